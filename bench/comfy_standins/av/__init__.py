"""Stand-in for PyAV, for an API-only ComfyUI on the GPU machine (bench/comfy_gpu_bundle.sh, bench/comfy_queue.py).

Why: ComfyUI 0.33 imports PyAV at start-up (comfy_api.latest's video and audio types, which nodes.py imports),
but only calls it inside video/audio nodes. PyAV's wheel is 34 MB (it bundles FFmpeg) and does not fit the
device's 64 MiB carry limit beside the rest, and the GPU image does not have it. GLM-Image's workflows and the
memory test pack use no video or audio node.

What it does: every `av` attribute and sub-module (`av.container.InputContainer`, `av.error.FFmpegError`, ...)
resolves to a placeholder, so the modules that name them import. Calling or instantiating any placeholder
raises ModuleNotFoundError with this explanation, so a workflow that does need PyAV fails loudly at that node.
bench/comfy_queue.py puts this folder on the server's PYTHONPATH only when the server's Python has no real PyAV.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

STANDIN = True
_MESSAGE = ("PyAV is not installed: this ComfyUI runs with the bench's PyAV stand-in (bench/comfy_standins), "
            "which has no video or audio support; install PyAV (`pip install av`) to use video/audio nodes")


class _Unavailable(Exception):
    """Base of every placeholder: a class (usable in annotations, isinstance and except clauses) that
    refuses to be used."""

    def __init__(self, *args, **kwargs):
        raise ModuleNotFoundError(_MESSAGE)


def _placeholder(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (_Unavailable,), {"__module__": module, "__qualname__": name})


class _StandinModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        # PyAV's lower-case names are sub-modules (av.error, av.audio.resampler), its CamelCase ones classes.
        value = importlib.import_module(full) if name[:1].islower() else _placeholder(full)
        setattr(self, name, value)
        return value

    def open(self, *args, **kwargs):  # noqa: A003 - the name PyAV uses
        raise ModuleNotFoundError(_MESSAGE)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import av.x.y` succeed with stand-in modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandinModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        parent, _, leaf = module.__name__.rpartition(".")
        setattr(sys.modules[parent], leaf, module)


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StandinModule
__version__ = "0+standin"
