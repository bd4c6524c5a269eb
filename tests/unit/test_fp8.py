"""glm_core.fp8 on the CPU: quantisation bounds, both matmul paths, module conversion, pre-quantised files.

Error figures measured here (torch 2.13 CPU, gaussian weights std 0.02, gaussian inputs, K = 1024..4096):
- weight quantisation alone: per-row relative error 0.026-0.029 (bound per element: 2^-4 relative);
- weight-only (dequant) path vs the unquantised fp32 nn.Linear: 0.027 relative (Frobenius);
- FP8 matmul path (e4m3 activations too) vs the dequant path: 0.027; vs the fp32 nn.Linear: 0.038
  (two independent e4m3 roundings: about sqrt(2) x 0.027).
torch 2.13's CPU build runs `torch._scaled_mm` on e4m3 tensors with row-wise scales, so the real call is tested
here against an independent emulation (quantise x per row, fp32 matmul of the e4m3 values, scales applied).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm_core import fp8
from tests.scaled_mm_cpu import needs_cpu_rowwise_scaled_mm, needs_fp8_gpu

E4M3_MAX = 448.0
# e4m3: 3 mantissa bits -> rounding a normal value moves it by at most half an ulp = 2^-4 of its size;
# subnormals (below 2^-6 in scaled units) sit on a 2^-9 grid -> absolute error at most 2^-10 scaled units.
NORMAL_RELATIVE_BOUND = 2.0**-4
SUBNORMAL_ABSOLUTE_BOUND = 2.0**-10


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def _heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(2.0)).sample((rows, cols))


# --------------------------------------------------------------------------------------------
# Quantise / dequantise


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [_gaussian, _heavy_tailed], ids=["gaussian", "heavy_tailed"])
def test_round_trip_within_the_e4m3_bound(make, source_dtype):
    weight = make(96, 512, seed=1).to(source_dtype)
    quantised, scale = fp8.quantize_weight(weight)
    assert quantised.dtype == torch.float8_e4m3fn and quantised.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (96,)

    exact = weight.double()
    expected_scale = exact.abs().amax(dim=1) / E4M3_MAX
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)

    error = (fp8.dequantize_weight(quantised, scale).double() - exact).abs()
    bound = torch.maximum(NORMAL_RELATIVE_BOUND * exact.abs(), SUBNORMAL_ABSOLUTE_BOUND * scale.double()[:, None])
    assert (error <= bound * (1 + 1e-6)).all(), f"max error / bound = {(error / bound).max().item():.3f}"

    row_relative = error.norm(dim=1) / exact.norm(dim=1)
    assert row_relative.max().item() <= NORMAL_RELATIVE_BOUND
    assert row_relative.mean().item() > 0.005  # really rounded to 3 mantissa bits, not kept at full precision


def test_values_stay_inside_e4m3_and_each_row_maximum_maps_to_448():
    weight = _gaussian(64, 256, seed=2)
    quantised, _ = fp8.quantize_weight(weight)
    values = quantised.float()
    assert torch.isfinite(values).all()  # a value above 448 would have been cast to NaN
    assert values.abs().max().item() <= E4M3_MAX
    assert (values.abs().amax(dim=1) == E4M3_MAX).all()


def test_zeros_stay_exactly_zero_and_an_all_zero_row_gets_a_usable_scale():
    weight = _gaussian(8, 64, seed=3)
    weight[2] = 0.0
    weight[5, ::3] = 0.0
    quantised, scale = fp8.quantize_weight(weight)
    dequantised = fp8.dequantize_weight(quantised, scale)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (dequantised[2] == 0).all() and (quantised[2].float() == 0).all()
    assert (dequantised[5, ::3] == 0).all()


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_rows_with_huge_or_tiny_values_give_no_nan_or_inf(source_dtype):
    big = torch.finfo(source_dtype).max
    rows = torch.stack([
        torch.linspace(-1, 1, 32) * big,         # up to the largest finite value of the dtype
        torch.linspace(-1e-30, 1e-30, 32),
        torch.full((32,), 1e-38),                # around fp32's smallest normal number
        torch.full((32,), 1e-41) if source_dtype == torch.float32 else torch.full((32,), 1e-39),  # denormal
        torch.zeros(32),
    ]).to(source_dtype)
    assert torch.isfinite(rows).all()
    quantised, scale = fp8.quantize_weight(rows)
    dequantised = fp8.dequantize_weight(quantised, scale)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(quantised.float()).all() and torch.isfinite(dequantised).all()
    for i in (0, 1):  # normal-range rows keep the e4m3 bound
        nonzero = rows[i] != 0
        relative = (dequantised[i][nonzero] - rows[i][nonzero].float()).abs() / rows[i][nonzero].float().abs()
        assert relative.max().item() <= NORMAL_RELATIVE_BOUND + 1e-6, (i, relative.max().item())


def test_quantize_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        fp8.quantize_rows(torch.zeros(2, 3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# The weight-only (dequant) path


def _layer(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
        if bias:
            linear.bias.normal_(0, 0.05)
    linear = linear.to(dtype).requires_grad_(False)
    return linear, fp8.Fp8Linear.from_linear(linear)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 6e-3)])
@pytest.mark.parametrize("shape", [(5, 256), (2, 7, 256)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_dequant_path_equals_fp32_linear_on_the_dequantised_weight(dtype, tolerance, shape, bias):
    _, layer = _layer(256, 96, bias, dtype)
    x = torch.randn(*shape).to(dtype)  # the reference sees exactly the same (rounded) input
    y = fp8.dequant_linear(x, layer.weight, layer.weight_scale, layer.bias)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 96)
    reference = F.linear(x.float(), layer.dequantized_weight(), None if layer.bias is None else layer.bias.float())
    assert _relative(y, reference) <= tolerance
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)  # forward on the CPU is this path


def test_dequant_path_with_fp16_inputs_does_not_overflow():
    _, layer = _layer(4096, 32, True, torch.float16)
    x = torch.full((2, 4096), 8.0, dtype=torch.float16)  # 4096 x 8 x 448 ~ 1.5e7: beyond fp16 before scaling
    y = layer(x)
    reference = F.linear(x.float(), layer.dequantized_weight(), layer.bias.float())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert _relative(y, reference) <= 6e-3


# --------------------------------------------------------------------------------------------
# The FP8 matmul path (torch._scaled_mm runs on the CPU in torch 2.13)


def _emulated_scaled_mm(x, weight, weight_scale, bias):
    """Independent arithmetic of the FP8 path: e4m3 x per row (amax / 448), fp32 matmul, both scales, bias."""
    rows = x.reshape(-1, x.shape[-1]).float()
    x_scale = (rows.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    x_e4m3 = (rows / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    y = (x_e4m3 @ weight.float().t()) * x_scale * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _inputs_with_rows_of_very_different_size(shape, dtype, seed=0):
    """Per-row activation scales matter here: one scale for the whole tensor would push small rows into
    e4m3's subnormals and lose them."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rows = x.reshape(-1, shape[-1])
    rows *= torch.logspace(-3, 3, rows.shape[0])[:, None]
    return x.to(dtype)


