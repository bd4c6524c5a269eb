"""GlmImageDiT: the GLM-Image diffusion transformer (spec §1.5), in plain PyTorch.

One forward maps a noisy latent (B, C, h, w) to a velocity of the same shape, conditioned on
- glyph embeddings (B, L, text_embed_dim) from `glm_core.glyph` (the DiT's only text input),
- per-patch prior token ids (B, N_img) from the AR model,
- the timestep and the SDXL-style (crop, target size) scalars,
- optionally a `ReferenceKV` (editing).

The text ("glyph") stream and the image stream run as ONE token sequence [text, image] through
shared QKV / FFN weights, with separate AdaLN modulation per stream (spec §6.14).

Attribute names mirror the official checkpoint keys (spec §3.1), so `load_weights` needs no mapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..compiling import compile_wanted, compiled
from .config import DiTConfig
from .reference_kv import ReferenceKV
from ..schedule import guided_velocity, uses_guidance

_gelu_tanh = partial(F.gelu, approximate="tanh")


# --------------------------------------------------------------------------------------------
# Building blocks


class _LinearThenActivation(nn.Module):
    """`<ff>.net.0`: Linear (key `proj`) followed by a parameter-free activation."""

    def __init__(self, dim_in: int, dim_out: int, activation):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.proj(x))


class FeedForward(nn.Module):
    """Linear -> activation -> Linear with the diffusers key layout `net.0.proj`, `net.2`.

    `net.1` is the (inference no-op) dropout slot of the reference; it has no parameters.
    """

    def __init__(self, dim_in: int, inner_dim: int, dim_out: int, activation):
        super().__init__()
        self.net = nn.ModuleList([
            _LinearThenActivation(dim_in, inner_dim, activation),
            nn.Identity(),
            nn.Linear(inner_dim, dim_out),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _TwoLayerMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection keys)."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_hidden)
        self.linear_2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """(N,) scalars -> (N, dim) float32 `[cos | sin]` with frequencies exp(-ln(P)·k/(dim/2)).

    Same arithmetic order as the reference (flip_sin_to_cos=True, shift 0), so fp32 values match bitwise.
    """
    half = dim // 2
    exponent = (-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device)) / half
    angles = values.float()[:, None] * torch.exp(exponent)[None, :]  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepSizeEmbedding(nn.Module):
    """`time_condition_embed`: temb = SiLU(MLP(sin(t)) + MLP([sin(crop_y, crop_x) | sin(H, W)])).

    The SiLU is applied once, here; the AdaLN linears consume temb directly (spec §1.5 step 5).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.time_embed_dim = config.time_embed_dim
        self.condition_dim = config.condition_dim
        self.max_period = config.sinusoid_max_period
        self.timestep_embedder = _TwoLayerMLP(config.time_embed_dim, config.time_embed_dim, config.time_embed_dim)
        self.condition_embedder = _TwoLayerMLP(config.size_condition_dim, config.time_embed_dim,
                                               config.time_embed_dim)

    def forward(self, timestep: torch.Tensor, target_size: torch.Tensor, crop_coords: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        batch = timestep.shape[0]
        timestep_features = sinusoidal_embedding(timestep, self.time_embed_dim, self.max_period)  # (B, E)
        # Each scalar gets its own condition_dim sinusoid: (B, 2) -> (B, 2*condition_dim).
        crop_features = sinusoidal_embedding(crop_coords.flatten(), self.condition_dim, self.max_period)
        size_features = sinusoidal_embedding(target_size.flatten(), self.condition_dim, self.max_period)
        condition_features = torch.cat([crop_features.view(batch, -1), size_features.view(batch, -1)], dim=1)
        temb = self.timestep_embedder(timestep_features.to(dtype)) + self.condition_embedder(
            condition_features.to(dtype))
        return F.silu(temb)  # (B, time_embed_dim)


def rotary_cos_sin(grid_h: int, grid_w: int, head_dim: int, theta: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables (N_img, head_dim) float32 for a row-major (grid_h, grid_w) patch grid.

    Per head: dims [0, D/4) rotate with the row, [D/4, D/2) with the column, and the second half
    repeats the first, so `rotate_half` pairs dim i with i + D/2 (spec §1.5 step 1).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    rows = torch.outer(torch.arange(grid_h, dtype=torch.float32, device=device), inv_freq)  # (gh, D/4)
    cols = torch.outer(torch.arange(grid_w, dtype=torch.float32, device=device), inv_freq)  # (gw, D/4)
    freqs = torch.cat([rows[:, None, :].expand(grid_h, grid_w, -1),
                       cols[None, :, :].expand(grid_h, grid_w, -1)], dim=-1)  # (gh, gw, D/2)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(grid_h * grid_w, head_dim)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, N, heads, D) in fp32, cast back to x's dtype (spec §1.5 step 6)."""
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x_float * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Transformer block


class AdaLayerNormZero(nn.Module):
    """`norm1`: the 12-way modulation (key `linear`); the LayerNorms themselves have no weights."""

    def __init__(self, time_embed_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 12 * dim)


class Attention(nn.Module):
    """`attn1`: shared QKV over [text, image], QK LayerNorm over head_dim, RoPE on image tokens only."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.heads = config.num_attention_heads
        self.head_dim = config.attention_head_dim
        self.eps = config.norm_eps
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def _heads(self, x: torch.Tensor, text_len: int, rope, normalize: bool) -> torch.Tensor:
        x = x.unflatten(-1, (self.heads, self.head_dim))  # (B, S, heads, D)
        if not normalize:
            return x.transpose(1, 2)
        x = F.layer_norm(x, (self.head_dim,), eps=self.eps)
        # Text tokens carry no position (spec §6.14); the image part gets 2-D RoPE.
        x = torch.cat([x[:, :text_len], apply_rotary(x[:, text_len:], *rope)], dim=1)
        return x.transpose(1, 2)  # (B, heads, S, D)

    def forward(self, tokens: torch.Tensor, text_len: int, rope, reference=None, key_mask=None):
        """tokens (B, S, dim) -> (out (B, S, dim), (k, v) each (B, heads, S, D) as fed to the reference cache).

        `reference`: (k, v) each (1, heads, N_ref, D) prepended to this pass's keys / values.
        `key_mask`: (B, 1, 1, N_ref + S) bool, True where a key may be attended, or None.
        """
        query = self._heads(self.to_q(tokens), text_len, rope, normalize=True)
        key = self._heads(self.to_k(tokens), text_len, rope, normalize=True)
        value = self._heads(self.to_v(tokens), text_len, rope, normalize=False)
        own_kv = (key, value)
        if reference is not None:
            batch = tokens.shape[0]
            ref_key, ref_value = reference
            key = torch.cat([ref_key.expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([ref_value.expand(batch, -1, -1, -1), value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)  # (B, heads, S, D)
        out = out.transpose(1, 2).flatten(2).to(tokens.dtype)
        return self.to_out[0](out), own_kv


def _mark_dynamic(tensor: torch.Tensor | None, dim: int) -> None:
    if tensor is not None:
        torch._dynamo.maybe_mark_dynamic(tensor, dim % tensor.dim())


def _per_stream(text_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
    return torch.cat([text_part, image_part], dim=1)


class DiTBlock(nn.Module):
    """`transformer_blocks.N`: single-stream block with dual (text / image) AdaLN modulation."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.eps = config.norm_eps
        self.norm1 = AdaLayerNormZero(config.time_embed_dim, dim)
        self.attn1 = Attention(config)
        self.ff = FeedForward(dim, 4 * dim, dim, _gelu_tanh)

    def forward(self, tokens: torch.Tensor, text_len: int, temb: torch.Tensor, rope,
                reference=None, key_mask=None):
        """tokens (B, L + N_img, dim) -> same shape, plus this block's (k, v) for the reference cache."""
        L = text_len
        # Chunk order (spec §1.5 step 6): image and text ("c_") chunks interleaved.
        (shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa,
         shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp) = \
            self.norm1.linear(temb)[:, None, :].chunk(12, dim=-1)  # each (B, 1, dim)

        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=self.eps)
        attn_in = _per_stream(normed[:, :L] * (1 + c_scale_msa) + c_shift_msa,
                              normed[:, L:] * (1 + scale_msa) + shift_msa)
        attn_out, own_kv = self.attn1(attn_in, L, rope, reference, key_mask)
        tokens = tokens + _per_stream(attn_out[:, :L] * c_gate_msa, attn_out[:, L:] * gate_msa)

        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=self.eps)
        ff_in = _per_stream(normed[:, :L] * (1 + c_scale_mlp) + c_shift_mlp,
                            normed[:, L:] * (1 + scale_mlp) + shift_mlp)
        ff_out = self.ff(ff_in)  # the same FFN weights for both streams
        tokens = tokens + _per_stream(ff_out[:, :L] * c_gate_mlp, ff_out[:, L:] * gate_mlp)
        return tokens, own_kv


