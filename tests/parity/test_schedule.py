"""glm_core.schedule vs FlowMatchEulerDiscreteScheduler driven exactly as GlmImagePipeline drives it (L958-977, L989-1047).

Schedules are compared with torch.equal (bit-identical), not a tolerance: the timesteps are integers the DiT
is conditioned on and the sigmas come from the same float32 arithmetic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glm_core.dit.sampling import guided_velocity
from glm_core.schedule import calculate_mu, dit_timestep, euler_step, image_seq_len, timesteps_and_sigmas
from tests.reference import reference_scheduler

SIZES = [(512, 512), (1024, 1024), (1152, 768), (2048, 2048)]  # (height, width)
STEPS = [1, 2, 30, 50]


@pytest.fixture(scope="module")
def latent_geometry(tiny_checkpoint) -> tuple[int, int]:
    """(vae_scale_factor, DiT patch_size) from the checkpoint, as the pipeline computes them."""
    vae = json.loads((tiny_checkpoint / "vae" / "config.json").read_text())
    dit = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1), dit["patch_size"]


def reference_schedule(tiny_checkpoint, num_inference_steps: int, height: int, width: int, vae_scale_factor: int,
                       patch_size: int):
    """GlmImagePipeline.__call__ L958-977, with timesteps=None and sigmas=None as the pipeline's defaults."""
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    scheduler = reference_scheduler(tiny_checkpoint)
    seq_len = ((height // vae_scale_factor) * (width // vae_scale_factor)) // (patch_size ** 2)
    timesteps = np.linspace(scheduler.config.num_train_timesteps, 1.0, num_inference_steps + 1)[:-1]
    timesteps = timesteps.astype(np.int64).astype(np.float32)
    sigmas = timesteps / scheduler.config.num_train_timesteps
    mu = calculate_shift(
        seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("base_shift", 0.25),
        scheduler.config.get("max_shift", 0.75),
    )
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, "cpu", timesteps, sigmas, mu=mu)
    return scheduler, timesteps, seq_len, mu


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_matches_pipeline(tiny_checkpoint, scheduler_config, latent_geometry, steps, height, width):
    scheduler, ref_timesteps, ref_seq_len, ref_mu = reference_schedule(tiny_checkpoint, steps, height, width,
                                                                       *latent_geometry)
    seq_len = image_seq_len(height, width, *latent_geometry)
    assert seq_len == ref_seq_len
    assert calculate_mu(seq_len, scheduler_config.base_image_seq_len, scheduler_config.max_image_seq_len,
                        scheduler_config.base_shift, scheduler_config.max_shift) == ref_mu
    timesteps, sigmas = timesteps_and_sigmas(steps, seq_len, scheduler_config)
    assert timesteps.dtype == ref_timesteps.dtype == torch.float32
    assert sigmas.dtype == scheduler.sigmas.dtype == torch.float32
    assert timesteps.shape == (steps,) and sigmas.shape == (steps + 1,)
    assert torch.equal(timesteps, ref_timesteps)
    assert torch.equal(sigmas, scheduler.sigmas)
    # What the DiT sees each step (pipeline L1000): t.expand(B) - 1.
    for t in ref_timesteps:
        assert torch.equal(dit_timestep(t, 2), t.expand(2) - 1)


def test_schedule_where_torch_linspace_would_truncate_differently(tiny_checkpoint, scheduler_config, latent_geometry):
    """N=99: a float64 torch.linspace lands an ulp below an integer where numpy does not; the int64 cast differs."""
    _, ref_timesteps, _, _ = reference_schedule(tiny_checkpoint, 99, 1024, 1024, *latent_geometry)
    timesteps, _ = timesteps_and_sigmas(99, image_seq_len(1024, 1024, *latent_geometry), scheduler_config)
    assert torch.equal(timesteps, ref_timesteps)


@torch.no_grad()
def test_euler_steps_match_scheduler_step(tiny_checkpoint, scheduler_config, latent_geometry):
    steps = 5
    scheduler, ref_timesteps, seq_len, _ = reference_schedule(tiny_checkpoint, steps, 256, 256, *latent_geometry)
    _, sigmas = timesteps_and_sigmas(steps, seq_len, scheduler_config)
    generator = torch.Generator().manual_seed(0)
    # The pipeline draws the noise in its dtype (bf16) and keeps fp32 latents after the first step (spec §6.17).
    ref_latents = torch.randn(1, 16, 8, 8, generator=generator, dtype=torch.bfloat16)
    latents = ref_latents.clone()
    for i, t in enumerate(ref_timesteps):
        cond = torch.randn(1, 16, 8, 8, generator=generator)
        uncond = torch.randn(1, 16, 8, 8, generator=generator)
        ref_velocity = uncond + 1.5 * (cond - uncond)  # pipeline L1038
        velocity = guided_velocity(cond, uncond, 1.5)
        assert torch.equal(velocity, ref_velocity)
        ref_latents = scheduler.step(ref_velocity, t, ref_latents, return_dict=False)[0]
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
        assert latents.dtype == ref_latents.dtype == torch.float32
        assert torch.equal(latents, ref_latents), f"step {i}"
    # Python-float sigmas give the same step (the difference is still taken in float32).
    assert torch.equal(euler_step(latents, velocity, sigmas[3].item(), sigmas[4].item()),
                       euler_step(latents, velocity, sigmas[3], sigmas[4]))
