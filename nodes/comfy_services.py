"""The few ComfyUI runtime services the nodes use, imported when present, with fallbacks outside ComfyUI.

Every ComfyUI module is imported at call time, never at import time: the pack must import without
ComfyUI (tests, tools), and ComfyUI's own modules are already loaded when a node runs, so the import is
a dictionary lookup. Nothing here catches ComfyUI's interrupt exception.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

# Model folder key registered with folder_paths, so that `glm_image: /big/disk/glm` in
# extra_model_paths.yaml works without any code of ours.
MODEL_FOLDER_KEY = "glm_image"
# GLM-Image is published in diffusers layout, so folders under models/diffusers/ are scanned too.
SCANNED_FOLDER_KEYS = (MODEL_FOLDER_KEY, "diffusers")
PREVIEW_MAX_SIZE = 512  # ComfyUI's default --preview-size


def _folder_paths():
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def _model_management():
    try:
        import comfy.model_management as model_management
    except ImportError:
        return None
    return model_management


def _model_patcher():
    try:
        import comfy.model_patcher as model_patcher
    except ImportError:
        return None
    return model_patcher


def _comfy_utils():
    try:
        import comfy.utils as comfy_utils
    except ImportError:
        return None
    return comfy_utils


def previews_on() -> bool:
    """Whether ComfyUI shows previews while sampling: its `--preview-method` ("none" by default), or the queue's
    own choice, which ComfyUI writes into the same setting before the prompt runs. Our decode's per-step preview
    runs the VAE decoder and waits for the GPU every step, so it is made only when previews are shown."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return False
    return getattr(args, "preview_method", LatentPreviewMethod.NoPreviews) != LatentPreviewMethod.NoPreviews


# --- folders --------------------------------------------------------------------------------------

def register_model_folder() -> None:
    """Add models/glm_image/ under the key `glm_image` (a no-op outside ComfyUI; ComfyUI de-duplicates)."""
    folder_paths = _folder_paths()
    if folder_paths is not None:
        folder_paths.add_model_folder_path(MODEL_FOLDER_KEY, os.path.join(folder_paths.models_dir, MODEL_FOLDER_KEY))


def model_search_roots() -> list[Path]:
    """Every folder registered under `glm_image` and `diffusers`, in ComfyUI's order, without duplicates.

    Outside ComfyUI: ./models/glm_image and ./models/diffusers relative to the working directory.
    """
    folder_paths = _folder_paths()
    roots: list[Path] = []
    for key in SCANNED_FOLDER_KEYS:
        if folder_paths is None:
            paths = [os.path.join("models", key)]
        elif key in folder_paths.folder_names_and_paths:
            paths = folder_paths.get_folder_paths(key)
        else:
            paths = []
        for path in paths:
            if Path(path) not in roots:
                roots.append(Path(path))
    return roots


def input_directory() -> Path:
    folder_paths = _folder_paths()
    return Path(folder_paths.get_input_directory() if folder_paths else "input")


def output_directory() -> Path:
    folder_paths = _folder_paths()
    return Path(folder_paths.get_output_directory() if folder_paths else "output")


# --- devices and memory ---------------------------------------------------------------------------

def torch_device():
    """ComfyUI's compute device (respects --cpu, --directml, ...); None outside ComfyUI = the core's default."""
    model_management = _model_management()
    return model_management.get_torch_device() if model_management else None


def free_memory(bytes_needed: int, device) -> None:
    """Ask ComfyUI to unload its own models until `bytes_needed` are free on `device`, then release
    cached blocks. Called before one of our stages moves its weights to the GPU."""
    model_management = _model_management()
    if model_management is None or device is None:
        return
    model_management.free_memory(bytes_needed, device)
    model_management.soft_empty_cache()


def gpu_memory_within_reach(device) -> int | None:
    """The GPU memory ComfyUI could make free on `device`: what is free now plus what the models it has loaded
    there hold (it unloads them when a node needs the room), less the memory it keeps in reserve. None outside
    ComfyUI or off the GPU (the core then reads the free memory itself)."""
    model_management = _model_management()
    if model_management is None or device is None or getattr(device, "type", None) != "cuda":
        return None
    loaded = 0
    for entry in list(getattr(model_management, "current_loaded_models", [])):
        try:
            if entry.device == device and entry.model is not None:
                loaded += int(entry.model_loaded_memory())
        except Exception:  # noqa: BLE001 - an entry whose model is gone or half torn down holds nothing we can count
            continue
    free = int(model_management.get_free_memory(device))
    return max(free + loaded - int(model_management.extra_reserved_memory()), 0)


