"""Memory etiquette inside ComfyUI: one big stage on the GPU at a time, ComfyUI frees room first, and every
loaded stage is on ComfyUI's loaded-model list, so it can evict our stages when other nodes need the memory.
"""
from __future__ import annotations

from . import comfy_services, model_patcher

# Before a stage runs, our other stages leave the GPU: the 9B AR and the 7B DiT together (~34 GB in bf16)
# do not fit a 24 GB card, and the DiT never needs the AR's weights (the tokens carry everything).
_STAGES_OFFLOADED_BEFORE = {"vision": ("dit", "vae", "glyph"), "ar": ("vision", "dit", "vae", "glyph"),
                            "dit": ("vision", "ar")}
# The pipeline stages each node runs.
_STAGES_RUN_BY = {"vision": ("vision",), "ar": ("ar",), "dit": ("glyph", "dit", "vae")}


def make_room_for(model, node: str) -> None:
    """Bring this node's stages onto the model's device, with room made for them first.

    Our other stages leave the GPU first. Inside ComfyUI, stages never loaded before are read from disk
    straight onto the device after ComfyUI freed room for them (estimated from the files), then every stage
    of the node goes through `load_models_gpu`: ComfyUI moves back any that it evicted and lists them all as
    loaded models (ComfyUI's own loaders register a model read straight onto the GPU the same way). Outside
    ComfyUI the stages load lazily when the pipeline first uses them.
    """
    stages = _STAGES_RUN_BY[node]
    managed = model_patcher.available()
    if managed:
        model_patcher.forget_unloaded(model)
    offloaded = [other for other in _STAGES_OFFLOADED_BEFORE[node] if model_patcher.offload_stage(model, other)]
    if not managed:
        comfy_services.free_memory(_bytes_to_load(model, stages), model.device)
        return
    new = [stage for stage in stages if stage not in model.stage_modules()]
    if new:
        comfy_services.free_memory(_bytes_to_load(model, new), model.device)
        for stage in new:
            model.stage(stage)
    elif offloaded:
        comfy_services.soft_empty_cache()
    comfy_services.load_models([model_patcher.patcher_for(model, stage) for stage in stages])


def _bytes_to_load(model, stages) -> int:
    """Weight bytes the stages still have to bring onto the model's device (0 for those already there)."""
    loaded = model.stage_modules()
    total = 0
    for stage in stages:
        module = loaded.get(stage)
        if module is None or next(module.parameters()).device != model.device:
            total += model.stage_nbytes(stage)
    return total
