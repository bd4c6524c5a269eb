"""ComfyUI IMAGE tensors to PIL images (through glm_core's one converter and its alpha rule)."""
from __future__ import annotations

import PIL.Image
import torch


def image_batch_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """A ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> B RGB PIL images (alpha composited onto white)."""
    from ..glm_core.images import to_rgb_image

    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a ComfyUI IMAGE of shape (B, H, W, 3), got {tuple(images.shape)}")
    return [to_rgb_image(picture) for picture in images]