@needs_cpu_rowwise_scaled_mm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 512), (4, 512), (16, 512), (17, 512), (3, 5, 512), (2, 37, 512)],
                         ids=["m1", "m4", "m16", "m17_unpadded", "3d", "3d_unpadded"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_scaled_mm_path_matches_its_emulation_and_the_dequant_path(dtype, shape, bias):
    linear, layer = _layer(512, 128, bias, dtype)
    x = _inputs_with_rows_of_very_different_size(shape, dtype)
    y = fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 128)
    assert torch.isfinite(y).all()

    emulated = _emulated_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias)
    assert _relative(y, emulated) <= 4e-3  # the product is written in bf16 (2^-9 rounding)
    for row in range(y.reshape(-1, 128).shape[0]):  # every row on its own: per-row scales, no row mixed up
        assert _relative(y.reshape(-1, 128)[row], emulated.reshape(-1, 128)[row]) <= 4e-3

    dequant = fp8.dequant_linear(x, layer.weight, layer.weight_scale, layer.bias)
    assert _relative(y, dequant) <= 0.04  # activation rounding to e4m3: measured 0.027
    unquantised = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    assert _relative(y, unquantised) <= 0.05  # measured 0.038


@needs_fp8_gpu
@pytest.mark.parametrize("fast_accum", [False, True], ids=["fp32_accum", "fast_accum"])
@pytest.mark.parametrize("rows", [1, 17, 4097, 4100])
def test_scaled_mm_on_the_gpu_matches_its_emulation_padded_or_not(rows, fast_accum):
    """The GPU's kernels with the row counts they get: a decode step (padded) and prompt / DiT token counts that
    are no multiple of 16 or 256 (unpadded; pytorch issue 133334 was a CUTLASS row-wise kernel at M % 256 != 0)."""
    linear, layer = _layer(4096, 1024, True, torch.bfloat16)
    layer = layer.cuda()
    x = _inputs_with_rows_of_very_different_size((rows, 4096), torch.bfloat16).cuda()
    y = fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias, use_fast_accum=fast_accum)
    emulated = _emulated_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias)
    assert y.shape == (rows, 1024) and torch.isfinite(y).all()
    for row in range(rows):  # every row on its own, the last ones included (a kernel's ragged tile)
        assert _relative(y[row], emulated[row]) <= 4e-3, row


