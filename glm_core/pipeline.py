"""The one path from prompt to pixels: encode_prompt -> generate_tokens -> decode.

Every caller (CLI, ComfyUI nodes, benchmark) goes through these functions. Each stage's weights load
lazily on first use, so building a `GlmImage` is cheap, and a stage can leave the GPU while another runs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import PIL.Image
import torch

from .ar.config import ARConfig, Sampling
from .ar.decode import generate_grids
from .ar.model import is_vision_key, load_ar
from .ar.vision import load_vision
from .checkpoint import CheckpointFolder, open_checkpoint, read_headers
from .dit.model import load_dit
from .dit.sampling import DiTConditioning, denoise, initial_noise, uses_guidance
from .glyph import load_glyph_encoder
from .processor import PromptProcessor, adjust_reference_size, validate_target_size
from .schedule import SchedulerConfig, image_seq_len, timesteps_and_sigmas
from .tokens import (PriorTokens, check_token_ids, check_tokens_match, load_tokens, preview_tokens, save_tokens,
                     upsample_prior)
from .vae import load_vae, postprocess, preprocess_reference

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]
# The model card's DiT settings (the reference pipeline's defaults).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 1.5

# Each stage, the checkpoint component its weights come from, and which of that component's keys it reads.
STAGES = ("vision", "ar", "glyph", "dit", "vae")
COMPONENT_OF_STAGE = {"vision": "vision_language_encoder", "ar": "vision_language_encoder",
                      "glyph": "text_encoder", "dit": "transformer", "vae": "vae"}
_KEYS_OF_STAGE = {"vision": is_vision_key, "ar": lambda key: not is_vision_key(key)}
_LOADERS = {"vision": load_vision, "ar": load_ar, "glyph": load_glyph_encoder, "dit": load_dit, "vae": load_vae}
_COMPILED_STAGES = ("ar", "dit")
_INT_ITEMSIZE = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}

__all__ = ["GlmImage", "Conditioning", "PriorTokens", "encode_prompt", "generate_tokens", "decode", "generate",
           "save_tokens", "load_tokens", "preview_tokens", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class GlmImage:
    """A GLM-Image checkpoint folder with its stages loaded on demand."""

    def __init__(self, checkpoint: CheckpointFolder, device: torch.device, dtype: torch.dtype,
                 compile: bool | None = None):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        # torch.compile of the AR decode layer and the DiT blocks: None = on for CUDA unless
        # GLM_CORE_NO_COMPILE=1 (glm_core.compiling); costs ~30 s of compiling on first use per process.
        self.compile = compile
        self.processor = PromptProcessor.from_folder(checkpoint.root)
        self.scheduler_config = SchedulerConfig.from_dict(checkpoint.read_config("scheduler", "scheduler_config.json"))
        self.ar_config = ARConfig.from_folder(checkpoint.component_dir("vision_language_encoder"))
        self._modules: dict[str, torch.nn.Module] = {}

    @classmethod
    def from_folder(cls, folder, *, device=None, dtype: torch.dtype | None = None,
                    compile: bool | None = None) -> "GlmImage":
        """Validate the folder and read its configs; no weights are read until a stage runs."""
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            # bf16 is the checkpoint's own dtype; on the CPU fp32 is both faster and exact.
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return cls(open_checkpoint(folder), device, dtype, compile)

    # -- stages ----------------------------------------------------------------------------------

    def stage(self, name: str) -> torch.nn.Module:
        """The loaded module of a stage ("vision", "ar", "glyph", "dit", "vae"), loading it on first use."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        module = self._modules.get(name)
        if module is None:
            extra = {"compile": self.compile} if name in _COMPILED_STAGES else {}
            module = _LOADERS[name](self.checkpoint.root, self.device, self.dtype, **extra)
            self._modules[name] = module
        elif _module_device(module) != self.device:
            module.to(self.device)
        return module

    def stage_nbytes(self, name: str) -> int:
        """Bytes a stage's weights take on the device in this model's dtype (from the file headers, nothing read)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        keep = _KEYS_OF_STAGE.get(name, lambda key: True)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for key, (shape, stored, _) in read_headers(self.checkpoint.component_dir(COMPONENT_OF_STAGE[name])).items():
            if keep(key):
                # floating tensors load in the model dtype; integer ones keep their stored width
                total += math.prod(shape) * (itemsize if stored.startswith(("F", "BF")) else _INT_ITEMSIZE[stored])
        return total

    def offload(self, stage: str | None = None, *, to: str | torch.device = "cpu") -> None:
        """Move a stage's weights (or all stages') off the GPU, keeping them in host memory."""
        for name in [stage] if stage else list(self._modules):
            module = self._modules.get(name)
            if module is not None:
                module.to(to)
        _empty_cache(self.device)

    def unload(self, stage: str | None = None) -> None:
        """Drop a stage's weights (or all); they are read from disk again when next needed."""
        for name in [stage] if stage else list(self._modules):
            self._modules.pop(name, None)
        _empty_cache(self.device)

    def stage_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self._modules)

    @property
    def sampling_defaults(self) -> Sampling:
        """The checkpoint's own sampling settings (generation_config.json; model-card values where it is silent)."""
        return self.ar_config.sampling

    @property
    def codebook_size(self) -> int:
        """Size of the semantic VQ codebook: the range of valid prior-token ids."""
        return int(self.checkpoint.read_config("transformer")["prior_vq_quantizer_codebook_size"])


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- conditioning ----------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """What the user asked for: the prompt, the target size and the references, size-adjusted and tokenized."""

    prompt: str
    width: int
    height: int
    references: list[PIL.Image.Image] = field(default_factory=list)  # size-adjusted RGB (spec §4)
    reference_grids: list[tuple[int, int]] = field(default_factory=list)  # (gh, gw) AR patch grid per reference
    reference_ids: list[torch.Tensor] = field(default_factory=list)  # (gh, gw) long VQ ids per reference, CPU

    @property
    def reference_sizes(self) -> list[tuple[int, int]]:
        return [(image.height, image.width) for image in self.references]


