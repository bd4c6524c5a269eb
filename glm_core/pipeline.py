"""The one path from prompt to pixels: encode_prompt -> generate_tokens -> decode.

Every caller (CLI, ComfyUI nodes, benchmark) goes through these functions. Each stage's weights load
lazily on first use, so building a `GlmImage` is cheap and the AR stage can be offloaded while the
DiT runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import PIL.Image
import torch
from safetensors.torch import load_file, save_file

from .ar.decode import PriorTokens, generate_tokens as ar_generate_tokens, upsample_prior
from .ar.model import load_ar
from .checkpoint import CheckpointFolder, open_checkpoint
from .dit.model import load_dit
from .glyph import load_glyph_encoder
from .processor import PromptProcessor, adjust_reference_size, validate_target_size
from .schedule import SchedulerConfig, dit_timestep, euler_step, image_seq_len, timesteps_and_sigmas
from .vae import load_vae, postprocess, preprocess_reference

Progress = Callable[[int, int], None]
Interrupt = Callable[[], None]
STAGES = ("ar", "glyph", "dit", "vae")
TOKENS_FORMAT = "glm-image-tokens/1"


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
        """The loaded module of a stage ("ar", "glyph", "dit", "vae"), loading it on first use."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        module = self._modules.get(name)
        if module is None:
            loader = {"ar": load_ar, "glyph": load_glyph_encoder, "dit": load_dit, "vae": load_vae}[name]
            module = loader(self.checkpoint.root, self.device, self.dtype)
            if name == "dit":
                module.compile_blocks = self.compile
            self._modules[name] = module
        elif _module_device(module) != self.device:
            module.to(self.device)
        return module

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
    """What the user asked for: the prompt, the target size and the (size-adjusted) reference images."""

    prompt: str
    width: int
    height: int
    references: list[PIL.Image.Image] = field(default_factory=list)

    @property
    def reference_sizes(self) -> list[tuple[int, int]]:
        return [(image.height, image.width) for image in self.references]


def encode_prompt(model: GlmImage | None, prompt: str, width: int, height: int,
                  references: Sequence = ()) -> Conditioning:
    """Check the request and bring each reference to a size both stages accept (spec §4)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image you want (quote any text to render, "
                         'e.g. a sign that says "OPEN").')
    validate_target_size(height, width)
    adjusted = [adjust_reference_size(image) for image in references]
    return Conditioning(prompt=prompt, width=int(width), height=int(height), references=adjusted)


# -- AR stage ----------------------------------------------------------------------------------------


def generate_tokens(model: GlmImage, cond: Conditioning, *, seed: int, temperature: float = 0.9,
                    top_p: float = 0.75, top_k: int | None = 50, batch_size: int = 1,
                    progress: Progress | None = None, interrupt: Interrupt | None = None) -> PriorTokens:
    """Sample the semantic token grid(s); item i of the batch uses seed + i."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_sampling(temperature, top_p, top_k)
    references = [list(cond.references)] * batch_size if cond.references else None
    inputs = model.processor.build_inputs([cond.prompt] * batch_size, cond.height, cond.width, references)
    ar = model.stage("ar")
    inputs = inputs.to(model.device)
    reference_grid_ids = []
    if cond.references:
        # One vision pass for the references, shared by the AR prompt of every batch item and by the DiT,
        # which conditions each reference on its own VQ ids (spec §2.2 step 3).
        grids = [tuple(g) for g in inputs.reference_grids[: len(cond.references)]]
        sizes = [h * w for h, w in grids]
        ids = ar.image_token_ids(inputs.pixel_values[: sum(sizes)], grids)  # (Σ h·w,)
        inputs = replace(inputs, reference_ids=ids.repeat(batch_size))
        reference_grid_ids = [part.view(h, w) for part, (h, w) in zip(ids.cpu().split(sizes), grids)]
    tokens = ar_generate_tokens(ar, inputs, seeds=[seed + i for i in range(batch_size)],
                                temperature=temperature, top_p=top_p, top_k=top_k,
                                progress=progress, interrupt=interrupt, compile=model.compile)
    tokens.reference_sizes = cond.reference_sizes
    tokens.reference_grid_ids = reference_grid_ids
    return tokens


