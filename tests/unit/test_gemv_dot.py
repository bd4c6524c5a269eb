"""bench/gemv_dot.py's candidate kernels (the FP8 AR's one-row GEMV as a tensor-core dot, the row padded to an MMA's
16 rows) against float64, in Triton's interpreter in a child process; and the bench's tiny run. Not used by glm_core:
these keep the candidate honest until a GPU run decides whether it goes in."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.child_runs import run_child
from tests.paths import REPO_ROOT

pytest.importorskip("triton", reason="the candidate kernel needs the triton package (its CPU interpreter)")

CHILD = r"""
import json, os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from bench import gemv_dot as gd
from glm_core.fp8 import quantize_weight

torch.manual_seed(0)
config = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}
out = {}
# K not a multiple of BLOCK_K and N not of BLOCK_N: the masks are exercised
for n, k, with_bias in ((45, 100, True), (30, 70, False)):
    x = (torch.randn(k) * 2).to(torch.bfloat16)
    weight, scale = quantize_weight((torch.randn(n, k) / k ** 0.5).to(torch.bfloat16))
    bias = (0.1 * torch.randn(n)).to(torch.bfloat16) if with_bias else None
    expected = (weight.double() * scale.double()[:, None]) @ x.double()
    if bias is not None:
        expected = expected + bias.double()
    def error(got):
        return ((got.double() - expected).abs().max() / expected.abs().max()).item()
    x_fp8, x_scale = gd.quantize_row(x)
    out[f"{n}x{k}"] = {
        "dot16": error(gd.dot_gemv(x, None, weight, scale, bias, config)),
        "dot8": error(gd.dot_gemv(x_fp8, x_scale, weight, scale, bias, config)),
        # the row's scale left out: what the test must be able to tell apart
        "dot8_unscaled": error(gd.dot_gemv(x_fp8, torch.ones(1), weight, scale, bias, config)),
    }
print("RESULT " + json.dumps(out))
"""


def test_the_dot_gemvs_compute_the_product():
    results = run_child(CHILD)
    assert set(results) == {"45x100", "30x70"}
    for case, errors in results.items():
        assert errors["dot16"] < 1e-2, (case, errors)  # the bf16 output's rounding only: fp16 holds e4m3 exactly
        assert errors["dot8"] < 8e-2, (case, errors)  # plus the row's e4m3 rounding (2^-4 relative per element)
        assert errors["dot8_unscaled"] > 0.5, (case, errors)


def test_the_bench_times_every_linear_and_variant_on_the_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.gemv_dot", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gemv_dot.json").read_text())
    seen = {(r["linear"], r["variant"]) for r in data["results"]}
    assert seen == {(linear, variant) for linear in ("qkv 48x96", "down 32x80")
                    for variant in ("glm_core", "dot16 b16 k32 w1 s1", "dot8 b16 k32 w1 s1")}
    assert all(r["us_per_layer"] > 0 for r in data["results"])
    assert all(r["relative_error"] < (8e-2 if r["variant"].startswith("dot8") else 1e-2) for r in data["results"])