def encode_prompt(model: GlmImage, prompt: str, width: int, height: int,
                  references: Sequence = ()) -> Conditioning:
    """Check the request, bring each reference to a size both stages accept (spec §4) and tokenize the
    references with the vision stage (one pass for all of them); a prompt alone needs no weights."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image you want (quote any text to render, "
                         'e.g. a sign that says "OPEN").')
    validate_target_size(height, width)
    adjusted = [adjust_reference_size(image) for image in references]
    cond = Conditioning(prompt=prompt, width=int(width), height=int(height), references=adjusted)
    if adjusted:
        pixels = [model.processor.preprocess_image(image) for image in adjusted]
        cond.reference_grids = [grid for _, grid in pixels]
        ids = model.stage("vision").image_token_ids(torch.cat([rows for rows, _ in pixels]), cond.reference_grids)
        sizes = [h * w for h, w in cond.reference_grids]
        cond.reference_ids = [part.view(h, w) for part, (h, w) in zip(ids.cpu().split(sizes), cond.reference_grids)]
    return cond


# -- AR stage ----------------------------------------------------------------------------------------


def sampling_settings(model: GlmImage, temperature: float | None = None, top_p: float | None = None,
                      top_k: int | None = None) -> Sampling:
    """The checkpoint's sampling defaults with the given values in their place; ValueError naming bad ones."""
    defaults = model.sampling_defaults
    return Sampling(temperature=defaults.temperature if temperature is None else temperature,
                    top_p=defaults.top_p if top_p is None else top_p,
                    top_k=defaults.top_k if top_k is None else top_k).validate()


def generate_tokens(model: GlmImage, cond: Conditioning, *, seed: int, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, batch_size: int = 1,
                    progress: Progress | None = None, interrupt: Interrupt | None = None) -> PriorTokens:
    """Sample the semantic token grid(s); item i of the batch uses seed + i. Unset sampling values come from
    the checkpoint's generation config (`GlmImage.sampling_defaults`)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    settings = sampling_settings(model, temperature, top_p, top_k)
    inputs = model.processor.build_inputs([cond.prompt] * batch_size, cond.height, cond.width,
                                          [cond.reference_grids] * batch_size)
    if cond.reference_ids:
        inputs.reference_ids = torch.cat([ids.flatten() for ids in cond.reference_ids]).repeat(batch_size)
    seeds = [seed + i for i in range(batch_size)]
    grid_ids = generate_grids(model.stage("ar"), inputs, seeds=seeds, sampling_settings=settings,
                              progress=progress, interrupt=interrupt)
    return PriorTokens(grid_ids=grid_ids, height=cond.height, width=cond.width,
                       reference_sizes=cond.reference_sizes, seeds=seeds)


# -- DiT stage ---------------------------------------------------------------------------------------


def check_decode_settings(steps, guidance) -> None:
    """ValueError naming every bad DiT setting (before any weight is read)."""
    problems = []
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not guidance >= 1.0:
        problems.append(f"guidance must be >= 1.0 (1.0 disables classifier-free guidance), got {guidance!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_decode_inputs(model: GlmImage, cond: Conditioning, tokens: PriorTokens) -> None:
    """The tokens fit this conditioning and this model's codebook (clear ValueError if not)."""
    check_tokens_match(tokens, cond.height, cond.width, cond.reference_sizes)
    check_token_ids(tokens, model.codebook_size)


