"""Inputs that unit and parity tests both use, each written once.

- AR: the transformers processor's output for a few prompts and reference images, seen through the fields of
  glm_core's ARInputs (`Inputs`), so that our AR and the reference AR get the very same tensors;
- pictures: deterministic test images (noise for the processor, gradients for the VQ and the VAE);
- glyph prompts, DiT reference latents, and the editing cases run through the whole pipeline.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from glm_core.processor import ARInputs

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


@dataclass
class Inputs(ARInputs):
    """glm_core's typed ARInputs made from the reference processor's output (the same tensors for both sides),
    plus what only the reference needs (pixel_values: it tokenizes the references itself)."""

    pixel_values: torch.Tensor | None = None

    def reference_kwargs(self):
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "image_grid_thw": self.image_grid_thw, "images_per_sample": self.images_per_sample}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        return kwargs


def inputs_from_feature(feature, t2i: bool, vision=None) -> Inputs:
    """The reference processor's BatchFeature as glm_core's ARInputs; the references' VQ ids come from our vision
    stage (`vision`), which tests/parity/test_ar_model.py checks id for id against the reference's."""
    grids = [tuple(g[1:]) for g in feature["image_grid_thw"].tolist()]
    per_sample = int(feature["images_per_sample"][0])
    if t2i:
        target, preview, reference_grids = grids[per_sample - 2], grids[per_sample - 1], []
    else:
        target, preview = grids[per_sample - 1], None
        reference_grids = [g for i, g in enumerate(grids) if i % per_sample != per_sample - 1]
    pixel_values = feature.get("pixel_values")
    reference_ids = None
    if reference_grids:
        if vision is None:
            raise ValueError("inputs with reference images need the vision stage to tokenize them")
        reference_ids = vision.image_token_ids(pixel_values, reference_grids)
    return Inputs(input_ids=feature["input_ids"], attention_mask=feature["attention_mask"],
                  image_grid_thw=feature["image_grid_thw"], images_per_sample=feature["images_per_sample"],
                  target_grid=target, preview_grid=preview, reference_grids=reference_grids,
                  height=target[0] * 32, width=target[1] * 32, reference_ids=reference_ids,
                  pixel_values=pixel_values)


@dataclass
class ARModels:
    """What the AR tests use: our AR, the reference AR (None in unit tests), the reference processor, our vision
    stage. Unpacks as the (ours, reference, processor) triple."""

    ours: object
    reference: object
    processor: object
    vision: object

    def __iter__(self):
        return iter((self.ours, self.reference, self.processor))


def make_inputs(processor, prompts, height, width, ref_sizes=(), vision=None):
    feature = processor_inputs(processor, prompts, height, width, images=reference_images(*ref_sizes))
    return inputs_from_feature(feature, t2i=not ref_sizes, vision=vision)


def build(models: ARModels, case):
    """`Inputs` of one of AR_CASES."""
    spec = AR_CASES[case]
    return make_inputs(models.processor, spec["prompts"], *spec["size"], ref_sizes=spec["images"],
                       vision=models.vision)


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


def our_processor_inputs(processor, prompts, height, width, images=None, **kwargs) -> Inputs:
    """What glm_core makes of prompts and their reference images, laid out like transformers' processor output:
    each image size-adjusted (`encode_prompt`'s rule) and preprocessed, the prompt tokenized around their grids,
    the pixel rows of all images concatenated in order."""
    from glm_core.processor import adjust_reference_size

    if isinstance(prompts, str):
        prompts = [prompts]
    cfg = processor.image_config
    pixel_rows, grids = [], []
    for per_prompt in images or [[] for _ in prompts]:
        prompt_grids = []
        for image in per_prompt:
            rows, grid = processor.preprocess_image(
                adjust_reference_size(image, min_side=cfg.shortest_side, max_side=cfg.longest_side))
            pixel_rows.append(rows)
            prompt_grids.append(grid)
        grids.append(prompt_grids)
    ar_inputs = processor.build_inputs(prompts, height, width, grids, **kwargs)
    return Inputs(**vars(ar_inputs), pixel_values=torch.cat(pixel_rows) if pixel_rows else None)