def test_only_inputs_of_fewer_rows_than_the_alignment_are_padded():
    assert [fp8.rows_to_pad(rows) for rows in (1, 4, 15, 16, 17, 4097)] == [15, 12, 1, 0, 0, 0]


@needs_cpu_rowwise_scaled_mm
def test_scaled_mm_path_row_padding_changes_nothing_and_zero_rows_give_the_bias():
    _, layer = _layer(256, 64, True, torch.bfloat16)
    x = torch.randn(3, 256).to(torch.bfloat16)
    x[1] = 0.0
    padded = fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias, pad_rows=True)
    unpadded = fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias, pad_rows=False)
    torch.testing.assert_close(padded, unpadded, rtol=0, atol=0)
    torch.testing.assert_close(padded[1], layer.bias, rtol=0, atol=0)
    empty = fp8.scaled_mm_linear(x[:0], layer.weight, layer.weight_scale, layer.bias)
    assert empty.shape == (0, 64)


def _force_path(monkeypatch, scaled: bool):
    monkeypatch.setitem(fp8._PATH_BY_DEVICE, "cpu", scaled)


@needs_cpu_rowwise_scaled_mm
def test_forward_takes_the_path_its_device_is_given(monkeypatch):
    _, layer = _layer(256, 64, True, torch.bfloat16)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    _force_path(monkeypatch, True)
    torch.testing.assert_close(layer(x), fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias),
                               rtol=0, atol=0)
    _force_path(monkeypatch, False)
    torch.testing.assert_close(layer(x), fp8.dequant_linear(x, layer.weight, layer.weight_scale, layer.bias),
                               rtol=0, atol=0)


@needs_cpu_rowwise_scaled_mm
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled_mm", "dequant"])
def test_forward_compiles_as_one_graph(monkeypatch, scaled):
    """fullgraph=True fails on a graph break: a host sync (.item()), a data-dependent branch, an untraceable
    call. The path decision must fold to a constant."""
    torch._dynamo.reset()
    _force_path(monkeypatch, scaled)
    _, layer = _layer(256, 64, True, torch.bfloat16)
    x = torch.randn(5, 256).to(torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    torch._dynamo.reset()


@needs_cpu_rowwise_scaled_mm
def test_scaled_mm_path_compiles_with_dynamic_token_counts(monkeypatch):
    """glm_core compiles its loops with dynamic=True: the row padding must trace with a symbolic M."""
    torch._dynamo.reset()
    _force_path(monkeypatch, True)
    _, layer = _layer(128, 48, True, torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (1, 3, 16, 17):
        x = torch.randn(2, rows, 128).to(torch.bfloat16)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# The path decision


def test_fp8_matmul_supported_is_false_on_the_cpu_without_asking_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("the CPU must not query CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    assert fp8.fp8_matmul_supported("cpu") is False
    assert fp8.fp8_matmul_supported(torch.device("cpu")) is False
    assert fp8.fp8_matmul_supported("meta") is False


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), False), ((8, 0), False), ((8, 6), False),  # T4, A100, RTX 3090: no FP8 matrix units
    ((8, 9), True), ((9, 0), True), ((10, 0), True), ((12, 0), True),  # Ada, Hopper, Blackwell
])
def test_fp8_matmul_supported_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch, "_scaled_mm", getattr(torch, "_scaled_mm", lambda *a, **k: None), raising=False)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0+cu130"))
    assert fp8.fp8_matmul_supported("cuda:0") is expected


def test_fp8_matmul_supported_needs_row_wise_scaled_mm_and_cuda_not_rocm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch, "_scaled_mm", getattr(torch, "_scaled_mm", lambda *a, **k: None), raising=False)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0+cu130"))
    assert fp8.fp8_matmul_supported("cuda") is True
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.4.1+cu121"))
    assert fp8.fp8_matmul_supported("cuda") is False  # _scaled_mm without row-wise scales
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0+cu130"))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert fp8.fp8_matmul_supported("cuda") is False
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delattr(torch, "_scaled_mm")
    assert fp8.fp8_matmul_supported("cuda") is False


# --------------------------------------------------------------------------------------------
# The layer as a module


