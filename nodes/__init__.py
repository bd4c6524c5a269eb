"""ComfyUI nodes of the GLM-Image pack (classic V1 contract), each a few lines over glm_core.pipeline.

Node ids are prefixed `GLMImage` so they never clash with other packs; the display names are what users see.
"""
from .decode import GlmImageDiTDecode
from .encode import GlmImageEncode
from .generate import GlmImageGenerateTokens
from .loader import LoadGlmImage
from .tokens import GlmImageLoadTokens, GlmImagePreviewTokens, GlmImageSaveTokens

NODE_CLASS_MAPPINGS = {
    "GLMImageLoader": LoadGlmImage,
    "GLMImageEncode": GlmImageEncode,
    "GLMImageGenerateTokens": GlmImageGenerateTokens,
    "GLMImageDiTDecode": GlmImageDiTDecode,
    "GLMImageSaveTokens": GlmImageSaveTokens,
    "GLMImageLoadTokens": GlmImageLoadTokens,
    "GLMImagePreviewTokens": GlmImagePreviewTokens,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "GLMImageLoader": "Load GLM-Image",
    "GLMImageEncode": "GLM-Image Encode Prompt/References",
    "GLMImageGenerateTokens": "GLM-Image AR Generate Tokens",
    "GLMImageDiTDecode": "GLM-Image DiT Decode",
    "GLMImageSaveTokens": "GLM-Image Save Tokens",
    "GLMImageLoadTokens": "GLM-Image Load Tokens",
    "GLMImagePreviewTokens": "GLM-Image Preview Tokens",
}
