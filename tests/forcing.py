"""Teacher forcing: the AR's logits for a given sequence of generated tokens, for parity tests and the
full-size parity benchmark (bench/parity_fullsize.py). Not part of glm_core's runtime path.

- `teacher_forced_logits`: one forward over prompt + forced tokens with explicit 3-D positions;
- `cached_forced_logits`: the real generation path (prefill, then one cached decode step per token), with the
  sampled token replaced by the forced one at every step.
"""
from __future__ import annotations

import torch

from glm_core.ar.decode import DecodeLoop, prefill, prepare_prompt, prompt_attention_mask, setup_caches
from glm_core.ar.model import GlmImageAR


@torch.no_grad()
def teacher_forced_logits(model: GlmImageAR, input_ids: torch.Tensor, positions: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, L, vision_vocab) for a whole given sequence in one forward, with explicit positions
    (3, B, L). input_ids must already hold VQ ids instead of image placeholders."""
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(model.device).bool()
    hidden = model.embed(input_ids)
    cos, sin = model.rotary_cos_sin(positions.to(model.device), hidden.dtype)
    mask = None if bool(attention_mask.all()) else prompt_attention_mask(attention_mask)
    return model.logits(model.hidden_states(hidden, cos, sin, mask))


@torch.no_grad()
def cached_forced_logits(model: GlmImageAR, ar_inputs, forced_tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through the generation path: forced_tokens (B, M) are generated tokens 0 .. M-1 (M at most
    N - 1 for a generation of N tokens). Returns logits (B, M + 1, V): row 0 from the prefill, row k + 1 from the
    step that fed token k. The decode layer runs as `model.compile_backend` says (None: eagerly)."""
    plan = prepare_prompt(model, ar_inputs)
    batch, total = plan.input_ids.shape[0], plan.num_new_tokens
    cache = setup_caches(model, batch, plan.input_ids.shape[1] + total)
    loop = DecodeLoop(model, plan, cache, generators=None, sampling_settings=None, mask_grid=False)
    steps = forced_tokens.shape[1]
    if steps > total - 1:
        raise ValueError(f"{steps} forced tokens, but this prompt generates {total} (at most {total - 1} can be fed)")
    loop.tokens[:, :steps] = forced_tokens.to(loop.tokens.device)
    rows = [prefill(model, plan, cache)]
    for _ in range(steps):
        rows.append(loop.forward())
        loop.step_index.add_(1)
    return torch.stack(rows, dim=1)
