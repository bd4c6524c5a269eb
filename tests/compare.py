"""How far a tensor is from the one it should equal: one definition for every test that compares numbers."""
from __future__ import annotations

import math

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||ours - ref|| / ||ref||, taken in float64 whatever the inputs' dtype (fp32 and
    bf16 tensors are exact in float64, so the error measured is the inputs', not the measurement's)."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def psnr(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (inf when identical)."""
    mse = ((ours.double() - ref.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
