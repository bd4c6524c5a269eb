"""DiT Decode: the diffusion decoder turns a token grid into pixels, with a preview at every step."""
from __future__ import annotations

from . import comfy_services
from .images import image_batch_to_pil
from .memory import make_room_for
from .types import CATEGORY, GLM_IMAGE_COND, GLM_IMAGE_MODEL, GLM_IMAGE_TOKENS


class GlmImageDiTDecode:
    DESCRIPTION = (
        "Runs the 7B diffusion decoder: it paints the image that the token grid lays out, following the prompt "
        "(and the reference images). The AR stage's weights leave the GPU first.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The generated images, one per token grid.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..glm_core.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

        return {
            "required": {
                "model": (GLM_IMAGE_MODEL, {"tooltip": "The model from Load GLM-Image."}),
                "cond": (GLM_IMAGE_COND, {"tooltip": "The same cond that produced the tokens (same size and "
                                                     "number of references)."}),
                "tokens": (GLM_IMAGE_TOKENS, {"tooltip": "Token grid from AR Generate Tokens or Load Tokens."}),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 200,
                                  "tooltip": "Denoising steps. 50 is the model's default; fewer is faster and "
                                             "softer."}),
                "guidance": ("FLOAT", {
                    "default": DEFAULT_GUIDANCE, "min": 1.0, "max": 10.0, "step": 0.1, "round": 0.01,
                    "tooltip": "Classifier-free guidance scale. 1.5 is the model's default; 1.0 turns guidance "
                               "off (one pass per step, twice as fast)."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                    "tooltip": "Seed of the starting noise. Changing it varies details, not the layout."}),
            }
        }

    def decode(self, model, cond, tokens, steps, guidance, seed):
        from ..glm_core.pipeline import check_decode_inputs, decode

        # A user error (tokens from another size or other references) must not load 7B of weights first.
        check_decode_inputs(model, cond, tokens)
        make_room_for(model, "dit")
        progress = comfy_services.Progress()

        def on_step(step, total, preview_rgb):
            progress(step, total, None if preview_rgb is None else image_batch_to_pil(preview_rgb[:1])[0])

        previews = comfy_services.previews_on()
        images = decode(model, cond, tokens, steps=steps, guidance=guidance, seed=seed,
                        interrupt=comfy_services.interrupt_check(), progress=None if previews else progress,
                        on_step=on_step if previews else None)
        return (images,)
