"""glm_core/dit/fp8_mlp.py: the FP8 DiT MLP's GELU and input quantisation in one pass must compute what the unfolded
MLP (F.gelu tanh, then Fp8Linear's `_scaled_mm` path) computes, and be taken exactly where the rows are quantised."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm_core import fp8
from glm_core.dit import fp8_mlp
from glm_core.dit.layers import FeedForward, _gelu_tanh
from glm_core.fp8 import Fp8Linear, quantize_rows
from tests.child_runs import run_child
from tests.scaled_mm_cpu import needs_cpu_rowwise_scaled_mm, needs_fp8_gpu


def test_the_sigmoid_form_is_the_tanh_gelu_up_to_fp32_rounding():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float32)
    expected = F.gelu(x.double(), approximate="tanh")
    got = fp8_mlp.gelu_tanh_by_sigmoid(x).double()
    assert (got - expected).abs().max() <= 4 * torch.finfo(torch.float32).eps * expected.abs().clamp(min=1).max()
    assert fp8_mlp.gelu_tanh_by_sigmoid(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_gelu_negative_bound_holds_and_is_tight():
    x = torch.linspace(-20, 0, 2_000_001, dtype=torch.float64)
    largest = F.gelu(x, approximate="tanh").abs().max().item()
    assert 0.17 < largest <= fp8_mlp.GELU_NEGATIVE_BOUND < largest + 1e-3


def test_row_scales_are_exact_for_large_rows_and_a_bound_otherwise():
    torch.manual_seed(0)
    hidden = torch.cat([torch.randn(6, 300) * 3,  # large rows
                        torch.full((1, 300), -0.7518),  # every value at GELU's negative extreme
                        -torch.rand(1, 300) * 5,  # all negative
                        torch.zeros(1, 300)]).to(torch.bfloat16)
    _, exact = quantize_rows(F.gelu(hidden.float(), approximate="tanh"))
    got = fp8_mlp.gelu_row_scales(hidden)
    large = torch.arange(9) < 6
    torch.testing.assert_close(got[large], exact[large], rtol=1e-6, atol=0)
    assert (got[~large] >= exact[~large]).all()  # never smaller: nothing overflows e4m3
    assert (got[~large] <= fp8_mlp.GELU_NEGATIVE_BOUND / 448 * (1 + 1e-6)).all()
    # the bound is tight for the row at GELU's negative extreme
    torch.testing.assert_close(got[6], exact[6], rtol=1e-3, atol=0)


def _fp8_mlp(dim: int = 64, hidden: int = 256, seed: int = 0) -> FeedForward:
    torch.manual_seed(seed)
    ff = FeedForward(dim, hidden, dim, _gelu_tanh).to(torch.bfloat16)
    ff.net[2] = Fp8Linear.from_linear(ff.net[2])
    return ff


def _force_scaled_mm(monkeypatch, scaled: bool) -> None:
    monkeypatch.setitem(fp8._PATH_BY_DEVICE, "cpu", scaled)


@needs_cpu_rowwise_scaled_mm
def test_the_folded_mlp_is_as_close_to_the_exact_product_as_the_unfolded_one(monkeypatch):
    """37 rows (padded to 48 inside): against the product of the GELU in fp32 and the dequantised weight (no
    activation rounding), the folded MLP is within the e4m3 error the unfolded one has, and no further from it."""
    _force_scaled_mm(monkeypatch, True)
    for seed in range(3):
        ff = _fp8_mlp(seed=seed)
        x = torch.randn(37, 64).to(torch.bfloat16)
        with torch.no_grad():
            hidden = ff.net[0].proj(x)
            down = ff.net[2]
            exact = F.linear(F.gelu(hidden.float(), approximate="tanh"), down.dequantized_weight(), down.bias.float())

            def error(y):
                return ((y.float() - exact).norm() / exact.norm()).item()

            unfolded = error(down(F.gelu(hidden, approximate="tanh")))  # Fp8Linear's scaled_mm path
            got = ff(x)
            assert got.shape == (37, 64) and got.dtype == torch.bfloat16
            assert error(got) < 0.04 and error(got) <= 1.1 * unfolded, (seed, error(got), unfolded)
            # the rows' scales left out of the product: what this must tell apart
            quantised = (F.gelu(hidden, approximate="tanh").float() / fp8_mlp.gelu_row_scales(hidden)).to(
                fp8.FP8_DTYPE)
            unscaled = fp8.scaled_mm_quantised(quantised, torch.ones(37, 1), down.weight, down.weight_scale,
                                               down.bias, torch.bfloat16)
            assert error(unscaled) > 1.0
            # 3-D input and a row of small values (the bound as its scale) stay finite and shaped
            assert ff(x.view(1, 37, 64)).shape == (1, 37, 64)
            assert torch.isfinite(ff(torch.full((1, 64), -0.01).to(torch.bfloat16)).float()).all()


@needs_cpu_rowwise_scaled_mm
def test_the_fold_is_taken_exactly_where_the_rows_are_quantised(monkeypatch):
    calls = []
    real = fp8_mlp.gelu_then_fp8_linear
    monkeypatch.setattr(fp8_mlp, "gelu_then_fp8_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    import glm_core.dit.layers as layers
    monkeypatch.setattr(layers, "gelu_then_fp8_linear", fp8_mlp.gelu_then_fp8_linear)
    x = torch.randn(5, 64).to(torch.bfloat16)
    fp8_ff = _fp8_mlp()
    _force_scaled_mm(monkeypatch, True)
    fp8_ff(x)
    assert len(calls) == 1
    _force_scaled_mm(monkeypatch, False)  # the weight-only path (CPU, pre-Ada GPUs): unfolded
    fp8_ff(x)
    torch.manual_seed(0)
    bf16_ff = FeedForward(64, 256, 64, _gelu_tanh).to(torch.bfloat16)
    _force_scaled_mm(monkeypatch, True)
    bf16_ff(x)  # bf16 weights: unfolded, the reference's ops
    other_activation = FeedForward(64, 256, 64, F.silu).to(torch.bfloat16)
    other_activation.net[2] = Fp8Linear.from_linear(other_activation.net[2])
    other_activation(x)
    assert len(calls) == 1


@needs_cpu_rowwise_scaled_mm
def test_the_folded_mlp_compiles_as_one_graph_with_dynamic_token_counts(monkeypatch):
    """glm_core compiles the DiT block with dynamic=True: the fold's choice is a constant and its padding traces with
    a symbolic row count (fullgraph=True fails on a graph break)."""
    torch._dynamo.reset()
    _force_scaled_mm(monkeypatch, True)
    calls = []
    real = fp8_mlp.gelu_then_fp8_linear
    import glm_core.dit.layers as layers
    monkeypatch.setattr(layers, "gelu_then_fp8_linear", lambda *a: calls.append(1) or real(*a))
    ff = _fp8_mlp()
    compiled = torch.compile(ff, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for rows in (3, 16, 17):
            x = torch.randn(2, rows, 64).to(torch.bfloat16)
            expected = ff(x)
            calls.clear()
            torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
            if rows == 3:  # traced here: the graph holds the fold
                assert calls, "the compiled MLP did not take the fold"
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# The Triton kernel (CUDA): in Triton's interpreter on the CPU, the real kernel on a GPU

KERNEL_CHILD = r"""
import json, os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from glm_core.dit import fp8_mlp

