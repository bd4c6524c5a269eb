"""Whether this torch's CPU `torch._scaled_mm` takes row-wise scales: tests that force glm_core's FP8 matmul path onto
the CPU need it. torch 2.13's does; torch 2.11's takes per-tensor scales only ("Now _scaled_mm only supports
per-tensor scaling for CPU backend", seen on the GPU machine's torch)."""
from __future__ import annotations

import functools

import pytest
import torch


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
