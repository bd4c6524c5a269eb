"""glm_core/dit/fp8_mlp.py: the FP8 DiT MLP's GELU and input quantisation in one pass must compute what the unfolded
MLP (F.gelu tanh, then Fp8Linear's `_scaled_mm` path) computes, and be taken exactly where the rows are quantised."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_core import fp8
from glm_core.dit import fp8_mlp
from glm_core.dit.layers import FeedForward, _gelu_tanh
from glm_core.fp8 import Fp8Linear, quantize_rows
from tests.scaled_mm_cpu import needs_cpu_rowwise_scaled_mm


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
