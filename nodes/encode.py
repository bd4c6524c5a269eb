"""Encode Prompt/References: the prompt, the output size and up to four reference inputs -> GLM_IMAGE_COND."""
from __future__ import annotations

from .images import image_batch_to_pil
from .memory import make_room_for
from .types import CATEGORY, GLM_IMAGE_COND, GLM_IMAGE_MODEL

REFERENCE_INPUTS = ("image_1", "image_2", "image_3", "image_4")
RECOMMENDED_SIZES = "1024×1024, 1280×1280, 1568×1056, 1056×1568, 1472×1088, 1088×1472, 1728×960, 960×1728"
_SIZE_TOOLTIP = (
    "{side} of the generated image in pixels: a multiple of 32 between 512 and 2048. Recommended "
    f"(width×height): {RECOMMENDED_SIZES}.")


class GlmImageEncode:
    DESCRIPTION = (
        "Sets what to generate: the prompt, the output size and optional reference images. No reference: "
        "text-to-image. One reference: edit it as the prompt says. Several: combine subjects. Text in "
        "\"double quotes\" in the prompt is rendered as glyphs.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (GLM_IMAGE_COND,)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("Prompt, size and references; connect the same cond to AR Generate Tokens and DiT Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 512, "max": 2048, "step": 32}
        reference = ("IMAGE", {"tooltip": "Optional reference image. A batch here counts as several references; "
                                          "references are used in the order image_1, image_2, ..."})
        return {
            "required": {
                "model": (GLM_IMAGE_MODEL, {"tooltip": "The model from Load GLM-Image."}),
                "prompt": ("STRING", {
                    "multiline": True, "dynamicPrompts": True,
                    "tooltip": "What to generate, or how to change the reference images. Put text that must "
                               "appear in the image in \"double quotes\"."}),
                "width": ("INT", {**size, "tooltip": _SIZE_TOOLTIP.format(side="Width")}),
                "height": ("INT", {**size, "tooltip": _SIZE_TOOLTIP.format(side="Height")}),
            },
            "optional": {name: reference for name in REFERENCE_INPUTS},
        }

    def encode(self, model, prompt, width, height, image_1=None, image_2=None, image_3=None, image_4=None):
        from ..glm_core.pipeline import encode_prompt

        references = [picture for images in (image_1, image_2, image_3, image_4) if images is not None
                      for picture in image_batch_to_pil(images)]
        if references:
            make_room_for(model, "vision")
        return (encode_prompt(model, prompt, width, height, references),)
