"""Determinism on the CPU (issue 11): the same seeds give the same tokens and image bytes across calls and across
processes; batch item i is the solo run with seed + i.

What is and is not bit-exact (fp32 on the CPU, the same thread count):
- tokens: exact, across calls, processes and batch positions;
- images of the same call repeated, in one process or two: exact, byte for byte;
- batch item i against the solo run with seed + i: the same tokens and the same starting noise, but the batched
  matrix products sum in another order, so the floats differ by ~1e-6 and a few 8-bit pixels by 1.
- a different thread count (OMP_NUM_THREADS) changes the floats the same way, so images can differ by a pixel
  level between machines or settings.

Already covered elsewhere: the AR alone (tests/unit/test_ar_decode.py) and generate_tokens' batch item 0 and
repeat (tests/unit/test_pipeline_tokens.py).
"""
from __future__ import annotations

import io
import re

import numpy as np
import PIL.Image
import pytest
import torch

from glm_core import pipeline
from tests.cli_runs import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 512
FAST = ("--device", "cpu", "--steps", 1, "--guidance", 1.0, "--no-compile", "--width", SIZE, "--height", SIZE)


def png_bytes(image: torch.Tensor) -> bytes:
    pixels = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def text_cond(model):
    return pipeline.encode_prompt(model, "a lighthouse at dusk", SIZE, SIZE)


def test_same_seed_same_image_bytes_across_calls(model, text_cond):
    tokens = pipeline.generate_tokens(model, text_cond, seed=21)
    first = pipeline.decode(model, text_cond, tokens, steps=2, guidance=1.5, seed=8)
    again = pipeline.decode(model, text_cond, pipeline.generate_tokens(model, text_cond, seed=21), steps=2,
                            guidance=1.5, seed=8)
    assert torch.equal(first, again)
    assert png_bytes(first[0]) == png_bytes(again[0])
    other_seed = pipeline.decode(model, text_cond, tokens, steps=2, guidance=1.5, seed=9)
    assert not torch.equal(first, other_seed), "the DiT seed changes nothing"


def test_batch_item_equals_solo_run_with_seed_plus_i(model, text_cond):
    batch_tokens = pipeline.generate_tokens(model, text_cond, seed=30, batch_size=2)
    batch_images = pipeline.decode(model, text_cond, batch_tokens, steps=2, guidance=1.5, seed=70)
    for i in range(2):
        solo_tokens = pipeline.generate_tokens(model, text_cond, seed=30 + i)
        assert torch.equal(batch_tokens.grid_ids[i], solo_tokens.grid_ids[0]), f"item {i}: tokens differ"
        solo_image = pipeline.decode(model, text_cond, solo_tokens, steps=2, guidance=1.5, seed=70 + i)[0]
        # Same noise (seed + i): equal up to the summation order of batched matrix products (see module doc);
        # another noise would differ by ~0.5.
        assert (batch_images[i] - solo_image).abs().max() < 1e-4, f"item {i}: image differs from the solo run"
    assert not torch.equal(batch_tokens.grid_ids[0], batch_tokens.grid_ids[1])


@pytest.fixture(scope="module")
def cli_runs(tiny_checkpoint, tmp_path_factory):
    """The same command in two processes, and a batch of 2 starting one seed lower (its item 1 = seed 5)."""
    folder = tmp_path_factory.mktemp("determinism")
    runs = {}
    for name, seed, batch in (("first", 5, 1), ("second", 5, 1), ("batch", 4, 2)):
        run = run_cli("--model", tiny_checkpoint, "--prompt", 'a sign that says "OPEN"', *FAST, "--seed", seed,
                      "--batch", batch, "--save-tokens", folder / f"{name}.safetensors", "--out", folder / f"{name}.png")
        assert run.returncode == 0, run.stderr
        runs[name] = run
    return folder, runs


def test_cli_same_seed_same_bytes_across_processes(cli_runs):
    folder, _ = cli_runs
    assert (folder / "first.png").read_bytes() == (folder / "second.png").read_bytes()
    first, second = (pipeline.load_tokens(folder / f"{name}.safetensors") for name in ("first", "second"))
    assert torch.equal(first.grid_ids, second.grid_ids) and first.seeds == second.seeds == [5]


def test_cli_batch_item_is_the_solo_run_with_seed_plus_i(cli_runs):
    folder, _ = cli_runs
    batch, solo = (pipeline.load_tokens(folder / f"{name}.safetensors") for name in ("batch", "first"))
    assert batch.seeds == [4, 5]
    assert torch.equal(batch.grid_ids[1], solo.grid_ids[0])
    difference = np.abs(pixels_of(folder / "batch_1.png") - pixels_of(folder / "first.png"))
    assert difference.max() <= 1, difference.max()  # see the module doc: summation order only
    assert np.abs(pixels_of(folder / "batch_0.png") - pixels_of(folder / "first.png")).max() > 1


def test_cli_progress_is_plain_lines_with_eta_when_stderr_is_a_pipe(cli_runs):
    """Issue 11 §9: `\\r` lines merged into one line in logs."""
    _, runs = cli_runs
    stderr = runs["first"].stderr
    assert "\r" not in stderr
    ar_lines = [line for line in stderr.splitlines() if line.startswith("AR tokens: ")]
    assert 5 <= len(ar_lines) <= 15, ar_lines  # about every 10 %, not every token
    for line in ar_lines:
        assert re.fullmatch(r"AR tokens: \d+/\d+ \(\d+\.\d s, ETA \d+\.\d s\)", line), line
    done = [int(line.split()[2].split("/")[0]) for line in ar_lines]
    total = int(ar_lines[-1].split("/")[1].split()[0])
    assert done == sorted(done) and done[-1] == total
    assert re.search(r"^loaded AR weights \(\d+\.\d GB\) in \d+\.\d s$", stderr, re.M), stderr
    assert re.search(r"^DiT steps: 1/1 \(\d+\.\d s, ETA 0\.0 s\)$", stderr, re.M), stderr
