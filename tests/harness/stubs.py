"""Stand-ins for the ComfyUI modules the pack may import: `folder_paths`, `comfy.utils`, `comfy.model_management`,
`comfy.model_patcher`, `comfy.cli_args`.

Each stub offers exactly what the pack calls, written from ComfyUI's documented behaviour (no ComfyUI code).
Anything else the pack asks for is recorded in `ComfyStubs.violations` and raises AttributeError, so a test
notices a pack that depends on more of ComfyUI than the harness models (and than this file documents).
Every call is recorded in `ComfyStubs.calls` as (module, function, args) for the etiquette tests.
"""
from __future__ import annotations

import contextlib
import enum
import os
import sys
import types
import weakref
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

    MODULE_NAMES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "comfy.model_patcher",
                    "comfy.cli_args")

    def __init__(self, base_dir: Path):
        self.calls: list[tuple[str, str, tuple]] = []
        self.violations: list[str] = []
        self.progress_updates: list[tuple[int, int, object]] = []  # (value, total, preview) via the global hook
        self.progress_hook = None  # extra hook(value, total, preview), e.g. a test pressing "cancel"
        self.interrupted = False
        # ComfyUI's loaded-model list: weak references to patchers, newest first (ComfyUI's LoadedModel holds
        # its patcher weakly too, so a pack that does not keep its patchers alive loses them here as there).
        self._loaded: list[weakref.ref] = []
        self.modules = {name: StubModule(name, self) for name in self.MODULE_NAMES}
        self._build_folder_paths()
        self._build_model_management()
        self._build_model_patcher()
        self._build_utils()
        self._build_cli_args()
        self.modules["comfy"].__path__ = []  # a package, so `import comfy.utils` works
        self.modules["comfy"].utils = self.modules["comfy.utils"]
        self.modules["comfy"].model_management = self.modules["comfy.model_management"]
        self.modules["comfy"].model_patcher = self.modules["comfy.model_patcher"]
        self.modules["comfy"].cli_args = self.modules["comfy.cli_args"]
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
        self._loaded.clear()  # a fresh ComfyUI has no models loaded
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

    # -- what "another node" does to our models ------------------------------------------------------

    def loaded_patchers(self) -> list:
        """The live patchers on the loaded-model list, newest first (`comfy.model_management.loaded_models()`)."""
        self._loaded[:] = [ref for ref in self._loaded if ref() is not None]
        return [ref() for ref in self._loaded]

    def evict(self, patcher, memory_to_free=None) -> bool:
        """What ComfyUI does to a loaded model when another model needs room (LoadedModel.model_unload): with
        a byte count below the model's loaded size, first a partial unload; if that freed too little (or no
        count is given), a full `detach()` to the offload device, and the model leaves the loaded list.
        True if the model was fully unloaded."""
        self._record("comfy.model_management", "evict", type(patcher.model).__name__, memory_to_free)
        if memory_to_free is not None and memory_to_free < patcher.loaded_size():
            if patcher.partially_unload(patcher.offload_device, memory_to_free) >= memory_to_free:
                return False
        patcher.detach(unpatch_all=True)
        self._loaded[:] = [ref for ref in self._loaded if ref() is not None and ref() is not patcher]
        return True

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

        def unet_offload_device():
            # --cpu / normal VRAM: the CPU (--highvram / --gpu-only would keep models on the GPU).
            return torch.device(os.environ.get("GLM_IMAGE_TEST_OFFLOAD_DEVICE", "cpu"))

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):
            # ComfyUI: make room on each model's load device (unloading other models; not modelled here:
            # free_memory only records), then load each model (LoadedModel.model_load -> partially_load, with
            # "everything" as the budget when force_full_load or when the device is the CPU) and put it at the
            # front of the loaded list. A model already on the list is moved to the front, not added twice.
            stubs._record("comfy.model_management", "load_models_gpu",
                          tuple(type(m.model).__name__ for m in models), force_full_load)
            for patcher in models:
                budget = 1e32 if force_full_load or patcher.load_device.type == "cpu" else patcher.model_size() // 2
                patcher.partially_load(patcher.load_device, budget)
                stubs._loaded[:] = [ref for ref in stubs._loaded if ref() is not None and ref() is not patcher]
                stubs._loaded.insert(0, weakref.ref(patcher))

        def loaded_models(only_currently_used=False):
            return stubs.loaded_patchers()

        def unload_all_models():
            # ComfyUI: free_memory(1e30, get_torch_device()) -> every model on the device is unloaded.
            stubs._record("comfy.model_management", "unload_all_models")
            for patcher in stubs.loaded_patchers():
                stubs.evict(patcher, 1e30)

        class VRAMState(enum.Enum):  # ComfyUI's, set from --lowvram / --highvram / ... at start-up
            DISABLED = 0
            NO_VRAM = 1
            LOW_VRAM = 2
            NORMAL_VRAM = 3
            HIGH_VRAM = 4
            SHARED = 5

        module.VRAMState = VRAMState
        module.vram_state = VRAMState.NORMAL_VRAM
        for function in (get_torch_device, free_memory, soft_empty_cache, interrupt_current_processing,
                         processing_interrupted, throw_exception_if_processing_interrupted, unet_offload_device,
                         load_models_gpu, loaded_models, unload_all_models):
            setattr(module, function.__name__, function)

    # -- comfy.model_patcher --------------------------------------------------------------------------

    def _build_model_patcher(self) -> None:
        module = self.modules["comfy.model_patcher"]
        stubs = self
        import torch

        class ModelPatcher:
            """comfy.model_patcher.ModelPatcher as model management meets it. Like ComfyUI's, it writes its
            bookkeeping onto the wrapped module (`device` when missing or None, `model_loaded_weight_memory`,
            `lowvram_patch_counter`, `model_lowvram`, `current_weight_patches_uuid`; `device` again on every
            load and unload), so wrapping a module whose `device` is a read-only property fails here as there.
            A partial load moves only the leaf modules that fit the budget; a partial unload moves leaf modules
            to the offload device until enough is freed (ComfyUI does both, for models built from comfy.ops)."""

            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                stubs._record("comfy.model_patcher", "ModelPatcher", type(model).__name__, load_device,
                              offload_device)
                self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
                if getattr(self.model, "device", None) is None:
                    self.model.device = offload_device
                for name, default in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                                      ("model_lowvram", False), ("current_weight_patches_uuid", None)):
                    if not hasattr(self.model, name):
                        setattr(self.model, name, default)
                self.model_size()

            def model_size(self):
                if self.size <= 0:
                    self.size = sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())
                return self.size

            def loaded_size(self):
                return self.model.model_loaded_weight_memory

            def current_loaded_device(self):
                return self.model.device

            def _leaves(self):
                return [(sum(p.nelement() * p.element_size() for p in m.parameters(recurse=False)), m)
                        for m in self.model.modules() if next(m.parameters(recurse=False), None) is not None]

            def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
                stubs._record("comfy.model_patcher", "partially_load", type(self.model).__name__, device_to)
                before = self.model.model_loaded_weight_memory
                if extra_memory + before > self.model_size():
                    self.model.to(device_to)
                    self.model.model_loaded_weight_memory = self.model_size()
                    self.model.model_lowvram = False
                else:  # lowvram: only what fits is moved; the rest stays where it is
                    used = before
                    for size, leaf in sorted(self._leaves(), key=lambda entry: -entry[0]):
                        if used + size <= before + extra_memory:
                            leaf.to(device_to)
                            used += size
                    self.model.model_loaded_weight_memory = used
                    self.model.model_lowvram = True
                self.model.device = device_to
                return self.model.model_loaded_weight_memory - before

            def partially_unload(self, device_to, memory_to_free=0):
                stubs._record("comfy.model_patcher", "partially_unload", type(self.model).__name__, device_to)
                freed = 0
                for size, leaf in sorted(self._leaves(), key=lambda entry: entry[0]):
                    if freed > memory_to_free:
                        break
                    leaf.to(device_to)
                    freed += size
                self.model.model_lowvram = True
                self.model.model_loaded_weight_memory -= freed
                return freed

            def detach(self, unpatch_all=True):
                stubs._record("comfy.model_patcher", "detach", type(self.model).__name__, unpatch_all)
                if unpatch_all:
                    self.model.to(self.offload_device)
                    self.model.device = self.offload_device
                    self.model.model_loaded_weight_memory = 0
                    self.model.model_lowvram = False
                return self.model

        module.ModelPatcher = ModelPatcher

    # -- comfy.utils ----------------------------------------------------------------------------------

    def _build_cli_args(self) -> None:
        """comfy.cli_args: the parsed command line `args`; only `preview_method` is modelled. ComfyUI's default is
        "none" (`--preview-method`); a queue's own choice (extra_data "preview_method") is written into the same
        attribute by ComfyUI before the prompt runs (0.33's latent_preview.set_preview_method)."""
        module = self.modules["comfy.cli_args"]

        class LatentPreviewMethod(enum.Enum):
            NoPreviews = "none"
            Auto = "auto"
            Latent2RGB = "latent2rgb"
            TAESD = "taesd"

        module.LatentPreviewMethod = LatentPreviewMethod
        module.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews)

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
