"""Memory etiquette inside ComfyUI: one big stage on the GPU at a time, and ComfyUI frees room first."""
from __future__ import annotations

import torch

from . import comfy_services

# Before a stage runs, our other stages leave the GPU: the 9B AR and the 7B DiT together (~34 GB in bf16)
# do not fit a 24 GB card, and the DiT never needs the AR's weights (the tokens carry everything).
_STAGES_OFFLOADED_BEFORE = {"ar": ("dit", "vae", "glyph"), "dit": ("ar",)}
# The pipeline stages each node runs, and the checkpoint component folder behind each stage (spec §3).
_STAGES_RUN_BY = {"ar": ("ar",), "dit": ("glyph", "dit", "vae")}
_COMPONENT_OF_STAGE = {"ar": "vision_language_encoder", "glyph": "text_encoder", "dit": "transformer", "vae": "vae"}
_CHECKPOINT_ITEMSIZE = 2  # the big components are stored in bf16; fp32 weights take twice the file size


def make_room_for(model, node: str) -> None:
    """Offload our other stages, then ask ComfyUI to unload its own models until this node's stages fit."""
    for other in _STAGES_OFFLOADED_BEFORE[node]:
        model.offload(other)
    comfy_services.free_memory(_bytes_to_load(model, _STAGES_RUN_BY[node]), model.device)


def _bytes_to_load(model, stages) -> int:
    """Weight bytes the stages still have to bring onto the model's device (0 for those already there)."""
    loaded = model.stage_modules()
    total = 0
    for stage in stages:
        module = loaded.get(stage)
        if module is not None and next(module.parameters()).device == model.device:
            continue
        folder = model.checkpoint.component_dir(_COMPONENT_OF_STAGE[stage])
        on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        total += on_disk * max(1, torch.empty((), dtype=model.dtype).element_size() // _CHECKPOINT_ITEMSIZE)
    return total
