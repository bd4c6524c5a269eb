"""bench/fp8_kernels.py at its tiny shapes on the CPU, as its own process (as on the device).

The plain run is what the CPU really offers (bf16 and dequant); the second run forces the fp8 variants through
torch 2.13's CPU `torch._scaled_mm`, so the script's fp8 code (probe, GEMVs, layer, GEMM-only) cannot rot
between GPU runs; the third runs the FP8 GEMV sweep in Triton's CPU interpreter. Only the CUDA graph capture and the compiled modes are left to the GPU run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scaled_mm_cpu import needs_cpu_rowwise_scaled_mm

REPO = Path(__file__).resolve().parents[2]


def _run(out: Path, *args: str, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench.fp8_kernels", "--tiny", "--out", str(out), *args], cwd=REPO,
                          check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench.fp8_kernels failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((out / "fp8_kernels.json").read_text())
    assert (out / "fp8_kernels.md").read_text().startswith("# GLM-Image FP8 linear kernels")
    assert data["errors"] == [], data["errors"]
    assert all(v["status"] == "ok" for v in data["phases"].values()), data["phases"]
    from bench.fp8_kernels import table_rows

    tail = proc.stdout.splitlines()[-(len(table_rows(data)) + 3):]  # the table is printed last
    assert any(line.startswith("group ") and "variant" in line for line in tail), tail
    return data


def _all_entries(data: dict) -> list[dict]:
    return [e for group in data["results"].values() for e in group.values()]


def _check_entry(e: dict) -> None:
    rate = e.get("gbps", e.get("tflops"))
    assert isinstance(rate, float) and rate > 0 and math.isfinite(rate), e
    assert (e.get("us") or e.get("ms")) > 0, e
    if "err_vs_fp32" in e:
        # bf16 output rounding for bf16 / dequant, plus e4m3 activations for fp8 (about 0.025)
        limit = 0.04 if e["variant"].startswith("fp8") else 8e-3
        assert 0 < e["err_vs_fp32"] <= limit, e
    if e.get("err_vs_bf16") is not None:  # e4m3 weights (and activations) against the bf16 weights
        assert 0.01 < e["err_vs_bf16"] <= 0.06, e
    if "err_vs_eager" in e:
        assert e["err_vs_eager"] <= 1e-2, e


def test_tiny_run_measures_bf16_and_dequant_everywhere(tmp_path):
    data = _run(tmp_path)
    assert set(data["phases"]) == {"ceilings", "probe", "ar.gemv", "gemv.sweep", "ar.layer", "dit.gemm"}
    assert data["probe"]["fp8_matmul_supported"] is False
    # the FP8 GEMV kernel is CUDA-only: the sweep says so instead of timing anything
    assert "gemv_sweep" not in data["results"]
    assert any(note.startswith("gemv.sweep: the GEMV kernel does not run here") for note in data["notes"])
    entries = _all_entries(data)
    for e in entries:
        _check_entry(e)
    gemv = {(e["what"], e["rows"], e["variant"]) for e in data["results"]["ar_gemv"].values()}
    assert gemv == {(name, rows, variant) for name in ("qkv", "o", "gate_up", "down") for rows in (1, 4)
                    for variant in ("bf16", "dequant")}
    dit = {(e["what"], e["variant"]) for e in data["results"]["dit_gemm"].values()}
    assert dit == {(name, variant) for name in ("attn_out", "qkv", "ff_up", "ff_down")
                   for variant in ("bf16", "dequant")}
    assert {e["variant"] for e in data["results"]["ar_layer"].values()} == {"bf16", "dequant"}


@needs_cpu_rowwise_scaled_mm
def test_tiny_run_with_the_fp8_variants_forced_through_the_cpu_scaled_mm(tmp_path):
    data = _run(tmp_path, "--force-scaled-mm", "--only", "probe,ar.gemv,ar.layer,dit.gemm")
    probe = data["probe"]
    assert probe["fp8_variants_run"] is True and probe["unpadded_m1"]["ok"] is True
    for e in _all_entries(data):
        _check_entry(e)
    variants = {e["variant"] for e in data["results"]["ar_gemv"].values()}
    assert variants == {"bf16", "fp8", "fp8_fast_accum", "fp8_unpadded", "dequant"}
    assert {e["variant"] for e in data["results"]["dit_gemm"].values()} == {
        "bf16", "fp8", "fp8_fast_accum", "fp8_gemm_only", "dequant"}
    assert {e["variant"] for e in data["results"]["ar_layer"].values()} == {"bf16", "fp8", "fp8_fast_accum", "dequant"}
    assert any("--force-scaled-mm" in note for note in data["notes"])


def test_tiny_gemv_sweep_in_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton", reason="the GEMV sweep needs the triton package (its CPU interpreter)")
    data = _run(tmp_path, "--only", "gemv.sweep", env_extra={"TRITON_INTERPRET": "1"})
    sweep = data["results"]["gemv_sweep"]
    assert set(sweep) == {"qkv", "o", "gate_up", "down"}
    for name, e in sweep.items():
        timed = [t for t in e["all"] if "us" in t]
        timed_bf16 = [t for t in e["bf16_weights_all"] if "us" in t]
        assert len(timed) == len(e["all"]) >= 2 and len(timed_bf16) == len(e["bf16_weights_all"]) >= 1, name
        assert any(t["config"] == "autotuned" for t in timed) and any(t["config"] == "autotuned" for t in timed_bf16)
        # outputs rounded to bf16 (interpreter: truncated): ~2^-8 relative; a wrong block or mask is far off
        assert all(0 < t["err_vs_fp32"] < 8e-3 for t in timed + timed_bf16), (name, timed, timed_bf16)
        assert e["best"][0]["us"] == min(t["us"] for t in timed), name


def test_tiny_gemv_sweep_of_bf16_weights_alone(tmp_path):
    pytest.importorskip("triton", reason="the GEMV sweep needs the triton package (its CPU interpreter)")
    data = _run(tmp_path, "--only", "gemv.sweep", "--gemv-weights", "bf16", env_extra={"TRITON_INTERPRET": "1"})
    for name, e in data["results"]["gemv_sweep"].items():
        assert e["all"] == [] and e["best"] == [], name
        assert len([t for t in e["bf16_weights_all"] if "us" in t]) >= 2, name
