"""AR parity, forward side: prefill logits (t2i, editing with 1 and 2 references, left-padded batch),
reference-image VQ ids, prompt and decode positions, teacher-forced logits over a whole generation.

Ours vs transformers' GlmImageForConditionalGeneration, both loaded in fp32 from the tiny checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from glm_core.ar.decode import prepare_prompt
from glm_core.ar.model import load_ar
from glm_core.ar.vision import load_vision
from tests.compare import rel_err
from tests.forcing import cached_forced_logits, teacher_forced_logits
from tests.inputs import AR_CASES, ARModels, build
from tests.reference import reference_ar, reference_image_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # relative Frobenius error, fp32 (fixture-notes §7: the reference differs from itself by ~3e-5)


@pytest.mark.parametrize("case", list(AR_CASES))
def test_prefill_logits_match_reference(ar_models, case):
    ours, ref, _ = ar_models
    inputs = build(ar_models, case)
    with torch.no_grad():
        ref_logits = ref(**inputs.reference_kwargs()).logits
    plan = prepare_prompt(ours, inputs)
    our_logits = teacher_forced_logits(ours, plan.input_ids, plan.prefill_positions, plan.attention_mask)
    valid = inputs.attention_mask.bool()  # padded rows are garbage on both sides
    assert ref_logits[valid].std() > 0.5, "fixture logits are too flat to catch position bugs"
    err = rel_err(our_logits[valid], ref_logits[valid])
    assert err <= TOL, f"{case}: prefill logits rel err {err:.2e}"


@pytest.mark.parametrize("case", ["edit_1ref", "edit_2ref"])
def test_reference_image_ids_match_reference(ar_models, case):
    ours, ref, _ = ar_models
    inputs = build(ar_models, case)
    grids = torch.tensor([[1, h, w] for h, w in inputs.reference_grids])
    expected = reference_image_tokens(ref, inputs.pixel_values, grids)
    got = ar_models.vision.image_token_ids(inputs.pixel_values, inputs.reference_grids)
    assert got.shape == expected.shape
    assert torch.equal(got, expected.to(got.device))
    assert expected.unique().numel() > 8, "VQ ids degenerate: the comparison would be weak"


@pytest.mark.parametrize("case", list(AR_CASES))
def test_positions_match_reference(ar_models, case):
    ours, ref, _ = ar_models
    inputs = build(ar_models, case)
    ref_prefill, _ = ref.model.get_rope_index(
        inputs.input_ids, image_grid_thw=inputs.image_grid_thw,
        images_per_sample=inputs.images_per_sample, attention_mask=inputs.attention_mask,
    )
    ref_decode = ref.model._cached_decode_position_ids  # (B, 3, N)
    plan = prepare_prompt(ours, inputs)
    assert torch.equal(plan.prefill_positions.cpu(), ref_prefill)
    assert torch.equal(plan.decode_positions.permute(1, 0, 2).cpu(), ref_decode)
    gh, gw = inputs.target_grid
    ph, pw = inputs.preview_grid or (0, 0)
    assert plan.num_new_tokens == gh * gw + ph * pw + 1


@pytest.mark.parametrize("case", ["t2i", "edit_2ref", "t2i_batch_padded"])
def test_teacher_forced_generation_logits(ar_models, case):
    """A whole generation forced in one forward, with the reference's own decode positions."""
    ours, ref, _ = ar_models
    inputs = build(ar_models, case)
    plan = prepare_prompt(ours, inputs)
    batch, n_new = plan.input_ids.shape[0], plan.num_new_tokens
    forced = torch.randint(0, ours.config.codebook_size, (batch, n_new - 1), generator=torch.Generator().manual_seed(3))
    ref_prefill, _ = ref.model.get_rope_index(
        inputs.input_ids, image_grid_thw=inputs.image_grid_thw,
        images_per_sample=inputs.images_per_sample, attention_mask=inputs.attention_mask,
    )
    ref_positions = torch.cat([ref_prefill, ref.model._cached_decode_position_ids[:, :, : n_new - 1].permute(1, 0, 2)],
                              dim=-1)
    full_mask = torch.cat([inputs.attention_mask, torch.ones_like(forced)], dim=1)
    kwargs = inputs.reference_kwargs()
    kwargs.update(input_ids=torch.cat([inputs.input_ids, forced], dim=1), attention_mask=full_mask,
                  position_ids=ref_positions)
    with torch.no_grad():
        ref_logits = ref(**kwargs).logits

    our_positions = torch.cat([plan.prefill_positions, plan.decode_positions[:, :, : n_new - 1]], dim=-1)
    our_logits = teacher_forced_logits(ours, torch.cat([plan.input_ids, forced], dim=1), our_positions, full_mask)
    valid = full_mask.bool()
    err = rel_err(our_logits[valid], ref_logits[valid])
    assert err <= TOL, f"{case}: teacher-forced logits rel err {err:.2e}"
    # the generated part alone, row by row
    gen_err = max(rel_err(our_logits[b, -n_new + 1:], ref_logits[b, -n_new + 1:]) for b in range(batch))
    assert gen_err <= TOL

    # the same tokens through our real decode path: prefill + KV-cache one-token steps
    cached = cached_forced_logits(ours, inputs, forced)  # (B, N, V)
    prompt_length = inputs.input_ids.shape[1]
    err = rel_err(cached, ref_logits[:, prompt_length - 1:])
    assert err <= TOL, f"{case}: cached decode logits rel err {err:.2e}"


