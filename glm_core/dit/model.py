"""GlmImageDiT: the GLM-Image diffusion transformer (spec §1.5), in plain PyTorch.

One forward maps a noisy latent (B, C, h, w) to a velocity of the same shape, conditioned on
- glyph embeddings (B, L, text_embed_dim) from `glm_core.glyph` (the DiT's only text input),
- per-patch prior token ids (B, N_img) from the AR model,
- the timestep and the SDXL-style (crop, target size) scalars,
- optionally a `ReferenceKV` (editing).

The text ("glyph") stream and the image stream run as ONE token sequence [text, image] through
shared QKV / FFN weights, with separate AdaLN modulation per stream (spec §6.14). Building blocks
live in `layers.py`; classifier-free guidance and the denoising loop in `sampling.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..compiling import compiled
from .config import DiTConfig
from .layers import (AdaLayerNormOut, DiTBlock, FeedForward, ImageProjector, TimestepSizeEmbedding,
                     rotary_cos_sin)
from .reference_kv import ReferenceKV


def _mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    torch._dynamo.maybe_mark_dynamic(tensor, dim % tensor.dim())


# Scalars and pairs given as Python numbers are filled in on the device: a copy from host memory waits for every
# kernel queued before it, which would stall the denoising loop at each pass instead of letting it run ahead.
def _batch_scalars(value, batch: int, device) -> torch.Tensor:
    """A float, (1,) or (B,) tensor -> (B,) float32."""
    if isinstance(value, (int, float)):
        return torch.full((batch,), float(value), dtype=torch.float32, device=device)
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    return value.expand(batch) if value.numel() == 1 else value


def _batch_pairs(value, batch: int, device) -> torch.Tensor:
    """(a, b), (2,), (1, 2) or (B, 2) -> (B, 2) float32."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        pairs = torch.empty((batch, 2), dtype=torch.float32, device=device)
        pairs[:, 0], pairs[:, 1] = float(value[0]), float(value[1])
        return pairs
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1, 2)
    return value.expand(batch, 2) if value.shape[0] == 1 else value


