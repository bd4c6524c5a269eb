"""Bad input through glm_core.pipeline (issue 3 §5, issue 2 §8), cancellation, and the tokens file.

Every error a user can cause must be a `ValueError` whose message names the problem; each test asserts
on the key words. Most cases fail before any weights load; the few that run the DiT use 512², 1-3 steps
and guidance 1.0 (one DiT pass per step) on the tiny checkpoint.
"""

from __future__ import annotations

import json

import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from glm_core import pipeline
from glm_core.tokens import TOKENS_FORMAT, PriorTokens

CODEBOOK = 16384


def make_tokens(height: int = 512, width: int = 512, *, grid=None, reference_sizes=(), seed: int = 0) -> PriorTokens:
    """PriorTokens as generate_tokens would return them, with random codebook ids."""
    if grid is None:
        grid = (height // 32, width // 32)
    ids = torch.randint(0, CODEBOOK, (1, *grid), generator=torch.Generator().manual_seed(seed))
    return PriorTokens(grid_ids=ids, height=height, width=width,
                       reference_sizes=[tuple(s) for s in reference_sizes], seeds=[seed])


def picture(height: int, width: int, colour=(40, 120, 200)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (width, height), colour)


# -- encode_prompt: prompt, size, references -------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(model, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipeline.encode_prompt(model, prompt, 512, 512)


@pytest.mark.parametrize("height,width,words", [
    (512, 520, ["width 520", "not a multiple of 32", "512 or 544"]),
    (500, 512, ["height 500", "not a multiple of 32"]),
    (480, 512, ["height 480", "below the minimum 512"]),
    (512, 256, ["width 256", "below the minimum 512"]),
    (2080, 1024, ["height 2080", "above the maximum 2048"]),
    (1024, 4096, ["width 4096", "above the maximum 2048"]),
])
def test_bad_target_size(model, height, width, words):
    with pytest.raises(ValueError) as info:
        pipeline.encode_prompt(model, "a cat", width, height)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    # The whole path checks before any stage runs.
    with pytest.raises(ValueError, match=words[1]):
        pipeline.generate(model, "a cat", width, height, steps=1)


@pytest.mark.parametrize("height,width", [(512, 512), (2048, 2048), (512, 2048), (1152, 768)])
def test_valid_target_sizes_accepted(model, height, width):
    cond = pipeline.encode_prompt(model, "a cat", width, height)
    assert (cond.height, cond.width) == (height, width)


def test_reference_aspect_ratio_over_4(model):
    with pytest.raises(ValueError) as info:
        pipeline.encode_prompt(model, "a cat", 512, 512, [picture(500, 2100)])
    assert "aspect ratio" in str(info.value) and "4.200" in str(info.value), str(info.value)
    # exactly 4 is allowed, and comes back as a valid size
    cond = pipeline.encode_prompt(model, "a cat", 512, 512, [picture(512, 2048)])
    assert cond.reference_sizes == [(512, 2048)]


# -- decode: tokens vs conditioning ---------------------------------------------------------------


def test_tokens_for_another_size(model):
    cond = pipeline.encode_prompt(model, "a cat", 640, 512)
    with pytest.raises(ValueError) as info:
        pipeline.decode(model, cond, make_tokens(512, 512), steps=1)
    message = str(info.value)
    assert "512x512" in message and "640x512" in message and "generated for" in message, message


def test_token_grid_not_matching_size(model):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    with pytest.raises(ValueError, match=r"token grid \(16, 20\) does not match \(16, 16\)"):
        pipeline.decode(model, cond, make_tokens(512, 512, grid=(16, 20)), steps=1)


def test_reference_count_differs(model):
    one = pipeline.encode_prompt(model, "a cat", 512, 512, [picture(512, 512)])
    with pytest.raises(ValueError, match=r"0 reference image\(s\) but the decode has 1"):
        pipeline.decode(model, one, make_tokens(), steps=1)
    none = pipeline.encode_prompt(model, "a cat", 512, 512)
    with pytest.raises(ValueError, match=r"1 reference image\(s\) but the decode has 0"):
        pipeline.decode(model, none, make_tokens(reference_sizes=[(512, 512)]), steps=1)
    two = pipeline.encode_prompt(model, "a cat", 512, 512, [picture(512, 512), picture(512, 768)])
    with pytest.raises(ValueError, match=r"1 reference image\(s\) but the decode has 2"):
        pipeline.decode(model, two, make_tokens(reference_sizes=[(512, 512)]), steps=1)


def test_reference_size_differs(model):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512, [picture(640, 512)])
    with pytest.raises(ValueError, match="reference sizes differ"):
        pipeline.decode(model, cond, make_tokens(reference_sizes=[(512, 512)]), steps=1)
    # order matters too
    cond = pipeline.encode_prompt(model, "a cat", 512, 512, [picture(512, 768), picture(512, 512)])
    with pytest.raises(ValueError, match="reference sizes differ"):
        pipeline.decode(model, cond, make_tokens(reference_sizes=[(512, 512), (512, 768)]), steps=1)


