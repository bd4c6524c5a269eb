"""glm_core.ar.decode on its own, on inputs from the reference processor: precomputed reference ids, the
PriorTokens layout, seeds and batching, progress and interrupt, and a wrong seed count."""

from __future__ import annotations

import pytest
import torch

from glm_core.ar.decode import PriorTokens, generate_sequences, generate_tokens, prepare_prompt
from tests.inputs import budget, build, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_precomputed_reference_ids_fill_the_prompt_like_the_vision_pass(ar_models):
    """The pipeline hands the AR the references' VQ ids it already computed: same prompt ids, no second pass;
    ids of the wrong length are refused."""
    ours, _, _ = ar_models
    inputs = build(ar_models, "edit_2ref")
    computed = prepare_prompt(ours, inputs).input_ids
    inputs.reference_ids = ours.image_token_ids(inputs.pixel_values, inputs.reference_grids)
    inputs.pixel_values = None  # proves the precomputed ids are what got used
    assert torch.equal(prepare_prompt(ours, inputs).input_ids, computed)
    inputs.reference_ids = inputs.reference_ids[:-1]
    with pytest.raises(ValueError, match="precomputed reference ids"):
        prepare_prompt(ours, inputs)


def test_prior_tokens_layout(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a tall tower"], 96, 64)
    sequences = generate_sequences(ours, inputs, seeds=[5])
    tokens = generate_tokens(ours, inputs, seeds=[5])
    assert isinstance(tokens, PriorTokens)
    gh, gw = inputs.target_grid
    preview = inputs.preview_grid[0] * inputs.preview_grid[1]
    assert torch.equal(tokens.grid_ids, sequences[:, preview: preview + gh * gw].view(1, gh, gw))
    assert tokens.prior_ids.shape == (1, 4 * gh * gw) and tokens.prior_ids.dtype == torch.long
    upsampled = tokens.prior_ids.view(1, 2 * gh, 2 * gw)
    for dy in (0, 1):
        for dx in (0, 1):
            assert torch.equal(upsampled[:, dy::2, dx::2], tokens.grid_ids)
    assert (tokens.height, tokens.width, tokens.seeds) == (96, 64, [5])


def test_same_seed_same_tokens_and_batch_equals_alone(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a castle"], 64, 64)
    a = generate_sequences(ours, inputs, seeds=[10])
    b = generate_sequences(ours, inputs, seeds=[10])
    c = generate_sequences(ours, inputs, seeds=[11])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    batch = generate_sequences(ours, inputs, seeds=[11, 10])
    assert torch.equal(batch[0], c[0]) and torch.equal(batch[1], a[0])


def test_batch_of_prompts_equals_alone(ar_models):
    ours, _, processor = ar_models
    prompts = ["a fox", "a much longer prompt about a fox in deep snow"]
    batch = generate_sequences(ours, make_inputs(processor, prompts, 64, 64), seeds=[3, 4])
    for i, prompt in enumerate(prompts):
        alone = generate_sequences(ours, make_inputs(processor, [prompt], 64, 64), seeds=[[3, 4][i]])
        assert torch.equal(batch[i], alone[0]), f"prompt {i}: batched tokens differ from alone"


def test_progress_and_interrupt(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a boat"], 64, 64)
    total = budget(inputs)
    calls = []
    interrupts = []
    generate_sequences(ours, inputs, seeds=[1], progress=lambda d, t: calls.append((d, t)),
                       interrupt=lambda: interrupts.append(1))
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) >= total // 8 and len(interrupts) >= total // 8

    class Cancelled(Exception):
        pass

    seen = []

    def interrupt():
        seen.append(1)
        if len(seen) == 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate_sequences(ours, inputs, seeds=[1], interrupt=interrupt)
    assert len(seen) == 4
    # the model is still usable after an interrupted run
    again = generate_sequences(ours, inputs, seeds=[1])
    assert again.shape == (1, total)


def test_seed_count_must_match_prompts(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a", "b c"], 64, 64)
    with pytest.raises(ValueError, match="seeds"):
        generate_sequences(ours, inputs, seeds=[1, 2, 3])

