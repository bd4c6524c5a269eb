"""`python -m glm_core` given bad input (issue 11), each in a subprocess on the tiny checkpoint at 512x512.

Every refusal is checked the same way: exit code 2, the key words of the message, no Python traceback, no weight
read and no AR token sampled (the CLI prints a line for each), and the output folder byte for byte as it was
(an existing output file is created first). A few cases run the model on purpose (Ctrl-C while sampling, decoding
a saved tokens file); they use 1 DiT step without guidance.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from glm_core.tokens import PriorTokens, save_tokens
from tests.cli_runs import CliRun, files_in, interrupt_cli_when, obeying_file_modes, run_cli
from tests.fixtures.damaged_checkpoint import damaged_copy
from tests.paths import REPO_ROOT

SIZE = ("--width", 512, "--height", 512)
FAST = ("--steps", 1, "--guidance", 1.0, "--no-compile")
CODEBOOK = 16384


@pytest.fixture
def out_dir(tmp_path):
    """A folder that already holds a picture from an earlier run (the user's work, not to be lost)."""
    folder = tmp_path / "out"
    folder.mkdir()
    PIL.Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "image.png")
    return folder


def assert_refused(run: CliRun, out_dir, before: dict, *words):
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    assert "\nerror: " in "\n" + run.stderr, run.stderr
    for word in words:
        assert word in run.stderr, f"{word!r} not in {run.stderr!r}"
    assert not run.loaded_weights and not run.ran_ar, run.stderr  # found before anything was read
    assert files_in(out_dir) == before, "the output folder changed"
    assert run.stdout == "", run.stdout  # "wrote ..." goes to stdout


def make_picture(path, width, height):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


# -- the request itself: refused before the model folder is opened ------------------------------------------

REQUEST_CASES = {
    # issue 11 §1: 0 was silently replaced by the default size
    "width_0": (("--width", 0, "--height", 512), ["width 0", "below the minimum 512"]),
    "height_0": (("--width", 512, "--height", 0), ["height 0", "below the minimum 512"]),
    # §5: both sides wrong, both named
    "both_sides": (("--width", 100, "--height", 3000), ["width 100", "height 3000", "multiple of 32",
                                                         "above the maximum 2048"]),
    # §3: were found only after the AR stage
    "steps_0": ((*SIZE, "--steps", 0), ["steps must be an integer >= 1, got 0"]),
    "guidance_0.5": ((*SIZE, "--guidance", 0.5), ["guidance must be >= 1.0", "got 0.5"]),
    "temperature_0": ((*SIZE, "--temperature", 0), ["temperature must be > 0"]),
    "top_p_above_1": ((*SIZE, "--top-p", 1.5), ["top_p must be in (0, 1]", "1.5"]),
    "top_k_negative": ((*SIZE, "--top-k", -3), ["top_k must be an integer >= 0", "-3"]),
    "batch_0": ((*SIZE, "--batch", 0), ["--batch must be >= 1, got 0"]),
    "empty_prompt": ((*SIZE, "--prompt", "  "), ["prompt is empty"]),
    "tokens_only_and_load_tokens": ((*SIZE, "--tokens-only", "--load-tokens", "{tmp}/out/image.png"),
                                    ["--load-tokens and --tokens-only", "drop one"]),
    "missing_ref": ((*SIZE, "--ref", "{tmp}/nowhere.png"), ["--ref", "nowhere.png", "file not found"]),
    "missing_tokens_file": ((*SIZE, "--load-tokens", "{tmp}/gone.safetensors"), ["--load-tokens", "gone.safetensors",
                                                                                 "file not found"]),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_bad_request_refused_before_loading(case, tiny_checkpoint, out_dir, tmp_path):
    args, words = REQUEST_CASES[case]
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *FAST, *args, "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, *words)
    if case == "width_0":
        assert "height" not in run.stderr


# -- a bad --out: refused before loading (issue 11 §2: on main the image was lost after the whole run) ---------

def test_out_without_extension(tiny_checkpoint, out_dir):
    (out_dir / "picture").write_bytes(b"the user's file")
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / "picture")
    assert_refused(run, out_dir, before, "--out", "unknown image extension (none)", ".png")


def test_out_with_unknown_extension(tiny_checkpoint, out_dir):
    (out_dir / "picture.xyz").write_bytes(b"the user's file")
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / "picture.xyz")
    assert_refused(run, out_dir, before, "unknown image extension .xyz", ".jpg")


@pytest.mark.parametrize("name", ["renders", "renders.png"])
def test_out_is_a_folder(tiny_checkpoint, out_dir, name):
    (out_dir / name).mkdir()
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / name)
    assert_refused(run, out_dir, before, f"--out {out_dir / name} is a folder", "give a file name")
    assert (out_dir / name).is_dir()


