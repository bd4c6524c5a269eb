"""End to end: glm_core.pipeline's decoded image vs diffusers `GlmImagePipeline`, fp32, tiny checkpoint.

Both sides get the same prior tokens and the same initial latents; the image (in [0, 1]) must agree
with PSNR >= 60 dB (issue 3 §3). Covered:
- text-to-image with CFG (guidance 1.5) and without (guidance 1.0: no unconditional pass), square and
  non-square, random prior ids < 16384 (the AR itself is covered by tests/parity/test_ar_*.py);
- editing with one reference and with two references of different sizes. The editing prior comes from
  `glm_core.pipeline.generate_tokens`; the reference images' VQ ids it records
  (`cond.reference_ids`) are first checked against transformers' own VQ ids
  (`reference_image_tokens`), then the diffusers pipeline is driven unpatched with `prior_token_ids`,
  `prior_token_image_ids` and `source_image_grid_thw` (fixture-notes §7) — fed the *reference's* ids,
  upsampled by the pipeline's own `_upsample_token_ids`, so nothing of ours leaks into that side.

Reference images are already valid sizes (multiples of 32, short side >= 512), so
`encode_prompt` leaves them untouched and both sides see the same pixels.
"""

from __future__ import annotations

import pytest
import torch

from glm_core import pipeline
from glm_core.tokens import PriorTokens
from tests.compare import psnr
from tests.inputs import EDIT_CASES
from tests.reference import (
    reference_ar,
    reference_ar_inputs,
    reference_image_tokens,
    reference_pipeline,
    reference_processor,
)

MIN_PSNR = 60.0
CODEBOOK = 16384


def reference_upsample(grid_ids: torch.Tensor) -> torch.Tensor:
    """(gh, gw) -> (1, 4·gh·gw) with diffusers' own upsample (nearest, ×2)."""
    from diffusers import GlmImagePipeline

    gh, gw = grid_ids.shape
    return GlmImagePipeline._upsample_token_ids(grid_ids.reshape(1, -1), gh, gw)


