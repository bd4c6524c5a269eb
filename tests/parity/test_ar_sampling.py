"""Sampling functions vs transformers' warpers; grid mask; the exponential-trick sampler."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from glm_core.ar import sampling


def reference_filter(logits, temperature, top_k, top_p, min_tokens_to_keep=1):
    scores = logits
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(dummy_ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep)(dummy_ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep)(dummy_ids, scores)
    return scores


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_keep",
    [(0.9, 50, 0.75, 1), (1.0, None, 0.75, 1), (0.7, 50, None, 1), (1.3, 8, 0.3, 1), (0.9, None, 0.05, 3),
     (0.9, 0, 0.999, 1)],
)
@pytest.mark.parametrize("ties", [False, True])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p, min_keep, ties):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 16512, generator=g) * 3
    if ties:  # coarse values: many exact ties at the top-k and top-p boundaries
        logits = (logits * 2).round() / 2
    ours = sampling.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_tokens_to_keep=min_keep)
    ref = reference_filter(logits, temperature, top_k, top_p, min_keep)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours, ref)
    kept = torch.isfinite(ours).sum(-1)
    assert (kept >= min_keep).all() and (kept < logits.shape[-1]).all()


def test_grid_mask():
    masks = sampling.grid_masks(16512, 16384, 16385)
    logits = torch.zeros(2, 16512)
    inside = sampling.apply_grid_mask(logits, masks, torch.tensor([False]))
    assert torch.isfinite(inside[:, :16384]).all() and torch.isinf(inside[:, 16384:]).all()
    at_end = sampling.apply_grid_mask(logits, masks, torch.tensor([True]))
    assert torch.isfinite(at_end[:, 16385]).all() and torch.isinf(at_end).sum() == 2 * 16511
    # even with huge out-of-codebook logits, a masked sample stays in the codebook, and the end slot is EOS
    logits[:, 16384:] = 1e4
    noise = sampling.draw_noise(torch.empty(2, 16512), sampling.make_generators([1, 2], "cpu"))
    ids = sampling.next_tokens(logits, noise=noise, temperature=0.9, top_k=50, top_p=0.75, masks=masks,
                               at_end=torch.tensor([False]))
    assert (ids < 16384).all()
    ids = sampling.next_tokens(logits, noise=noise, temperature=0.9, top_k=50, top_p=0.75, masks=masks,
                               at_end=torch.tensor([True]))
    assert (ids == 16385).all()


def test_exponential_trick_draws_from_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().expand(40000, -1)
    noise = torch.empty(40000, 5).exponential_(generator=torch.Generator().manual_seed(5))
    ids = sampling.sample(logits, noise)
    freq = torch.bincount(ids, minlength=5).float() / ids.numel()
    assert freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.01), freq


def test_per_item_generators_are_independent_of_batch():
    alone = sampling.draw_noise(torch.empty(1, 100), sampling.make_generators([42], "cpu"))
    batch = sampling.draw_noise(torch.empty(3, 100), sampling.make_generators([7, 42, 9], "cpu"))
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1])


def test_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ids = sampling.next_tokens(logits, noise=None, temperature=0.9, top_k=50, top_p=0.75)
    assert torch.equal(ids, logits.argmax(-1))
