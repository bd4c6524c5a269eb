"""Conversions between ComfyUI IMAGE tensors and PIL images."""
from __future__ import annotations

import numpy as np
import PIL.Image
import torch


def image_batch_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """A ComfyUI IMAGE (B, H, W, C) float in [0, 1] -> B RGB PIL images (an alpha channel is dropped)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a ComfyUI IMAGE of shape (B, H, W, 3), got {tuple(images.shape)}")
    pixels = (images[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (B, H, W, C)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return [PIL.Image.fromarray(picture, "RGB") for picture in pixels]
