"""glm_core.pipeline.generate_tokens on the editing cases: the same seed gives the same tokens, batch item i
uses seed + i, and progress counts up to the grid plus the EOS slot."""

from __future__ import annotations

import itertools

import pytest
import torch

from glm_core import pipeline
from tests.inputs import EDIT_CASES

CODEBOOK = 16384


def test_generate_tokens_reproducible(model, edit_runs):
    """Same seed -> same tokens; batch item i uses seed + i (so item 0 repeats the single run)."""
    cond, first, _ = edit_runs["one_reference"]
    seed = EDIT_CASES["one_reference"][3]
    again = pipeline.generate_tokens(model, cond, seed=seed, batch_size=2)
    assert again.grid_ids.shape == (2, *first.grid_ids.shape[1:])
    assert list(again.seeds) == [seed, seed + 1]
    assert torch.equal(again.grid_ids[:1], first.grid_ids), "same seed, different tokens"
    assert torch.equal(again.prior_ids[:1], first.prior_ids)
    assert not torch.equal(again.grid_ids[1], again.grid_ids[0]), "seed + 1 gave the same tokens as seed"
    assert again.reference_sizes == first.reference_sizes == cond.reference_sizes
    assert int(first.grid_ids.max()) < CODEBOOK and int(first.grid_ids.min()) >= 0


@pytest.mark.parametrize("name", list(EDIT_CASES))
def test_generate_tokens_progress(edit_runs, name):
    """progress(done, total): done rises strictly to total, total = the large grid + the EOS slot (editing)."""
    cond, _, progress = edit_runs[name]
    total = (cond.height // 32) * (cond.width // 32) + 1
    assert progress, "no progress reported"
    assert {t for _, t in progress} == {total}, progress
    done = [d for d, _ in progress]
    assert done[-1] == total, progress[-3:]
    assert all(b > a for a, b in itertools.pairwise(done)), f"progress not strictly increasing: {progress[-3:]}"

