"""Load the pack the way ComfyUI's loader does: `<custom_nodes>/<any folder name>/__init__.py`, imported
through importlib under a module name made from its path, then read NODE_CLASS_MAPPINGS.

Mirrors the documented behaviour of ComfyUI's `nodes.load_custom_node` (V1 branch); written from its docs.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# What ComfyUI-Manager / the registry zip puts in the pack folder that the pack's code can reach.
PACK_CONTENT = ("__init__.py", "nodes", "glm_core", "web", "workflows", "pyproject.toml", "requirements.txt")


# Top-level packages of this repository that exist on sys.path in tests but not inside ComfyUI, where the pack
# lives under an arbitrary folder name: an absolute `import glm_core` there fails with ModuleNotFoundError.
REPO_TOP_LEVEL_PACKAGES = ("glm_core", "nodes")


class _BlockRepoPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in REPO_TOP_LEVEL_PACKAGES:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (inside ComfyUI the pack is not on sys.path: the pack must import "
                f"its own code with relative imports, e.g. `from ..glm_core import pipeline`)", name=fullname)
        return None


@contextlib.contextmanager
def as_in_comfyui():
    """While active, `import glm_core` / `import nodes` fail as they do inside ComfyUI (the repository's copies
    are hidden from sys.modules and blocked on sys.path); the pack's own relative imports are unaffected."""
    hidden = {name: module for name, module in sys.modules.items()
              if name.split(".")[0] in REPO_TOP_LEVEL_PACKAGES}
    for name in hidden:
        del sys.modules[name]
    blocker = _BlockRepoPackages()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


class PackLoadError(AssertionError):
    """The pack would show as IMPORT FAILED, or register nothing, in ComfyUI."""


@dataclass
class LoadedPack:
    folder: Path
    module_name: str
    module: object
    node_class_mappings: dict
    display_name_mappings: dict
    python_module: str  # what /object_info reports: "custom_nodes.<folder name>"
    warnings: list[str] = field(default_factory=list)


def copy_pack(custom_nodes_dir: Path, folder_name: str | None = None) -> Path:
    """Copy the pack's shipped content into custom_nodes/<folder_name> (default: a random, non-identifier name)."""
    folder_name = folder_name or f"glm-image.{secrets.token_hex(3)}-pack"  # dots and dashes, like real installs
    target = Path(custom_nodes_dir) / folder_name
    target.mkdir(parents=True)
    for name in PACK_CONTENT:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, target / name)
    return target


def load_pack(folder: Path) -> LoadedPack:
    """Import `folder/__init__.py` as ComfyUI does and return what it registers; PackLoadError if nothing."""
    folder = Path(folder)
    # ComfyUI names the module after the folder's full path with "." replaced, so no two packs clash and the
    # folder name never has to be a Python identifier; relative imports inside the pack still work.
    module_name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(module_name, folder / "__init__.py")
    if spec is None or spec.loader is None:
        raise PackLoadError(f"no importable __init__.py in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with as_in_comfyui():
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PackLoadError(f"IMPORT FAILED: {folder}: {type(exc).__name__}: {exc}") from exc

    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if hasattr(module, "comfy_entrypoint"):
        # ComfyUI would silently ignore comfy_entrypoint next to NODE_CLASS_MAPPINGS: a bug for us.
        raise PackLoadError(f"{folder} exports comfy_entrypoint; this pack uses the V1 contract only")
    if not mappings:
        raise PackLoadError(f"{folder} registers no nodes (NODE_CLASS_MAPPINGS is {mappings!r})")
    web_directory = getattr(module, "WEB_DIRECTORY", None)
    if web_directory is not None and not list((folder / web_directory).glob("*.js")):
        # ComfyUI serves WEB_DIRECTORY's .js files to the frontend only if the folder exists: no error, no script.
        raise PackLoadError(f"{folder}: WEB_DIRECTORY {web_directory!r} holds no .js files")
    display = dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {})
    return LoadedPack(folder=folder, module_name=module_name, module=module, node_class_mappings=dict(mappings),
                      display_name_mappings=display, python_module=f"custom_nodes.{folder.name}")


def unload_pack(pack: LoadedPack) -> None:
    """Drop the pack's modules from sys.modules (its package and every sub-module)."""
    for name in [n for n in sys.modules if n == pack.module_name or n.startswith(pack.module_name + ".")]:
        del sys.modules[name]
