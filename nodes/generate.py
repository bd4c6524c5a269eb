"""AR Generate Tokens: the autoregressive prior writes the image's token grid (the slow, LLM-like stage)."""
from __future__ import annotations

from . import comfy_services
from .memory import make_room_for
from .types import CATEGORY, GLM_IMAGE_COND, GLM_IMAGE_MODEL, GLM_IMAGE_TOKENS


class GlmImageGenerateTokens:
    DESCRIPTION = (
        "Runs the 9B autoregressive prior: it writes the image layout as a grid of visual tokens, one token at a "
        "time (about 1300 at 1024×1024). The result is cached by ComfyUI, so changing only DiT Decode settings "
        "does not run this again.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = (GLM_IMAGE_TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The token grid (and its size and reference info); decode it with DiT Decode, save it with "
                       "Save Tokens, or look at it with Preview Tokens.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..glm_core.ar.config import MODEL_CARD_SAMPLING

        return {
            "required": {
                "model": (GLM_IMAGE_MODEL, {"tooltip": "The model from Load GLM-Image."}),
                "cond": (GLM_IMAGE_COND, {"tooltip": "Prompt, size and references from Encode Prompt/References."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                    "tooltip": "Seed of the token sampling; the same seed and inputs give the same tokens."}),
                "temperature": ("FLOAT", {
                    "default": MODEL_CARD_SAMPLING.temperature, "min": 0.05, "max": 2.0, "step": 0.05,
                    "tooltip": "Sampling temperature. Lower: safer, more uniform layouts; higher: more varied. "
                               "The model is tuned for 0.9; greedy-like low values can degrade the image."}),
                "top_p": ("FLOAT", {
                    "default": MODEL_CARD_SAMPLING.top_p, "min": 0.05, "max": 1.0, "step": 0.05,
                    "tooltip": "Nucleus sampling: only the most likely tokens covering this probability mass are "
                               "kept. 1.0 disables it."}),
                "top_k": ("INT", {
                    "default": MODEL_CARD_SAMPLING.top_k, "min": 0, "max": 16512,
                    "tooltip": "Only the k most likely tokens are kept at each step; 0 disables the limit."}),
                "batch_size": ("INT", {
                    "default": 1, "min": 1, "max": 16,
                    "tooltip": "Number of token grids sampled together (seeds seed, seed+1, ...); DiT Decode "
                               "then makes one image per grid."}),
            }
        }

    def generate(self, model, cond, seed, temperature, top_p, top_k, batch_size):
        from ..glm_core.pipeline import generate_tokens

        make_room_for(model, "ar")
        tokens = generate_tokens(
            model, cond, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
            progress=comfy_services.Progress(), interrupt=comfy_services.interrupt_check())
        return (tokens,)
