"""glm_core/gemv.py: the one-row GEMV, on e4m3 weights against a float64 reference of the dequantised weight and on
bf16 weights against a float64 reference of the weight.

On the CPU the kernel runs in Triton's interpreter. TRITON_INTERPRET=1 must be set before triton defines a kernel,
so it runs in a child process that sets it; the parent checks what the child reports. On a GPU (skipped without
CUDA, each skip saying so): the real kernel at the AR decoder's shapes, inside torch.compile with the C++ wrapper
and a CUDA graph, and Fp8Linear and GemvLinear taking it for one row.
"""

from __future__ import annotations

import json

import pytest
import torch

from glm_core import fp8, gemv
from glm_core.compiling import CPP_WRAPPER_OPTIONS
from glm_core.gemv import GemvLinear, gemv_available
from tests.child_runs import run_child

# (N, K, bias): N off the interpreter's 4-channel blocks (a partial last block), K off its 32-column steps (a
# partial last step) and spanning several steps.
SHAPES = [(40, 70, True), (33, 100, False), (16, 32, True), (50, 129, False)]

CHILD = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from glm_core import fp8
from glm_core.gemv import gemv

torch.manual_seed(0)
results = []
for weights, out_features, in_features, has_bias in json.loads(sys.argv[1]):
    w = torch.randn(out_features, in_features) * 0.02
    if weights == "fp8":
        weight, scale = fp8.quantize_weight(w)
        dequantized = fp8.dequantize_weight(weight, scale).double()  # (N, K)
    else:
        weight, scale = w.to(torch.bfloat16), None
        dequantized = weight.double()
    x = torch.randn(1, 1, in_features).to(torch.bfloat16)
    bias = (torch.randn(out_features) * 0.02).to(torch.bfloat16) if has_bias else None
    y = gemv(x, weight, scale, bias)
    reference = x[0].double() @ dequantized.T + (bias.double() if has_bias else 0.0)  # (1, N)
    magnitude = x[0].double().abs() @ dequantized.abs().T  # sum_k |x w|: what fp32 summation errors scale with
    results.append({"shape": [weights, out_features, in_features, has_bias], "dtype": str(y.dtype),
                    "out_shape": list(y.shape), "error": (y[0].double() - reference).abs().tolist(),
                    "reference": reference.abs().tolist(), "magnitude": magnitude.tolist()})
