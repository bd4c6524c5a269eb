"""Flow-matching schedule for the DiT: mu, integer timesteps, shifted sigmas, Euler step.

Pure functions over ``scheduler/scheduler_config.json`` (spec §1.7, §2.1 step 9-10, §6.1-6.2).
The arithmetic mirrors the reference's dtypes step by step (numpy float64 linspace, int64 truncation,
float32 sigmas and shift, fp32 Euler update) so the numbers are bit-identical, not just close.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int
    base_image_seq_len: int
    base_shift: float
    max_shift: float
    max_image_seq_len: int | None = None  # in the file, but the GLM mu formula never reads it (spec §6.2)

    # Flags the reference scheduler supports but GLM-Image does not use; anything else is rejected.
    _REQUIRED = ("num_train_timesteps", "base_image_seq_len", "base_shift", "max_shift")
    _MUST_BE_OFF = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas", "stochastic_sampling")

    @classmethod
    def from_dict(cls, config: dict, source: str = "scheduler/scheduler_config.json") -> "SchedulerConfig":
        missing = [key for key in cls._REQUIRED if config.get(key) is None]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}; a GLM-Image scheduler config has all of "
                             f"{', '.join(cls._REQUIRED)}.")
        # GLM-Image always shifts by resolution with the linear formula (spec §1.7).
        if config.get("use_dynamic_shifting") is not True:
            raise ValueError(f"{source}: use_dynamic_shifting is {config.get('use_dynamic_shifting')!r}; "
                             "only true (resolution-dependent shift, as GLM-Image ships) is supported.")
        if config.get("time_shift_type") != "linear":
            raise ValueError(f"{source}: time_shift_type is {config.get('time_shift_type')!r}; only 'linear' "
                             "(as GLM-Image ships) is supported.")
        enabled = [key for key in cls._MUST_BE_OFF if config.get(key)]
        if enabled:
            raise ValueError(f"{source}: {', '.join(enabled)} set; GLM-Image's schedule uses none of these and "
                             "this implementation does not support them.")
        return cls(
            num_train_timesteps=int(config["num_train_timesteps"]),
            base_image_seq_len=int(config["base_image_seq_len"]),
            base_shift=float(config["base_shift"]),
            max_shift=float(config["max_shift"]),
            max_image_seq_len=config.get("max_image_seq_len"),
        )


def calculate_mu(image_seq_len: int, base_seq_len: int, max_seq_len: int | None,
                 base_shift: float, max_shift: float) -> float:
    """mu = sqrt(seq / base) * max_shift + base_shift, no clamp (spec §6.2).

    ``max_seq_len`` is accepted so callers can pass the whole config, but the GLM formula ignores it:
    it is not Flux's interpolation between (base, base_shift) and (max, max_shift).
    """
    del max_seq_len
    # `** 0.5`, not math.sqrt: same Python float ops as the reference, so mu matches to the last bit.
    scale = (image_seq_len / base_seq_len) ** 0.5
    return scale * max_shift + base_shift


def image_seq_len(height: int, width: int, vae_scale_factor: int, patch_size: int) -> int:
    """Number of DiT image tokens for a (height, width) pixel target: (H/8 · W/8) / patch²."""
    return ((height // vae_scale_factor) * (width // vae_scale_factor)) // (patch_size ** 2)


def timesteps_and_sigmas(num_steps: int, image_seq_len: int,
                         scheduler_config: SchedulerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (N,) float32, unshifted integers 1000, 980, ...; sigmas (N+1,) float32, shifted, ending in 0.

    The DiT sees ``timesteps[i] - 1`` (see ``dit_timestep``); the Euler update uses the shifted sigmas
    (spec §6.1).
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {num_steps!r}.")
    config = scheduler_config
    num_train = config.num_train_timesteps
    # float64 linspace, then int64 truncation (N=30 gives 966, not 966.67): the numpy ops the reference uses,
    # because a torch linspace can land an ulp below an integer and truncate to the wrong value.
    timesteps = np.linspace(num_train, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sigmas = timesteps / num_train  # float32
    mu = calculate_mu(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                      config.base_shift, config.max_shift)
    # Linear time shift mu / (mu + (1/sigma - 1)), evaluated in float32 like the reference's numpy code.
    sigmas = (mu / (mu + (1.0 / sigmas - 1.0))).astype(np.float32)
    sigmas = torch.cat([torch.from_numpy(sigmas), torch.zeros(1, dtype=torch.float32)])
    return torch.from_numpy(timesteps), sigmas


def dit_timestep(timestep: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The timestep the DiT is conditioned on: the unshifted integer timestep minus one (999, 979, ...; spec §6.1)."""
    return timestep.expand(batch_size) - 1


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One flow-matching Euler step in fp32: latents + (sigma_next − sigma)·velocity.

    ``sigma``/``sigma_next`` are entries of the sigmas from ``timesteps_and_sigmas`` (tensor or float);
    the difference is taken in float32, as the reference does with its float32 sigma table.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=velocity.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=velocity.device)
    return latents.float() + (sigma_next - sigma) * velocity.float()