def test_out_in_an_unwritable_folder(tiny_checkpoint, out_dir):
    locked = out_dir / "locked"
    locked.mkdir()
    (locked / "image.png").write_bytes((out_dir / "image.png").read_bytes())
    locked.chmod(0o555)
    try:
        before = files_in(out_dir)
        run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--out", locked / "image.png",
                      preexec_fn=obeying_file_modes())
        assert_refused(run, out_dir, before, f"cannot write into {locked}", "writable folder")
    finally:
        locked.chmod(0o755)


def test_out_below_a_file(tiny_checkpoint, out_dir):
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--out",
                  out_dir / "image.png" / "cat.png")
    assert_refused(run, out_dir, before, "cannot write into", "image.png")


def test_save_tokens_path_is_a_folder(tiny_checkpoint, out_dir):
    """Found after the whole AR stage before this round (IsADirectoryError from the rename)."""
    (out_dir / "tokens").mkdir()
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / "image.png",
                  "--save-tokens", out_dir / "tokens")
    assert_refused(run, out_dir, before, f"--save-tokens {out_dir / 'tokens'} is a folder")


# -- the checkpoint: every file checked before any weight is read (issue 11 §3) ------------------------------

CHECKPOINT_CASES = {
    "missing_dit_shard": ["missing on disk", "diffusion_pytorch_model-00002-of-00002.safetensors", "re-download"],
    "dit_shape_mismatch": ["gives shape", "expected", "GlmImageDiT"],
    "bad_dit_index": ["cannot parse JSON", "diffusion_pytorch_model.safetensors.index.json"],
    "broken_vae_config": ["config of component 'vae'", "cannot parse JSON", "vae/config.json"],
    "dit_index_naming_another_shard": ["listed in the shard index but is not in this shard", "re-download"],
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_found_before_the_ar(damage, tiny_checkpoint, out_dir, tmp_path):
    folder, what = damaged_copy(tiny_checkpoint, tmp_path / "GLM-Image", damage)
    before = files_in(out_dir)
    run = run_cli("--model", folder, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, *CHECKPOINT_CASES[damage])
    assert what in run.stderr


def test_not_a_checkpoint_folder(out_dir, tmp_path):
    before = files_in(out_dir)
    run = run_cli("--model", tmp_path, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, "not a GLM-Image folder", "model_index.json")


def test_reference_that_is_not_an_image(tiny_checkpoint, out_dir, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("not a picture")
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "make it blue", *SIZE, *FAST, "--ref", fake,
                  "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, f"--ref {fake}: not a readable image")


def test_reference_too_elongated(tiny_checkpoint, out_dir, tmp_path):
    strip = make_picture(tmp_path / "strip.png", 500, 100)
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "make it blue", *SIZE, *FAST, "--ref", strip,
                  "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, "reference image 500x100", "aspect ratio 5.000", "crop it first")


# -- load errors that are not corruption are not called corrupt (issue 11 §4) --------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (this one has a GPU)")
def test_cuda_asked_for_without_cuda(tiny_checkpoint, out_dir):
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--device", "cuda",
                  "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, "device 'cuda'", "no CUDA GPU", "use device 'cpu'")
    assert "corrupt" not in run.stderr and "re-download" not in run.stderr


def test_unreadable_shard_is_a_permission_problem(tiny_checkpoint, out_dir, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "GLM-Image")
    shard = folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.chmod(0o000)
    before = files_in(out_dir)
    run = run_cli("--model", folder, "--prompt", "a cat", *SIZE, *FAST, "--out", out_dir / "image.png",
                  preexec_fn=obeying_file_modes())
    assert_refused(run, out_dir, before, f"cannot read {shard}: permission denied", "read access")
    assert "corrupt" not in run.stderr and "re-download" not in run.stderr and "No such file" not in run.stderr


# -- Ctrl-C (issue 11 §7) -----------------------------------------------------------------------------------

def test_ctrl_c_while_sampling_tokens(tiny_checkpoint, out_dir):
    before = files_in(out_dir)
    run, printed = interrupt_cli_when("AR tokens", "--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST,
                                      "--out", out_dir / "image.png", timeout=120)
    assert run.returncode == 130, (run.returncode, run.stderr)
    assert printed[-1].startswith("AR tokens"), printed  # it was sampling when the key was pressed
    after_interrupt = run.stderr[len("".join(printed)):]
    assert after_interrupt == "interrupted; no image was written\n", repr(after_interrupt)  # one line, no traceback
    assert files_in(out_dir) == before and run.stdout == ""


# -- tokens files (issue 11 §8) -----------------------------------------------------------------------------

def tokens_file(path, height=512, width=512, reference_sizes=()):
    ids = torch.randint(0, CODEBOOK, (1, height // 32, width // 32), generator=torch.Generator().manual_seed(1))
    return save_tokens(PriorTokens(grid_ids=ids, height=height, width=width,
                                   reference_sizes=list(reference_sizes), seeds=[1]), path)


def test_load_tokens_decodes_without_the_ar(tiny_checkpoint, tmp_path):
    saved = tokens_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "decoded.png"
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--load-tokens", saved,
                  "--out", out)
    assert run.returncode == 0, run.stderr
    assert not run.ran_ar and "loaded AR weights" not in run.stderr, run.stderr
    assert "loaded DiT weights" in run.stderr and f"wrote {out}" in run.stdout
    with PIL.Image.open(out) as image:
        assert image.size == (512, 512)


def test_load_tokens_of_another_size(tiny_checkpoint, out_dir, tmp_path):
    saved = tokens_file(tmp_path / "tokens.safetensors", height=512, width=576)
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "a cat", *SIZE, *FAST, "--load-tokens", saved,
                  "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, "generated for 576x512", "asks for 512x512")
    for comfy_word in ("node", "Encode", "DiT Decode", "Load Tokens", "ComfyUI"):
        assert comfy_word not in run.stderr, run.stderr  # the core speaks to whoever called it


def test_load_tokens_with_other_references(tiny_checkpoint, out_dir, tmp_path):
    saved = tokens_file(tmp_path / "tokens.safetensors")  # made without references
    reference = make_picture(tmp_path / "photo.png", 512, 512)
    before = files_in(out_dir)
    run = run_cli("--model", tiny_checkpoint, "--prompt", "make it blue", *SIZE, *FAST, "--load-tokens", saved,
                  "--ref", reference, "--out", out_dir / "image.png")
    assert_refused(run, out_dir, before, "0 reference image(s)", "has 1", "same references")


def test_tiny_reference_is_upscaled_with_a_warning(tiny_checkpoint, tmp_path):
    """Issue 11 §6 on the CLI: an 8x8 reference is used, and the log says it was blown up to 512x512."""
    saved = tokens_file(tmp_path / "tokens.safetensors", reference_sizes=[(512, 512)])
    thumbnail = make_picture(tmp_path / "thumb.png", 8, 8)
    out = tmp_path / "edited.png"
    run = run_cli("--model", tiny_checkpoint, "--prompt", "make it blue", *SIZE, *FAST, "--load-tokens", saved,
                  "--ref", thumbnail, "--out", out)
    assert run.returncode == 0, run.stderr
    assert "reference image 8x8 is upscaled to 512x512" in run.stderr, run.stderr
    assert out.is_file()


# -- saving fails after the generation: the image is kept elsewhere -------------------------------------------

def test_failed_save_keeps_the_image_in_a_fallback_file(tmp_path, monkeypatch, capsys):
    from glm_core import __main__ as cli

    out = tmp_path / "image.png"
    out.write_bytes(b"the user's earlier picture")
    fallback_dir = tmp_path / "fallback"
    fallback_dir.mkdir()
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(fallback_dir))

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.os, "replace", disk_full)
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SystemExit) as exit_info:
        cli.save_images(image, [out], demo=False)
    assert exit_info.value.code == 2
    assert out.read_bytes() == b"the user's earlier picture"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    (fallback,) = fallback_dir.iterdir()
    message = capsys.readouterr().err
    assert f"could not write {out}" in message and "No space left" in message and str(fallback) in message
    with PIL.Image.open(fallback) as saved:
        assert saved.size == (96, 64)


# -- help (issue 11 §9) -------------------------------------------------------------------------------------

def help_entries(text: str) -> dict[str, str]:
    """Option -> its help text, from argparse's --help layout."""
    options = text.split("options:", 1)[1]
    entries, current = {}, None
    for line in options.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current:
            entries[current] += " " + line.strip()
    return {option: " ".join(text.split()) for option, text in entries.items()}


def test_help_names_every_default_once_and_imports_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "glm_core", "--help"], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "glm_core.__main__" in imported or "argparse" in imported, "no import trace"
    assert "torch" not in imported and "numpy" not in imported, "--help imported torch or numpy"

    entries = help_entries(result.stdout)
    assert {"--model", "--width", "--steps", "--temperature", "--top-p", "--out"} <= set(entries)
    for option, text in entries.items():
        if option in ("-h", "--prompt"):
            continue
        assert text.lower().count("default") == 1, f"{option}: the default should be named once: {text!r}"
        assert "default: None" not in text, f"{option}: {text!r}"
    assert "required" in entries["--prompt"] and "default" not in entries["--prompt"].lower()