def _check_sampling(temperature: float, top_p: float, top_k: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


# -- DiT stage ---------------------------------------------------------------------------------------


def check_tokens_match(cond: Conditioning, tokens: PriorTokens) -> None:
    """The tokens must come from the same size and references as the conditioning (clear error if not)."""
    if (tokens.height, tokens.width) != (cond.height, cond.width):
        raise ValueError(
            f"the tokens were generated for {tokens.width}x{tokens.height} but the decode asks for "
            f"{cond.width}x{cond.height}: re-run AR Generate Tokens with this size, or set the size back.")
    expected_grid = (cond.height // 32, cond.width // 32)
    if tuple(tokens.grid_ids.shape[-2:]) != expected_grid:
        raise ValueError(f"token grid {tuple(tokens.grid_ids.shape[-2:])} does not match {expected_grid} "
                         f"for {cond.width}x{cond.height}; the tokens file is damaged or from another model.")
    if len(tokens.reference_sizes) != len(cond.references):
        raise ValueError(
            f"the tokens were generated with {len(tokens.reference_sizes)} reference image(s) but the decode "
            f"has {len(cond.references)}: use the same references for both stages.")
    if [tuple(s) for s in tokens.reference_sizes] != cond.reference_sizes:
        raise ValueError(
            f"reference sizes differ between the tokens {tokens.reference_sizes} and the decode "
            f"{cond.reference_sizes}: use the same reference images for both stages.")
    if len(tokens.reference_grid_ids) != len(cond.references):
        raise ValueError("the tokens carry no reference-image ids; re-run AR Generate Tokens with the references.")


def check_token_ids(tokens: PriorTokens, codebook_size: int) -> None:
    """Every id must index the DiT's prior embedding (the reference crashes with an IndexError instead)."""
    grids = {"the token grid": tokens.grid_ids, "the prior ids": tokens.prior_ids}
    grids.update({f"reference {i + 1}'s ids": ids for i, ids in enumerate(tokens.reference_grid_ids)})
    for what, ids in grids.items():
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
            raise ValueError(f"{what} hold ids outside the codebook [0, {codebook_size}) "
                             f"(found {int(ids.min())}..{int(ids.max())}): the tokens are damaged or from "
                             "another model; re-run AR Generate Tokens.")


def initial_noise(batch: int, channels: int, height: int, width: int, seed: int,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, H/8, W/8) Gaussian noise drawn in the model dtype, like the reference (spec §6.17)."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn((batch, channels, height // 8, width // 8), generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def decode(model: GlmImage, cond: Conditioning, tokens: PriorTokens, *, steps: int = 50,
           guidance: float = 1.5, seed: int = 0, progress: Progress | None = None,
           interrupt: Interrupt | None = None, on_step=None, latents: torch.Tensor | None = None,
           batched_cfg: bool = False) -> torch.Tensor:
    """Denoise latents conditioned on the tokens and decode them: (B, H, W, 3) float32 in [0, 1], CPU.

    `latents` overrides the seeded initial noise (for parity tests); `on_step(step, total, preview)`
    gets a cheap low-resolution preview (B, h, w, 3) of the current estimate. `batched_cfg` runs the
    conditional and unconditional passes as one batch; two passes measured faster on an H200 at 1024²
    and 2048² (the glyph padding mask slows attention), so it is off by default.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not guidance >= 1.0:
        raise ValueError(f"guidance must be >= 1.0 (1.0 disables classifier-free guidance), got {guidance}")
    check_tokens_match(cond, tokens)
    check_token_ids(tokens, model.codebook_size)
    prior_ids = tokens.prior_ids
    device, dtype = model.device, model.dtype
    batch = prior_ids.shape[0]

    glyph = model.stage("glyph")
    glyph_embeds = glyph.encode([cond.prompt] * batch, dtype=dtype)
    negative_embeds = glyph.encode_negative(batch, dtype=dtype) if guidance > 1 else None
    vae = model.stage("vae")
    dit = model.stage("dit")

    reference_kv = None
    velocity = noisy = None
    try:
        if cond.references:
            reference_kv = encode_reference_kv(model, cond, tokens)
        if latents is None:
            latents = initial_noise(batch, dit.config.in_channels, cond.height, cond.width, seed, device, dtype)
        elif not torch.isfinite(latents).all():
            raise ValueError("the initial latents contain NaN or inf")
        noisy = latents.to(device).float()  # fp32 accumulation from here on (spec §6.17)
        seq_len = image_seq_len(cond.height, cond.width, vae.config.scale_factor, dit.config.patch_size)
        timesteps, sigmas = timesteps_and_sigmas(steps, seq_len, model.scheduler_config)
        target_size = (cond.height, cond.width)
        for i in range(steps):
            if interrupt is not None:
                interrupt()
            t = dit_timestep(timesteps[i : i + 1].to(device), batch)
            velocity = dit.predict_velocity(noisy.to(dtype), glyph_embeds, negative_embeds, prior_ids.to(device),
                                            t, target_size, guidance=guidance, reference_kv=reference_kv,
                                            batched_cfg=batched_cfg)
            if on_step is not None:
                on_step(i + 1, steps, preview_latents(vae, noisy - sigmas[i].to(device) * velocity))
            noisy = euler_step(noisy, velocity, sigmas[i], sigmas[i + 1])
            if progress is not None:
                progress(i + 1, steps)
        reference_kv = velocity = None
        images = vae.decode_latents(noisy.to(vae.dtype))
        noisy = None
        return postprocess(images)
    finally:
        # Drop the big tensors in this frame so an interrupt or error leaves GPU memory where it was
        # (a traceback keeps the frame, and with it every local, alive).
        reference_kv = velocity = noisy = latents = None
        _empty_cache(device)


def encode_reference_kv(model: GlmImage, cond: Conditioning, tokens: PriorTokens):
    """Each reference through the VAE encoder and the DiT at t=0; its per-layer K/V (spec §1.5.1)."""
    vae, dit = model.stage("vae"), model.stage("dit")
    latents, prior_ids, sizes = [], [], []
    for image, grid_ids in zip(cond.references, tokens.reference_grid_ids):
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
             ar_seed: int = 0, seed: int = 0, steps: int = 50, guidance: float = 1.5,
             temperature: float = 0.9, top_p: float = 0.75, top_k: int | None = 50, batch_size: int = 1,
             ar_progress: Progress | None = None, dit_progress: Progress | None = None,
             interrupt: Interrupt | None = None) -> torch.Tensor:
    """Prompt (+ references) to images (B, H, W, 3) float32 in [0, 1]."""
    cond = encode_prompt(model, prompt, width, height, references)
    tokens = generate_tokens(model, cond, seed=ar_seed, temperature=temperature, top_p=top_p, top_k=top_k,
                             batch_size=batch_size, progress=ar_progress, interrupt=interrupt)
    return decode(model, cond, tokens, steps=steps, guidance=guidance, seed=seed, progress=dit_progress,
                  interrupt=interrupt)


# -- tokens on disk -----------------------------------------------------------------------------------


def save_tokens(tokens: PriorTokens, path) -> Path:
    """Write the tokens as safetensors with their size, seeds and reference info in the metadata."""
    path = Path(path)
    tensors = {"grid_ids": tokens.grid_ids.cpu().contiguous()}
    for i, ids in enumerate(tokens.reference_grid_ids):
        tensors[f"reference_grid_ids.{i}"] = ids.cpu().contiguous()
    meta = {"format": TOKENS_FORMAT, "height": tokens.height, "width": tokens.width,
            "reference_sizes": [list(s) for s in tokens.reference_sizes], "seeds": list(tokens.seeds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"glm_image": json.dumps(meta)})
    return path


def load_tokens(path) -> PriorTokens:
    """Read a file written by `save_tokens`; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokens file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("glm_image", "null"))
        tensors = load_file(str(path))
    except Exception as error:  # a damaged or foreign file
        raise ValueError(f"{path} is not a GLM-Image tokens file ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != TOKENS_FORMAT or "grid_ids" not in tensors:
        raise ValueError(f"{path} is not a GLM-Image tokens file (format {TOKENS_FORMAT!r} expected)")
    if not all(isinstance(meta.get(key), int) for key in ("height", "width")) or not isinstance(
            meta.get("reference_sizes", []), list):
        raise ValueError(f"{path}: damaged tokens file (its metadata lacks the image size): {meta}")
    meta.setdefault("reference_sizes", [])
    grid_ids = tensors["grid_ids"].long()
    if grid_ids.ndim != 3 or tuple(grid_ids.shape[-2:]) != (meta["height"] // 32, meta["width"] // 32):
        raise ValueError(f"{path}: token grid {tuple(grid_ids.shape)} does not match "
                         f"{meta['width']}x{meta['height']}")
    references = [tensors[f"reference_grid_ids.{i}"].long() for i in range(len(meta["reference_sizes"]))
                  if f"reference_grid_ids.{i}" in tensors]
    return PriorTokens(grid_ids=grid_ids, prior_ids=upsample_prior(grid_ids), height=int(meta["height"]),
                       width=int(meta["width"]), reference_sizes=[tuple(s) for s in meta["reference_sizes"]],
                       seeds=[int(s) for s in meta.get("seeds", [])], reference_grid_ids=references)


def preview_tokens(tokens: PriorTokens, cell: int = 8) -> torch.Tensor:
    """(B, gh·cell, gw·cell, 3) float32: each token id as a fixed colour, to see the layout before the DiT.

    Nearby codebook ids carry no meaning, so ids are hashed to colours: equal ids look equal, regions of
    repeated structure stand out.
    """
    ids = tokens.grid_ids.long()
    channels = [((ids * mult) % 251).float() / 250.0 for mult in (97, 61, 29)]  # (B, gh, gw) each
    rgb = torch.stack(channels, dim=-1)  # (B, gh, gw, 3)
    return rgb.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).contiguous()
