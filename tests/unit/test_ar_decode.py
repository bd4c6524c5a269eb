"""glm_core.ar.decode on its own, on inputs from the reference processor: reference ids over the placeholders,
the token grid layout, seeds and batching, progress and interrupt, and a wrong seed count."""

from __future__ import annotations

import pytest
import torch

from glm_core.ar.decode import generate_grids, generate_sequences, prepare_prompt
from glm_core.ar.config import MODEL_CARD_SAMPLING
from glm_core.tokens import PriorTokens
from tests.inputs import budget, build, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLING = MODEL_CARD_SAMPLING


def test_reference_ids_fill_the_placeholders(ar_models):
    """The vision stage's ids of the references replace the `<|image|>` placeholders in order, the rest of the
    prompt is untouched; ids of the wrong length are refused."""
    ours, _, _ = ar_models
    inputs = build(ar_models, "edit_2ref")
    placeholder = inputs.input_ids == ours.config.image_token_id
    filled = prepare_prompt(ours, inputs).input_ids.cpu()
    assert torch.equal(filled[placeholder], inputs.reference_ids)
    assert torch.equal(filled[~placeholder], inputs.input_ids[~placeholder])
    inputs.reference_ids = inputs.reference_ids[:-1]
    with pytest.raises(ValueError, match="reference ids"):
        prepare_prompt(ours, inputs)