class GlmImageDiT(nn.Module):
    """GLM-Image DiT. Build on the meta device and load with `load_dit`; see `forward`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.image_projector = ImageProjector(config)
        self.glyph_projector = FeedForward(config.text_embed_dim, dim, dim, F.gelu)
        self.prior_token_embedding = nn.Embedding(config.prior_vq_quantizer_codebook_size, dim)
        self.prior_projector = FeedForward(dim, dim, dim, F.silu)
        self.time_condition_embed = TimestepSizeEmbedding(config)
        self.transformer_blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.norm_out = AdaLayerNormOut(config.time_embed_dim, dim, config.norm_eps)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * config.out_channels)
        # None: blocks run eagerly; else the torch.compile backend each block runs through (one shared
        # graph for all blocks). Set by the loader (`glm_core.compiling.compile_backend`).
        self.compile_backend: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # -- pieces of the forward ---------------------------------------------------------------

    def embed_image(self, latents: torch.Tensor, prior_token_ids: torch.Tensor,
                    prior_drop: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens + projected prior embedding: (B, N_img, dim)."""
        image_tokens = self.image_projector(latents)
        prior = self.prior_token_embedding(prior_token_ids)  # (B, N_img, dim)
        if prior_drop is not None:
            # Drop zeroes the EMBEDDING, so a dropped prior still adds prior_projector(0) (spec §6.15).
            keep = (~torch.as_tensor(prior_drop, dtype=torch.bool, device=prior.device)).to(prior.dtype)
            keep = keep.reshape(keep.shape + (1,) * (prior.dim() - keep.dim()))  # (B,) or (B, N) -> broadcast
            prior = prior * keep
        return image_tokens + self.prior_projector(prior)

    def _run_blocks(self, tokens, is_text, temb, rope, reference_kv, collect_kv: bool):
        collected_keys, collected_values = [], []
        if self.compile_backend is None:
            run_block = DiTBlock.__call__
        else:
            # inductor fuses the LayerNorms, modulation, QK-norm + RoPE, gates and residuals around the
            # matmuls. Token counts are marked dynamic (else dynamo specialises them through the RoPE
            # broadcast): one graph serves every resolution and text length, a second one the edits.
            run_block = compiled(DiTBlock.forward, "DiT block", self.compile_backend)
            for tensor, dim in ((tokens, 1), (is_text, 0), (rope[0], 0), (rope[1], 0)):
                _mark_dynamic(tensor, dim)
        for index, block in enumerate(self.transformer_blocks):
            reference = reference_kv.layer(index) if reference_kv is not None else None
            if reference is not None and self.compile_backend is not None:
                _mark_dynamic(reference[0], 2)
                _mark_dynamic(reference[1], 2)
            tokens, (key, value) = run_block(block, tokens, is_text, temb, rope, reference)
            if collect_kv:
                collected_keys.append(key)
                collected_values.append(value)
        return tokens, (collected_keys, collected_values)

    def _unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B = tokens.shape[0]
        p = self.config.patch_size
        out = tokens.reshape(B, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
        return out.reshape(B, -1, h, w)

    def _prepare(self, latents, glyph_embeds, prior_token_ids, timestep, target_size, crop_coords, prior_drop):
        """Common input handling: (tokens (B, L + N_img, dim), L, is_text (L + N_img,) bool, temb, rope)."""
        batch, _, h, w = latents.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} must be a multiple of the patch size {p} "
                             f"(image sides must be multiples of 32 pixels)")
        dtype, device = self.dtype, self.device
        latents = latents.to(device=device, dtype=dtype)
        prior_token_ids = prior_token_ids.to(device)
        if prior_token_ids.dim() == 1:
            prior_token_ids = prior_token_ids[None]
        n_img = (h // p) * (w // p)
        if prior_token_ids.shape[-1] != n_img:
            raise ValueError(f"prior_token_ids has {prior_token_ids.shape[-1]} ids per image but the latent "
                             f"{h}x{w} has {n_img} patches; the prior must be the 2x-upsampled AR grid")
        image_tokens = self.embed_image(latents, prior_token_ids, prior_drop)  # (B, N_img, dim)
        text_tokens = self.glyph_projector(glyph_embeds.to(device=device, dtype=dtype))  # (B, L, dim)
        if text_tokens.shape[0] != batch:
            text_tokens = text_tokens.expand(batch, -1, -1)
        if crop_coords is None:
            crop_coords = (0.0, 0.0)
        temb = self.time_condition_embed(_batch_scalars(timestep, batch, device),
                                         _batch_pairs(target_size, batch, device),
                                         _batch_pairs(crop_coords, batch, device), dtype)
        text_len = text_tokens.shape[1]
        rope = rotary_cos_sin(h // p, w // p, self.config.attention_head_dim, self.config.rope_theta, device,
                              text_len)
        tokens = torch.cat([text_tokens, image_tokens], dim=1)
        is_text = torch.arange(tokens.shape[1], device=device) < text_len
        return tokens, text_len, is_text, temb, rope

    # -- public API --------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, glyph_embeds: torch.Tensor, prior_token_ids: torch.Tensor,
                timestep, target_size, crop_coords=None, *,
                prior_drop: torch.Tensor | Sequence[bool] | None = None,
                reference_kv: ReferenceKV | None = None) -> torch.Tensor:
        """Velocity (B, out_channels, h, w) in the model dtype.

        latents (B, C, h, w); glyph_embeds (B, L, text_embed_dim) (L may be 0); prior_token_ids (B, N_img)
        long; timestep: float or (B,) — what the DiT sees, i.e. the schedule's t − 1 (spec §6.1);
        target_size: (H, W) pixels or (B, 2); crop_coords: (top, left), default (0, 0).
        prior_drop: (B,) or (B, N_img) bool; True zeroes the prior embedding (the unconditional pass).
        reference_kv: reference-image K/V prepended to every block's keys (conditional pass only).
        """
        tokens, text_len, is_text, temb, rope = self._prepare(latents, glyph_embeds, prior_token_ids, timestep,
                                                              target_size, crop_coords, prior_drop)
        tokens, _ = self._run_blocks(tokens, is_text, temb, rope, reference_kv, collect_kv=False)
        image_tokens = self.proj_out(self.norm_out(tokens[:, text_len:], temb))  # the glyph stream is dropped
        return self._unpatchify(image_tokens, latents.shape[-2], latents.shape[-1])

    @torch.no_grad()
    def encode_references(self, ref_latents: Sequence[torch.Tensor], ref_prior_ids: Sequence[torch.Tensor],
                          ref_sizes: Sequence[tuple[int, int]]) -> ReferenceKV:
        """Reference-image K/V for editing (spec §1.5.1, §2.2 step 6).

        ref_latents: normalised VAE latents, each (1, C, h_i, w_i); ref_prior_ids: each (h_i/p · w_i/p,)
        or (1, ·) — the reference's VQ ids, 2x-upsampled; ref_sizes: each reference's (H, W) in pixels.
        Each reference runs alone at t=0 with no glyph tokens; the results are concatenated in order.
        """
        if not (len(ref_latents) == len(ref_prior_ids) == len(ref_sizes)) or not ref_latents:
            raise ValueError(f"encode_references needs matching non-empty lists, got {len(ref_latents)} latents, "
                             f"{len(ref_prior_ids)} prior id sets and {len(ref_sizes)} sizes")
        parts = []
        for latent, prior_ids, size in zip(ref_latents, ref_prior_ids, ref_sizes):
            if latent.dim() != 4 or latent.shape[0] != 1:
                raise ValueError(f"each reference latent must be (1, C, h, w), got {tuple(latent.shape)}")
            no_glyph = latent.new_zeros(1, 0, self.config.text_embed_dim)  # (1, 0, text_embed_dim)
            tokens, _, is_text, temb, rope = self._prepare(latent, no_glyph, prior_ids, 0.0, size, None, None)
            _, (keys, values) = self._run_blocks(tokens, is_text, temb, rope, None, collect_kv=True)
            parts.append(ReferenceKV(tuple(keys), tuple(values)))
        return ReferenceKV.concat(parts)


