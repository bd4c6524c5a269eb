"""Pure sampling functions for the AR decode loop. None of them synchronises with the host.

The filters equal transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper,
the order the reference's `generate` applies them (spec §6.21), including top-p's
`min_tokens_to_keep` and its behaviour on ties (a sort, then a cumulative sum in that order).
Sampling uses the exponential trick, argmax(p / E) with E ~ Exp(1), which draws from p; the noise
comes from per-item `torch.Generator`s, so item i's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """logits (B, V) float -> filtered logits, removed entries set to -inf.

    top_k None/0 and top_p None/>=1 disable that filter, as in transformers.
    On CUDA top-k and top-p come from a single sort (`top_k_top_p`): faster there, and it places ties as
    the two steps do; on the CPU the two-step path stays (its sort is not stable).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy mode instead")
    scores = logits / temperature if temperature != 1.0 else logits
    if scores.is_cuda and top_k and top_p is not None and top_p < 1.0:
        return top_k_top_p(scores, top_k, top_p, min_tokens_to_keep)
    if top_k:
        k = min(max(int(top_k), min_tokens_to_keep), scores.shape[-1])
        kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        # drop the low tail whose total mass is <= 1 - top_p, but never the best min_tokens_to_keep
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -min_tokens_to_keep:] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    """top-k then top-p with ONE sort: the same filter as the two steps of `filter_logits`.

    On the GPU a (B, 16512) topk is one slow single-block kernel (~80 µs on an H200, more than the
    sort top-p needs anyway). A descending sort gives the k-th best value (what topk returns, ties
    included), and reversed it is the ascending order of the top-k-masked scores that top-p sorts:
    the -inf entries first (probability exactly 0), then the kept ones ascending. So the softmax and
    cumulative sums see the same values at the same positions, bit for bit. Exactly tied scores keep
    the order a stable ascending sort gives them (lower id first, as CUDA's radix sort of the masked
    row places them): the descending sort runs stably over the reversed ids, and reversing its result
    restores that order.
    """
    vocab = scores.shape[-1]
    k = min(max(int(top_k), min_tokens_to_keep), vocab)
    descending, order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True)
    order = (vocab - 1) - order  # ids; among ties the higher id first
    kth_best = descending[..., k - 1 : k]
    ascending = descending.masked_fill(descending < kth_best, float("-inf")).flip(-1)
    order = order.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cumulative <= (1 - top_p)) | (ascending == float("-inf"))
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def grid_masks(vocab_size: int, codebook_size: int, eos_token_id: int, device=None) -> torch.Tensor:
    """(2, V) bool: row 0 = ids allowed inside a grid (codebook ids only: no EOS, no id >= codebook),
    row 1 = ids allowed in the slot after the last grid (EOS only)."""
    ids = torch.arange(vocab_size, device=device)
    return torch.stack((ids < codebook_size, ids == eos_token_id))


def apply_grid_mask(logits: torch.Tensor, masks: torch.Tensor, at_end: torch.Tensor) -> torch.Tensor:
    """logits (B, V); masks from `grid_masks`; at_end: bool tensor (0-d or (B,)), True in the EOS slot."""
    allowed = torch.where(at_end.reshape(-1, 1), masks[1], masks[0])  # (B or 1, V)
    return logits.masked_fill(~allowed, float("-inf"))


def make_generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    generators = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        generators.append(g)
    return generators


def draw_noise(out: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Fill out (B, V) in place with Exp(1) noise, row i from generators[i]."""
    for row, generator in zip(out, generators):
        row.exponential_(generator=generator)
    # a draw of exactly 0 would turn p / E into 0/0 for a filtered-out id
    return out.clamp_min_(torch.finfo(out.dtype).tiny)


def sample(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw one id per row from softmax(logits) with the exponential trick: (B, V) -> (B,) long."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.argmax(probs / noise, dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


def next_tokens(
    logits: torch.Tensor,
    *,
    noise: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    masks: torch.Tensor | None = None,
    at_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole sampling step: fp32 logits (B, V) -> (B,) ids. noise None means greedy."""
    logits = logits.float()  # transformers samples from fp32 logits
    if masks is not None:
        logits = apply_grid_mask(logits, masks, at_end)
    if noise is None:
        return greedy(logits)
    return sample(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), noise)
