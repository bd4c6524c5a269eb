"""Stand-ins for the ComfyUI modules the pack may import: `folder_paths`, `comfy.utils`, `comfy.model_management`.

Each stub offers exactly what the pack calls, written from ComfyUI's documented behaviour (no ComfyUI code).
Anything else the pack asks for is recorded in `ComfyStubs.violations` and raises AttributeError, so a test
notices a pack that depends on more of ComfyUI than the harness models (and than this file documents).
Every call is recorded in `ComfyStubs.calls` as (module, function, args) for the etiquette tests.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path


class InterruptProcessingException(Exception):
    """What ComfyUI raises when the user presses "cancel" (comfy.model_management)."""


class StubModule(types.ModuleType):
    """A module whose unknown attributes fail loudly (and are recorded) instead of silently existing."""

    def __init__(self, name: str, stubs: "ComfyStubs"):
        super().__init__(name)
        self._stubs = stubs

    def __getattr__(self, attribute: str):
        if not attribute.startswith("__"):
            self._stubs.violations.append(f"{self.__name__}.{attribute}")
        raise AttributeError(
            f"the test harness's stub of {self.__name__!r} has no {attribute!r}: the pack uses a ComfyUI API "
            f"that the harness does not model; add it to tests/harness/stubs.py after checking ComfyUI's docs")


class ComfyStubs:
    """One set of stub modules; `install()` puts them in sys.modules, `configure(base)` points folders at `base`."""

    MODULE_NAMES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management")

    def __init__(self, base_dir: Path):
        self.calls: list[tuple[str, str, tuple]] = []
        self.violations: list[str] = []
        self.progress_updates: list[tuple[int, int, object]] = []  # (value, total, preview) via the global hook
        self.progress_hook = None  # extra hook(value, total, preview), e.g. a test pressing "cancel"
        self.interrupted = False
        self.modules = {name: StubModule(name, self) for name in self.MODULE_NAMES}
        self._build_folder_paths()
        self._build_model_management()
        self._build_utils()
        self.modules["comfy"].__path__ = []  # a package, so `import comfy.utils` works
        self.modules["comfy"].utils = self.modules["comfy.utils"]
        self.modules["comfy"].model_management = self.modules["comfy.model_management"]
        self.configure(base_dir)

    # -- set-up ---------------------------------------------------------------------------------------

    def configure(self, base_dir: Path) -> None:
        """Fresh ComfyUI folders under base_dir (models/, input/, output/, temp/) and empty records.

        Model folders that the pack registered under the old models_dir (at import, once, as in ComfyUI) are
        carried over to the new one, as if ComfyUI had started from base_dir.
        """
        base_dir = Path(base_dir)
        folder_paths = self.modules["folder_paths"]
        old_models_dir = Path(folder_paths.__dict__.get("models_dir", base_dir / "models"))
        old_table = folder_paths.__dict__.get("folder_names_and_paths", {})
        folder_paths.base_path = str(base_dir)
        folder_paths.models_dir = str(base_dir / "models")
        # ComfyUI registers `diffusers` with the pseudo-extension "folder" (its entries are directories).
        folder_paths.folder_names_and_paths = {"diffusers": ([str(base_dir / "models" / "diffusers")], {"folder"})}
        for key, (paths, extensions) in old_table.items():
            if key != "diffusers":
                folder_paths.folder_names_and_paths[key] = (
                    [str(base_dir / "models" / Path(p).relative_to(old_models_dir))
                     if Path(p).is_relative_to(old_models_dir) else p for p in paths], set(extensions))
        self.directories = {name: base_dir / name for name in ("input", "output", "temp")}
        for path in self.directories.values():
            path.mkdir(parents=True, exist_ok=True)
        self.reset_records()

    def reset_records(self) -> None:
        self.calls.clear()
        self.violations.clear()
        self.progress_updates.clear()
        self.progress_hook = None
        self.interrupted = False

    @contextlib.contextmanager
    def installed(self):
        """The stubs in sys.modules for the duration (whatever was there before is put back)."""
        saved = {name: sys.modules.get(name) for name in self.MODULE_NAMES}
        sys.modules.update(self.modules)
        try:
            yield self
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module

    def _record(self, module: str, function: str, *args) -> None:
        self.calls.append((module, function, args))

    def called(self, function: str) -> list[tuple]:
        return [args for _module, name, args in self.calls if name == function]

    # -- folder_paths ---------------------------------------------------------------------------------

    def _build_folder_paths(self) -> None:
        module = self.modules["folder_paths"]
        stubs = self

        def add_model_folder_path(folder_name, full_folder_path, is_default=False):
            # ComfyUI: append (or prepend when is_default) to an existing key without duplicates,
            # or create the key with an empty extension set (= any file).
            stubs._record("folder_paths", "add_model_folder_path", folder_name, full_folder_path, is_default)
            table = module.folder_names_and_paths
            if folder_name not in table:
                table[folder_name] = ([full_folder_path], set())
                return
            paths = table[folder_name][0]
            if full_folder_path in paths:
                if is_default:
                    paths.remove(full_folder_path)
                    paths.insert(0, full_folder_path)
            elif is_default:
                paths.insert(0, full_folder_path)
            else:
                paths.append(full_folder_path)

        def get_folder_paths(folder_name):
            stubs._record("folder_paths", "get_folder_paths", folder_name)
            return list(module.folder_names_and_paths[folder_name][0])

        def directory_getter(name):
            def get_directory():
                stubs._record("folder_paths", f"get_{name}_directory")
                return str(stubs.directories[name])
            get_directory.__name__ = f"get_{name}_directory"
            return get_directory

        module.add_model_folder_path = add_model_folder_path
        module.get_folder_paths = get_folder_paths
        module.get_input_directory = directory_getter("input")
        module.get_output_directory = directory_getter("output")
        module.get_temp_directory = directory_getter("temp")

    # -- comfy.model_management -----------------------------------------------------------------------

    def _build_model_management(self) -> None:
        module = self.modules["comfy.model_management"]
        stubs = self
        import torch

        module.InterruptProcessingException = InterruptProcessingException

        def get_torch_device():
            stubs._record("comfy.model_management", "get_torch_device")
            return torch.device(os.environ.get("GLM_IMAGE_TEST_DEVICE", "cpu"))

        def free_memory(memory_required, device, keep_loaded=()):
            stubs._record("comfy.model_management", "free_memory", memory_required, device)

        def soft_empty_cache(force=False):
            stubs._record("comfy.model_management", "soft_empty_cache")

        def interrupt_current_processing(value=True):
            stubs.interrupted = value

        def processing_interrupted():
            return stubs.interrupted

        def throw_exception_if_processing_interrupted():
            stubs._record("comfy.model_management", "throw_exception_if_processing_interrupted")
            if stubs.interrupted:
                stubs.interrupted = False  # ComfyUI clears the flag as it raises
                raise InterruptProcessingException()

        for function in (get_torch_device, free_memory, soft_empty_cache, interrupt_current_processing,
                         processing_interrupted, throw_exception_if_processing_interrupted):
            setattr(module, function.__name__, function)

    # -- comfy.utils ----------------------------------------------------------------------------------

    def _build_utils(self) -> None:
        module = self.modules["comfy.utils"]
        stubs = self

        class ProgressBar:
            """comfy.utils.ProgressBar: absolute/relative updates go to the server's global hook, which in
            ComfyUI also checks the interrupt flag."""

            def __init__(self, total, node_id=None):
                stubs._record("comfy.utils", "ProgressBar", total)
                self.total = total
                self.current = 0

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                stubs.progress_updates.append((self.current, self.total, preview))
                if stubs.progress_hook is not None:
                    stubs.progress_hook(self.current, self.total, preview)

            def update(self, value):
                self.update_absolute(self.current + value)

        module.ProgressBar = ProgressBar
