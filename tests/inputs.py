"""Inputs that unit and parity tests both use, each written once.

- AR: the transformers processor's output for a few prompts and reference images, seen through the fields of
  glm_core's ARInputs (`Inputs`), so that our AR and the reference AR get the very same tensors;
- pictures: deterministic test images (noise for the processor, gradients for the VQ and the VAE);
- glyph prompts, DiT reference latents, and the editing cases run through the whole pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch

# ---- AR: prompts and reference images through the reference processor -----------------------------------

AR_CASES = {
    "t2i": {"prompts": ["a red fox in the snow"], "size": (64, 96), "images": ()},
    "t2i_batch_padded": {"prompts": ["a fox", "a much longer prompt about a fox in deep snow"], "size": (64, 64),
                         "images": ()},
    "edit_1ref": {"prompts": ["make it blue"], "size": (64, 64), "images": ((512, 512),)},
    "edit_2ref": {"prompts": ["combine both"], "size": (96, 64), "images": ((512, 512), (512, 768))},
}


def reference_images(*sizes):
    """Deterministic RGB test images of the given (H, W) sizes."""
    g = torch.Generator().manual_seed(7)
    images = []
    for h, w in sizes:
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        images.append(PIL.Image.fromarray(pixels))
    return images


def processor_inputs(processor, prompts, height, width, images=()):
    """The reference processor's BatchFeature for one or several prompts (left-padded)."""
    conversations = []
    for prompt in prompts:
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": prompt})
        conversations.append([{"role": "user", "content": content}])
    return processor.apply_chat_template(
        conversations if len(prompts) > 1 else conversations[0],
        tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"target_h": height, "target_w": width, "padding": len(prompts) > 1},
    )


class Inputs:
    """ARInputs-shaped view of the reference processor's output (same tensors for both sides)."""

    def __init__(self, feature, t2i: bool):
        self.input_ids = feature["input_ids"]
        self.attention_mask = feature["attention_mask"]
        self.image_grid_thw = feature["image_grid_thw"]
        self.images_per_sample = feature["images_per_sample"]
        self.pixel_values = feature.get("pixel_values")
        grids = [tuple(g[1:]) for g in self.image_grid_thw.tolist()]
        per_sample = int(self.images_per_sample[0])
        if t2i:
            self.target_grid, self.preview_grid = grids[per_sample - 2], grids[per_sample - 1]
            self.reference_grids = []
        else:
            self.target_grid, self.preview_grid = grids[per_sample - 1], None
            self.reference_grids = [g for i, g in enumerate(grids) if i % per_sample != per_sample - 1]
        self.height, self.width = self.target_grid[0] * 32, self.target_grid[1] * 32

    def reference_kwargs(self):
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "image_grid_thw": self.image_grid_thw, "images_per_sample": self.images_per_sample}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        return kwargs


def make_inputs(processor, prompts, height, width, ref_sizes=()):
    feature = processor_inputs(processor, prompts, height, width, images=reference_images(*ref_sizes))
    return Inputs(feature, t2i=not ref_sizes)


def build(models, case):
    """`Inputs` of one of AR_CASES; `models` is the (ours, reference, processor) triple of the `ar_models` fixtures."""
    _, _, processor = models
    spec = AR_CASES[case]
    return make_inputs(processor, spec["prompts"], *spec["size"], ref_sizes=spec["images"])


def budget(inputs):
    """Tokens a generation samples: the target grid, the preview grid (text-to-image only) and EOS."""
    gh, gw = inputs.target_grid
    ph, pw = inputs.preview_grid or (0, 0)
    return gh * gw + ph * pw + 1


# ---- pictures ---------------------------------------------------------------------------------------------


def noise_image(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    # Smooth-ish content (not pure noise) so bicubic resampling differences would show.
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, channels), dtype=np.uint8)
    image = PIL.Image.fromarray(base, mode=mode).resize((width, height), PIL.Image.BILINEAR)
    return image


def make_picture(height: int, width: int, seed: int) -> PIL.Image.Image:
    """A smooth gradient plus noise: the VQ sees varied codes, the VAE a non-trivial picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200.0
    pixels = np.clip(base + rng.normal(0.0, 25.0, (height, width, 3)), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def copy_processor(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A GLM-Image folder holding a writable copy of the processor files (and model_index.json) only."""
    folder = tmp_path / "GLM-Image"
    shutil.copytree(tiny_checkpoint / "processor", folder / "processor")
    shutil.copy(tiny_checkpoint / "model_index.json", folder / "model_index.json")
    return folder


# ---- glyph ------------------------------------------------------------------------------------------------

GLYPH_PROMPTS = [
    "a poster that says 'HELLO'",                                 # single quotes
    "a sign reading \u201cOpen 24h\u201d above the door",         # curly double quotes
    'a cake with "Happy Birthday" written on it',                 # straight double quotes
    "\u4e00\u5f20\u6d77\u62a5\uff0c\u5199\u7740\u300c\u4f60\u597d\u4e16\u754c\u300d",  # corner brackets, CJK
    "a quiet forest at dawn, no text",                            # no quotes
    "it's a shop, don't miss it",                                 # apostrophes: single-quote regex quirk
    "'A' and 'B'",                                                # two texts: leading pad quirk (even)
    "'A', \"BB\" and \u300cCCC\u300d",                            # three texts, mixed styles (odd)
    "\"one\" \u201ctwo\u201d 'three' \u300cfour\u300d",           # four texts, all styles, out of regex order
    "an empty quote '' and \"\"",                                 # empty glyph texts
]

# ---- DiT: reference images as latents and prior ids -------------------------------------------------------

REFERENCE_GRIDS = [(8, 8), (8, 12)]  # latent sizes of two references (pixels = 8x)


def dit_references(count: int):
    """(latent, prior ids, pixel size) of the first `count` REFERENCE_GRIDS."""
    g = torch.Generator().manual_seed(11)
    refs = []
    for h, w in REFERENCE_GRIDS[:count]:
        latent = torch.randn(1, 16, h, w, generator=g)
        ids = torch.randint(0, 16384, ((h // 2) * (w // 2),), generator=g)
        refs.append((latent, ids, (8 * h, 8 * w)))
    return refs


# ---- editing through the pipeline (the `edit_runs` fixture samples their tokens) ---------------------------

EDIT_PROMPT = 'put the "CAT" sign on the left'
EDIT_CASES = {
    # name: (target height, width, [(reference height, width), ...], AR seed)
    "one_reference": (512, 512, [(640, 512)], 11),
    "two_references": (512, 640, [(512, 512), (512, 768)], 12),
}


# ---- configs ------------------------------------------------------------------------------------------------


def raw_config(folder: Path, component: str, filename: str = "config.json") -> dict:
    """A component's JSON config as the checkpoint folder has it (tests change copies of it)."""
    return json.loads((folder / component / filename).read_text())
