"""Our pipeline stages as models ComfyUI's model management knows: one ModelPatcher per loaded stage.

ComfyUI can only make room for other nodes by unloading models it knows about: those that went through
`comfy.model_management.load_models_gpu([patcher])`. Each loaded stage of a `GlmImage` ("vision", "ar", "glyph",
"dit", "vae") is wrapped in a thin `nn.Module` holder (our stage modules define `device` / `dtype` as
read-only properties, and ModelPatcher writes `device`, `model_loaded_weight_memory`,
`lowvram_patch_counter`, ... onto the module it wraps) and given a `ModelPatcher` whose load device is the
model's device and whose offload device is ComfyUI's `unet_offload_device()`. When another node needs the
memory, ComfyUI unloads our patcher; the holder's `.to()` then takes the stage off the GPU the core's way
(into its host copy: one copy the first time, nothing afterwards) instead of converting each tensor, and the
next node of ours that needs the stage asks `load_models_gpu` for it again (one host-to-device copy).

The holder reports where the stage really is (`device`, `model_loaded_weight_memory`), so ComfyUI's accounting
stays true when the core itself moved a stage. The patchers live here, keyed weakly by the `GlmImage`: when
ComfyUI drops the loader's output, its patchers, holders and weights go with it (and ComfyUI's finalizer takes
them off its loaded list). Outside ComfyUI nothing here is used: `available()` is False.
"""
from __future__ import annotations

import weakref

import torch

from . import comfy_services


class GlmImageStage(torch.nn.Module):
    """What a ModelPatcher wraps: one pipeline stage as the holder's only child, so `state_dict()` and
    `named_modules()` (what ModelPatcher sizes) cover exactly the stage's weights, and the attributes
    ModelPatcher sets land on the holder, not on the stage module."""

    stage_name = "stage"

    def __init__(self, model, module: torch.nn.Module):
        super().__init__()
        self.stage_module = module
        self._owner = weakref.ref(model)
        self._loaded_bytes = 0

    @property
    def device(self) -> torch.device:
        return next(self.stage_module.parameters()).device

    @device.setter
    def device(self, value) -> None:  # ModelPatcher writes it; the truth is where the weights are
        pass

    @property
    def model_loaded_weight_memory(self) -> int:
        """What ModelPatcher last recorded as loaded, or 0 when the core has since moved the stage off the GPU."""
        owner = self._owner()
        return self._loaded_bytes if owner is not None and owner.on_device(self.stage_name) else 0

    @model_loaded_weight_memory.setter
    def model_loaded_weight_memory(self, value) -> None:
        self._loaded_bytes = int(value)

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        owner = self._owner()
        if owner is None or dtype is not None or device is None:
            return super().to(*args, **kwargs)
        if torch.device(device) == owner.device:
            owner.prepare([self.stage_name])  # back from the host copy (ComfyUI made the room)
        else:
            owner.release(self.stage_name)
        return self


# One class per stage so that ComfyUI's log ("Requested to load GlmImageDiTStage") says which one.
class GlmImageVisionStage(GlmImageStage):
    stage_name = "vision"


class GlmImageARStage(GlmImageStage):
    stage_name = "ar"


class GlmImageGlyphStage(GlmImageStage):
    stage_name = "glyph"


class GlmImageDiTStage(GlmImageStage):
    stage_name = "dit"


class GlmImageVAEStage(GlmImageStage):
    stage_name = "vae"


HOLDERS = {cls.stage_name: cls for cls in (GlmImageVisionStage, GlmImageARStage, GlmImageGlyphStage,
                                           GlmImageDiTStage, GlmImageVAEStage)}

# GlmImage -> {stage name: patcher}. Weak keys: the patchers live exactly as long as the model object.
_PATCHERS: "weakref.WeakKeyDictionary[object, dict[str, object]]" = weakref.WeakKeyDictionary()


def available() -> bool:
    """True inside ComfyUI (its ModelPatcher can be imported)."""
    return comfy_services.stage_patcher_class() is not None


def registered_patcher(model, stage: str):
    """The patcher of a stage if the stage is loaded and registered with ComfyUI, else None."""
    patcher = _PATCHERS.get(model, {}).get(stage)
    module = model.stage_modules().get(stage)
    if patcher is None or module is None or patcher.model.stage_module is not module:
        return None
    return patcher


def patcher_for(model, stage: str):
    """The patcher of a loaded stage, made on first use (and again if the stage was reloaded from disk)."""
    patcher = registered_patcher(model, stage)
    if patcher is None:
        module = model.stage_modules()[stage]
        patcher = comfy_services.stage_patcher_class()(
            HOLDERS[stage](model, module), load_device=model.device, offload_device=comfy_services.offload_device())
        _PATCHERS.setdefault(model, {})[stage] = patcher
    return patcher


def forget_unloaded(model) -> None:
    """Drop patchers whose stage the model no longer holds (`GlmImage.unload`), so that they do not keep
    its weights alive; ComfyUI's finalizer then removes them from its loaded list."""
    patchers = _PATCHERS.get(model)
    if patchers:
        for stage in [s for s in patchers if registered_patcher(model, s) is None]:
            del patchers[stage]


def registered_stages(model) -> dict[str, object]:
    """{stage: patcher} of the model's registered stages (for tests and diagnostics)."""
    return {stage: patcher for stage in list(_PATCHERS.get(model, {}))
            if (patcher := registered_patcher(model, stage)) is not None}


def offload_stage(model, stage: str) -> bool:
    """Move a loaded stage off the GPU: through its patcher when ComfyUI manages it (so ComfyUI's accounting
    says it is no longer loaded), else with the core's own offload. True if the stage was loaded."""
    if stage not in model.stage_modules():
        return False
    patcher = registered_patcher(model, stage)
    if patcher is not None:
        patcher.detach()  # what ComfyUI itself does to unload a model: the holder's .to(offload device)
    else:
        model.release(stage)
    return True
