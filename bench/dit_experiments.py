"""Candidate changes to the DiT's elementwise work, tried by bench.dit_profile on a loaded model before any goes into
glm_core (each is installed on the model's blocks and taken off again; none is used by the product).

Why these (bench.dit_profile on the H200, 2026-11-30 15:36): the MLP's GELU over the 4100 × 16384 hidden is the
largest elementwise kernel of a guided step (bf16: 98 µs a call against ~63 µs for its bytes; FP8: fused with the
row quantisation of the second linear's input, 248 µs a call against ~80 µs for its bytes). Both run more
arithmetic than bytes: the tanh form of GELU costs a libdevice tanh per element, and the FP8 kernel computes the
GELU twice, once for the row maxima and again for the quantised values.

- `sigmoid_form_gelu`: the same function, 0.5·x·(1 + tanh(u)) = x·σ(2u) with u = √(2/π)·(x + 0.044715·x³), through a
  sigmoid (an exponential and a reciprocal) instead of a tanh. Equal up to fp32 rounding.
- `RowMaxQuantisedMLP` (FP8): the second linear's input rows quantised with a scale taken from the row maximum of
  the hidden BEFORE the GELU: GELU rises monotonically above x ≈ -0.75 and stays within 0.1701 in magnitude below
  it, so max|gelu(h)| over a row is gelu(max h) whenever that is ≥ 0.1701 (always, for real activations), and never
  more than max(gelu(max h), 0.1701). The scale is then the same as the exact one (a bound where it is not), and the
  row maxima need no GELU: one GELU per element.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glm_core.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, SCALED_MM_ALIGNMENT, Fp8Linear, scaled_mm_quantised

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# max |gelu_tanh(x)| over x < 0 (at x ≈ -0.7518: 0.170041), rounded up
GELU_NEGATIVE_BOUND = 0.1701


def sigmoid_form_gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") as x·σ(2u), computed in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * torch.sigmoid(2.0 * SQRT_2_OVER_PI * (x32 + 0.044715 * x32 * x32 * x32))).to(x.dtype)


class RowMaxQuantisedMLP(nn.Module):
    """An FP8 block's `ff` (Linear -> GELU -> Fp8Linear) with the second linear's input scales taken from the row
    maxima before the GELU (module docstring). Holds the original `ff` and calls its layers."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        self.inner = ff
        down = ff.net[2]
        if not isinstance(down, Fp8Linear):
            raise ValueError("RowMaxQuantisedMLP needs an FP8 second linear (weights='fp8')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, down = self.inner.net[0], self.inner.net[2]
        hidden = first.proj(x)  # (..., 4·dim) in the compute dtype
        rows = hidden.reshape(-1, hidden.shape[-1])
        count = rows.shape[0]
        pad = (-count) % SCALED_MM_ALIGNMENT
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))  # zero rows: gelu(0) = 0, their scale the bound
        row_max = rows.amax(dim=1, keepdim=True).float()
        amax = torch.clamp(F.gelu(row_max, approximate="tanh"), min=GELU_NEGATIVE_BOUND)
        scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
        activated = first.activation(rows)  # the block's GELU, rounded to the compute dtype as the product does
        quantised = (activated.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out = scaled_mm_quantised(quantised, scale, down.weight, down.weight_scale, down.bias, x.dtype,
                                  use_fast_accum=down.use_fast_accum)
        if pad:
            out = out[:count]
        return out.reshape(*hidden.shape[:-1], down.out_features)


def install(dit: nn.Module, experiments: set[str]) -> list:
    """Put the named experiments ("sgelu", "rowmax") on the DiT's blocks; returns what `remove` needs."""
    undo = []
    for block in dit.transformer_blocks:
        if "sgelu" in experiments:
            first = block.ff.net[0]
            undo.append((first, "activation", first.activation))
            first.activation = sigmoid_form_gelu
        if "rowmax" in experiments:
            undo.append((block, "ff", block.ff))
            block.ff = RowMaxQuantisedMLP(block.ff)
    return undo


def remove(undo: list) -> None:
    for owner, name, original in reversed(undo):
        setattr(owner, name, original)