def test_prior_tokens_layout(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a tall tower"], 96, 64)
    sequences = generate_sequences(ours, inputs, seeds=[5], sampling_settings=ours.config.sampling)
    tokens = PriorTokens(generate_grids(ours, inputs, seeds=[5], sampling_settings=ours.config.sampling),
                         height=96, width=64, seeds=[5])
    gh, gw = inputs.target_grid
    preview = inputs.preview_grid[0] * inputs.preview_grid[1]
    assert torch.equal(tokens.grid_ids, sequences[:, preview: preview + gh * gw].view(1, gh, gw))
    assert tokens.prior_ids.shape == (1, 4 * gh * gw) and tokens.prior_ids.dtype == torch.long
    upsampled = tokens.prior_ids.view(1, 2 * gh, 2 * gw)
    for dy in (0, 1):
        for dx in (0, 1):
            assert torch.equal(upsampled[:, dy::2, dx::2], tokens.grid_ids)
    assert (tokens.height, tokens.width, tokens.seeds) == (96, 64, [5])


def test_same_seed_same_tokens_and_batch_equals_alone(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a castle"], 64, 64)
    a = generate_sequences(ours, inputs, seeds=[10], sampling_settings=SAMPLING)
    b = generate_sequences(ours, inputs, seeds=[10], sampling_settings=SAMPLING)
    c = generate_sequences(ours, inputs, seeds=[11], sampling_settings=SAMPLING)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    batch = generate_sequences(ours, inputs, seeds=[11, 10], sampling_settings=SAMPLING)
    assert torch.equal(batch[0], c[0]) and torch.equal(batch[1], a[0])


def test_batch_of_prompts_equals_alone(ar_models):
    ours, _, processor = ar_models
    prompts = ["a fox", "a much longer prompt about a fox in deep snow"]
    batch = generate_sequences(ours, make_inputs(processor, prompts, 64, 64), seeds=[3, 4],
                               sampling_settings=SAMPLING)
    for i, prompt in enumerate(prompts):
        alone = generate_sequences(ours, make_inputs(processor, [prompt], 64, 64), seeds=[[3, 4][i]],
                                   sampling_settings=SAMPLING)
        assert torch.equal(batch[i], alone[0]), f"prompt {i}: batched tokens differ from alone"


def test_progress_and_interrupt(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a boat"], 64, 64)
    total = budget(inputs)
    calls = []
    interrupts = []
    generate_sequences(ours, inputs, seeds=[1], sampling_settings=SAMPLING,
                       progress=lambda d, t: calls.append((d, t)), interrupt=lambda: interrupts.append(1))
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) >= total // 8 and len(interrupts) >= total // 8

    class Cancelled(Exception):
        pass

    seen = []

    def interrupt():
        seen.append(1)
        if len(seen) == 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate_sequences(ours, inputs, seeds=[1], sampling_settings=SAMPLING, interrupt=interrupt)
    assert len(seen) == 4
    # the model is still usable after an interrupted run
    again = generate_sequences(ours, inputs, seeds=[1], sampling_settings=SAMPLING)
    assert again.shape == (1, total)


def test_seed_count_must_match_prompts(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a", "b c"], 64, 64)
    with pytest.raises(ValueError, match="seeds"):
        generate_sequences(ours, inputs, seeds=[1, 2, 3], sampling_settings=SAMPLING)


CHILD_TOKENS = """
import json, sys, warnings, torch
warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail instead
from glm_core import compiling, pipeline
from glm_core.ar import decode
def user_triton_kernels():
    # the Triton kernels torch.compile traced as user-defined kernels in this process (glm_core's own kernels)
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    names = set()
    for kernel in kernel_side_table.id_to_kernel.values():
        while hasattr(kernel, "fn"):  # an Autotuner holds a JITFunction, which holds the Python function
            kernel = kernel.fn
        names.add(kernel.__name__)
    return sorted(names)
replays = [0]
replay = torch.cuda.CUDAGraph.replay
def counted_replay(graph):
    replays[0] += 1
    return replay(graph)
torch.cuda.CUDAGraph.replay = counted_replay
model = pipeline.GlmImage.from_folder(sys.argv[1], device="cuda", dtype=torch.bfloat16)
cond = pipeline.encode_prompt(model, "a red door", 512, 512)
with_graph = pipeline.generate_tokens(model, cond, seed=1).grid_ids.cpu()
graph_replays = replays[0]
decode.cuda_graphs_supported = lambda: False
without_graph = pipeline.generate_tokens(model, cond, seed=1).grid_ids.cpu()
differing = (with_graph != without_graph).flatten().nonzero().flatten().tolist()
print("RESULT " + json.dumps({
    "allocator": torch.cuda.get_allocator_backend(), "graph_replays": graph_replays,
    "replays_without_graph": replays[0] - graph_replays,
    "compiled": {w.name: w.fallback_reason for w in compiling._WRAPPERS.values()},
    "tokens": with_graph.numel(), "differing_tokens": len(differing),
    "first_difference": differing[0] if differing else None,
    "same_tokens": bool(torch.equal(with_graph, without_graph)), "user_triton_kernels": user_triton_kernels()}),
    flush=True)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the decode's CUDA graph is CUDA-only")
@pytest.mark.parametrize("allocator", ["native", "cudaMallocAsync"])
def test_cuda_graph_decode_with_compiled_layers_under_both_allocators(tiny_checkpoint, allocator):
    """ComfyUI runs PyTorch with cudaMallocAsync, where a capture of inductor's Python-launched kernels failed and
    its leftovers aborted the process. Under both allocators the decode now replays a CUDA graph of the compiled
    layers (no compile fallback, no failed capture, a clean exit), with the tokens of the same compiled layers run
    step by step without a graph in the same process."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "GLM_CORE_NO_COMPILE")}
    if allocator == "cudaMallocAsync":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD_TOKENS, str(tiny_checkpoint)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:]
    result = json.loads(lines[-1][7:])
    assert result["allocator"] == allocator
    assert result["compiled"] == {"AR decode layer": None}, result  # compiled, and it did not fall back
    assert result["graph_replays"] > 10 and result["replays_without_graph"] == 0, result
    assert result["same_tokens"], json.dumps(result)
    from glm_core.decode_attention import decode_attention_available

    if decode_attention_available("cuda"):  # the compiled layers took glm_core/decode_attention.py's kernels
        assert {"split_kernel", "combine_kernel"} <= set(result["user_triton_kernels"]), result
    from glm_core.gemv import gemv_available

    if allocator == "cudaMallocAsync" and gemv_available("cuda"):  # there the GEMV is traced in, not an opaque op
        assert "gemv_kernel" in result["user_triton_kernels"], result


def test_a_failed_capture_under_cudamallocasync_is_kept_and_ends_graphs(monkeypatch):
    """Freeing what a failed capture allocated under cudaMallocAsync aborts the process: the failure is kept for
    the process's lifetime and later generations decode without a graph. Under PyTorch's own allocator the
    leftovers are freed as usual and graphs stay on."""
    from glm_core.ar import decode

    monkeypatch.setattr(decode, "_FAILED_CAPTURE_LEFTOVERS", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    decode._keep_leftovers_of_failed_capture(RuntimeError("native"))
    assert decode._FAILED_CAPTURE_LEFTOVERS == [] and decode.cuda_graphs_supported()
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    failure = RuntimeError("CUDA driver error: invalid argument")
    decode._keep_leftovers_of_failed_capture(failure)
    assert decode._FAILED_CAPTURE_LEFTOVERS == [failure]
    assert not decode.cuda_graphs_supported()


@pytest.mark.parametrize("backend,cpp_wrapper", [("native", False), ("cudaMallocAsync", True)])
def test_decode_layer_launches_from_cpp_under_cudamallocasync(monkeypatch, ar_models, backend, cpp_wrapper):
    """Under cudaMallocAsync the compiled decode layer is built with inductor's C++ wrapper (its Python-side
    launchers reject the capture's own allocations); under PyTorch's allocator with the usual Python wrapper."""
    from glm_core import compiling
    from glm_core.ar import decode

    ours = ar_models.ours
    monkeypatch.setattr(compiling, "_WRAPPERS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    monkeypatch.setattr(ours, "compile_backend", "inductor")
    assert decode.decode_layer_runner(ours) is not None
    assert [key[1:] for key in compiling._WRAPPERS] == [("inductor", cpp_wrapper, False)]


def test_an_fp8_decode_layer_compiles_with_tuned_reductions_only_where_our_gemv_does_not_run(monkeypatch, ar_models):
    """FP8 decode layers whose one-row linears inductor writes as reductions (our GEMV kernel does not run there)
    are compiled with inductor's coordinate-descent tuning; bf16 ones, and FP8 ones whose linears take our GEMV,
    without it (there it would only re-time the norm kernels, noisily)."""
    from glm_core import compiling, gemv
    from glm_core.ar import decode
    from glm_core.fp8 import Fp8Linear

    ours = ar_models.ours
    monkeypatch.setattr(compiling, "_WRAPPERS", {})
    monkeypatch.setattr(ours, "compile_backend", "inductor")
    monkeypatch.setitem(gemv.GEMV_BY_DEVICE, str(ours.device), False)
    decode.decode_layer_runner(ours)
    layer = ours.model.language_model.layers[0].mlp
    monkeypatch.setattr(layer, "down_proj", Fp8Linear.from_linear(layer.down_proj))
    decode.decode_layer_runner(ours)
    wrappers = compiling._WRAPPERS
    assert [key[3] for key in wrappers] == [False, True]
    assert wrappers[list(wrappers)[1]].compiled is not wrappers[list(wrappers)[0]].compiled
    monkeypatch.setitem(gemv.GEMV_BY_DEVICE, str(ours.device), True)  # a GPU where our GEMV runs
    assert decode.inductor_writes_fp8_gemvs(ours) is False
    decode.decode_layer_runner(ours)
    assert [key[3] for key in compiling._WRAPPERS] == [False, True]  # the untuned wrapper again, none new


def test_the_decode_loop_stays_a_bounded_number_of_steps_ahead_of_the_gpu():
    """Before queueing step k the host waits for the event of step k - MAX_STEPS_AHEAD, never for a later one (the
    GPU keeps that many steps queued) and never not at all (the driver's queue would fill, and every other thread's
    CUDA calls would wait in it). Fake events stand in for CUDA's: the bookkeeping is the same."""
    from glm_core.ar.decode import StepsInFlight

    log = []

    class Event:
        def __init__(self, index):
            self.index = index

        def record(self):
            log.append(("record", self.index))

        def synchronize(self):
            log.append(("wait", self.index))

    ahead = StepsInFlight.MAX_STEPS_AHEAD
    in_flight = StepsInFlight(torch.device("cpu"))
    assert in_flight.events == []
    in_flight.events = [Event(i) for i in range(ahead)]
    recorded_at = {}  # step -> which event it recorded
    for step in range(3 * ahead):
        before = len(log)
        in_flight.wait_for_room()
        waits = [index for kind, index in log[before:] if kind == "wait"]
        if step < ahead:
            assert waits == [], (step, waits)
        else:
            assert waits == [recorded_at[step - ahead]], (step, waits)
        in_flight.queued()
        recorded_at[step] = log[-1][1]
