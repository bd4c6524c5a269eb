"""Building blocks of the GLM-Image DiT (spec §1.5): embeddings, modulation, attention, the block.

Attribute names mirror the official checkpoint keys (spec §3.1), so `load_weights` needs no mapping.
Composition into the whole model lives in `model.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import fuse_checkpoint_keys
from .config import DiTConfig
from .fp8_mlp import gelu_then_fp8_linear, takes_gelu_fold

_gelu_tanh = partial(F.gelu, approximate="tanh")


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

    `net.1` is the (inference no-op) dropout slot of the reference; it has no parameters. With FP8 weights on FP8
    matrix units the DiT blocks' tanh-GELU MLP quantises its hidden in one pass (fp8_mlp.py).
    """

    def __init__(self, dim_in: int, inner_dim: int, dim_out: int, activation):
        super().__init__()
        self.net = nn.ModuleList([
            _LinearThenActivation(dim_in, inner_dim, activation),
            nn.Identity(),
            nn.Linear(inner_dim, dim_out),
        ])
        # whether the tanh GELU may fold into an FP8 second linear's row quantisation (fp8_mlp.py); decided here, not
        # per call: dynamo does not see a partial stored on a module as the same object
        self.folds_gelu = activation is _gelu_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, down = self.net[0], self.net[2]
        hidden = first.proj(x)
        if self.folds_gelu and takes_gelu_fold(hidden, down):
            return gelu_then_fp8_linear(hidden, down)
        return down(first.activation(hidden))