def random_latents(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def random_prior(height: int, width: int, seed: int) -> PriorTokens:
    grid = torch.randint(0, CODEBOOK, (1, height // 32, width // 32), generator=torch.Generator().manual_seed(seed))
    return PriorTokens(grid_ids=grid, height=height, width=width, seeds=[seed])


@pytest.fixture(scope="module")
def ref_pipe(tiny_checkpoint):
    pipe = reference_pipeline(tiny_checkpoint, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(ref_pipe, prompt, height, width, prior_ids, latents, steps, guidance, **editing):
    images = ref_pipe(prompt=prompt, height=height, width=width, prior_token_ids=prior_ids,
                      latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance,
                      output_type="pt", **editing).images  # (B, 3, H, W) in [0, 1]
    return images.permute(0, 2, 3, 1).float()


# -- text-to-image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,height,width,steps,guidance", [
    ('a red door with a sign that says "OPEN" and \'24h\'', 512, 512, 2, 1.5),
    ("a quiet lake at dawn, no text", 768, 512, 3, 1.5),
    ('a poster reading “GLM” under 「画像」', 512, 640, 2, 1.0),
])
def test_text_to_image_matches_diffusers(model, ref_pipe, prompt, height, width, steps, guidance):
    tokens = random_prior(height, width, seed=height + width)
    latents = random_latents(height, width, seed=steps)
    cond = pipeline.encode_prompt(model, prompt, width, height)
    ours = pipeline.decode(model, cond, tokens, steps=steps, guidance=guidance, latents=latents)
    ref = run_reference(ref_pipe, prompt, height, width, reference_upsample(tokens.grid_ids[0]), latents,
                        steps, guidance)
    assert ours.shape == ref.shape == (1, height, width, 3)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    value = psnr(ours, ref)
    print(f"t2i {width}x{height} steps={steps} guidance={guidance}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR, f"t2i {width}x{height} guidance {guidance}: PSNR {value:.2f} dB < {MIN_PSNR}"


def test_text_to_image_prior_and_guidance_matter(model, ref_pipe):
    """The comparison above can fail: other prior tokens or another guidance give a different picture."""
    prompt, height, width, steps = 'a sign "OPEN"', 512, 512, 1
    latents = random_latents(height, width, seed=7)
    cond = pipeline.encode_prompt(model, prompt, width, height)
    tokens = random_prior(height, width, seed=1)
    ref = run_reference(ref_pipe, prompt, height, width, reference_upsample(tokens.grid_ids[0]), latents, steps, 1.5)
    same = pipeline.decode(model, cond, tokens, steps=steps, guidance=1.5, latents=latents)
    other_prior = pipeline.decode(model, cond, random_prior(height, width, seed=2), steps=steps, guidance=1.5,
                                  latents=latents)
    other_guidance = pipeline.decode(model, cond, tokens, steps=steps, guidance=3.0, latents=latents)
    assert psnr(same, ref) >= MIN_PSNR
    assert psnr(other_prior, ref) < 45.0, f"prior tokens barely matter: {psnr(other_prior, ref):.1f} dB"
    assert psnr(other_guidance, ref) < 45.0, f"guidance barely matters: {psnr(other_guidance, ref):.1f} dB"


# -- editing ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_ar(tiny_checkpoint):
    return reference_ar(tiny_checkpoint, torch.float32)


def reference_vq_ids(tiny_checkpoint, ref_ar, cond) -> list[torch.Tensor]:
    """transformers' VQ ids of each reference image, (gh, gw) each, from its own processor."""
    inputs = reference_ar_inputs(reference_processor(tiny_checkpoint), cond.prompt, cond.height, cond.width,
                                 cond.references)
    grids = inputs["image_grid_thw"][: len(cond.references)]  # references first, then the target grid(s)
    ids = reference_image_tokens(ref_ar, inputs["pixel_values"], grids)
    return [piece.view(int(h), int(w)) for piece, (_, h, w) in zip(ids.split(grids.prod(-1).tolist()), grids)]


@pytest.mark.parametrize("name", list(EDIT_CASES))
def test_editing_matches_diffusers(tiny_checkpoint, model, ref_pipe, ref_ar, edit_runs, name):
    cond, tokens, _ = edit_runs[name]
    height, width, sizes, _ = EDIT_CASES[name]
    assert cond.reference_sizes == sizes, "valid-size references must reach the stages unresized"
    assert [tuple(s) for s in tokens.reference_sizes] == sizes

    # Same reference VQ ids on both sides (spec §2.2 step 3).
    expected_ids = reference_vq_ids(tiny_checkpoint, ref_ar, cond)
    ours_ids = cond.reference_ids
    assert len(ours_ids) == len(expected_ids) == len(sizes)
    for i, (got, want) in enumerate(zip(ours_ids, expected_ids)):
        assert tuple(got.shape) == (sizes[i][0] // 32, sizes[i][1] // 32)
        assert torch.equal(got.long(), want.long()), \
            f"reference {i}: {(got != want).sum().item()} of {want.numel()} VQ ids differ from transformers'"

    latents = random_latents(height, width, seed=3)
    steps, guidance = 2, 1.5
    ours = pipeline.decode(model, cond, tokens, steps=steps, guidance=guidance, latents=latents)
    image_prior = torch.cat([reference_upsample(ids)[0] for ids in expected_ids])  # (Σ 4·gh·gw,)
    image_grids = torch.tensor([[1, 2 * ids.shape[0], 2 * ids.shape[1]] for ids in expected_ids])
    ref = run_reference(ref_pipe, cond.prompt, height, width, reference_upsample(tokens.grid_ids[0]), latents,
                        steps, guidance, image=list(cond.references), prior_token_image_ids=[image_prior],
                        source_image_grid_thw=[image_grids])
    assert ours.shape == ref.shape == (1, height, width, 3)
    value = psnr(ours, ref)
    print(f"editing {name} {width}x{height}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR, f"editing ({name}): PSNR {value:.2f} dB < {MIN_PSNR}"

    # The references do change the picture, so the comparison above can fail.
    text_only = run_reference(ref_pipe, cond.prompt, height, width, reference_upsample(tokens.grid_ids[0]),
                              latents, steps, guidance)
    assert psnr(ours, text_only) < 45.0, f"references barely matter: {psnr(ours, text_only):.1f} dB"


def test_editing_without_cfg_matches_diffusers(model, ref_pipe, edit_runs):
    """guidance 1.0 with references: only the conditional pass (with the reference K/V) runs."""
    cond, tokens, _ = edit_runs["two_references"]
    height, width = cond.height, cond.width
    latents = random_latents(height, width, seed=4)
    ours = pipeline.decode(model, cond, tokens, steps=2, guidance=1.0, latents=latents)
    image_prior = torch.cat([reference_upsample(ids)[0] for ids in cond.reference_ids])
    image_grids = torch.tensor([[1, 2 * ids.shape[0], 2 * ids.shape[1]] for ids in cond.reference_ids])
    ref = run_reference(ref_pipe, cond.prompt, height, width, reference_upsample(tokens.grid_ids[0]), latents,
                        2, 1.0, image=list(cond.references), prior_token_image_ids=[image_prior],
                        source_image_grid_thw=[image_grids])
    value = psnr(ours, ref)
    print(f"editing two_references guidance 1.0: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR, f"editing, guidance 1.0: PSNR {value:.2f} dB < {MIN_PSNR}"
