"""The FP8 DiT MLP's GELU and its second linear's input quantisation in one pass over the hidden.

A DiT block's MLP is Linear(4096 -> 16384) -> GELU (tanh form) -> Linear(16384 -> 4096). With FP8 weights on FP8
matrix units the second linear quantises its input per row (glm_core/fp8.py): scale = max |gelu(h)| / 448 over the
row. Computed as written, the GELU of the 4100 × 16384 hidden runs twice, once for the row maxima and again for the
quantised values, and that one fused kernel was the largest elementwise kernel of an FP8 guided step (H200,
2026-11-30: 256 µs a call, 15 ms of a 146 ms step). Here the row maxima come from the hidden before the GELU, so the
GELU runs once, in its sigmoid form:

- GELU rises monotonically above x ≈ -0.7518 and stays within GELU_NEGATIVE_BOUND in magnitude below it, so
  max |gelu(h)| over a row is gelu(max h) whenever that reaches the bound (always, for a real activation row),
  and never more than max(gelu(max h), bound) otherwise: the scale is the exact one, or a larger one (no overflow).
- 0.5·x·(1 + tanh(u)) = x·σ(2u) with u = √(2/π)·(x + 0.044715·x³): the same function through an exponential and a
  reciprocal instead of a tanh, equal up to fp32 rounding.

Measured with `bench.dit_profile` (H200, 2026-11-30 17:31): the kernel 129 µs a call instead of 256, a guided step
0.1408 s instead of 0.1457, the guided velocity's distance from bf16 unchanged (1.784e-2). Where the second linear
does not quantise its input (bf16 weights, the weight-only FP8 path of CPUs and pre-Ada GPUs) the MLP is unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fp8 import FP8_MAX, MIN_SCALE, Fp8Linear, cast_rows, quantizes_rows, scaled_mm_linear

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# max |gelu_tanh(x)| over x < 0 (0.170041 at x ≈ -0.7518), rounded up
GELU_NEGATIVE_BOUND = 0.1701


def gelu_tanh_by_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") as x·σ(2u), computed in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * torch.sigmoid(2.0 * SQRT_2_OVER_PI * (x32 + 0.044715 * x32 * x32 * x32))).to(x.dtype)


def gelu_row_scales(hidden_rows: torch.Tensor) -> torch.Tensor:
    """(M, C) hidden before the GELU -> (M, 1) fp32 e4m3 scales of its GELU's rows (the module docstring)."""
    row_max = hidden_rows.amax(dim=1, keepdim=True).float()
    largest = torch.clamp(F.gelu(row_max, approximate="tanh"), min=GELU_NEGATIVE_BOUND)
    return (largest / FP8_MAX).clamp(min=MIN_SCALE)


def takes_gelu_fold(hidden: torch.Tensor, down: torch.nn.Module) -> bool:
    """Whether down(gelu(hidden)) goes through `gelu_then_fp8_linear`: an FP8 second linear that quantises these
    rows (a constant at trace time, no data-dependent branch)."""
    return isinstance(down, Fp8Linear) and quantizes_rows(hidden)


def gelu_quantize_rows(hidden_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) hidden before the GELU -> its GELU's rows in e4m3 and their (M, 1) fp32 scales, the GELU computed once.
    Zero (padding) rows give zeros: gelu(0) = 0, their scale the bound."""
    scale = gelu_row_scales(hidden_rows)
    # the GELU rounded to the compute dtype before the e4m3 cast, as the unfolded MLP's activation is
    return cast_rows(gelu_tanh_by_sigmoid(hidden_rows), scale), scale


def gelu_then_fp8_linear(hidden: torch.Tensor, down: Fp8Linear) -> torch.Tensor:
    """down(gelu_tanh(hidden)) for hidden (..., C) in the compute dtype, on the `_scaled_mm` path."""
    return scaled_mm_linear(hidden, down.weight, down.weight_scale, down.bias, use_fast_accum=down.use_fast_accum,
                            quantise=gelu_quantize_rows)
