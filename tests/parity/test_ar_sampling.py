"""glm_core.ar.sampling's filters vs transformers' warpers (temperature, top-k, top-p, ties)."""

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
