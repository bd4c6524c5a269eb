"""glm_core.prefetch: the decode stages loaded, and the DiT's compiled graph warmed, on a side thread while the AR
decodes. On the CPU the thread really runs beside the AR; the GPU-only parts (its own stream, the memory check
against the free memory) are covered with the free memory given."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from glm_core import pipeline
from glm_core.prefetch import DECODE_STAGES, DecodePrefetch, warm_up_dit
from tests.inputs import make_picture

PROMPT = 'a shop sign that says "OPEN"'
SIZE = (512, 640)  # width, height


def _new_model(folder):
    return pipeline.GlmImage.from_folder(folder, device="cpu")


def _watch_prefetches(model, monkeypatch, progress: list) -> list:
    """The prefetches `generate` starts, each with the AR tokens reported when it started."""
    started = []
    start = model.start_prefetch

    def watched(prefetch):
        started.append((prefetch, list(progress)))
        start(prefetch)

    monkeypatch.setattr(model, "start_prefetch", watched)
    return started


def _images_without_prefetch(folder, references=()):
    model = _new_model(folder)
    cond = pipeline.encode_prompt(model, PROMPT, *SIZE, references)
    tokens = pipeline.generate_tokens(model, cond, seed=3)
    assert not any(model.on_device(name) for name in DECODE_STAGES)
    return pipeline.decode(model, cond, tokens, steps=2, seed=4)


def test_generate_loads_the_decode_stages_while_the_ar_decodes(tiny_checkpoint, monkeypatch):
    model = _new_model(tiny_checkpoint)
    progress = []
    started = _watch_prefetches(model, monkeypatch, progress)
    images = pipeline.generate(model, PROMPT, *SIZE, ar_seed=3, seed=4, steps=2,
                               ar_progress=lambda done, total: progress.append((done, total)))
    assert len(started) == 1
    prefetch, progress_at_start = started[0]
    total = progress[-1][1]
    assert progress_at_start and progress_at_start[-1][0] < total, "the prefetch started after the AR had finished"
    assert prefetch.failure is None
    assert prefetch.loaded == list(DECODE_STAGES)
    assert torch.equal(images, _images_without_prefetch(tiny_checkpoint)), "the prefetch changed the image"


def test_a_failed_prefetch_loses_nothing(tiny_checkpoint, monkeypatch, caplog):
    model = _new_model(tiny_checkpoint)
    started = _watch_prefetches(model, monkeypatch, [])
    load = model.load_stage

    def failing_on_the_side_thread(name, **options):
        if name == "dit" and threading.current_thread() is not threading.main_thread():
            raise OSError("disk went away")
        load(name, **options)

    monkeypatch.setattr(model, "load_stage", failing_on_the_side_thread)
    reference = make_picture(512, 512, seed=5)
    with caplog.at_level(logging.WARNING, logger="glm_core"):
        images = pipeline.generate(model, PROMPT, *SIZE, [reference], ar_seed=3, seed=4, steps=2)
    prefetch = started[0][0]
    assert prefetch.failure is not None and "disk went away" in prefetch.failure
    assert any("preparing the decode beside the AR failed" in r.getMessage() for r in caplog.records)
    assert all(model.on_device(name) for name in DECODE_STAGES)
    assert torch.equal(images, _images_without_prefetch(tiny_checkpoint, [reference]))


def test_the_prefetch_runs_only_where_the_stages_fit_beside_the_ar(tiny_checkpoint, monkeypatch):
    """It never makes room: on a card where the stages take turns, the decode loads them itself as before."""
    model = _new_model(tiny_checkpoint)
    model.device = torch.device("cuda", 0)  # no stage is loaded: nothing here touches a GPU
    cond = pipeline.Conditioning(prompt=PROMPT, width=1024, height=1024)
    prefetch = DecodePrefetch(model, cond, batch=1)
    needed = sum(model.stage_nbytes(name) for name in DECODE_STAGES) + pipeline.HEADROOM_BYTES
    monkeypatch.setattr("glm_core.prefetch.free_bytes", lambda device: needed)
    reason = prefetch.skip_reason()
    assert reason is not None and "needed beside the AR" in reason, reason  # the decode's working memory too
    monkeypatch.setattr("glm_core.prefetch.free_bytes", lambda device: needed + 64 * pipeline.GB)
    assert prefetch.skip_reason() is None
    model.placement = "sequential"
    assert "sequential" in prefetch.skip_reason()


@pytest.mark.parametrize("references", [0, 2], ids=["t2i", "edit"])
def test_the_warm_up_compiles_what_the_decode_runs(tiny_checkpoint, references):
    """After `warm_up_dit` for a request, its decode compiles nothing: same graphs, same guards (the eager backend
    shows dynamo's guards on the CPU). Without the warm-up the same decode compiles (the test can fail)."""
    from bench.recompiles import CompileCounter

    model = _new_model(tiny_checkpoint)
    pictures = [make_picture(512, 512 + 128 * i, seed=i) for i in range(references)]
    cond = pipeline.encode_prompt(model, PROMPT, *SIZE, pictures)
    tokens = pipeline.generate_tokens(model, cond, seed=3)
    model.prepare(list(DECODE_STAGES))
    model.stage("dit").compile_backend = "eager"
    counts = {}
    for warm in (False, True):
        torch._dynamo.reset()
        if warm:
            with torch.no_grad():
                assert warm_up_dit(model, cond, batch=1)
        with CompileCounter() as counter:
            pipeline.decode(model, cond, tokens, steps=2, seed=4)
        counts[warm] = (counter.compiled_frames, counter.recompiles, counter.reasons)
    torch._dynamo.reset()
    assert counts[False][0] >= 1, counts
    assert counts[True][:2] == (0, 0), counts


def test_a_second_image_starts_no_prefetch_thread(tiny_checkpoint):
    """Loaded stages and a decode of this kind already run in the process: nothing to prepare."""
    model = _new_model(tiny_checkpoint)
    pipeline.generate(model, PROMPT, *SIZE, ar_seed=3, seed=4, steps=1)
    model.stage("dit").compile_backend = "eager"  # would be warmed again if the prefetch ran
    prefetch = DecodePrefetch(model, pipeline.encode_prompt(model, PROMPT, *SIZE), batch=1)
    prefetch.start()
    assert prefetch._thread is None and not prefetch.warmed


def test_an_interrupted_ar_leaves_no_side_thread_behind(tiny_checkpoint):
    """The interrupt propagates as it would without the prefetch; by then the side thread has ended (cancelled: it
    starts no further load) and the model can run the same request again."""
    model = _new_model(tiny_checkpoint)
    cond = pipeline.encode_prompt(model, PROMPT, *SIZE)
    calls = []

    def interrupt():
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.generate_tokens(model, cond, seed=3, interrupt=interrupt, prefetch_decode=True)
    assert not [t for t in threading.enumerate() if t.name == "glm-core-decode-prefetch"]
    assert model._prefetch is None
    again = pipeline.generate_tokens(model, cond, seed=3, prefetch_decode=True)
    assert torch.equal(again.grid_ids, pipeline.generate_tokens(_new_model(tiny_checkpoint), cond, seed=3).grid_ids)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the prefetch's stream, its memory check and inductor's compile are CUDA's")
def test_on_the_gpu_the_decode_after_a_prefetch_compiles_nothing(tiny_checkpoint, monkeypatch):
    """generate() on the GPU: the side thread reads the decode stages and warms the DiT's inductor graph while the
    AR decodes, the decode then compiles no frame, and the image is the one a run without the prefetch makes."""
    from bench.recompiles import CompileCounter

    torch._dynamo.reset()
    model = pipeline.GlmImage.from_folder(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    started = _watch_prefetches(model, monkeypatch, [])
    decode = pipeline.decode
    counted = []

    def counted_decode(*args, **kwargs):
        # The decode joins the side thread first; its compile may still be finishing then (the tiny AR is done in
        # milliseconds on a GPU), and torch counts compiled frames process-wide: join before counting.
        model.finish_prefetch()
        with CompileCounter() as counter:
            images = decode(*args, **kwargs)
        counted.append(counter)
        return images

    monkeypatch.setattr(pipeline, "decode", counted_decode)
    images = pipeline.generate(model, PROMPT, *SIZE, ar_seed=3, seed=4, steps=2)
    prefetch = started[0][0]
    assert prefetch.failure is None and prefetch.loaded == list(DECODE_STAGES) and prefetch.warmed
    assert counted[0].compiled_frames == 0, counted[0].reasons
    monkeypatch.setattr(pipeline, "decode", decode)
    cond = pipeline.encode_prompt(model, PROMPT, *SIZE)
    again = pipeline.decode(model, cond, pipeline.generate_tokens(model, cond, seed=3), steps=2, seed=4)
    assert torch.equal(images, again)
    torch._dynamo.reset()