def soft_empty_cache() -> None:
    model_management = _model_management()
    if model_management is not None:
        model_management.soft_empty_cache()


def offload_device():
    """Where ComfyUI puts a diffusion model it unloads: the CPU, or the GPU itself under --highvram /
    --gpu-only (then nothing leaves the GPU, as the user asked)."""
    return _model_management().unet_offload_device()


_STAGE_PATCHER_CLASSES: dict = {}


def stage_patcher_class():
    """ComfyUI's ModelPatcher, specialised for a stage that runs whole or not at all (None outside ComfyUI).

    Our stages are plain torch modules, not built from comfy.ops, so they cannot run with some layers left on
    the CPU (ComfyUI's "lowvram" partial loading). Every way ComfyUI moves weights ends in the holder's `.to()`
    (`nodes.model_patcher.GlmImageStage`), which moves the whole stage the core's way (one flat copy):
    - load / partially_load bring the whole stage (ComfyUI's CLIP and VAE do the same through
      `force_full_load`; this also covers --novram, which would otherwise load nothing);
    - partially_unload frees nothing, so ComfyUI's LoadedModel.model_unload falls through to `detach()`, whose
      unpatch_model moves the whole stage to the offload device.
    The holder reports where the stage really is, so the accounting also holds when the core moved it.
    """
    model_patcher = _model_patcher()
    if model_patcher is None or _model_management() is None:
        return None
    base = model_patcher.ModelPatcher
    cls = _STAGE_PATCHER_CLASSES.get(base)
    if cls is None:
        class GlmImageStagePatcher(base):
            def load(self, device_to=None, *args, **kwargs):
                if device_to is not None:
                    self.model.to(device_to)
                    self.model.model_loaded_weight_memory = self.model_size()
                    self.model.model_lowvram = False

            def partially_load(self, device_to, extra_memory=0, *args, **kwargs):
                before = self.model.model_loaded_weight_memory
                self.load(device_to)
                return self.model.model_loaded_weight_memory - before

            def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
                return 0

            def unpatch_model(self, device_to=None, unpatch_weights=True):
                if unpatch_weights and device_to is not None:
                    self.model.to(device_to)
                    self.model.model_loaded_weight_memory = 0

        cls = _STAGE_PATCHER_CLASSES[base] = GlmImageStagePatcher
    return cls


def placement_from_flags() -> str:
    """The placement ComfyUI's memory flags ask for: --highvram / --gpu-only keep everything on the GPU,
    --lowvram / --novram one stage at a time, otherwise "auto" (outside ComfyUI too)."""
    model_management = _model_management()
    state = getattr(getattr(model_management, "vram_state", None), "name", "")
    return {"HIGH_VRAM": "gpu", "LOW_VRAM": "sequential", "NO_VRAM": "sequential"}.get(state, "auto")


def load_models(patchers) -> None:
    """ComfyUI makes room (unloading its own models, or ours it no longer needs) and moves these patchers'
    models whole onto their load device; they are then on its loaded-model list, where it can evict them."""
    _model_management().load_models_gpu(list(patchers), force_full_load=True)


# --- progress and interrupt -----------------------------------------------------------------------

def interrupt_check() -> Callable[[], None] | None:
    """ComfyUI's "stop" button: a callable that raises its InterruptProcessingException when pressed."""
    model_management = _model_management()
    return model_management.throw_exception_if_processing_interrupted if model_management else None


class Progress:
    """ComfyUI's progress bar for the running node; created on the first update, when the total is known."""

    def __init__(self):
        self._bar = None

    def __call__(self, done: int, total: int, preview_image=None) -> None:
        if self._bar is None:
            comfy_utils = _comfy_utils()
            if comfy_utils is None:
                return
            self._bar = comfy_utils.ProgressBar(total)
        preview = None if preview_image is None else ("JPEG", preview_image, PREVIEW_MAX_SIZE)
        self._bar.update_absolute(done, total, preview)
