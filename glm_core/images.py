"""Images in, images out: the one converter every entry point uses for user images.

`to_rgb_image` takes what callers hand us (PIL, numpy uint8 (H, W[, C]), torch float (H, W, C) in [0, 1] such
as one ComfyUI IMAGE) and returns an 8-bit RGB PIL image. The one alpha rule: transparency is composited
onto white. transformers' image processor (the AR side of the reference) does the same; diffusers'
VaeImageProcessor (its DiT side) would drop the alpha channel instead and so reveal whatever colour the
transparent pixels hold, and a reference that is read two ways by the two stages is never what a user
means. So both of our stages see the white composite (for images without alpha nothing differs).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_rgb_image(image) -> Image.Image:
    """A PIL RGB image from PIL, numpy (H, W[, C]) uint8, or torch float (H, W, C) in [0, 1].

    Transparency is composited onto white (see the module doc). A torch tensor may carry a leading
    batch dimension of 1 (one ComfyUI IMAGE).
    """
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ValueError(f"a torch image must be float in [0, 1] (ComfyUI IMAGE), got dtype {image.dtype}")
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"a torch image must have shape (H, W, 3) (channels last), got {tuple(image.shape)}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"a torch image must hold values in [0, 1], got [{lo:.3f}, {hi:.3f}]")
        array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return to_rgb_image(array)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be uint8 (H, W, C), got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            return Image.fromarray(image, mode="L").convert("RGB")
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"a numpy image must have shape (H, W, 3) (channels last), got {image.shape}")
        return to_rgb_image(Image.fromarray(image, mode="RGB" if image.shape[-1] == 3 else "RGBA"))
    raise TypeError(f"reference image must be a PIL image, a numpy uint8 array or a torch float tensor, "
                    f"got {type(image).__name__}")
