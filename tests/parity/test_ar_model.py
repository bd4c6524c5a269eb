"""AR parity, forward side: prefill logits (t2i, editing with 1 and 2 references, left-padded batch),
reference-image VQ ids, prompt and decode positions, teacher-forced logits over a whole generation.

Ours vs transformers' GlmImageForConditionalGeneration, both loaded in fp32 from the tiny checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from glm_core.ar.decode import cached_forced_logits, prepare_prompt, teacher_forced_logits
from glm_core.ar.model import load_ar
from tests.reference import reference_ar, reference_image_tokens, reference_processor

TOL = 1e-4  # relative Frobenius error, fp32 (fixture-notes §7: the reference differs from itself by ~3e-5)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_images(*sizes):
    """Deterministic RGB test images of the given (H, W) sizes."""
    g = torch.Generator().manual_seed(7)
    images = []
    for h, w in sizes:
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(pixels))
    return images


def processor_inputs(processor, prompts, height, width, images=()):
    """The reference processor's BatchFeature for one or several prompts (left-padded)."""
    conversations = []
    for prompt in prompts:
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": prompt})
        conversations.append([{"role": "user", "content": content}])
    return processor.apply_chat_template(
        conversations if len(prompts) > 1 else conversations[0],
        tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"target_h": height, "target_w": width, "padding": len(prompts) > 1},
    )


class Inputs:
    """ARInputs-shaped view of the reference processor's output (same tensors for both sides)."""

    def __init__(self, feature, t2i: bool):
        self.input_ids = feature["input_ids"]
        self.attention_mask = feature["attention_mask"]
        self.image_grid_thw = feature["image_grid_thw"]
        self.images_per_sample = feature["images_per_sample"]
        self.pixel_values = feature.get("pixel_values")
        grids = [tuple(g[1:]) for g in self.image_grid_thw.tolist()]
        per_sample = int(self.images_per_sample[0])
        if t2i:
            self.target_grid, self.preview_grid = grids[per_sample - 2], grids[per_sample - 1]
            self.reference_grids = []
        else:
            self.target_grid, self.preview_grid = grids[per_sample - 1], None
            self.reference_grids = [g for i, g in enumerate(grids) if i % per_sample != per_sample - 1]
        self.height, self.width = self.target_grid[0] * 32, self.target_grid[1] * 32

    def reference_kwargs(self):
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                      "image_grid_thw": self.image_grid_thw, "images_per_sample": self.images_per_sample}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        return kwargs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Token-by-token loops on a shared 2-core machine: OpenMP threads spinning against other
    processes make each small op 100x slower; one thread is faster and gives the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    ours = load_ar(tiny_checkpoint, "cpu", torch.float32)
    ref = reference_ar(tiny_checkpoint, torch.float32)
    return ours, ref, reference_processor(tiny_checkpoint)


CASES = {
    "t2i": {"prompts": ["a red fox in the snow"], "size": (64, 96), "images": ()},
    "t2i_batch_padded": {"prompts": ["a fox", "a much longer prompt about a fox in deep snow"], "size": (64, 64),
                             "images": ()},
    "edit_1ref": {"prompts": ["make it blue"], "size": (64, 64), "images": ((512, 512),)},
    "edit_2ref": {"prompts": ["combine both"], "size": (96, 64), "images": ((512, 512), (512, 768))},
}


def build(models, case):
    _, _, processor = models
    spec = CASES[case]
    feature = processor_inputs(processor, spec["prompts"], *spec["size"], images=reference_images(*spec["images"]))
    return Inputs(feature, t2i=not spec["images"])


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_reference(models, case):
    ours, ref, _ = models
    inputs = build(models, case)
    with torch.no_grad():
        ref_logits = ref(**inputs.reference_kwargs()).logits
    plan = prepare_prompt(ours, inputs)
    our_logits = teacher_forced_logits(ours, plan.input_ids, plan.prefill_positions, plan.attention_mask)
    valid = inputs.attention_mask.bool()  # padded rows are garbage on both sides
    assert ref_logits[valid].std() > 0.5, "fixture logits are too flat to catch position bugs"
    err = rel_err(our_logits[valid], ref_logits[valid])
    assert err <= TOL, f"{case}: prefill logits rel err {err:.2e}"


@pytest.mark.parametrize("case", ["edit_1ref", "edit_2ref"])
def test_reference_image_ids_match_reference(models, case):
    ours, ref, _ = models
    inputs = build(models, case)
    grids = torch.tensor([[1, h, w] for h, w in inputs.reference_grids])
    expected = reference_image_tokens(ref, inputs.pixel_values, grids)
    got = ours.image_token_ids(inputs.pixel_values, inputs.reference_grids)
    assert got.shape == expected.shape
    assert torch.equal(got, expected.to(got.device))
    assert expected.unique().numel() > 8, "VQ ids degenerate: the comparison would be weak"


def test_precomputed_reference_ids_fill_the_prompt_like_the_vision_pass(models):
    """The pipeline hands the AR the references' VQ ids it already computed: same prompt ids, no second pass;
    ids of the wrong length are refused."""
    ours, _, _ = models
    inputs = build(models, "edit_2ref")
    computed = prepare_prompt(ours, inputs).input_ids
    inputs.reference_ids = ours.image_token_ids(inputs.pixel_values, inputs.reference_grids)
    inputs.pixel_values = None  # proves the precomputed ids are what got used
    assert torch.equal(prepare_prompt(ours, inputs).input_ids, computed)
    inputs.reference_ids = inputs.reference_ids[:-1]
    with pytest.raises(ValueError, match="precomputed reference ids"):
        prepare_prompt(ours, inputs)


@pytest.mark.parametrize("case", list(CASES))
def test_positions_match_reference(models, case):
    ours, ref, _ = models
    inputs = build(models, case)
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
def test_teacher_forced_generation_logits(models, case):
    """A whole generation forced in one forward, with the reference's own decode positions."""
    ours, ref, _ = models
    inputs = build(models, case)
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


def test_wrong_positions_are_detected(models):
    """Guard: the fixture is position-sensitive, so 1-D positions must break the comparison."""
    ours, ref, _ = models
    inputs = build(models, "edit_1ref")
    with torch.no_grad():
        ref_logits = ref(**inputs.reference_kwargs()).logits
    plan = prepare_prompt(ours, inputs)
    flat = torch.arange(plan.input_ids.shape[1]).expand(3, 1, -1)
    our_logits = teacher_forced_logits(ours, plan.input_ids, flat, plan.attention_mask)
    assert rel_err(our_logits, ref_logits) > 1e-2


@pytest.mark.parametrize("case", ["t2i", "edit_1ref"])
def test_bf16_matches_reference_bf16(tiny_checkpoint, models, case):
    """bf16 precision handling (fp32 norms cast before the weight, cos/sin cast to bf16, VQ in bf16):
    ours in bf16 vs the reference in bf16 on the same CPU. Rounding-order mistakes show up at ~1e-2
    (the reference's own bf16-vs-fp32 distance here), far above this bound."""
    ours16 = load_ar(tiny_checkpoint, "cpu", torch.bfloat16)
    ref16 = reference_ar(tiny_checkpoint, torch.bfloat16)
    inputs = build(models, case)
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
        assert torch.equal(ours16.image_token_ids(inputs.pixel_values, inputs.reference_grids), expected)