def test_meta_construction_and_state_dict_keys():
    with torch.device("meta"):
        layer = fp8.Fp8Linear(128, 48, bias=True, dtype=torch.bfloat16)
        no_bias = fp8.Fp8Linear(128, 48, bias=False, dtype=torch.bfloat16)
    assert list(layer.state_dict()) == ["weight", "weight_scale", "bias"]
    assert list(no_bias.state_dict()) == ["weight", "weight_scale"]
    assert layer.weight.is_meta and layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (48, 128)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (48,)
    assert layer.bias.dtype == torch.bfloat16 and layer.bias.shape == (48,)
    assert (layer.in_features, layer.out_features) == (128, 48)


def test_dtype_casts_of_the_module_keep_e4m3_and_fp32_scales():
    _, layer = _layer(64, 32, True, torch.float32)
    weight_bytes = layer.weight.detach().view(torch.uint8).clone()
    scales = layer.weight_scale.detach().clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(layer)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.weight.detach().view(torch.uint8), weight_bytes)
        assert torch.equal(layer.weight_scale.detach(), scales)
    assert layer.bias.dtype == torch.float32  # the bias follows the casts, like nn.Linear's


def test_forward_names_a_wrong_input_width():
    _, layer = _layer(64, 32, True, torch.float32)
    with pytest.raises(ValueError, match="last dimension is 63"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="nn.Linear"):
        fp8.Fp8Linear.from_linear(nn.Conv1d(2, 2, 1))


# --------------------------------------------------------------------------------------------
# Whole modules


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.norm = nn.LayerNorm(64)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(64, 96, bias=True), "o": nn.Linear(32, 64, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 10)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.05)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        qkv = self.attn["qkv"](h)
        h = h + self.attn["o"](qkv[..., :32])
        h = h + self.mlp(h)
        return self.head(h)


def test_pre_quantised_copy_loads_bit_identical_to_quantising_on_load(demo_folder, tmp_path):
    """The product's own FP8 file path: `python -m glm_core.quantize` writes the copy (official layout, e4m3 +
    fp32 scales), and loading it gives the very tensors (so the same outputs) that quantising the bf16 folder on
    load gives."""
    from glm_core.ar.model import load_ar
    from glm_core.dit.model import load_dit
    from glm_core.quantize import write_fp8_copy

    copy = write_fp8_copy(demo_folder, tmp_path / "fp8", device="cpu")
    for load in (load_ar, load_dit):
        on_load = load(demo_folder, "cpu", torch.bfloat16, weights="fp8", compile=False)
        stored = load(copy, "cpu", torch.bfloat16, weights="fp8", compile=False)
        expected, got = on_load.state_dict(), stored.state_dict()
        assert list(expected) == list(got)
        quantised = [key for key, tensor in expected.items() if tensor.dtype == torch.float8_e4m3fn]
        assert quantised, f"{load.__name__}: no FP8 layer"
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype, key
            assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)) if tensor.dtype == \
                torch.float8_e4m3fn else torch.equal(got[key], tensor), key
    with pytest.raises(ValueError, match="already exists"):
        write_fp8_copy(demo_folder, copy, device="cpu")


def test_fp8_structure_refuses_what_it_cannot_replace():
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        fp8.fp8_structure_(_Block(), ["nope"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        fp8.fp8_structure_(_Block(), ["norm"])
    with pytest.raises(ValueError, match="root module"):
        fp8.fp8_structure_(_Block(), [""])
    block = _Block()
    fp8.fp8_structure_(block, ["attn.qkv", "mlp.0"])
    assert isinstance(block.attn["qkv"], fp8.Fp8Linear) and block.attn["qkv"].weight.is_meta
    assert block.attn["qkv"].bias is not None and type(block.head) is nn.Linear


@needs_cpu_rowwise_scaled_mm
def test_dit_fp8_matmuls_ask_for_fast_accumulation_and_the_ars_do_not(demo_folder, monkeypatch):
    """The DiT blocks' FP8 linears call `_scaled_mm` with fast accumulation (measured as accurate and faster on the
    H200: glm_core/dit/model.py FP8_FAST_ACCUM); the AR's keep fp32 promotion (its prompt rows only: its decode
    rows take the GEMV)."""
    from glm_core.ar.model import load_ar
    from glm_core.dit.model import load_dit

    calls = []
    real = torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    _force_path(monkeypatch, True)
    dit = load_dit(demo_folder, "cpu", torch.bfloat16, weights="fp8", compile=False)
    linear = dit.transformer_blocks[0].attn1.to_qkv
    linear(torch.randn(3, linear.in_features).to(torch.bfloat16))
    ar = load_ar(demo_folder, "cpu", torch.bfloat16, weights="fp8", compile=False)
    linear = ar.model.language_model.layers[0].self_attn.qkv_proj
    linear(torch.randn(3, linear.in_features).to(torch.bfloat16))
    assert calls == [True, False]
