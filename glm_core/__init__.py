"""glm_core: a standalone PyTorch implementation of GLM-Image (AR prior + DiT decoder).

Never imports ComfyUI or the reference GLM-Image classes of transformers / diffusers.
"""
