"""AR parity, generation side: greedy sequences vs the reference's generate, and the grid mask on a
checkpoint whose unmasked sampling (the reference's and ours) leaves the codebook."""

from __future__ import annotations

import pytest
import torch

from glm_core.ar.decode import generate_grids, generate_sequences
from glm_core.ar.model import load_ar
from tests.inputs import budget, make_inputs
from tests.reference import reference_ar, reference_processor

pytestmark = pytest.mark.usefixtures("one_thread")

CODEBOOK = 16384
EOS = 16385


@pytest.fixture(scope="module")
def ooc_models(tiny_checkpoint_ooc):
    return load_ar(tiny_checkpoint_ooc, "cpu", torch.float32), reference_ar(tiny_checkpoint_ooc, torch.float32), \
        reference_processor(tiny_checkpoint_ooc)


def reference_generate(ref, inputs, n_new, **kwargs):
    with torch.no_grad():
        out = ref.generate(**inputs.reference_kwargs(), max_new_tokens=n_new, **kwargs)
    return out[:, inputs.input_ids.shape[1]:]


GREEDY_CASES = {
    "t2i": (["a red fox in the snow"], 64, 96, ()),
    "t2i_batch_padded": (["a fox", "a much longer prompt about a fox in deep snow"], 64, 64, ()),
    "edit_1ref": (["make it blue"], 128, 96, ((512, 512),)),
    "edit_2ref": (["combine both"], 96, 128, ((512, 512), (512, 768))),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_matches_reference_generate(ar_models, case):
    ours, ref, processor = ar_models
    prompts, h, w, refs = GREEDY_CASES[case]
    inputs = make_inputs(processor, prompts, h, w, refs, vision=ar_models.vision)
    n_new = budget(inputs)
    expected = reference_generate(ref, inputs, n_new, do_sample=False)
    got = generate_sequences(ours, inputs, seeds=[0] * len(prompts), sampling_settings=None, mask_grid=False)
    assert expected.shape == (len(prompts), n_new), "reference stopped early: fixture sampled EOS"
    assert got.shape == expected.shape
    # greedy on the tiny fixture may settle into short cycles; cached_forced_logits (test_ar_model)
    # checks the decode path on arbitrary tokens
    assert expected[:, :-1].unique().numel() >= min(5, n_new // 2), "greedy sequence degenerate"
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at (item, token) {mismatch[0].tolist()}"


def test_mask_keeps_grids_in_codebook(ooc_models):
    ours, ref, processor = ooc_models
    inputs = make_inputs(processor, ["a lighthouse"], 64, 64)
    n_new = budget(inputs)
    # precondition: unmasked, the reference (and we) leave the codebook inside the grids
    torch.manual_seed(1)
    ref_tokens = reference_generate(ref, inputs, n_new, do_sample=True)
    assert (ref_tokens[:, :-1] >= CODEBOOK).any()
    unmasked = generate_sequences(ours, inputs, seeds=[1], sampling_settings=ours.config.sampling, mask_grid=False)
    assert (unmasked[:, :-1] >= CODEBOOK).any()

    masked = generate_sequences(ours, inputs, seeds=[1, 2, 3], sampling_settings=ours.config.sampling,
                                mask_grid=True)
    assert masked.shape == (3, n_new)
    assert (masked[:, :-1] < CODEBOOK).all() and (masked[:, :-1] >= 0).all()
    assert (masked[:, -1] == EOS).all()
    grid_ids = generate_grids(ours, inputs, seeds=[4], sampling_settings=ours.config.sampling)
    assert grid_ids.shape == (1, *inputs.target_grid) and (grid_ids < CODEBOOK).all()
