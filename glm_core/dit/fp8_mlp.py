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

On CUDA the pass is a Triton kernel of our own (`gelu_quantize_kernel`): one program holds a whole row in registers,
so the hidden is read once; inductor's fused kernel for the same ops reads each row twice (once for the maximum,
once for the values). H200, 2026-11-30 20:21 (`bench.dit_profile --variants fp8+fast,fp8+fast+torchgelu`, one
process): 102.9 µs a call for the 4100 × 16384 hidden against inductor's 126.0 (its bytes take ~55 µs), a guided
step 0.1342 s against 0.1355.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fp8 import FP8_MAX, MIN_SCALE, Fp8Linear, cast_rows, quantizes_rows, scaled_mm_linear

try:  # the kernel needs triton; glm_core imports without it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 — a broken triton install must not break glm_core
    triton = None
    tl = None

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
    Zero (padding) rows give zeros: gelu(0) = 0, their scale the bound. The Triton kernel where it runs
    (`takes_gelu_quantize_kernel`), these torch ops elsewhere."""
    if takes_gelu_quantize_kernel(hidden_rows):
        return gelu_quantize_kernel(hidden_rows)
    scale = gelu_row_scales(hidden_rows)
    # the GELU rounded to the compute dtype before the e4m3 cast, as the unfolded MLP's activation is
    return cast_rows(gelu_tanh_by_sigmoid(hidden_rows), scale), scale


# a row lives in one program's registers: wider rows take the torch ops (the DiT's are 16384)
KERNEL_MAX_COLUMNS = 32768


def takes_gelu_quantize_kernel(hidden_rows: torch.Tensor) -> bool:
    """CUDA, triton importable, a contiguous 2-D bf16 hidden of at most KERNEL_MAX_COLUMNS columns. Only reached on
    the `_scaled_mm` path (compute capability >= 8.9: the kernel's e4m3 conversion is native there)."""
    return (triton is not None and hidden_rows.is_cuda and hidden_rows.dtype == torch.bfloat16
            and hidden_rows.dim() == 2 and hidden_rows.shape[1] <= KERNEL_MAX_COLUMNS and hidden_rows.is_contiguous())


def gelu_quantize_kernel(hidden_rows: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`gelu_quantize_rows` as one Triton kernel: (M, C) contiguous bf16 -> (M, C) e4m3, (M, 1) fp32. Called directly
    inside torch.compile (inductor launches it with the block's kernels); on the CPU only under TRITON_INTERPRET=1.
    out_dtype=torch.float32 writes the scaled values before their e4m3 cast (tests: Triton's interpreter does not
    round to e4m3 as the GPU does)."""
    rows, columns = hidden_rows.shape
    quantised = torch.empty((rows, columns), device=hidden_rows.device, dtype=out_dtype)
    scale = torch.empty((rows, 1), device=hidden_rows.device, dtype=torch.float32)
    block = triton.next_power_of_2(columns)
    # a 16384-column row: 16 warps hold 32 values a thread
    warps = 1 if hidden_rows.device.type == "cpu" else max(4, min(32, block // 1024))
    _gelu_quantize_kernel[(rows,)](hidden_rows, quantised, scale, columns, BLOCK=block, SQRT_2_OVER_PI=SQRT_2_OVER_PI,
                                   BOUND=GELU_NEGATIVE_BOUND, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, num_warps=warps)
    return quantised, scale


if triton is not None:
    @triton.jit
    def _gelu_quantize_kernel(hidden_ptr, quantised_ptr, scale_ptr, columns, BLOCK: tl.constexpr,
                              SQRT_2_OVER_PI: tl.constexpr, BOUND: tl.constexpr, FP8_MAX: tl.constexpr,
                              MIN_SCALE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < columns
        h = tl.load(hidden_ptr + row * columns + offsets, mask=inside, other=0.0).to(tl.float32)
        # the row's scale from its largest hidden value (the module docstring); padding lanes never win the maximum
        row_max = tl.max(tl.where(inside, h, float("-inf")), axis=0)
        u_max = SQRT_2_OVER_PI * (row_max + 0.044715 * row_max * row_max * row_max)
        largest = row_max * tl.sigmoid(2.0 * u_max)
        scale = tl.maximum(tl.maximum(largest, BOUND) / FP8_MAX, MIN_SCALE)
        # the GELU in its sigmoid form, rounded to bf16 as the unfolded MLP's activation is, then scaled and cast
        u = SQRT_2_OVER_PI * (h + 0.044715 * h * h * h)
        gelu = (h * tl.sigmoid(2.0 * u)).to(tl.bfloat16).to(tl.float32)
        values = tl.minimum(tl.maximum(gelu / scale, -FP8_MAX), FP8_MAX)
        tl.store(quantised_ptr + row * columns + offsets, values.to(quantised_ptr.dtype.element_ty), mask=inside)
        tl.store(scale_ptr + row, scale)


def gelu_then_fp8_linear(hidden: torch.Tensor, down: Fp8Linear) -> torch.Tensor:
    """down(gelu_tanh(hidden)) for hidden (..., C) in the compute dtype, on the `_scaled_mm` path."""
    return scaled_mm_linear(hidden, down.weight, down.weight_scale, down.bias, use_fast_accum=down.use_fast_accum,
                            quantise=gelu_quantize_rows)