@torch.no_grad()
def decode(model: GlmImage, cond: Conditioning, tokens: PriorTokens, *, steps: int = DEFAULT_STEPS,
           guidance: float = DEFAULT_GUIDANCE, seed: int = 0, progress: Progress | None = None,
           interrupt: Interrupt | None = None, on_step=None, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise latents conditioned on the tokens and decode them: (B, H, W, 3) float32 in [0, 1], CPU.

    `latents` overrides the seeded initial noise (for parity tests); `on_step(step, total, preview)`
    gets a cheap low-resolution preview (B, h, w, 3) of the current estimate.
    """
    check_decode_settings(steps, guidance)
    check_decode_inputs(model, cond, tokens)
    device, dtype = model.device, model.dtype
    batch = tokens.grid_ids.shape[0]
    if interrupt is not None:
        interrupt()

    glyph = model.stage("glyph")
    glyph_embeds = glyph.encode([cond.prompt] * batch, dtype=dtype)
    negative_embeds = glyph.encode_negative(batch, dtype=dtype) if uses_guidance(guidance) else None
    vae = model.stage("vae")
    dit = model.stage("dit")

    dit_cond = denoised = None
    try:
        dit_cond = DiTConditioning(glyph_embeds=glyph_embeds, negative_glyph_embeds=negative_embeds,
                                   prior_ids=tokens.prior_ids.to(device), target_size=(cond.height, cond.width),
                                   reference_kv=encode_reference_kv(model, cond) if cond.references else None)
        scale = vae.config.scale_factor
        if latents is None:
            latents = initial_noise(batch, dit.config.in_channels, cond.height // scale, cond.width // scale,
                                    seed, device, dtype)
        elif not torch.isfinite(latents).all():
            raise ValueError("the initial latents contain NaN or inf")
        seq_len = image_seq_len(cond.height, cond.width, scale, dit.config.patch_size)
        timesteps, sigmas = timesteps_and_sigmas(steps, seq_len, model.scheduler_config)

        def after_step(step: int, total: int, estimate: torch.Tensor) -> None:
            if on_step is not None:
                on_step(step, total, preview_latents(vae, estimate))
            if progress is not None:
                progress(step, total)
            if interrupt is not None and step < total:
                interrupt()

        denoised = denoise(dit, latents, dit_cond, timesteps, sigmas, guidance, on_step=after_step)
        dit_cond = None
        images = vae.decode_latents(denoised.to(vae.dtype))
        denoised = None
        return postprocess(images)
    finally:
        # Drop the big tensors in this frame so an interrupt or error leaves GPU memory where it was
        # (a traceback keeps the frame, and with it every local, alive).
        dit_cond = denoised = latents = None
        _empty_cache(device)


def encode_reference_kv(model: GlmImage, cond: Conditioning):
    """Each reference through the VAE encoder and the DiT at t=0; its per-layer K/V (spec §1.5.1)."""
    vae, dit = model.stage("vae"), model.stage("dit")
    latents, prior_ids, sizes = [], [], []
    for image, grid_ids in zip(cond.references, cond.reference_ids):
        height, width = image.height, image.width  # already multiples of 32 (encode_prompt)
        pixels = preprocess_reference(image, height, width).to(model.device, vae.dtype)
        latents.append(vae.encode_latents(pixels).to(model.dtype))
        prior_ids.append(upsample_prior(grid_ids[None].to(model.device))[0])
        sizes.append((height, width))
    return dit.encode_references(latents, prior_ids, sizes)


def preview_latents(vae, denoised: torch.Tensor, max_side: int = 32) -> torch.Tensor:
    """A cheap picture of the current estimate: the VAE decoder on 4x-downsampled latents (≈1/16 of the work)."""
    factor = max(1, max(denoised.shape[-2:]) // max_side)
    small = torch.nn.functional.avg_pool2d(denoised, factor) if factor > 1 else denoised
    return postprocess(vae.decode_latents(small.to(vae.dtype)))


# -- whole path ---------------------------------------------------------------------------------------


def generate(model: GlmImage, prompt: str, width: int, height: int, references: Sequence = (), *,
             ar_seed: int = 0, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             batch_size: int = 1, ar_progress: Progress | None = None, dit_progress: Progress | None = None,
             interrupt: Interrupt | None = None) -> torch.Tensor:
    """Prompt (+ references) to images (B, H, W, 3) float32 in [0, 1]."""
    check_decode_settings(steps, guidance)
    sampling_settings(model, temperature, top_p, top_k)
    cond = encode_prompt(model, prompt, width, height, references)
    tokens = generate_tokens(model, cond, seed=ar_seed, temperature=temperature, top_p=top_p, top_k=top_k,
                             batch_size=batch_size, progress=ar_progress, interrupt=interrupt)
    return decode(model, cond, tokens, steps=steps, guidance=guidance, seed=seed, progress=dit_progress,
                  interrupt=interrupt)
