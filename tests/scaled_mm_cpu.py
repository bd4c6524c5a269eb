"""Where tests can run glm_core's FP8 matmul path (`torch._scaled_mm` with row-wise scales).

On the CPU: tests that force the path there need this torch's CPU `_scaled_mm` to take row-wise scales. torch
2.13's does; torch 2.11's takes per-tensor scales only ("Now _scaled_mm only supports per-tensor scaling for CPU
backend", seen on the GPU machine's torch). On a GPU: one with FP8 matrix units (`fp8.fp8_matmul_supported`)."""
from __future__ import annotations

import functools

import pytest
import torch

from glm_core.fp8 import fp8_matmul_supported


@functools.cache
def why_no_cpu_rowwise_scaled_mm() -> str | None:
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    ones = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.bfloat16)
    except RuntimeError as error:
        return (f"torch {torch.__version__}'s CPU torch._scaled_mm takes no row-wise scales "
                f"({str(error).splitlines()[0][:100]}); torch 2.13's does")
    return None


needs_cpu_rowwise_scaled_mm = pytest.mark.skipif(why_no_cpu_rowwise_scaled_mm() is not None,
                                                 reason=why_no_cpu_rowwise_scaled_mm() or "")


needs_fp8_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and fp8_matmul_supported("cuda")),
                                   reason="needs a CUDA GPU with FP8 matrix units (run on the device: bench/README.md)")