class TwoLayerMLP(nn.Module):
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
        self.timestep_embedder = TwoLayerMLP(config.time_embed_dim, config.time_embed_dim, config.time_embed_dim)
        self.condition_embedder = TwoLayerMLP(config.size_condition_dim, config.time_embed_dim,
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


def rotary_cos_sin(grid_h: int, grid_w: int, head_dim: int, theta: float, device: torch.device,
                   text_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables (text_len + N_img, head_dim) float32 for `text_len` text tokens followed by a row-major
    (grid_h, grid_w) patch grid.

    Per head: dims [0, D/4) rotate with the row, [D/4, D/2) with the column, and the second half
    repeats the first, so `rotate_half` pairs dim i with i + D/2 (spec §1.5 step 1). Text tokens carry no
    position (spec §6.14): their rows are the identity rotation (cos 1, sin 0), which leaves them exactly as
    they are, so one rotation covers the whole [text, image] sequence and the block needs no text length.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    rows = torch.outer(torch.arange(grid_h, dtype=torch.float32, device=device), inv_freq)  # (gh, D/4)
    cols = torch.outer(torch.arange(grid_w, dtype=torch.float32, device=device), inv_freq)  # (gw, D/4)
    freqs = torch.cat([rows[:, None, :].expand(grid_h, grid_w, -1),
                       cols[None, :, :].expand(grid_h, grid_w, -1)], dim=-1)  # (gh, gw, D/2)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(grid_h * grid_w, head_dim)
    cos, sin = freqs.cos(), freqs.sin()
    if text_len:
        cos = torch.cat([cos.new_ones(text_len, head_dim), cos])
        sin = torch.cat([sin.new_zeros(text_len, head_dim), sin])
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, N, heads, D) in fp32, cast back to x's dtype (spec §1.5 step 6)."""
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x_float * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Modulation


@dataclass
class ModulationOut:
    """One AdaLN-Zero modulation: x -> LN(x)·(1 + scale) + shift, and the residual gate. Each (B, 1, dim)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, normed: torch.Tensor) -> torch.Tensor:
        return normed * (1 + self.scale) + self.shift


@dataclass
class BlockModulation:
    """The block's four modulations: attention and MLP, each for the image and the text (glyph) stream."""

    attn_image: ModulationOut
    attn_text: ModulationOut
    mlp_image: ModulationOut
    mlp_text: ModulationOut


class AdaLayerNormZero(nn.Module):
    """`norm1`: the 12-way modulation (key `linear`); the LayerNorms themselves have no weights."""

    def __init__(self, time_embed_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 12 * dim)

    def forward(self, temb: torch.Tensor) -> BlockModulation:
        # Chunk order (spec §1.5 step 6): image and text ("c_") chunks interleaved:
        # shift, c_shift, scale, c_scale, gate, c_gate for attention, then the same six for the MLP.
        chunks = self.linear(temb)[:, None, :].chunk(12, dim=-1)  # each (B, 1, dim)
        image, text = chunks[0::2], chunks[1::2]
        return BlockModulation(attn_image=ModulationOut(*image[:3]), attn_text=ModulationOut(*text[:3]),
                               mlp_image=ModulationOut(*image[3:]), mlp_text=ModulationOut(*text[3:]))


def modulate_streams(normed: torch.Tensor, is_text: torch.Tensor, text: ModulationOut, image: ModulationOut
                     ) -> torch.Tensor:
    """Each token of one [text, image] sequence with its own stream's modulation; is_text (S,) bool.

    A per-token choice rather than slices at the text length: the block then compiles once for any
    text length (a length of 0 or 1, as in the reference and the unconditional passes, would otherwise
    be a graph of its own), and each element is computed by the same arithmetic as before."""
    return torch.where(is_text[:, None], text.modulate(normed), image.modulate(normed))


def gate_streams(out: torch.Tensor, is_text: torch.Tensor, text: ModulationOut, image: ModulationOut) -> torch.Tensor:
    return torch.where(is_text[:, None], out * text.gate, out * image.gate)


# --------------------------------------------------------------------------------------------
# Attention and the block


class Attention(nn.Module):
    """`attn1`: shared QKV over [text, image], QK LayerNorm over head_dim, RoPE on image tokens only.

    The checkpoint's `to_q`, `to_k` and `to_v` are one projection here, `to_qkv` (rows q | k | v), concatenated when
    the weights load (`checkpoint_fusions`, as the AR's `qkv_proj`): one matmul instead of three, and with FP8
    weights one quantisation of its input instead of three.
    """

    checkpoint_fusions = {
        "to_qkv.weight": ("to_q.weight", "to_k.weight", "to_v.weight"),
        "to_qkv.bias": ("to_q.bias", "to_k.bias", "to_v.bias"),
        "to_qkv.weight_scale": ("to_q.weight_scale", "to_k.weight_scale", "to_v.weight_scale"),  # FP8
    }

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.dim = dim
        self.heads = config.num_attention_heads
        self.head_dim = config.attention_head_dim
        self.eps = config.norm_eps
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self._register_load_state_dict_pre_hook(fuse_checkpoint_keys, with_module=True)

    def fused_part_sizes(self) -> tuple[int, int, int]:
        return self.dim, self.dim, self.dim

    def _heads(self, x: torch.Tensor, rope, normalize: bool) -> torch.Tensor:
        x = x.unflatten(-1, (self.heads, self.head_dim))  # (B, S, heads, D)
        if not normalize:
            return x.transpose(1, 2)
        x = F.layer_norm(x, (self.head_dim,), eps=self.eps)
        x = apply_rotary(x, *rope)  # the text rows of the tables are the identity (`rotary_cos_sin`)
        return x.transpose(1, 2)  # (B, heads, S, D)

    def forward(self, tokens: torch.Tensor, rope, reference=None):
        """tokens (B, S, dim) -> (out (B, S, dim), (k, v) each (B, heads, S, D) as fed to the reference cache).

        `reference`: (k, v) each (1, heads, N_ref, D) prepended to this pass's keys / values.
        """
        query, key, value = self.to_qkv(tokens).chunk(3, dim=-1)
        query = self._heads(query, rope, normalize=True)
        key = self._heads(key, rope, normalize=True)
        value = self._heads(value, rope, normalize=False)
        own_kv = (key, value)
        if reference is not None:
            batch = tokens.shape[0]
            ref_key, ref_value = reference
            key = torch.cat([ref_key.expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([ref_value.expand(batch, -1, -1, -1), value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, S, D)
        out = out.transpose(1, 2).flatten(2).to(tokens.dtype)
        return self.to_out[0](out), own_kv


class DiTBlock(nn.Module):
    """`transformer_blocks.N`: single-stream block with dual (text / image) AdaLN modulation."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.eps = config.norm_eps
        self.norm1 = AdaLayerNormZero(config.time_embed_dim, dim)
        self.attn1 = Attention(config)
        self.ff = FeedForward(dim, 4 * dim, dim, _gelu_tanh)

    def forward(self, tokens: torch.Tensor, is_text: torch.Tensor, temb: torch.Tensor, rope, reference=None):
        """tokens (B, L + N_img, dim) -> same shape, plus this block's (k, v) for the reference cache.
        is_text (L + N_img,) bool marks the text tokens; rope: (L + N_img, D) tables (`rotary_cos_sin`)."""
        mod = self.norm1(temb)
        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=self.eps)
        attn_out, own_kv = self.attn1(modulate_streams(normed, is_text, mod.attn_text, mod.attn_image),
                                      rope, reference)
        tokens = tokens + gate_streams(attn_out, is_text, mod.attn_text, mod.attn_image)

        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=self.eps)
        ff_out = self.ff(modulate_streams(normed, is_text, mod.mlp_text, mod.mlp_image))  # one FFN, both streams
        tokens = tokens + gate_streams(ff_out, is_text, mod.mlp_text, mod.mlp_image)
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