@pytest.mark.parametrize("steps", [0, -1, 2.5, "2"])
def test_bad_steps(model, steps):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        pipeline.decode(model, cond, make_tokens(), steps=steps)


@pytest.mark.parametrize("guidance", [0.0, 0.5, 0.999, -1.5, float("nan")])
def test_guidance_below_one(model, guidance):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    with pytest.raises(ValueError, match=r"guidance must be >= 1\.0"):
        pipeline.decode(model, cond, make_tokens(), steps=1, guidance=guidance)


def test_guidance_one_runs_without_cfg_pass(model):
    """guidance 1.0 is allowed: one DiT pass per step (no unconditional rows); 1.5 gives another image."""
    cond = pipeline.encode_prompt(model, 'a sign "OPEN"', 512, 512)
    tokens = make_tokens()
    latents = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    dit = model.stage("dit")
    rows = []
    hook = dit.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        no_cfg = pipeline.decode(model, cond, tokens, steps=2, guidance=1.0, latents=latents)
        no_cfg_rows, rows[:] = list(rows), []
        cfg = pipeline.decode(model, cond, tokens, steps=2, guidance=1.5, latents=latents)
    finally:
        hook.remove()
    assert no_cfg_rows == [1, 1], f"guidance 1.0 ran DiT batches {no_cfg_rows}, expected one row per step"
    assert sum(rows) == 4, f"guidance 1.5 ran DiT batches {rows}: expected a cond and an uncond row per step"
    assert no_cfg.shape == cfg.shape == (1, 512, 512, 3)
    assert torch.isfinite(no_cfg).all() and no_cfg.min() >= 0 and no_cfg.max() <= 1
    assert (no_cfg - cfg).abs().max() > 1e-3, "guidance 1.0 and 1.5 gave the same image"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents(model, bad):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    latents = torch.randn(1, 16, 64, 64)
    latents[0, 3, 10, 10] = bad
    with pytest.raises(ValueError, match="initial latents contain NaN or inf"):
        pipeline.decode(model, cond, make_tokens(), steps=1, guidance=1.0, latents=latents)


@pytest.mark.parametrize("bad_id", [-1, CODEBOOK, 20000])
def test_prior_ids_outside_codebook(model, bad_id):
    """A damaged tokens file or one from another model: a clear error, not an IndexError in the embedding."""
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    tokens = make_tokens()
    tokens.grid_ids[0, 5, 7] = bad_id
    with pytest.raises(ValueError, match="invalid ids|codebook|out of range"):
        pipeline.decode(model, cond, tokens, steps=1, guidance=1.0)


# -- cancellation ---------------------------------------------------------------------------------


class Cancelled(Exception):
    pass


def test_interrupt_stops_decode_after_that_step(model):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    calls, progress, previews = [], [], []

    def interrupt():
        calls.append(len(calls) + 1)
        if len(calls) == 2:  # checked before step 2 runs
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled, match="user pressed cancel"):
        pipeline.decode(model, cond, make_tokens(), steps=3, guidance=1.0,
                        progress=lambda done, total: progress.append((done, total)),
                        on_step=lambda step, total, preview: previews.append(step), interrupt=interrupt)
    assert calls == [1, 2], calls
    assert progress == [(1, 3)], f"decode went on after the interrupt: progress {progress}"
    assert previews == [1], previews
    # nothing left half-done: the same model decodes again
    image = pipeline.decode(model, cond, make_tokens(), steps=1, guidance=1.0)
    assert image.shape == (1, 512, 512, 3) and torch.isfinite(image).all()


def test_interrupt_stops_ar_within_a_few_tokens(model):
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    progress = []
    ar = model.stage("ar")
    logits_calls = []
    hook = ar.lm_head.register_forward_hook(lambda module, args, out: logits_calls.append(1))

    def interrupt():
        if len(progress) >= 2:  # mid-AR: after the prefill and a first run of decode steps
            raise Cancelled("stop the AR")

    try:
        with pytest.raises(Cancelled, match="stop the AR"):
            pipeline.generate_tokens(model, cond, seed=0, interrupt=interrupt,
                                     progress=lambda done, total: progress.append((done, total)))
    finally:
        hook.remove()
    total = 16 * 16 + 16 * 16 + 1  # t2i 512²: preview + large grid + EOS slot
    assert len(progress) == 2, progress
    assert all(t == total for _, t in progress), progress
    done = progress[-1][0]
    assert 1 < done <= 32, f"AR reported {done} of {total} tokens before stopping"
    assert len(logits_calls) <= 48, f"AR ran {len(logits_calls)} forwards after being told to stop"


