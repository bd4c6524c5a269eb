"""glm_core.ar.sampling on its own: the grid mask, the exponential-trick sampler, per-item generators, greedy."""

from __future__ import annotations

import torch

from glm_core.ar import sampling


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

