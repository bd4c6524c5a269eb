"""The AR stage's result, `PriorTokens`, and what can be done with it without any model: the prior ids the
DiT takes, checks against a conditioning, token files on disk, and a cheap preview picture."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TOKENS_FORMAT = "glm-image-tokens/1"


def upsample_prior(grid_ids: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) -> (B, 4*gh*gw): each AR token covers a 2x2 block of DiT patches (spec §6.12)."""
    return grid_ids.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1)


@dataclass
class PriorTokens:
    """Token grids sampled by the AR, with what they were sampled for (to refuse a mismatched decode)."""

    grid_ids: torch.Tensor  # (B, gh, gw) long: the large grid, codebook ids
    height: int
    width: int
    reference_sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) pixels per reference used
    seeds: list[int] = field(default_factory=list)

    @property
    def prior_ids(self) -> torch.Tensor:
        """(B, 4·gh·gw) long: the 2x-upsampled grid the DiT takes."""
        return upsample_prior(self.grid_ids)


def check_token_ids(tokens: PriorTokens, codebook_size: int) -> None:
    """Every id must index the DiT's prior embedding (the reference crashes with an IndexError instead)."""
    ids = tokens.grid_ids
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
        raise ValueError(f"the token grid holds ids outside the codebook [0, {codebook_size}) (found "
                         f"{int(ids.min())}..{int(ids.max())}): the tokens are damaged or from another model; "
                         "generate them again.")


def check_tokens_match(tokens: PriorTokens, height: int, width: int,
                       reference_sizes: list[tuple[int, int]]) -> None:
    """The tokens must come from the same size and references as the decode asks for (clear error if not)."""
    if (tokens.height, tokens.width) != (height, width):
        raise ValueError(
            f"the tokens were generated for {tokens.width}x{tokens.height} but the decode asks for "
            f"{width}x{height}: generate the tokens at this size, or set the size back.")
    expected_grid = (height // 32, width // 32)
    if tuple(tokens.grid_ids.shape[-2:]) != expected_grid:
        raise ValueError(f"token grid {tuple(tokens.grid_ids.shape[-2:])} does not match {expected_grid} "
                         f"for {width}x{height}; the tokens are damaged or from another model.")
    if len(tokens.reference_sizes) != len(reference_sizes):
        raise ValueError(
            f"the tokens were generated with {len(tokens.reference_sizes)} reference image(s) but the decode "
            f"has {len(reference_sizes)}: use the same references for both stages.")
    if [tuple(s) for s in tokens.reference_sizes] != [tuple(s) for s in reference_sizes]:
        raise ValueError(
            f"reference sizes differ between the tokens {tokens.reference_sizes} and the decode "
            f"{reference_sizes}: use the same reference images for both stages.")


def save_tokens(tokens: PriorTokens, path) -> Path:
    """Write the tokens as safetensors with their size, seeds and reference sizes in the metadata.

    Written to a temporary file in the same folder, then renamed: an existing file is replaced whole or
    not at all."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot save the tokens to {path}: it is a folder; give a file name such as "
                         f"{path / 'tokens.safetensors'}")
    meta = {"format": TOKENS_FORMAT, "height": tokens.height, "width": tokens.width,
            "reference_sizes": [list(s) for s in tokens.reference_sizes], "seeds": list(tokens.seeds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file({"grid_ids": tokens.grid_ids.cpu().contiguous()}, str(partial),
                  metadata={"glm_image": json.dumps(meta)})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_tokens(path) -> PriorTokens:
    """Read a file written by `save_tokens` (also by earlier versions, whose extra tensors are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokens file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("glm_image", "null"))
        tensors = load_file(str(path))
    except Exception as error:  # a damaged or foreign file
        raise ValueError(f"{path} is not a GLM-Image tokens file ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != TOKENS_FORMAT or "grid_ids" not in tensors:
        raise ValueError(f"{path} is not a GLM-Image tokens file (format {TOKENS_FORMAT!r} expected)")
    if not all(isinstance(meta.get(key), int) for key in ("height", "width")) or not isinstance(
            meta.get("reference_sizes", []), list):
        raise ValueError(f"{path}: damaged tokens file (its metadata lacks the image size): {meta}")
    grid_ids = tensors["grid_ids"].long()
    if grid_ids.ndim != 3 or tuple(grid_ids.shape[-2:]) != (meta["height"] // 32, meta["width"] // 32):
        raise ValueError(f"{path}: token grid {tuple(grid_ids.shape)} does not match "
                         f"{meta['width']}x{meta['height']}")
    return PriorTokens(grid_ids=grid_ids, height=int(meta["height"]), width=int(meta["width"]),
                       reference_sizes=[tuple(s) for s in meta.get("reference_sizes", [])],
                       seeds=[int(s) for s in meta.get("seeds", [])])


def preview_tokens(tokens: PriorTokens, cell: int = 8) -> torch.Tensor:
    """(B, gh·cell, gw·cell, 3) float32: each token id as a fixed colour, to see the layout before the DiT.

    Nearby codebook ids carry no meaning, so ids are hashed to colours: equal ids look equal, regions of
    repeated structure stand out.
    """
    ids = tokens.grid_ids.long()
    channels = [((ids * mult) % 251).float() / 250.0 for mult in (97, 61, 29)]  # (B, gh, gw) each
    rgb = torch.stack(channels, dim=-1)  # (B, gh, gw, 3)
    return rgb.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).contiguous()