# -- tokens files -----------------------------------------------------------------------------------


def test_tokens_file_round_trip(tmp_path):
    tokens = make_tokens(512, 640, reference_sizes=[(512, 512), (512, 768)], seed=4)
    path = pipeline.save_tokens(tokens, tmp_path / "sub" / "tokens.safetensors")
    loaded = pipeline.load_tokens(path)
    assert torch.equal(loaded.grid_ids, tokens.grid_ids) and torch.equal(loaded.prior_ids, tokens.prior_ids)
    assert (loaded.height, loaded.width) == (512, 640)
    assert [tuple(s) for s in loaded.reference_sizes] == [(512, 512), (512, 768)]
    assert list(loaded.seeds) == [4]


def test_tokens_file_of_the_earlier_format_still_loads(tmp_path):
    """Files written before the references' ids moved to the conditioning carry them as extra tensors: ignored."""
    tokens = make_tokens(512, 512, reference_sizes=[(512, 512)], seed=5)
    meta = {"format": TOKENS_FORMAT, "height": 512, "width": 512, "reference_sizes": [[512, 512]], "seeds": [5]}
    save_file({"grid_ids": tokens.grid_ids, "reference_grid_ids.0": torch.zeros(16, 16, dtype=torch.long)},
              str(tmp_path / "old.safetensors"), metadata={"glm_image": json.dumps(meta)})
    loaded = pipeline.load_tokens(tmp_path / "old.safetensors")
    assert torch.equal(loaded.grid_ids, tokens.grid_ids) and loaded.reference_sizes == [(512, 512)]


def test_saving_tokens_replaces_a_file_whole(tmp_path, monkeypatch):
    """save_tokens writes beside the target and renames: a failure mid-write leaves the old file intact."""
    import glm_core.tokens as tokens_module

    path = pipeline.save_tokens(make_tokens(seed=1), tmp_path / "t.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tokens_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pipeline.save_tokens(make_tokens(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"], "a partial file was left behind"


def test_tokens_file_from_another_resolution(model, tmp_path):
    path = pipeline.save_tokens(make_tokens(512, 512), tmp_path / "tokens_512.safetensors")
    cond = pipeline.encode_prompt(model, "a cat", 640, 512)
    with pytest.raises(ValueError) as info:
        pipeline.decode(model, cond, pipeline.load_tokens(path), steps=1)
    assert "generated for 512x512" in str(info.value) and "640x512" in str(info.value), str(info.value)


def test_tokens_file_with_references_used_without(model, tmp_path):
    path = pipeline.save_tokens(make_tokens(reference_sizes=[(512, 512)]), tmp_path / "edit.safetensors")
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    with pytest.raises(ValueError, match="same references"):
        pipeline.decode(model, cond, pipeline.load_tokens(path), steps=1)


def _write_tokens_file(path, grid_ids, meta):
    save_file({"grid_ids": grid_ids}, str(path), metadata={"glm_image": json.dumps(meta)})
    return path


def test_tokens_file_grid_not_matching_its_size(tmp_path):
    meta = {"format": TOKENS_FORMAT, "height": 640, "width": 512, "reference_sizes": [], "seeds": [0]}
    path = _write_tokens_file(tmp_path / "t.safetensors", torch.zeros(1, 16, 16, dtype=torch.long), meta)
    with pytest.raises(ValueError, match="does not match 512x640"):
        pipeline.load_tokens(path)


def test_tokens_file_with_damaged_metadata(tmp_path):
    """The right format tag but no size: a clear ValueError, not a KeyError."""
    path = _write_tokens_file(tmp_path / "t.safetensors", torch.zeros(1, 16, 16, dtype=torch.long),
                              {"format": TOKENS_FORMAT})
    with pytest.raises(ValueError, match="tokens file"):
        pipeline.load_tokens(path)


def test_non_tokens_safetensors_file(tiny_checkpoint):
    weights = tiny_checkpoint / "vae" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    with pytest.raises(ValueError, match="is not a GLM-Image tokens file"):
        pipeline.load_tokens(weights)


def test_non_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("not a tensor file")
    with pytest.raises(ValueError, match="is not a GLM-Image tokens file"):
        pipeline.load_tokens(path)


def test_missing_tokens_file(tmp_path):
    with pytest.raises(ValueError, match="tokens file not found"):
        pipeline.load_tokens(tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match="tokens file not found"):
        pipeline.load_tokens(tmp_path)  # a folder is not a file
