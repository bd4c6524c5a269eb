"""AR-side inputs: prompt layout, tokenization, target grids and reference-image pixels (spec §1.3).

One prompt (plus its reference images) becomes the AR prefill:

    [<bos> <|image|>×(h·w) <eos>] per reference   text   <sop>H W<eop>   [<sop>h w<eop> t2i only]   <bos>

where <bos>/<eos> are the tokenizer's bos/eos strings (the image start / end markers, spec §1.2.2),
H W the target token grid (pixels / 32) and h w the ≈16×16 preview grid that text-to-image samples
first. Every token string and id comes from `processor/tokenizer.json` and
`processor/tokenizer_config.json`; the pixel pipeline's numbers from `preprocessor_config.json`.

Reference images go through two steps:
1. `adjust_reference_size`: our documented fix so the AR grid and the DiT grid agree (spec §4):
   sides become multiples of 32 with the short side ≥ 512 and the long side ≤ 2048. The result is
   the image both the AR and the DiT (VAE) see.
2. `PromptProcessor.preprocess_image`: what the reference image processor does (smart_resize with
   its halving, PIL bicubic, rescale, normalise, patchify into (gh·gw, 3·16·16) rows).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from .checkpoint import CheckpointError, _read_json, open_checkpoint
from .images import to_rgb_image
from .limits import (MAX_REFERENCE_ASPECT, MAX_TARGET_SIDE, MIN_TARGET_SIDE, SIZE_MULTIPLE, reference_size,
                     validate_target_size)

# A reference upscaled more than this per side is used, with a warning (a 16x16 thumbnail becomes 512x512).
MAX_SILENT_UPSCALE = 4.0
log = logging.getLogger("glm_core")


# --------------------------------------------------------------------------------------------
# Sizes and grids


def get_target_shape(height: int, width: int) -> tuple[int, int, int, int]:
    """(token_h, token_w, preview_h, preview_w) for a target size in pixels (spec §1.3).

    The reference floors the size to multiples of 32; the preview grid keeps the aspect ratio at
    about 16×16 tokens, with int() truncation.
    """
    token_h = (height // SIZE_MULTIPLE * SIZE_MULTIPLE) // SIZE_MULTIPLE
    token_w = (width // SIZE_MULTIPLE * SIZE_MULTIPLE) // SIZE_MULTIPLE
    if token_h < 1 or token_w < 1:
        raise ValueError(f"target size {height}x{width} is smaller than one {SIZE_MULTIPLE}-pixel token")
    ratio = token_h / token_w
    preview_side = SIZE_MULTIPLE // 2
    preview_h = int(math.sqrt(ratio) * preview_side)
    preview_w = int(math.sqrt(1 / ratio) * preview_side)
    return token_h, token_w, preview_h, preview_w


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 512 * 512,
                 max_pixels: int = 2048 * 2048) -> tuple[int, int]:
    """The reference image processor's resize rule (spec §1.3 steps 1–5): returns (h, w) pixels.

    Note the halving (step 4): a 1024-pixel side becomes 512 pixels, i.e. 32 patches of 16.
    """
    if height < factor or width < factor:
        raise ValueError(f"reference image {width}x{height} (WxH) is smaller than {factor} pixels on a side")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_REFERENCE_ASPECT:
        raise ValueError(f"reference image {width}x{height} (WxH) has aspect ratio {aspect:.3f}, "
                         f"above the limit {MAX_REFERENCE_ASPECT:g}; crop it first")
    shortest = int(round(math.sqrt(min_pixels)))
    longest = int(round(math.sqrt(max_pixels)))
    scale = 1.0
    if min(height, width) < shortest:
        scale = shortest / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    half_h, half_w = height // 2, width // 2
    new_h = max(factor, int(round(half_h * scale / factor)) * factor)
    new_w = max(factor, int(round(half_w * scale / factor)) * factor)
    if max(new_h, new_w) > longest:
        beta = max(new_h, new_w) / longest
        new_h = max(factor, int(math.floor(new_h / beta / factor)) * factor)
        new_w = max(factor, int(math.floor(new_w / beta / factor)) * factor)
    return new_h, new_w


# --------------------------------------------------------------------------------------------
# Reference images


def adjust_reference_size(image, *, min_side: int = MIN_TARGET_SIDE,
                          max_side: int = MAX_TARGET_SIDE) -> Image.Image:
    """RGB PIL image resized (PIL bicubic) so both the AR and the DiT grids agree (spec §4).

    Sides become multiples of 32, short side ≥ 512, long side ≤ 2048, aspect kept as well as
    rounding allows; an image already of such a size is returned unresized.
    Aspect ratio > 4 → ValueError. The returned image is what both sides must use.
    """
    rgb = to_rgb_image(image)
    width, height = rgb.size
    new_h, new_w = reference_size(height, width, min_side=min_side, max_side=max_side)
    if (new_h, new_w) == (height, width):
        return rgb
    if min(new_h / height, new_w / width) > MAX_SILENT_UPSCALE:
        log.warning("reference image %dx%d is upscaled to %dx%d (more than %gx per side): it will look soft "
                    "to the model; a larger reference (short side >= %d) works better", width, height, new_w,
                    new_h, MAX_SILENT_UPSCALE, min_side)
    return rgb.resize((new_w, new_h), resample=Image.BICUBIC)


# --------------------------------------------------------------------------------------------
# Processor


@dataclass
class ARInputs:
    """Prefill inputs of the AR model for a batch of prompts (one shared target size)."""

    input_ids: torch.Tensor            # (B, P) long, left-padded with the tokenizer's pad id
    attention_mask: torch.Tensor       # (B, P) long, 0 on padding
    image_grid_thw: torch.Tensor       # (N, 3) long: per sample [references..., target, (preview)]
    images_per_sample: torch.Tensor    # (B,) long: grids per sample (references + 2 t2i / + 1 i2i)
    target_grid: tuple[int, int]       # (H/32, W/32): the grid the DiT uses
    preview_grid: tuple[int, int] | None  # ≈16×16 grid sampled first in t2i; None for editing
    reference_grids: list[tuple[int, int]]  # (gh, gw) per reference, all samples in batch order
    height: int
    width: int
    # (Σ gh·gw,) VQ ids of the references, all samples in batch order (from the vision stage); written
    # over the `<|image|>` placeholders. None for text-to-image.
    reference_ids: torch.Tensor | None = None

    @property
    def is_text_to_image(self) -> bool:
        return self.preview_grid is not None


@dataclass(frozen=True)
class ImageProcessorConfig:
    """`processor/preprocessor_config.json` values the pixel pipeline uses."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> ImageProcessorConfig:
        size = data.get("size") or {}
        min_pixels = data.get("min_pixels", size.get("shortest_edge"))
        max_pixels = data.get("max_pixels", size.get("longest_edge"))
        if min_pixels is None or max_pixels is None:
            raise CheckpointError(
                f"{source}: expected min_pixels and max_pixels (or size.shortest_edge / size.longest_edge); "
                f"without them reference grids would be wrong")
        try:
            return cls(
                min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                patch_size=int(data.get("patch_size", 16)),
                temporal_patch_size=int(data.get("temporal_patch_size", 1)),
                merge_size=int(data.get("merge_size", 1)),
                image_mean=tuple(float(v) for v in data.get("image_mean", (0.5, 0.5, 0.5))),
                image_std=tuple(float(v) for v in data.get("image_std", (0.5, 0.5, 0.5))),
                rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                resample=int(data.get("resample", 3)),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: unexpected value type: {exc}") from exc

    @property
    def shortest_side(self) -> int:
        return int(round(math.sqrt(self.min_pixels)))

    @property
    def longest_side(self) -> int:
        return int(round(math.sqrt(self.max_pixels)))


# tokenizer_config.json keys naming the markers of the layout (spec §1.2.2).
_MARKER_KEYS = ("bos_token", "eos_token", "pad_token", "grid_bos_token", "grid_eos_token", "image_token")


def _token_string(value) -> str | None:
    if isinstance(value, dict):  # serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


class PromptProcessor:
    """Tokenizer + layout + reference pixels; the replacement for transformers' GlmImageProcessor."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_config: dict, image_config: ImageProcessorConfig,
                 *, source: Path | None = None):
        self.tokenizer = tokenizer
        self.image_config = image_config
        where = source or "tokenizer_config.json"
        tokens: dict[str, str] = {}
        extra = tokenizer_config.get("extra_special_tokens")
        for key in _MARKER_KEYS:
            value = _token_string(tokenizer_config.get(key))
            if value is None and isinstance(extra, dict):
                value = _token_string(extra.get(key))
            if value is None:
                raise CheckpointError(f"{where}: missing {key!r}; expected the GLM-Image marker strings "
                                      f"(bos_token, eos_token, pad_token, grid_bos_token, grid_eos_token, image_token)")
            tokens[key] = value

        # transformers registers every named special token as a special added token; a marker absent
        # from the vocabulary would silently get a new id there, so it is an error here.
        registered = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        to_add = []
        for key, value in tokens.items():
            if tokenizer.token_to_id(value) is None:
                raise CheckpointError(f"{where}: {key} {value!r} is not in tokenizer.json's vocabulary")
            if value not in registered:
                to_add.append(AddedToken(value, special=True, normalized=False))
                registered.add(value)
        if to_add:
            tokenizer.add_special_tokens(to_add)

        self.bos_token = tokens["bos_token"]            # image-start marker, also ends the prompt
        self.eos_token = tokens["eos_token"]            # image-end marker
        self.grid_bos_token = tokens["grid_bos_token"]  # <sop>
        self.grid_eos_token = tokens["grid_eos_token"]  # <eop>
        self.image_token = tokens["image_token"]        # one per reference-image patch
        self.bos_token_id = tokenizer.token_to_id(self.bos_token)
        self.eos_token_id = tokenizer.token_to_id(self.eos_token)
        self.pad_token_id = tokenizer.token_to_id(tokens["pad_token"])
        self.grid_bos_token_id = tokenizer.token_to_id(self.grid_bos_token)
        self.grid_eos_token_id = tokenizer.token_to_id(self.grid_eos_token)
        self.image_token_id = tokenizer.token_to_id(self.image_token)
        self._markers = tuple(tokens.values())
        # add_special_tokens=True applies tokenizer.json's own post-processor, if it has one. The
        # reference (transformers 5.23) ignores add_bos_token / add_eos_token in tokenizer_config.json
        # whenever tokenizer.json exists, so they are ignored here too.

    @classmethod
    def from_folder(cls, folder) -> PromptProcessor:
        """From a GLM-Image folder (uses its processor/) or from the processor folder itself."""
        folder = Path(folder).expanduser()
        if (folder / "model_index.json").is_file():
            folder = open_checkpoint(folder).component_dir("processor")
        tokenizer_path = folder / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise CheckpointError(f"GLM-Image processor: {tokenizer_path} not found; expected a GLM-Image "
                                  f"folder or its processor/ sub-folder")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise CheckpointError(f"cannot read {tokenizer_path}: {exc}") from exc
        tokenizer_config_path = folder / "tokenizer_config.json"
        tokenizer_config = _read_json(tokenizer_config_path, "GLM-Image tokenizer config")
        image_config_path = folder / "preprocessor_config.json"
        image_config = ImageProcessorConfig.from_dict(
            _read_json(image_config_path, "GLM-Image image processor config"), image_config_path)
        return cls(tokenizer, tokenizer_config, image_config, source=tokenizer_config_path)

    # ---- pixels

    def preprocess_image(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Reference-image pixels as the reference image processor makes them (spec §1.3).

        Returns (pixel rows (gh·gw/merge², C·t·p·p·merge²) float32, (gh, gw)). Call it on an image
        already passed through `adjust_reference_size`, or the DiT grid will not match.
        """
        cfg = self.image_config
        rgb = to_rgb_image(image)
        width, height = rgb.size
        factor = cfg.patch_size * cfg.merge_size
        new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=cfg.min_pixels,
                                    max_pixels=cfg.max_pixels)
        resized = np.asarray(rgb.resize((new_w, new_h), resample=cfg.resample))  # (h, w, 3) uint8
        # The reference rescales in float64 then stores float32, and normalises in float32.
        pixels = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, h, w)
        return self._patchify(chw), (new_h // cfg.patch_size, new_w // cfg.patch_size)

    def _patchify(self, chw: torch.Tensor) -> torch.Tensor:
        """(C, h, w) -> rows ordered row-major over (merged) patches, each channel-major (C, t, p, p)."""
        cfg = self.image_config
        p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        channels, height, width = chw.shape
        grid_h, grid_w = height // p, width // p
        patches = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)  # the same frame t times
        return patches.reshape(grid_h * grid_w, channels * t * p * p).contiguous()

    # ---- text

    def prompt_text(self, prompt: str, height: int, width: int, reference_grids=()) -> str:
        """The templated prompt string for one sample (before tokenization); see the module doc."""
        token_h, token_w, preview_h, preview_w = get_target_shape(height, width)
        per_image = self.image_config.merge_size ** 2
        references = "".join(
            f"{self.bos_token}{self.image_token * (gh * gw // per_image)}{self.eos_token}"
            for gh, gw in reference_grids)
        grids = f"{self.grid_bos_token}{token_h} {token_w}{self.grid_eos_token}"
        if not reference_grids:  # text-to-image also declares the preview grid it samples first
            grids += f"{self.grid_bos_token}{preview_h} {preview_w}{self.grid_eos_token}"
        return f"{references}{prompt}{grids}{self.bos_token}"

    def _check_prompt(self, prompt, index: int) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty; describe the image to generate")
        for marker in self._markers:
            if marker in prompt:
                raise ValueError(f"prompt {index} contains the control token {marker!r}, which would break "
                                 f"the prompt layout; remove it")

    def build_inputs(self, prompts: list[str], height: int, width: int,
                     reference_grids: list[list[tuple[int, int]]] | None = None, *,
                     min_side: int = MIN_TARGET_SIDE, max_side: int = MAX_TARGET_SIDE) -> ARInputs:
        """AR prefill inputs for `prompts` at one target size; `reference_grids[i]` are the (gh, gw) patch
        grids of prompt i's reference images (from `preprocess_image`), every prompt with the same count.

        The references' VQ ids are not part of this: the caller sets `reference_ids` on the result.
        `min_side`/`max_side` bound the target size (only tiny test models go below 512).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompt given; pass at least one prompt")
        for i, prompt in enumerate(prompts):
            self._check_prompt(prompt, i)
        validate_target_size(height, width, min_side=min_side, max_side=max_side)
        height, width = int(height), int(width)

        if reference_grids is None:
            reference_grids = [[] for _ in prompts]
        reference_grids = [[tuple(grid) for grid in grids] for grids in reference_grids]
        if len(reference_grids) != len(prompts):
            raise ValueError(f"got {len(reference_grids)} reference lists for {len(prompts)} prompts; "
                             f"pass one list (possibly empty) per prompt")
        counts = [len(r) for r in reference_grids]
        if len(set(counts)) != 1:
            raise ValueError(f"every prompt in a batch needs the same number of reference images, got {counts}; "
                             f"run prompts with different reference counts as separate batches")

        cfg = self.image_config
        texts = [self.prompt_text(prompt, height, width, grids) for prompt, grids in zip(prompts, reference_grids)]
        all_grids = [grid for grids in reference_grids for grid in grids]

        # The reference tokenizes with add_special_tokens unless the templated text starts with the
        # bos token (i.e. with a reference image), judged on the first sample (spec §1.3).
        add_special_tokens = not texts[0].startswith(self.bos_token)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        sequences = [enc.ids for enc in encodings]
        n_image_tokens = sum(gh * gw for gh, gw in all_grids) // cfg.merge_size ** 2
        if sum(ids.count(self.image_token_id) for ids in sequences) != n_image_tokens:
            raise RuntimeError("tokenization split the image placeholder tokens; tokenizer.json does not match")

        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)  # (B, P)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):  # left padding
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1

        token_h, token_w, preview_h, preview_w = get_target_shape(height, width)
        is_t2i = counts[0] == 0
        grid_rows = []
        for grids in reference_grids:
            grid_rows += [[1, gh, gw] for gh, gw in grids]
            grid_rows.append([1, token_h, token_w])
            if is_t2i:
                grid_rows.append([1, preview_h, preview_w])
        images_per_sample = torch.full((len(prompts),), counts[0] + (2 if is_t2i else 1), dtype=torch.long)
        return ARInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_grid_thw=torch.tensor(grid_rows, dtype=torch.long),  # (N, 3)
            images_per_sample=images_per_sample,
            target_grid=(token_h, token_w),
            preview_grid=(preview_h, preview_w) if is_t2i else None,
            reference_grids=all_grids,
            height=height,
            width=width,
        )
