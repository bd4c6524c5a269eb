"""Memory etiquette inside ComfyUI: one big stage on the GPU at a time, and ComfyUI frees room first."""
from __future__ import annotations

from . import comfy_services

# Before a stage runs, our other stages leave the GPU: the 9B AR and the 7B DiT together (~34 GB in bf16)
# do not fit a 24 GB card, and the DiT never needs the AR's weights (the tokens carry everything).
_STAGES_OFFLOADED_BEFORE = {"ar": ("dit", "vae", "glyph"), "dit": ("ar",)}


def make_room_for(model, stage: str) -> None:
    """Offload our other stages, then ask ComfyUI to unload its own models until `stage` fits."""
    for other in _STAGES_OFFLOADED_BEFORE[stage]:
        model.offload(other)
    comfy_services.empty_cache()
    comfy_services.free_memory(model.stage_weight_bytes(stage), comfy_services.torch_device())
