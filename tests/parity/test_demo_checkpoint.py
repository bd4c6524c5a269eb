"""The demo checkpoint (random weights written by glm_core) through our pipeline and through diffusers':
the same picture from the same prior tokens and latents."""

from __future__ import annotations

import torch

from glm_core import pipeline
from tests.compare import psnr
from tests.reference import reference_pipeline


def test_our_pipeline_runs_and_matches_diffusers(demo_folder):
    model = pipeline.GlmImage.from_folder(demo_folder, device="cpu", dtype=torch.float32)
    prompt, width, height = 'a shop sign that says "OPEN"', 512, 512
    cond = pipeline.encode_prompt(model, prompt, width, height)
    tokens = pipeline.generate_tokens(model, cond, seed=1)
    assert tokens.grid_ids.shape == (1, 16, 16)
    assert 0 <= int(tokens.grid_ids.min()) and int(tokens.grid_ids.max()) < 16384
    latents = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = pipeline.decode(model, cond, tokens, steps=2, guidance=1.5, latents=latents)
    assert ours.shape == (1, 512, 512, 3) and torch.isfinite(ours).all()
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1

    pipe = reference_pipeline(demo_folder, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompt, height=height, width=width, prior_token_ids=tokens.prior_ids, latents=latents.clone(),
               num_inference_steps=2, guidance_scale=1.5, output_type="pt").images.permute(0, 2, 3, 1)
    value = psnr(ours, ref)
    print(f"demo checkpoint t2i 512x512: PSNR {value:.1f} dB")
    assert value >= 60.0, f"demo checkpoint: PSNR {value:.2f} dB vs diffusers"

