"""Memory etiquette inside ComfyUI: ComfyUI frees room first, and every loaded stage is on ComfyUI's
loaded-model list, so it can evict our stages when other nodes need the memory.
"""
from __future__ import annotations

from . import comfy_services, model_patcher, recent_model

# Asking ComfyUI for this much makes it unload every model it holds on the device.
EVERYTHING = 1 << 62

# Under placement "sequential" our other stages leave the GPU before a node's stages load.
_STAGES_OFFLOADED_BEFORE = {"vision": ("dit", "vae", "glyph"), "ar": ("vision", "dit", "vae", "glyph"),
                            "dit": ("vision", "ar")}
# The pipeline stages each node runs.
_STAGES_RUN_BY = {"vision": ("vision",), "ar": ("ar",), "dit": ("glyph", "dit", "vae")}


def make_room_for(model, node: str, working_bytes: int = 0) -> None:
    """Bring this node's stages onto the model's device, with room made for them first.

    Inside ComfyUI, ComfyUI makes the room (`free_memory`, asked for the stages' weights plus the core's
    headroom: it unloads the least recently used models, ours included, through their patchers; asked again for
    all of it when the device still falls short of the weights), then the core loads what was never loaded and
    brings back what was moved off, and every stage of the node goes through `load_models_gpu`, so ComfyUI lists
    them as loaded models it may evict later. Under --lowvram / --novram our other stages leave first ("sequential").
    Outside ComfyUI the core makes room itself when the pipeline asks for the stages.
    """
    stages = _STAGES_RUN_BY[node]
    recent_model.touch(model)
    if not model_patcher.available():
        return
    model_patcher.forget_unloaded(model)
    if model.placement == "sequential":
        for other in _STAGES_OFFLOADED_BEFORE[node]:
            model_patcher.offload_stage(model, other)
    from ..glm_core.pipeline import HEADROOM_BYTES  # at call time: importing the pack loads no model code

    needed = _bytes_to_load(model, stages) + working_bytes
    comfy_services.free_memory(needed + HEADROOM_BYTES if needed else 0, model.device)
    if needed and falls_short(model.device, needed):
        # ComfyUI counts what its dynamic-VRAM models could hand back as free and unloads them only in part: once
        # it had freed "enough", an H200 under a 24 GB budget had 14.0 GB free for the DiT's 14.3 GB (2026-11-30).
        comfy_services.free_memory(EVERYTHING, model.device)
    model.prepare(stages)
    comfy_services.load_models([model_patcher.patcher_for(model, stage) for stage in stages])


def falls_short(device, nbytes: int) -> bool:
    """Whether the GPU `device` has less than `nbytes` free for a new allocation now (never true off the GPU)."""
    from ..glm_core.memory import free_bytes

    return getattr(device, "type", None) == "cuda" and free_bytes(device) < nbytes


def _bytes_to_load(model, stages) -> int:
    """Weight bytes the stages still have to bring onto the model's device (0 for those already there)."""
    return sum(model.stage_nbytes(stage) for stage in stages if not model.on_device(stage))