class AdaLayerNormOut(nn.Module):
    """`norm_out`: LN(x)·(1 + scale) + shift with `scale, shift = linear(temb).chunk(2)` (scale FIRST)."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(time_embed_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb.to(x.dtype))[:, None, :].chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale) + shift


class ImageProjector(nn.Module):
    """`image_projector`: patchify (B, C, h, w) -> (B, N_img, C·p·p), features ordered (C, py, px)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Linear(config.in_channels * config.patch_size ** 2, config.inner_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, h, w = latents.shape
        p = self.patch_size
        patches = latents.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        return self.proj(patches.reshape(B, (h // p) * (w // p), C * p * p))


# --------------------------------------------------------------------------------------------
# Model


def _batch_scalars(value, batch: int, device) -> torch.Tensor:
    """A float, (1,) or (B,) tensor -> (B,) float32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    return value.expand(batch) if value.numel() == 1 else value


def _batch_pairs(value, batch: int, device) -> torch.Tensor:
    """(a, b), (2,), (1, 2) or (B, 2) -> (B, 2) float32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1, 2)
    return value.expand(batch, 2) if value.shape[0] == 1 else value


def pad_glyph_rows(glyph_rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack glyph embeddings of different lengths (each (b_i, L_i, C)) into one batch.

    Shorter rows are right-padded with zeros that are MASKED as attention keys, so each row computes
    exactly what it would alone. Returns (embeds (Σb_i, max L, C), glyph_mask (Σb_i, max L) bool or
    None when all lengths are equal). Not the reference's unmasked left padding across prompts
    (that is part of `GlyphEncoder.encode` and is reproduced there on purpose).
    """
    max_len = max(rows.shape[1] for rows in glyph_rows)
    if all(rows.shape[1] == max_len for rows in glyph_rows):
        return torch.cat(list(glyph_rows), dim=0), None
    embeds, masks = [], []
    for rows in glyph_rows:
        b, length, channels = rows.shape
        embeds.append(torch.cat([rows, rows.new_zeros(b, max_len - length, channels)], dim=1))
        mask = torch.zeros(b, max_len, dtype=torch.bool, device=rows.device)
        mask[:, :length] = True
        masks.append(mask)
    return torch.cat(embeds, dim=0), torch.cat(masks, dim=0)


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
        # torch.compile each block (one shared compiled graph for all blocks): True / False, or None =
        # on for CUDA unless GLM_CORE_NO_COMPILE=1 (`glm_core.compiling`). Not module state.
        self.compile_blocks: bool | None = None
        self.compile_backend = "inductor"

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

    def _block_runner(self):
        """DiTBlock.__call__, or the shared torch.compile'd DiTBlock.forward (inductor fuses the
        LayerNorms, modulation, QK-norm + RoPE, gates and residuals around the matmuls; falls back to
        eager on a compile error). Blocks are pure functions, so a failed compiled call can rerun."""
        if compile_wanted(self.device, self.compile_blocks):
            return compiled(DiTBlock.forward, "DiT block", self.compile_backend)
        return DiTBlock.__call__

    def _run_blocks(self, tokens, text_len, temb, rope, reference_kv, key_mask, collect_kv: bool):
        collected_keys, collected_values = [], []
        run_block = self._block_runner()
        compiled_blocks = run_block is not DiTBlock.__call__
        if compiled_blocks:
            # token counts symbolic (else dynamo specialises them through the RoPE broadcast): one
            # compiled graph per pass kind serves every resolution instead of a recompile per size
            _mark_dynamic(tokens, 1)
            _mark_dynamic(rope[0], 0)
            _mark_dynamic(rope[1], 0)
            _mark_dynamic(key_mask, -1)
        for index, block in enumerate(self.transformer_blocks):
            reference = reference_kv.layer(index) if reference_kv is not None else None
            if compiled_blocks and reference is not None:
                _mark_dynamic(reference[0], 2)
                _mark_dynamic(reference[1], 2)
            tokens, (key, value) = run_block(block, tokens, text_len, temb, rope, reference, key_mask)
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
        """Common input handling: (tokens (B, L + N_img, dim), text_len, temb, rope)."""
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
        rope = rotary_cos_sin(h // p, w // p, self.config.attention_head_dim, self.config.rope_theta, device)
        tokens = torch.cat([text_tokens, image_tokens], dim=1)
        return tokens, text_tokens.shape[1], temb, rope

    # -- public API --------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, glyph_embeds: torch.Tensor, prior_token_ids: torch.Tensor,
                timestep, target_size, crop_coords=None, *,
                prior_drop: torch.Tensor | Sequence[bool] | None = None,
                glyph_mask: torch.Tensor | None = None,
                reference_kv: ReferenceKV | None = None,
                reference_rows: torch.Tensor | Sequence[bool] | None = None) -> torch.Tensor:
        """Velocity (B, out_channels, h, w) in the model dtype.

        latents (B, C, h, w); glyph_embeds (B, L, text_embed_dim) (L may be 0); prior_token_ids (B, N_img)
        long; timestep: float or (B,) — what the DiT sees, i.e. the schedule's t − 1 (spec §6.1);
        target_size: (H, W) pixels or (B, 2); crop_coords: (top, left), default (0, 0).
        prior_drop: (B,) or (B, N_img) bool; True zeroes the prior embedding (the unconditional pass).
        glyph_mask: (B, L) bool; False marks padding keys no query may attend (see `pad_glyph_rows`).
        reference_kv: reference-image K/V prepended to every block's keys (conditional pass only).
        reference_rows: (B,) bool; rows that see `reference_kv` (default all), so a batched CFG
            forward can hide it from its unconditional rows.
        """
        tokens, text_len, temb, rope = self._prepare(latents, glyph_embeds, prior_token_ids, timestep,
                                                     target_size, crop_coords, prior_drop)
        key_mask = self._key_mask(tokens.shape[0], tokens.shape[1], text_len, glyph_mask, reference_kv,
                                  reference_rows)
        tokens, _ = self._run_blocks(tokens, text_len, temb, rope, reference_kv, key_mask, collect_kv=False)
        image_tokens = self.proj_out(self.norm_out(tokens[:, text_len:], temb))  # the glyph stream is dropped
        return self._unpatchify(image_tokens, latents.shape[-2], latents.shape[-1])

    @staticmethod
    def _key_mask(batch, seq_len, text_len, glyph_mask, reference_kv, reference_rows):
        """(B, 1, 1, N_ref + S) bool for SDPA, or None when every row may attend to every key."""
        ref_len = reference_kv.num_tokens if reference_kv is not None else 0
        hide_reference = ref_len > 0 and reference_rows is not None
        if glyph_mask is None and not hide_reference:
            return None
        device = glyph_mask.device if glyph_mask is not None else reference_kv.keys[0].device
        mask = torch.ones(batch, ref_len + seq_len, dtype=torch.bool, device=device)
        if hide_reference:
            rows = torch.as_tensor(reference_rows, dtype=torch.bool, device=device)
            mask[:, :ref_len] = rows[:, None]
        if glyph_mask is not None:
            if glyph_mask.shape != (batch, text_len):
                raise ValueError(f"glyph_mask must be (B, L) = {(batch, text_len)}, got {tuple(glyph_mask.shape)}")
            mask[:, ref_len:ref_len + text_len] = glyph_mask.to(device)
        return mask[:, None, None, :]

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
            tokens, text_len, temb, rope = self._prepare(latent, no_glyph, prior_ids, 0.0, size, None, None)
            _, (keys, values) = self._run_blocks(tokens, text_len, temb, rope, None, None, collect_kv=True)
            parts.append(ReferenceKV(tuple(keys), tuple(values)))
        return ReferenceKV.concat(parts)

    @torch.no_grad()
    def predict_velocity(self, latents: torch.Tensor, glyph_embeds: torch.Tensor,
                         negative_glyph_embeds: torch.Tensor | None, prior_token_ids: torch.Tensor,
                         timestep, target_size, *, guidance: float, crop_coords=None,
                         reference_kv: ReferenceKV | None = None, batched_cfg: bool = False) -> torch.Tensor:
        """Guided velocity (B, C, h, w) float32 for one denoising step.

        cond = DiT(glyph, prior, reference_kv); uncond = DiT(negative glyph, prior dropped, no references)
        (spec §6.16); v = uncond + guidance·(cond − uncond), or cond alone when guidance <= 1.
        batched_cfg=False (default) runs two forwards like the reference. True runs both as ONE
        batch-2B forward (glyph padding and, with references, the reference keys masked for the
        unconditional rows); equal to the two passes within fp32 rounding, but measured SLOWER in eager
        bf16 on an H200 (1024²: 0.288 s vs 0.265 s per step; 2048²: 1.66 s vs 1.39 s; with each block
        torch.compile'd, 1024²: 0.215 s vs 0.208 s): at these token counts the GEMMs are already
        compute-bound, and the key mask costs attention speed.
        """
        if not uses_guidance(guidance):
            return self(latents, glyph_embeds, prior_token_ids, timestep, target_size, crop_coords,
                        reference_kv=reference_kv).float()
        if negative_glyph_embeds is None:
            raise ValueError("guidance > 1 needs negative_glyph_embeds (GlyphEncoder.encode_negative)")
        batch = latents.shape[0]
        if not batched_cfg:
            cond = self(latents, glyph_embeds, prior_token_ids, timestep, target_size, crop_coords,
                        reference_kv=reference_kv).float()
            uncond = self(latents, negative_glyph_embeds, prior_token_ids, timestep, target_size, crop_coords,
                          prior_drop=torch.ones(batch, dtype=torch.bool)).float()
            return guided_velocity(cond, uncond, guidance)

        device = self.device
        glyph, glyph_mask = pad_glyph_rows([glyph_embeds.expand(batch, -1, -1).to(device),
                                            negative_glyph_embeds.expand(batch, -1, -1).to(device)])
        is_cond = torch.arange(2 * batch, device=device) < batch  # rows [cond..., uncond...]
        prior_token_ids = prior_token_ids.reshape(-1, prior_token_ids.shape[-1]).expand(batch, -1)
        velocity = self(torch.cat([latents, latents]), glyph, torch.cat([prior_token_ids, prior_token_ids]),
                        torch.cat([_batch_scalars(timestep, batch, device)] * 2),
                        torch.cat([_batch_pairs(target_size, batch, device)] * 2),
                        None if crop_coords is None else torch.cat([_batch_pairs(crop_coords, batch, device)] * 2),
                        prior_drop=~is_cond, glyph_mask=glyph_mask, reference_kv=reference_kv,
                        reference_rows=is_cond if reference_kv is not None else None).float()
        cond, uncond = velocity.chunk(2)
        return guided_velocity(cond, uncond, guidance)


def load_dit(checkpoint_folder, device, dtype) -> GlmImageDiT:
    """GlmImageDiT from a GLM-Image folder's `transformer/` (built on meta, weights assigned, eval mode)."""
    from ..checkpoint import load_weights, open_checkpoint

    folder = open_checkpoint(checkpoint_folder)
    component = folder.component_dir("transformer")
    config = DiTConfig.from_dict(folder.read_config("transformer"), source=str(component / "config.json"))
    with torch.device("meta"):
        model = GlmImageDiT(config)
    load_weights(model, component, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