def test_wrong_positions_are_detected(ar_models):
    """Guard: the fixture is position-sensitive, so 1-D positions must break the comparison."""
    ours, ref, _ = ar_models
    inputs = build(ar_models, "edit_1ref")
    with torch.no_grad():
        ref_logits = ref(**inputs.reference_kwargs()).logits
    plan = prepare_prompt(ours, inputs)
    flat = torch.arange(plan.input_ids.shape[1]).expand(3, 1, -1)
    our_logits = teacher_forced_logits(ours, plan.input_ids, flat, plan.attention_mask)
    assert rel_err(our_logits, ref_logits) > 1e-2


@pytest.mark.parametrize("case", ["t2i", "edit_1ref"])
def test_bf16_matches_reference_bf16(tiny_checkpoint, ar_models, case):
    """bf16 precision handling (fp32 norms cast before the weight, cos/sin cast to bf16, VQ in bf16):
    ours in bf16 vs the reference in bf16 on the same CPU. Rounding-order mistakes show up at ~1e-2
    (the reference's own bf16-vs-fp32 distance here), far above this bound."""
    ours16 = load_ar(tiny_checkpoint, "cpu", torch.bfloat16)
    vision16 = load_vision(tiny_checkpoint, "cpu", torch.bfloat16)
    ref16 = reference_ar(tiny_checkpoint, torch.bfloat16)
    inputs = build(ARModels(ours16, ref16, ar_models.processor, vision16), case)
    with torch.no_grad():
        ref_logits = ref16(**inputs.reference_kwargs()).logits.float()
    plan = prepare_prompt(ours16, inputs)
    our_logits = teacher_forced_logits(ours16, plan.input_ids, plan.prefill_positions, plan.attention_mask).float()
    assert our_logits.dtype == torch.float32 and ours16.lm_head.weight.dtype == torch.bfloat16
    err = rel_err(our_logits, ref_logits)
    assert err <= 1e-3, f"{case}: bf16 logits rel err {err:.2e} vs the reference in bf16"
    if inputs.pixel_values is not None:
        grids = torch.tensor([[1, h, w] for h, w in inputs.reference_grids])
        expected = reference_image_tokens(ref16, inputs.pixel_values, grids)
        assert torch.equal(vision16.image_token_ids(inputs.pixel_values, inputs.reference_grids), expected)
