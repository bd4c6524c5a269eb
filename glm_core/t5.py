"""The glyph encoder's network: a T5 encoder (ByT5-small in GLM-Image, spec §1.4), as plain nn.Modules.

Module names follow the checkpoint's keys (`shared`, `encoder.block.{i}.layer.0.SelfAttention.q`, ...,
`encoder.final_layer_norm`), so `text_encoder/model.safetensors` loads as stored. The arithmetic is transformers
5.23's `T5EncoderModel` under its default SDPA attention, op for op, so that the embeddings are bit-identical to the
reference's on the same device and dtype (tests/parity/test_glyph.py): fp32 variance in the norms, no attention
scaling, one relative-position bias computed by the first block and added by every block, `wo` run in its own dtype
(fp32 under fp16), and fp16 activations clamped after each sub-layer.

Why not transformers' class: importing it pulls in transformers' model machinery, seconds of a cold start (2.7 of
the 2.8 s that checking the tiny checkpoint took on this project's CPU machine, most of it imports), for a
14-module encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float

    @classmethod
    def from_dict(cls, config: dict) -> "T5EncoderConfig":
        """From text_encoder/config.json. Only the gated-GELU feed-forward that GLM-Image's ByT5 uses is built."""
        projection = config.get("feed_forward_proj", "relu")
        if projection != "gated-gelu":
            raise ValueError(f"text_encoder/config.json: feed_forward_proj {projection!r} is not supported; GLM-Image's "
                             "glyph encoder (ByT5) uses 'gated-gelu' (is this a GLM-Image checkpoint?)")
        missing = [name for name in cls.__dataclass_fields__ if name not in config]
        if missing:
            raise ValueError(f"text_encoder/config.json lacks {', '.join(missing)}")
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """T5's `gelu_new`, written as transformers writes it (the fused torch kernel rounds differently)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def clamp_fp16(hidden: torch.Tensor) -> torch.Tensor:
    """T5 keeps fp16 activations finite: clamp to the fp16 range (1000 inside it once an inf appeared)."""
    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.where(torch.isinf(hidden).any(), torch.finfo(torch.float16).max - 1000,
                        torch.finfo(torch.float16).max)
    return torch.clamp(hidden, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """RMS norm without bias; statistics in fp32, result in the weight's dtype when that is half precision."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.to(self.weight.dtype)
        return self.weight * hidden


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int,
                              device) -> torch.Tensor:
    """(Q, K) long: T5's bidirectional buckets of key position - query position (exact near, logarithmic far)."""
    relative = (torch.arange(key_length, dtype=torch.long, device=device)[None, :]
                - torch.arange(query_length, dtype=torch.long, device=device)[:, None])
    num_buckets //= 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    relative = torch.abs(relative)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


class T5SelfAttention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.config = config
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """(1, heads, L, L): the learned bias of each relative-position bucket."""
        buckets = relative_position_buckets(length, length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance, device)
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        shape = (batch, length, -1, self.head_dim)
        q = self.q(hidden).view(shape).transpose(1, 2)  # (B, heads, L, d_kv)
        k = self.k(hidden).view(shape).transpose(1, 2)
        v = self.v(hidden).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=0.0, scale=1.0,
                                             is_causal=False)  # T5 does not scale the scores
        out = out.reshape(out.shape[0], -1, length, v.shape[-1]).transpose(1, 2).contiguous()
        return self.o(out.reshape(batch, length, -1).contiguous())


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5SelfAttention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return hidden + self.SelfAttention(self.layer_norm(hidden), additive_mask)


class T5GatedFeedForward(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = gelu_tanh(self.wi_0(hidden)) * self.wi_1(hidden)
        if hidden.dtype != self.wo.weight.dtype:  # wo may stay fp32 under fp16 (glyph.py: _keep_fp32_rule)
            hidden = hidden.to(self.wo.weight.dtype)
        return self.wo(hidden)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        hidden = clamp_fp16(self.layer[0](hidden, additive_mask))
        return clamp_fp16(self.layer[1](hidden))


class T5Stack(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.block = nn.ModuleList([T5Block(config, has_relative_attention_bias=i == 0)
                                    for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """input_ids (B, L) and attention_mask (B, L) (1 = token, 0 = padding) -> last hidden states (B, L, d_model)."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        self.encoder.embed_tokens = self.shared  # one tied matrix (the checkpoint may store either name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.shared(input_ids)  # (B, L, d_model)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], hidden.device)  # (1, heads, L, L), every block adds it
        if attention_mask is None or bool(attention_mask.all()):
            additive_mask = bias.contiguous()
        else:  # padded keys get the dtype's lowest value instead of their bias
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            additive_mask = torch.where(keep, bias, torch.finfo(first.k.weight.dtype).min).contiguous()
        for block in self.encoder.block:
            hidden = block(hidden, additive_mask)
        return self.encoder.final_layer_norm(hidden)