torch.manual_seed(0)
hidden = torch.cat([torch.randn(5, 300) * 3,  # large rows; 300 columns: a partial block (masking)
                    torch.full((1, 300), -0.7518),  # every value at GELU's negative extreme
                    -torch.rand(1, 300) * 5,  # all negative
                    torch.zeros(1, 300)]).to(torch.bfloat16)  # a padding row
values, scale = fp8_mlp.gelu_quantize_kernel(hidden, torch.float32)
expected_scale = fp8_mlp.gelu_row_scales(hidden)
expected = fp8_mlp.gelu_tanh_by_sigmoid(hidden).float() / expected_scale
print("RESULT " + json.dumps({"shapes": [list(values.shape), list(scale.shape)],
                              "scale_relative": ((scale / expected_scale) - 1).abs().max().item(),
                              "value_error": (values - expected).abs().tolist(),
                              "expected": expected.abs().tolist(),
                              "unscaled_value_error": (values - expected * expected_scale).abs().max().item()}))
"""


def test_the_kernel_computes_the_rows_and_scales_of_the_torch_ops():
    """Triton's interpreter, before the e4m3 cast (the interpreter neither rounds to bf16 nor to e4m3 as a GPU does:
    it truncates bf16, hence 2^-7 here; the cast itself is checked on a GPU below)."""
    pytest.importorskip("triton", reason="the kernel test needs the triton package (its CPU interpreter)")
    result = run_child(KERNEL_CHILD, env={"TRITON_INTERPRET": "1"})
    assert result["shapes"] == [[8, 300], [8, 1]]
    assert result["scale_relative"] <= 1e-6
    error, expected = torch.tensor(result["value_error"]), torch.tensor(result["expected"])
    assert (error <= 2**-7 * expected + 1e-6).all(), error.max()
    assert result["unscaled_value_error"] > 1.0  # a kernel that left the scale out would pass nothing above


@needs_fp8_gpu
def test_on_the_gpu_the_kernel_gives_the_torch_ops_e4m3_rows():
    """The DiT's hidden shape: the kernel's e4m3 values and scales against the torch ops, eager. Their sigmoid and
    bf16 roundings may differ in fp32's last bit, which moves a value across an e4m3 rounding boundary rarely."""
    torch.manual_seed(0)
    hidden = (torch.randn(4100, 16384, device="cuda") * 2).to(torch.bfloat16)
    hidden[7] = 0.0
    assert fp8_mlp.takes_gelu_quantize_kernel(hidden)
    quantised, scale = fp8_mlp.gelu_quantize_kernel(hidden)
    expected_scale = fp8_mlp.gelu_row_scales(hidden)
    expected = fp8.cast_rows(fp8_mlp.gelu_tanh_by_sigmoid(hidden), expected_scale)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    differ = quantised.float() != expected.float()
    assert differ.float().mean().item() < 1e-3
    assert ((quantised.float() - expected.float()).abs()[differ] <= expected.float().abs()[differ] / 8 + 2**-9).all()
    assert (quantised[7].float() == 0).all()


@needs_fp8_gpu
def test_on_the_gpu_the_compiled_fold_runs_the_kernel_and_matches_eager():
    """The fold inside torch.compile (inductor, dynamic token counts, as the DiT block compiles) launches the kernel
    and gives the eager torch ops' MLP output within the e4m3 error of either."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ff = FeedForward(4096, 16384, 4096, _gelu_tanh).to("cuda", torch.bfloat16)
    ff.net[2] = Fp8Linear.from_linear(ff.net[2])
    compiled = torch.compile(ff, dynamic=True)
    with torch.no_grad():
        x = torch.randn(1, 4100, 4096, device="cuda").to(torch.bfloat16)
        eager = ff(x)
        got = compiled(x)
        torch.testing.assert_close(compiled(x[:, :4097]), got[:, :4097], rtol=0.05, atol=0.05)
    rel = ((got.float() - eager.float()).norm() / eager.float().norm()).item()
    assert rel < 0.02, rel
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, torch.no_grad():
        compiled(x)
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    assert any("_gelu_quantize_kernel" in name for name in names), sorted(set(names))
    torch._dynamo.reset()
