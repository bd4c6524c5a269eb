"""The GLM-Image AR model: a GLM-4-style text decoder with 3-D M-RoPE and a vision-vocab head
(spec §1.2.3), plus the reference-image tokenizer from `vision.py`.

Attribute names mirror the checkpoint keys (spec §3.1) so `load_weights` needs no mapping:
`model.visual.*`, `model.language_model.*`, `model.vqmodel.*`, `lm_head.weight`.

The model holds no generation state. A `KVCache` (decode.py) is passed in explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ARConfig, TextConfig
from .vision import VisionModel, VQModel, activation, reference_image_ids


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale: the cast comes before the weight (spec §1.2.3)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# How a decode token attends over the static KV cache inside the compiled decode layer (eager calls
# always use "sdpa"): "sdpa" = one SDPA call with the group's query heads as rows (a cuDNN kernel with
# only B * kv_heads thread blocks: 32 µs per layer on an H200 at 1382 keys), "gqa" = SDPA over all
# query heads with enable_gqa (6.7 µs), "reduce" = fp32 products and sums that inductor turns into
# reduction kernels (slow at batch 4). bench/fast_paths.py, H200, ms per decode token: 7.18 / 6.14 / 6.93.
DECODE_ATTENTION = "gqa"


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One decode token. q (B, kv_heads, group, d): the query heads sharing a kv head as rows;
    k, v (B, kv_heads, S, d); mask (B, 1, 1, S) bool or None -> (B, kv_heads, group, d)."""
    mode = DECODE_ATTENTION if torch.compiler.is_compiling() else "sdpa"
    if mode == "gqa":
        b, kv_heads, group, d = q.shape
        out = F.scaled_dot_product_attention(q.reshape(b, kv_heads * group, 1, d), k, v, attn_mask=mask,
                                             enable_gqa=True)  # (B, heads, 1, d)
        return out.view(b, kv_heads, group, d)
    if mode == "reduce":
        scale = q.shape[-1] ** -0.5
        scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * scale  # (B, kv, g, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        return (probs[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)  # (B, kv, g, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotate-half over the first rotary_dim dims; the rest pass through.

    x (B, heads, L, head_dim); cos, sin (B, 1, L, rotary_dim) in x's dtype.
    """
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        # (q|k|v) rows stacked, set by `fuse_qkv`; q/k/v_proj then hold views of it (no extra memory,
        # the checkpoint key names stay). Non-persistent: never in the state dict.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to() / .float() / ... convert each parameter on its own, which would leave the fused copy and
        # three separate ones (twice the q/k/v memory, e.g. after offloading to the CPU): drop the fused
        # copy first; the decode loop fuses again on its next call.
        self.qkv_weight = self.qkv_bias = None
        return super()._apply(fn, recurse)

    def _qkv_parts(self):
        return [(self.q_proj, "weight"), (self.k_proj, "weight"), (self.v_proj, "weight")], \
            [(self.q_proj, "bias"), (self.k_proj, "bias"), (self.v_proj, "bias")]

    def qkv_fused(self) -> bool:
        """True when qkv_weight / qkv_bias exist and q/k/v_proj still point into them (not after `.to()`,
        `load_state_dict(assign=True)` or anything else that replaced a projection's tensors)."""
        for fused, parts in zip((self.qkv_weight, self.qkv_bias), self._qkv_parts()):
            tensors = [getattr(module, name) for module, name in parts]
            if fused is None:
                if tensors[0] is None:
                    continue
                return False
            offset = fused.data_ptr()
            for t in tensors:
                if t is None or t.device != fused.device or t.dtype != fused.dtype or t.data_ptr() != offset:
                    return False
                offset += t.numel() * t.element_size()
        return self.qkv_weight is not None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """One matmul for q, k and v (a decode token reads one (q+2kv, hidden) weight instead of three,
        the two small kv GEMVs being the least efficient). Idempotent; re-fuses when stale."""
        if self.qkv_fused():
            return
        for fused_name, parts in zip(("qkv_weight", "qkv_bias"), self._qkv_parts()):
            tensors = [getattr(module, name) for module, name in parts]
            if tensors[0] is None:
                setattr(self, fused_name, None)
                continue
            fused = torch.cat([t.detach() for t in tensors])
            setattr(self, fused_name, fused)
            start = 0
            for (module, name), t in zip(parts, tensors):
                setattr(module, name, nn.Parameter(fused[start : start + t.shape[0]], requires_grad=False))
                start += t.shape[0]

    def _project_qkv(self, x: torch.Tensor):
        if self.qkv_weight is not None and (torch.compiler.is_compiling() or self.qkv_fused()):
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return F.linear(x, self.qkv_weight, self.qkv_bias).split([q_size, kv_size, kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, attn_mask, layer_cache=None, cache_index=None):
        """x (B, L, hidden); attn_mask (B, 1, L, S) bool, True = may attend; None = causal, no padding.

        layer_cache None: attend over this call's keys (teacher forcing).
        layer_cache and cache_index None: prefill, write keys at [0, L) and attend over them.
        layer_cache and cache_index (1,) long: one decode token, write at cache_index and attend over
        the whole preallocated cache (static shapes).
        """
        b, length, _ = x.shape
        q, k, v = self._project_qkv(x)
        q = q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if layer_cache is not None:
            if cache_index is None:
                layer_cache.write_prefix(k, v)
            else:
                k, v = layer_cache.write_at(cache_index, k, v)
        group = self.num_heads // self.num_kv_heads
        if length == 1 and group > 1:
            # one decode token: the `group` query heads sharing a kv head become `group` query rows
            # against that head's keys, so no kernel has to expand the cache (q head h uses kv head h // group)
            q = q.view(b, self.num_kv_heads, group, self.head_dim)
            out = decode_attention(q, k, v, attn_mask)  # (B, kv, group, d)
            return self.o_proj(out.reshape(b, 1, -1))
        if attn_mask is None:  # unpadded prompt: plain causal attention (flash kernels, native GQA)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        else:
            # a padding mask rules out flash kernels, and the masked kernels do not all take GQA; expanding
            # the kv heads here avoids a fallback that would materialise (B, heads, L, L) scores
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class TextMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # gate rows come first in the fused weight
        return self.down_proj(up * self.act(gate))


class TextDecoderLayer(nn.Module):
    """Sandwich-norm block: four RMSNorms (spec §1.2.3)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = TextAttention(config)
        self.mlp = TextMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, attn_mask, layer_cache=None, cache_index=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, layer_cache, cache_index)
        x = x + self.post_self_attn_layernorm(attn)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TextDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, attn_mask, kv_cache=None, cache_index=None, run_layer=None) -> torch.Tensor:
        """hidden (B, L, hidden) embeddings -> final-normed hidden states (B, L, hidden).

        run_layer(layer, hidden, cos, sin, attn_mask, layer_cache, cache_index): how to call each layer
        (the decode loop passes a torch.compile'd `TextDecoderLayer.forward`); None = call it.
        """
        for i, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else kv_cache.layers[i]
            if run_layer is None:
                hidden = layer(hidden, cos, sin, attn_mask, layer_cache, cache_index)
            else:
                hidden = run_layer(layer, hidden, cos, sin, attn_mask, layer_cache, cache_index)
        return self.norm(hidden)


class GlmImageARBackbone(nn.Module):
    """Holds the three sub-models under the checkpoint's `model.` prefix."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.visual = VisionModel(config.vision)
        self.language_model = TextModel(config.text)
        self.vqmodel = VQModel(config.vq)


class GlmImageAR(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        text = config.text
        if 2 * sum(text.mrope_section) != text.rotary_dim:
            raise ValueError(
                f"config.json: rope mrope_section {list(text.mrope_section)} must sum to head_dim * "
                f"partial_rotary_factor / 2 = {text.rotary_dim // 2}"
            )
        if config.vq.latent_channels != config.vision.hidden_size:
            raise ValueError(
                f"config.json: vq_config.latent_channels {config.vq.latent_channels} must equal "
                f"vision_config.hidden_size {config.vision.hidden_size}"
            )
        self.config = config
        self.model = GlmImageARBackbone(config)
        self.lm_head = nn.Linear(text.hidden_size, text.vision_vocab_size, bias=False)

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, always computed in fp32 on the CPU (never rounded with the weights)."""
        text = self.config.text
        dim = text.rotary_dim
        return 1.0 / (text.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def rotary_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, B, L) long (t, h, w) -> cos, sin (B, 1, L, rotary_dim) in `dtype`.

        Frequency slot k takes its angle from axis a(k) given by mrope_section, then the 32 (for the
        real model) slots are duplicated for rotate-half. Computed in fp32, then cast (spec §1.2.3).
        """
        inv_freq = self.inv_freq().to(positions.device)
        angles = positions[..., None].float() * inv_freq  # (3, B, L, rotary_dim/2)
        sections = self.config.text.mrope_section
        axis_of_slot = torch.tensor([i % 3 for i, n in enumerate(sections) for _ in range(n)], device=positions.device)
        # for each slot, the angle of its axis: (B, L, rotary_dim/2)
        angles = angles.gather(0, axis_of_slot.view(1, 1, 1, -1).expand(1, *angles.shape[1:]))[0]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    def hidden_states(self, hidden, cos, sin, attn_mask, kv_cache=None, cache_index=None, run_layer=None
                      ) -> torch.Tensor:
        return self.model.language_model(hidden, cos, sin, attn_mask, kv_cache, cache_index, run_layer)

    def fuse_projections(self) -> None:
        """Fuse each text layer's q/k/v projections into one matmul (see `TextAttention.fuse_qkv`)."""
        for layer in self.model.language_model.layers:
            layer.self_attn.fuse_qkv()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def image_token_ids(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Reference images -> codebook ids (Σ h*w,) long, row-major per image, images in order."""
        return reference_image_ids(self.model.visual, self.model.vqmodel, pixel_values.to(self.device), grids)


def load_ar(checkpoint_folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> GlmImageAR:
    """Build the AR model on the meta device and assign the checkpoint's weights straight to device/dtype."""
    from ..checkpoint import load_weights, open_checkpoint

    folder = open_checkpoint(checkpoint_folder)
    component = folder.component_dir("vision_language_encoder")
    config = ARConfig.from_folder(component)
    with torch.device("meta"):
        model = GlmImageAR(config)
    load_weights(model, component, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