print("RESULTS " + json.dumps(results))
"""


def within_rounding(error, reference, magnitude) -> torch.Tensor:
    # The kernel's roundings: fp32 products and sums (< K * 2^-24 of sum_k |x w| in all, here < 2^-10) and the final
    # bf16 store (2^-9 of the value when rounding to nearest; Triton's interpreter truncates: < 2^-7). A wrong scale,
    # bias, mask or K step is off by far more.
    return error <= 2**-7 * reference + 2**-10 * magnitude


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton", reason="the GEMV kernel tests need the triton package (its CPU interpreter)")
    cases = [[weights, *shape] for weights in ("fp8", "bf16") for shape in SHAPES]
    return run_child(CHILD, json.dumps(cases), tag="RESULTS", env={"TRITON_INTERPRET": "1"})


def test_gemv_matches_a_float64_reference_for_e4m3_and_bf16_weights(interpreted_results):
    assert [r["shape"] for r in interpreted_results] == [[w, *s] for w in ("fp8", "bf16") for s in SHAPES]
    for result in interpreted_results:
        out_features = result["shape"][1]
        assert result["dtype"] == "torch.bfloat16" and result["out_shape"] == [1, 1, out_features], result["shape"]
        ok = within_rounding(torch.tensor(result["error"]), torch.tensor(result["reference"]),
                             torch.tensor(result["magnitude"]))
        assert bool(ok.all()), result["shape"]


def test_gemv_is_unavailable_on_the_cpu_and_the_layers_keep_their_cpu_paths():
    assert gemv_available("cpu") is False
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(linear)
    bf16_layer = GemvLinear(64, 48, bias=True, dtype=torch.bfloat16)
    bf16_layer.load_state_dict(linear.state_dict())
    for rows in (1, 4):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(layer(x), fp8.dequant_linear(x, layer.weight, layer.weight_scale, layer.bias)), rows
        assert torch.equal(bf16_layer(x), linear(x)), rows


def test_gemv_rejects_inputs_that_do_not_fit():
    pytest.importorskip("triton", reason="the op is registered only where triton imports")
    from glm_core.gemv import check_inputs

    weight, scale = fp8.quantize_weight(torch.randn(8, 16))
    x = torch.zeros(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row of 16"):
        check_inputs(torch.zeros(2, 16, dtype=torch.bfloat16), weight, scale, None)
    with pytest.raises(ValueError, match="x bf16"):
        check_inputs(torch.zeros(16), weight, scale, None)
    with pytest.raises(ValueError, match="bias"):
        check_inputs(x, weight, scale, torch.zeros(9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="needs its fp32 weight_scale"):
        check_inputs(x, weight, None, None)
    with pytest.raises(ValueError, match="takes none"):
        check_inputs(x, weight.to(torch.bfloat16), scale, None)
    with pytest.raises(ValueError, match="float8_e4m3fn or bf16 weight"):
        check_inputs(x, weight.float(), None, None)


# --------------------------------------------------------------------------------------------
# On the GPU

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and gemv_available("cuda")),
                         reason="needs a CUDA GPU of compute capability >= 8.9 with triton (the GEMV kernel)")

AR_SHAPES = [(4608, 4096, True), (4096, 4096, False), (27392, 4096, False), (4096, 13696, False)]


@gpu
@pytest.mark.parametrize("weights", ["fp8", "bf16"])
@pytest.mark.parametrize("out_features,in_features,has_bias", AR_SHAPES)
def test_on_the_gpu_gemv_matches_float64_and_is_deterministic(out_features, in_features, has_bias, weights):
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features, device="cuda") * 0.02
    if weights == "fp8":
        weight, scale = fp8.quantize_weight(w)
        dequantized = fp8.dequantize_weight(weight, scale).double()
    else:
        weight, scale = w.to(torch.bfloat16), None
        dequantized = weight.double()
    bias = (torch.randn(out_features, device="cuda") * 0.02).to(torch.bfloat16) if has_bias else None
    x = torch.randn(1, in_features, device="cuda").to(torch.bfloat16)
    y = gemv.gemv(x, weight, scale, bias)
    reference = x.double() @ dequantized.T + (bias.double() if has_bias else 0.0)
    magnitude = x.double().abs() @ dequantized.abs().T
    assert y.shape == (1, out_features) and y.dtype == torch.bfloat16
    assert bool(within_rounding((y.double() - reference).abs(), reference.abs(), magnitude).all())
    assert all(torch.equal(gemv.gemv(x, weight, scale, bias), y) for _ in range(3))


@gpu
def test_on_the_gpu_fp8_linear_takes_the_gemv_in_a_compiled_cuda_graph_with_the_cpp_wrapper(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 4608, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = fp8.Fp8Linear.from_linear(linear)  # inference: the op has no backward, its inputs need no grad
    calls = []
    original = fp8.gemv

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fp8, "gemv", counted)
    step = torch.compile(lambda x: layer(torch.nn.functional.silu(x)) * 2, dynamic=True,
                         options=dict(CPP_WRAPPER_OPTIONS))
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    expected = layer(torch.nn.functional.silu(x)) * 2  # eager: the GEMV as well
    assert calls, "Fp8Linear did not take the GEMV for one bf16 row"
    calls.clear()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(x)
    torch.cuda.current_stream().wait_stream(side)
    assert calls, "the compiled step did not trace the GEMV"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, layer(torch.nn.functional.silu(x)) * 2)
    assert not torch.equal(captured, expected)  # the replay computed from the new x


def test_fp8_linear_takes_the_gemv_for_one_bf16_row_only(monkeypatch):
    """Routing, on the CPU with the GEMV pretended available (a spy stands in for the kernel): one bf16 row takes
    it, eagerly and under torch.compile with dynamic shapes (dynamo keeps a batch of 1 static); more rows, a
    symbolic batch and other dtypes take the matmul paths."""
    calls = []

    def spy(x, weight, weight_scale, bias=None):
        calls.append(tuple(x.shape))
        return fp8.dequant_linear(x, weight, weight_scale, bias)

    monkeypatch.setitem(gemv.GEMV_BY_DEVICE, "cpu", True)
    monkeypatch.setattr(fp8, "gemv", spy)
    torch.manual_seed(0)
    layer = fp8.Fp8Linear.from_linear(torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16).requires_grad_(False))
    layer(torch.randn(1, 1, 64, dtype=torch.bfloat16))
    layer(torch.randn(2, 1, 64, dtype=torch.bfloat16))
    layer(torch.randn(1, 64, dtype=torch.float32))
    assert calls == [(1, 1, 64)]
    calls.clear()
    torch._dynamo.reset()
    step = torch.compile(lambda x: layer(x), dynamic=True)
    step(torch.randn(1, 1, 64, dtype=torch.bfloat16))  # traced with one static row
    step(torch.randn(3, 1, 64, dtype=torch.bfloat16))  # a new graph with a symbolic batch
    step(torch.randn(4, 1, 64, dtype=torch.bfloat16))  # the same symbolic graph: no trace
    torch._dynamo.reset()
    assert calls == [(1, 1, 64)]


def test_gemv_linear_takes_the_gemv_for_one_bf16_row_only(monkeypatch):
    """GemvLinear's routing on the CPU with the GEMV pretended available (a spy stands in for the kernel): one bf16
    row takes it, eagerly and compiled with dynamic shapes; more rows, a symbolic batch, fp32 take F.linear."""
    calls = []

    def spy(x, weight, weight_scale=None, bias=None):
        calls.append((tuple(x.shape), weight_scale))
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setitem(gemv.GEMV_BY_DEVICE, "cpu", True)
    monkeypatch.setattr(gemv, "gemv", spy)
    torch.manual_seed(0)
    layer = GemvLinear(64, 48, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    fp32_layer = GemvLinear(64, 48, bias=False).requires_grad_(False)
    layer(torch.randn(1, 1, 64, dtype=torch.bfloat16))
    layer(torch.randn(2, 1, 64, dtype=torch.bfloat16))
    fp32_layer(torch.randn(1, 64))
    assert calls == [((1, 1, 64), None)]
    calls.clear()
    torch._dynamo.reset()
    step = torch.compile(lambda x: layer(x), dynamic=True)
    step(torch.randn(1, 1, 64, dtype=torch.bfloat16))
    step(torch.randn(3, 1, 64, dtype=torch.bfloat16))
    step(torch.randn(4, 1, 64, dtype=torch.bfloat16))
    torch._dynamo.reset()
    assert calls == [((1, 1, 64), None)]


def test_a_bf16_ar_decode_takes_the_gemv_in_every_linear_and_the_head_at_batch_one_only(monkeypatch, tiny_checkpoint):
    """The tiny AR in bf16 with the GEMV pretended available (a spy computing F.linear stands in): each batch-1
    decode step calls it once per decoder linear and once for the head, the prefill's layers and a batch of two never;
    the tokens are those of the plain layers."""
    from glm_core.ar.config import MODEL_CARD_SAMPLING
    from glm_core.ar.decode import generate_sequences
    from glm_core.ar.model import load_ar
    from tests.inputs import make_inputs
    from tests.reference import reference_processor

    model = load_ar(tiny_checkpoint, "cpu", torch.bfloat16)
    inputs = make_inputs(reference_processor(tiny_checkpoint), ["a red fox"], 64, 64)
    plain = generate_sequences(model, inputs, seeds=[3], sampling_settings=MODEL_CARD_SAMPLING,
                               use_cuda_graph=False)
    calls = []

    def spy(x, weight, weight_scale=None, bias=None):
        calls.append(weight.shape)
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setitem(gemv.GEMV_BY_DEVICE, "cpu", True)
    monkeypatch.setattr(gemv, "gemv", spy)
    routed = generate_sequences(model, inputs, seeds=[3], sampling_settings=MODEL_CARD_SAMPLING,
                                use_cuda_graph=False)
    assert torch.equal(routed, plain)
    layers = len(model.model.language_model.layers)
    steps = plain.shape[1] - 1  # the first token comes from the prefill
    assert len(calls) == steps * (4 * layers + 1) + 1  # + the prefill's head, over the prompt's last position only
    assert {tuple(shape) for shape in calls} == {tuple(m.weight.shape) for m in model.modules()
                                                 if isinstance(m, GemvLinear)}
    calls.clear()
    generate_sequences(model, inputs, seeds=[3, 4], sampling_settings=MODEL_CARD_SAMPLING, use_cuda_graph=False)
    assert calls == []


def test_under_cuda_malloc_async_the_gemv_runs_only_inside_compiled_code(monkeypatch, caplog):
    """Under cudaMallocAsync a CUDA graph capture of the op (Triton's Python launcher) killed the process on the H200:
    there the kernel runs only where torch.compile traces it (inductor launches it), and eager calls take the
    library paths, said once in the log."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    monkeypatch.setattr(gemv, "_SAID_EAGER_OFF_UNDER_CUDA_MALLOC_ASYNC", [])
    with caplog.at_level("INFO", logger="glm_core"):
        assert gemv.gemv_launchable() is False
        assert gemv.gemv_launchable() is False
    said = [r.getMessage() for r in caplog.records if "cudaMallocAsync" in r.getMessage()]
    assert len(said) == 1, said
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert gemv.gemv_launchable() is True
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert gemv.gemv_launchable() is True


CHILD_CUDA_MALLOC_ASYNC = r"""
import json, torch
from glm_core import fp8, gemv
from glm_core.compiling import CPP_WRAPPER_OPTIONS
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
torch.manual_seed(0)
linear = torch.nn.Linear(4096, 4608, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
bf16_layer = gemv.GemvLinear(4096, 4608, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
bf16_layer.load_state_dict(linear.state_dict())
fp8_layer = fp8.Fp8Linear.from_linear(linear)
traced = []
original = gemv._traced_gemv
def counted(*args):
    traced.append(args[1].dtype)
    return original(*args)
gemv._traced_gemv = counted
step = torch.compile(lambda x: (bf16_layer(torch.nn.functional.silu(x)), fp8_layer(x)), options=dict(CPP_WRAPPER_OPTIONS))
x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(2):
        step(x)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out_bf16, out_fp8 = step(x)
x.copy_(torch.randn_like(x))
graph.replay()
torch.cuda.synchronize()
ref_bf16 = torch.nn.functional.linear(torch.nn.functional.silu(x), linear.weight, linear.bias)
ref_fp8 = fp8.dequant_linear(x, fp8_layer.weight, fp8_layer.weight_scale, fp8_layer.bias)
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
print("RESULT " + json.dumps({"traced": sorted({str(d) for d in traced}), "rel_bf16": rel(out_bf16, ref_bf16),
                              "rel_fp8": rel(out_fp8, ref_fp8)}), flush=True)
"""


@gpu
def test_on_the_gpu_under_cuda_malloc_async_compiled_layers_capture_the_traced_gemv():
    """ComfyUI's allocator: a compiled function of a bf16 and an FP8 layer (one row, C++ wrapper) runs the GEMV as a
    kernel inductor launches, is captured into a CUDA graph, and its replay computes from the new input."""
    result = run_child(CHILD_CUDA_MALLOC_ASYNC, env={"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"},
                       timeout=900, faulthandler=True)
    assert result["traced"] == ["torch.bfloat16", "torch.float8_e4m3fn"], result
    assert result["rel_bf16"] < 1e-2 and result["rel_fp8"] < 1e-2, result


def test_tuned_block_shapes_report_each_formats_picks(monkeypatch):
    """What benchmarks record beside their timings: the picks per weight format and key, none before any launch."""
    pytest.importorskip("triton", reason="the GEMV's autotuners need triton")
    assert all(hasattr(tuner, "cache") for tuner in gemv.AUTOTUNED.values())  # triton's Autotuner keeps its picks there
    if not torch.cuda.is_available():
        assert gemv.tuned_block_shapes() == {}  # no autotuned launch in a CPU process (the interpreter's is fixed)

    class Tuned:
        cache = {(4608, 4096, "torch.bfloat16"): "BLOCK_N: 2, BLOCK_K: 2048, num_warps: 8, num_stages: 1"}

    class Untouched:
        cache = {}

    monkeypatch.setattr(gemv, "AUTOTUNED", {torch.bfloat16: Tuned(), torch.float8_e4m3fn: Untouched()})
    assert gemv.tuned_block_shapes() == {
        "bfloat16": {"(4608, 4096, 'torch.bfloat16')": "BLOCK_N: 2, BLOCK_K: 2048, num_warps: 8, num_stages: 1"}}
