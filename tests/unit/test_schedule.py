"""glm_core.schedule on its own: the spec's numbers, guidance at or below 1, bad step counts and configs."""

from __future__ import annotations

import json

import pytest
import torch

from glm_core.dit.sampling import guided_velocity, uses_guidance
from glm_core.schedule import SchedulerConfig, calculate_mu, dit_timestep, timesteps_and_sigmas


def test_schedule_spec_numbers(scheduler_config):
    """Spec §2.1 step 9 values, independently of the reference library."""
    assert calculate_mu(4096, 256, 4096, 0.25, 0.75) == 3.25
    assert calculate_mu(16384, 256, 4096, 0.25, 0.75) == 6.25  # no clamp at max_image_seq_len
    timesteps, sigmas = timesteps_and_sigmas(30, 4096, scheduler_config)
    assert timesteps[:4].tolist() == [1000, 966, 933, 900] and timesteps[-3:].tolist() == [100, 67, 34]
    assert sigmas[-1] == 0 and sigmas[0] == 1
    assert torch.allclose(sigmas[-4:-1], torch.tensor([0.265306, 0.189224, 0.102647]), atol=1e-6)
    timesteps, sigmas = timesteps_and_sigmas(50, 16384, scheduler_config)
    assert timesteps[1] == 980 and abs(sigmas[1].item() - 0.996745) < 1e-6 and abs(sigmas[-2].item() - 0.113122) < 1e-6
    assert dit_timestep(timesteps[0], 1).tolist() == [999.0]


def test_guidance_at_or_below_one_is_cond_only():
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)
    assert not uses_guidance(1.0) and uses_guidance(1.5)
    assert guided_velocity(cond, None, 1.0) is cond
    assert guided_velocity(cond, uncond, 0.5) is cond  # the reference skips CFG entirely at guidance <= 1
    with pytest.raises(ValueError, match="unconditional"):
        guided_velocity(cond, None, 2.0)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_invalid_step_counts_raise(scheduler_config, steps):
    with pytest.raises(ValueError, match="steps"):
        timesteps_and_sigmas(steps, 4096, scheduler_config)


@pytest.mark.parametrize("change, message", [
    ({"time_shift_type": "exponential"}, "time_shift_type"),
    ({"use_dynamic_shifting": False}, "use_dynamic_shifting"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"shift_terminal": 0.1}, "shift_terminal"),
    ({"base_shift": None}, "base_shift"),
])
def test_config_rejects_unsupported_values(tiny_checkpoint, change, message):
    raw = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_dict(raw)

