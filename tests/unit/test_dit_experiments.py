"""bench/dit_experiments.py: the candidate DiT changes the bench tries must compute what the product computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench import dit_experiments
from glm_core.dit.layers import FeedForward
from glm_core.fp8 import Fp8Linear, quantize_rows


def test_sigmoid_form_gelu_is_the_tanh_gelu_up_to_fp32_rounding():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float32)
    expected = F.gelu(x.double(), approximate="tanh")
    got = dit_experiments.sigmoid_form_gelu(x).double()
    assert (got - expected).abs().max() <= 4 * torch.finfo(torch.float32).eps * expected.abs().clamp(min=1).max()
    bf16 = x.to(torch.bfloat16)
    assert dit_experiments.sigmoid_form_gelu(bf16).dtype == torch.bfloat16


def test_the_gelu_negative_bound_holds_and_is_tight():
    x = torch.linspace(-20, 0, 2_000_001, dtype=torch.float64)
    largest = F.gelu(x, approximate="tanh").abs().max().item()
    assert 0.17 < largest <= dit_experiments.GELU_NEGATIVE_BOUND < largest + 1e-3


def _fp8_mlp(dim: int = 64, hidden: int = 256, seed: int = 0) -> FeedForward:
    torch.manual_seed(seed)
    ff = FeedForward(dim, hidden, dim, lambda h: F.gelu(h, approximate="tanh")).to(torch.bfloat16)
    ff.net[2] = Fp8Linear.from_linear(ff.net[2])
    return ff


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no torch._scaled_mm")
def test_row_max_quantised_mlp_takes_the_exact_scales_where_the_row_maximum_is_large():
    """Rows whose maximum GELU exceeds the negative bound get exactly the scale of quantising the GELU output, so
    the e4m3 values, and the product, are those of the product's path; the other rows get a larger scale, never a
    smaller one (no overflow)."""
    ff = _fp8_mlp()
    x = torch.randn(37, 64).to(torch.bfloat16)  # 37 rows: padding to 48 inside
    hidden = ff.net[0].proj(x)
    activated = ff.net[0].activation(hidden)
    _, exact_scale = quantize_rows(activated)
    row_max = hidden.amax(dim=1, keepdim=True).float()
    large = F.gelu(row_max, approximate="tanh") >= dit_experiments.GELU_NEGATIVE_BOUND
    assert large.all(), "the test input should have large row maxima"
    experimental = dit_experiments.RowMaxQuantisedMLP(ff)
    down = ff.net[2]
    expected = torch._scaled_mm(quantize_rows(activated)[0], down.weight.t(), scale_a=exact_scale,
                                scale_b=down.weight_scale.view(1, -1), bias=down.bias, out_dtype=torch.bfloat16)
    got = experimental(x)
    assert got.shape == (37, 64)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # a row of small values: the bound is used, larger than the exact scale
    small = torch.full((1, 64), -0.01).to(torch.bfloat16)
    small_hidden = ff.net[0].proj(small)
    if F.gelu(small_hidden.amax().float(), approximate="tanh") < dit_experiments.GELU_NEGATIVE_BOUND:
        _, small_exact = quantize_rows(ff.net[0].activation(small_hidden))
        assert small_exact.item() <= dit_experiments.GELU_NEGATIVE_BOUND / 448
    assert torch.isfinite(experimental(small).float()).all()


def test_install_and_remove_leave_the_blocks_as_they_were(demo_folder):
    from glm_core.dit.model import load_dit

    dit = load_dit(demo_folder, "cpu", torch.bfloat16, weights="fp8", compile=False)
    before = [(block.ff, block.ff.net[0].activation) for block in dit.transformer_blocks]
    undo = dit_experiments.install(dit, {"sgelu", "rowmax"})
    assert all(isinstance(block.ff, dit_experiments.RowMaxQuantisedMLP) for block in dit.transformer_blocks)
    assert all(block.ff.inner.net[0].activation is dit_experiments.sigmoid_form_gelu for block in dit.transformer_blocks)
    dit_experiments.remove(undo)
    assert [(block.ff, block.ff.net[0].activation) for block in dit.transformer_blocks] == before
    bf16 = load_dit(demo_folder, "cpu", torch.bfloat16, weights="bf16", compile=False)
    with pytest.raises(ValueError, match="FP8 second linear"):
        dit_experiments.install(bf16, {"rowmax"})
