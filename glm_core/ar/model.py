"""The GLM-Image AR model: a GLM-4-style text decoder with 3-D M-RoPE and a vision-vocab head
(spec §1.2.3). The reference-image tokenizer in the same checkpoint files is `vision.py`.

Attribute names mirror the checkpoint keys (spec §3.1) so `load_weights` needs no mapping
(`model.language_model.*`, `lm_head.weight`), except q/k/v, which are fused as they load. The decoder's
linears and the head are `GemvLinear`s: their batch-1 decode steps take the one-row GEMV (glm_core/gemv.py); in
the compiled decode layer on a GPU a token's attention is two kernels of our own (glm_core/decode_attention.py).

The model holds no generation state. A `KVCache` (decode.py) is passed in explicitly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import fuse_checkpoint_keys
from ..decode_attention import attend as attend_one_token
from ..decode_attention import takes_decode_attention
from ..gemv import GemvLinear
from .config import ARConfig, TextConfig
from .vision import activation


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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One decode token. q (B, kv_heads, group, d): the query heads sharing a kv head as rows;
    k, v (B, kv_heads, S, d); mask (B, 1, 1, S) bool or None -> (B, kv_heads, group, d).

    Eagerly, one SDPA call with the group's query heads as rows (no kernel has to expand the cache).
    Inside the compiled decode layer on GPUs where glm_core/decode_attention.py does not run, SDPA over all query
    heads with enable_gqa: there the group-as-rows form picks a cuDNN kernel with only B * kv_heads thread blocks
    (H200, 1382 keys: 32 vs 6.7 µs per layer; 6.1 vs 7.2 ms per decode token).
    """
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, kv_heads, group, d = q.shape
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads * group, 1, d), k, v, attn_mask=mask,
                                         enable_gqa=True)  # (B, heads, 1, d)
    return out.view(b, kv_heads, group, d)


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
    """GQA self-attention with q/k/v in ONE projection, `qkv_proj` (rows q | k | v).

    The checkpoint stores `q_proj`, `k_proj` and `v_proj` (spec §3.1); they are concatenated once, when
    the weights load (`checkpoint_fusions`, read by `checkpoint.load_weights` and by the state-dict hook
    for `load_state_dict`): a decode token then reads one (q+2kv, hidden) weight instead of three, the
    two small kv GEMVs being the least efficient.
    """

    checkpoint_fusions = {
        "qkv_proj.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
        "qkv_proj.bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
        "qkv_proj.weight_scale": ("q_proj.weight_scale", "k_proj.weight_scale", "v_proj.weight_scale"),  # FP8
    }

    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = GemvLinear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = GemvLinear(self.num_heads * self.head_dim, hidden, bias=False)
        self._register_load_state_dict_pre_hook(fuse_checkpoint_keys, with_module=True)

    def fused_part_sizes(self) -> tuple[int, int, int]:
        return self.q_size, self.kv_size, self.kv_size

    def forward(self, x, cos, sin, attn_mask, layer_cache=None, cache_index=None):
        """x (B, L, hidden); attn_mask (B, 1, L, S) bool, True = may attend; None = causal, no padding.

        layer_cache None: attend over this call's keys (teacher forcing).
        layer_cache and cache_index None: prefill, write keys at [0, L) and attend over them.
        layer_cache and cache_index (1,) long: one decode token, write at cache_index and attend over
        the whole preallocated cache (static shapes).
        """
        b, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        k = k.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if layer_cache is not None:
            if cache_index is None:
                layer_cache.write_prefix(k, v)
            else:
                k, v = layer_cache.write_at(cache_index, k, v)
        if cache_index is not None and attn_mask is not None and takes_decode_attention(q):
            # one decode token in compiled code: q's rotary, the GQA rows and the mask inside the kernels
            out = attend_one_token(q.view(b, self.num_heads, self.head_dim), cos.reshape(b, -1),
                                   sin.reshape(b, -1), k, v, attn_mask.reshape(b, -1))  # (B, heads, d)
            return self.o_proj(out.view(b, 1, -1))
        q = q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
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
        self.gate_up_proj = GemvLinear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = GemvLinear(config.intermediate_size, config.hidden_size, bias=False)
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
    """The text decoder under the checkpoint's `model.` prefix (the vision tower and the VQ beside it in the
    same files are the separate "vision" stage, `vision.VisionTokenizer`)."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.language_model = TextModel(config.text)


class GlmImageAR(nn.Module):
    """Text decoder + vision-vocab head: the stage that samples the token grid."""

    def __init__(self, config: ARConfig):
        super().__init__()
        text = config.text
        if 2 * sum(text.mrope_section) != text.rotary_dim:
            raise ValueError(
                f"config.json: rope mrope_section {list(text.mrope_section)} must sum to head_dim * "
                f"partial_rotary_factor / 2 = {text.rotary_dim // 2}"
            )
        self.config = config
        self.model = GlmImageARBackbone(config)
        self.lm_head = GemvLinear(text.hidden_size, text.vision_vocab_size, bias=False)
        # None: the decode layer runs eagerly; else the torch.compile backend of the decode layer. Set by
        # the loader (`glm_core.compiling.compile_backend`).
        self.compile_backend: str | None = None

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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


# The linears stored in FP8 when the AR loads with weights="fp8": every projection of the decoder layers (the
# bytes each decode token reads). Embeddings, norms and the vision-vocab head stay in the compute dtype.
FP8_LINEARS = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))")


def is_vision_key(key: str) -> bool:
    """Checkpoint keys of the vision stage (tower + VQ) inside vision_language_encoder/ (spec §3.1)."""
    return key.startswith(("model.visual.", "model.vqmodel."))


def load_ar(checkpoint_folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
            *, compile: bool | None = None, weights: str = "bf16", dry_run: bool = False) -> GlmImageAR:
    """Build the text decoder on the meta device and assign the checkpoint's weights straight to device/dtype
    (the vision tower's keys in the same files are left for `vision.load_vision`). weights="fp8": the decoder
    layers' linears in FP8 (quantised as they load, or read as stored from a pre-quantised folder)."""
    from ..checkpoint import load_weights, open_checkpoint
    from ..compiling import compile_backend
    from ..fp8 import use_fp8_linears_

    folder = open_checkpoint(checkpoint_folder)
    component = folder.component_dir("vision_language_encoder")
    config = ARConfig.from_folder(component)
    with torch.device("meta"):
        model = GlmImageAR(config)
    use_fp8_linears_(model, FP8_LINEARS, weights, component)
    load_weights(model, component, device=device, dtype=dtype, ignore_keys=is_vision_key, dry_run=dry_run)
    model.compile_backend = compile_backend(device, compile)
    return model.eval().requires_grad_(False)