# The linears stored in FP8 when the DiT loads with weights="fp8": every linear of the transformer blocks (their
# modulation included: 1.5 of its 13.9 GB). Embeddings, projectors and the output layers stay in the compute dtype.
FP8_LINEARS = re.compile(r"transformer_blocks\.\d+\.(attn1\.(to_qkv|to_out\.0)|ff\.net\.(0\.proj|2)|norm1\.linear)")


# The blocks' FP8 matmuls accumulate in the tensor cores' own accumulator over the whole K (cuBLAS's fast
# accumulation) instead of promoting partial sums to fp32: on the H200 (2026-11-30, bench.dit_profile) a guided
# 1024² step took 0.142 s instead of 0.155 (the e4m3 GEMMs at 98 % instead of 91 % of the measured e4m3 rate), and
# the guided velocity stayed as far from bf16's on the same weights (relative error 1.784e-2 against 1.780e-2).
FP8_FAST_ACCUM = True


def load_dit(checkpoint_folder, device, dtype, *, compile: bool | None = None, weights: str = "bf16",
             dry_run: bool = False) -> GlmImageDiT:
    """GlmImageDiT from a GLM-Image folder's `transformer/` (built on meta, weights assigned, eval mode).
    weights="fp8": the blocks' linears in FP8 (quantised as they load, or as stored in a pre-quantised folder)."""
    from ..checkpoint import load_weights, open_checkpoint
    from ..compiling import compile_backend
    from ..fp8 import use_fp8_linears_

    folder = open_checkpoint(checkpoint_folder)
    component = folder.component_dir("transformer")
    config = DiTConfig.from_dict(folder.read_config("transformer"), source=str(component / "config.json"))
    with torch.device("meta"):
        model = GlmImageDiT(config)
    use_fp8_linears_(model, FP8_LINEARS, weights, component, use_fast_accum=FP8_FAST_ACCUM)
    load_weights(model, component, device=device, dtype=dtype, dry_run=dry_run)
    model.compile_backend = compile_backend(device, compile)
    return model.eval().requires_grad_(False)
