"""`python -m glm_core` in a subprocess on the tiny checkpoint: a PNG of the asked size, --tokens-only, bad input.

Three subprocess runs (two run the AR, ~10-20 s each on 2 CPU cores; the bad-width one stops at once).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import torch

from glm_core import pipeline
from tests.paths import REPO_ROOT


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "glm_core", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_writes_png_of_requested_size(tiny_checkpoint, tmp_path):
    out = tmp_path / "images" / "cat.png"
    result = run_cli("--model", tiny_checkpoint, "--prompt", 'a cat holding a sign "HI"', "--width", 640,
                     "--height", 512, "--steps", 2, "--seed", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "DiT steps: 2/2" in result.stderr and "AR tokens:" in result.stderr  # progress for both stages
    with PIL.Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (640, 512)  # (width, height)
        assert image.mode == "RGB"
        assert np.asarray(image).std() > 0, "a flat image"
    # The picture gets the permissions a plain open() would give it, not the private 0600 of its temporary file.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, oct(out.stat().st_mode)


def test_cli_tokens_only_prints_grid(tiny_checkpoint, tmp_path):
    saved = tmp_path / "tokens.safetensors"
    result = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", "--width", 512, "--height", 512,
                     "--tokens-only", "--save-tokens", saved, "--out", tmp_path / "never.png")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("token grid (16, 16) for 512x512"), lines[0]
    rows = [[int(v) for v in line.split()] for line in lines[1:]]
    assert len(rows) == 16 and all(len(row) == 16 for row in rows)
    assert all(0 <= v < 16384 for row in rows for v in row)
    assert not (tmp_path / "never.png").exists(), "--tokens-only must stop before the DiT"
    # the printed grid is the one written to --save-tokens
    tokens = pipeline.load_tokens(saved)
    assert torch.equal(tokens.grid_ids[0], torch.tensor(rows))
    assert (tokens.height, tokens.width) == (512, 512)


def test_cli_bad_width_exits_2(tiny_checkpoint, tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", "--width", 500, "--height", 512, "--out", out)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "width 500" in result.stderr and "multiple of 32" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not out.exists()


def test_cli_ends_without_finalisation_but_with_its_output_and_code(tmp_path, monkeypatch):
    """`exit_now` flushes what was printed and ends the process with main's code at once; with a tracer or a
    profiler attached it exits normally instead (they write their results during finalisation)."""
    from glm_core import __main__ as cli

    ended = []

    class Ended(Exception):
        pass

    def fake_exit(code):
        ended.append(code)
        raise Ended

    flushed = []
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: flushed.append("logging"))
    monkeypatch.setattr(sys.stdout, "flush", lambda: flushed.append("stdout"))
    monkeypatch.setattr(sys.stderr, "flush", lambda: flushed.append("stderr"))
    tracer = sys.gettrace()  # pytest's coverage or a debugger may have one: the test needs none, then its own
    sys.settrace(None)
    try:
        try:
            cli.exit_now(2)
        except Ended:
            pass
        assert ended == [2] and flushed == ["logging", "stdout", "stderr"]
        sys.settrace(lambda *args: None)
        try:
            cli.exit_now(3)
        except SystemExit as exit_:
            assert exit_.code == 3
        else:
            raise AssertionError("exit_now skipped finalisation under a tracer")
    finally:
        sys.settrace(tracer)
    assert ended == [2]


def test_cli_profiled_run_still_writes_its_profile(tmp_path):
    """`python -m cProfile -o FILE -m glm_core ...` must leave FILE: the profiler writes it after the module ends."""
    profile = tmp_path / "cli.prof"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "glm_core", "--prompt", "a cat",
                             "--width", "33"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "multiple of 32" in result.stderr, result.stderr  # (cProfile itself swallows the exit code)
    assert profile.stat().st_size > 0
