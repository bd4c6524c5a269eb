"""bench/gemv_prologues.py's candidate kernel (the AR's RMSNorm or silu·up made as a GEMV loads its input) against
float64, in Triton's interpreter in a child process; and the bench's tiny run. Not used by glm_core yet: these keep
the candidate honest until a GPU run decides whether it goes in."""
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
from bench import gemv_prologues as gp
from glm_core.fp8 import quantize_weight

torch.manual_seed(0)
config = {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1}
out = {}
# K not a multiple of BLOCK_K and N not of BLOCK_N: the masks are exercised
for name, prologue, n, k in (("norm", gp.RMS_NORM, 45, 100), ("silu_mul", gp.SILU_MUL, 30, 70)):
    x = (torch.randn(k if prologue == gp.RMS_NORM else 2 * k) * 2).to(torch.bfloat16)
    norm = (1 + 0.2 * torch.randn(k)).to(torch.bfloat16) if prologue == gp.RMS_NORM else None
    for weights in ("bf16", "e4m3"):
        weight = (torch.randn(n, k) / k ** 0.5).to(torch.bfloat16)
        scale = None
        if weights == "e4m3":
            weight, scale = quantize_weight(weight)
        bias = (0.1 * torch.randn(n)).to(torch.bfloat16)
        expected = gp.reference(x, weight, scale, bias, norm, prologue)
        def error(got):
            return ((got.double() - expected).abs().max() / expected.abs().max()).item()
        out[f"{name} {weights}"] = {
            "fused": error(gp.prologue_gemv(x, weight, scale, bias, norm, prologue, config)),
            "separate": error(gp.separate_step(prologue)(x, weight, scale, bias, norm)),
            # the prologue left out: what the test must be able to tell apart
            "no_prologue": error(gp.prologue_gemv(x[:k].contiguous(), weight, scale, bias, None, gp.NO_PROLOGUE,
                                                  config)),
        }
print("RESULT " + json.dumps(out))
"""


def test_the_fused_prologues_compute_what_the_separate_kernels_do():
    results = run_child(CHILD)
    assert set(results) == {"norm bf16", "norm e4m3", "silu_mul bf16", "silu_mul e4m3"}
    for case, errors in results.items():
        assert errors["fused"] < 1e-2, (case, errors)  # the bf16 output's rounding
        assert errors["fused"] <= errors["separate"] + 2e-3, (case, errors)  # no bf16 rounding of the input
        assert errors["no_prologue"] > 0.2, (case, errors)


def test_the_bench_times_every_case_and_variant_on_the_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.gemv_prologues", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gemv_prologues.json").read_text())
    seen = {(r["case"], r["weights"], r["variant"]) for r in data["results"]}
    assert seen == {(case, weights, variant) for case in ("qkv+norm", "down+silu·up") for weights in ("bf16", "e4m3")
                    for variant in ("separate", "fused b4 k32 w1 s1")}
    assert all(r["us_per_layer"] > 0 and r["relative_error"] < 2e-2 for r in data["results"])
