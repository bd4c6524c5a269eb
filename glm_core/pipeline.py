"""The one path from prompt to pixels: encode_prompt -> generate_tokens -> decode.

Every caller (CLI, ComfyUI nodes, benchmark) goes through these functions. Each stage's weights load
lazily on first use, so building a `GlmImage` is cheap, and a stage can leave the GPU while another runs.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import PIL.Image
import torch

from .ar.config import ARConfig, Sampling
from .ar.decode import generate_grids
from .ar.model import is_vision_key, load_ar
from .ar.vision import load_vision
from .checkpoint import CheckpointFolder, open_checkpoint
from .dit.model import load_dit
from .dit.sampling import DiTConditioning, denoise, initial_noise, uses_guidance
from .glyph import load_glyph_encoder
from .memory import (GB, VAE_DECODE_BYTES_PER_PIXEL, estimated_working_bytes, free_bytes, gpu_released_on_error,
                     out_of_memory_error)
from .limits import (PLACEMENTS, WEIGHT_CHOICES, WEIGHT_FORMATS, check_decode_settings, check_prompt,
                     validate_target_size)
from .prefetch import DecodePrefetch
from .processor import PromptProcessor, adjust_reference_size
from .fp8 import stored_in_fp8
from .residency import StageWeights, host_copy_plan
from .schedule import SchedulerConfig, image_seq_len, timesteps_and_sigmas
from .tokens import (PriorTokens, check_token_ids, check_tokens_match, load_tokens, preview_tokens, save_tokens,
                     upsample_prior)
from .vae import load_vae, postprocess, preprocess_reference

log = logging.getLogger("glm_core")
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
STAGE_TITLES = {"vision": "vision tower", "ar": "AR", "glyph": "glyph encoder", "dit": "DiT", "vae": "VAE"}
_COMPILED_STAGES = ("ar", "dit")
_FP8_STAGES = ("ar", "dit")  # the stages whose linears can be stored in FP8 (weights="fp8")
HEADROOM_BYTES = int(1.5 * GB)  # beyond the estimates: allocator fragmentation, cuBLAS/compile workspaces

__all__ = ["GlmImage", "Conditioning", "PriorTokens", "encode_prompt", "generate_tokens", "decode", "generate",
           "save_tokens", "load_tokens", "preview_tokens", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class GlmImage:
    """A GLM-Image checkpoint folder with its stages loaded on demand.

    placement: "gpu" keeps every loaded stage on the GPU; "sequential" keeps one group of stages there at a
    time (vision | ar | glyph+dit+vae); "auto" keeps what fits and moves a stage off the GPU only when the
    next one needs the room (decided from the free memory each time).
    """

    def __init__(self, checkpoint: CheckpointFolder, device: torch.device, dtype: torch.dtype,
                 compile: bool | None = None, placement: str = "auto", weights: str = "bf16"):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS} here (auto is decided by from_folder), "
                             f"got {weights!r}")
        self.weights = weights
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" and "cuda:0" compare unequal: name the index, so that "is this stage on our device" holds
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.placement = placement
        # torch.compile of the AR decode layer and the DiT blocks: None = on for CUDA unless
        # GLM_CORE_NO_COMPILE=1 (glm_core.compiling); costs ~30 s of compiling on first use per process.
        self.compile = compile
        self.processor = PromptProcessor.from_folder(checkpoint.root)
        self.scheduler_config = SchedulerConfig.from_dict(checkpoint.read_config("scheduler", "scheduler_config.json"))
        self.ar_config = ARConfig.from_folder(checkpoint.component_dir("vision_language_encoder"))
        self._modules: dict[str, torch.nn.Module] = {}
        self._weights: dict[str, StageWeights] = {}
        self._meta: dict[str, torch.nn.Module] = {}
        self._nbytes: dict[str, int] = {}
        self._prefetch: DecodePrefetch | None = None
        # (batch, with references) of the decodes run in this process: their DiT graphs are compiled
        self.decode_graphs_run: set[tuple[int, bool]] = set()
        # on_load(stage, bytes, None) before a stage's weights load, (stage, bytes, seconds) after
        self.on_load: Callable[[str, int, float | None], None] | None = None

    @classmethod
    def from_folder(cls, folder, *, device=None, dtype: torch.dtype | None = None, compile: bool | None = None,
                    placement: str = "auto", weights: str = "auto", gpu_memory: int | None = None) -> "GlmImage":
        """Validate the folder and read its configs; no weights are read until a stage runs.

        weights: "bf16" (the checkpoint's precision), "fp8" (the AR decoder's and the DiT blocks' linears in FP8:
        half the memory), or "auto": FP8 for a pre-quantised folder, else bf16 when the largest stage fits the GPU
        memory with room to run, else FP8 (the choice and its reason are logged).
        gpu_memory: the bytes "auto" may count on; default: what is free now. A host that unloads its own models on
        demand (ComfyUI) passes what it could make free."""
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but this PyTorch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use device 'cpu', or install a CUDA build of PyTorch")
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"weights must be 'auto', 'bf16' or 'fp8', got {weights!r}")
        if dtype is None:
            # bf16 is the checkpoint's own dtype; on the CPU fp32 is both faster and exact.
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        checkpoint = open_checkpoint(folder)
        model = cls(checkpoint, device, dtype, compile, placement, "bf16" if weights == "auto" else weights)
        if weights == "auto":
            model.weights = model._choose_weights(gpu_memory)
        return model

    def _choose_weights(self, gpu_memory: int | None) -> str:
        stored = [stage for stage in _FP8_STAGES
                  if stored_in_fp8(self.checkpoint.component_dir(COMPONENT_OF_STAGE[stage]))]
        if stored:
            log.info("weights auto: fp8 (the %s weights in this folder are stored in FP8)", "/".join(stored))
            return "fp8"
        if self.device.type != "cuda":
            return "bf16"
        largest = max(self.stage_nbytes(stage) for stage in _FP8_STAGES)
        needed = largest + estimated_working_bytes("ar", height=1024, width=1024) + HEADROOM_BYTES
        free = free_bytes(self.device) if gpu_memory is None else gpu_memory
        where = "free" if gpu_memory is None else "within reach"
        if free >= needed:
            log.info("weights auto: bf16 (the largest stage, %.1f GB, fits the %.1f GB %s with room to run)",
                     largest / GB, free / GB, where)
            return "bf16"
        log.info("weights auto: fp8 (the largest stage needs %.1f GB in bf16 with room to run; %.1f GB are %s)",
                 needed / GB, free / GB, where)
        self._meta.clear()
        self._nbytes.clear()
        return "fp8"

    # -- stages ----------------------------------------------------------------------------------

    def stage(self, name: str) -> torch.nn.Module:
        """The module of a stage ("vision", "ar", "glyph", "dit", "vae") on the device, loading it on first use
        (room is made first, see `prepare`)."""
        self.prepare([name])
        return self._modules[name]

    def prepare(self, names: Sequence[str], working_bytes: int = 0) -> None:
        """Bring these stages onto the device, after making room for their weights plus `working_bytes`:
        "sequential" moves every other stage off the GPU, "auto" only as many as needed (largest first)."""
        for name in names:
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        self.finish_prefetch()
        missing = [name for name in names if not self.on_device(name)]
        if not missing:
            return
        if self.device.type == "cuda":
            self._make_room(names, sum(self.stage_nbytes(name) for name in missing), working_bytes)
        for name in missing:
            if name not in self._modules:
                self.load_stage(name)
            else:
                start = time.perf_counter()
                with gpu_released_on_error(f"moving the {name} weights back to the GPU", self.device):
                    self._weights[name].to_device(self.device)
                log.info("moved %s weights back to the GPU from their host copy in %.1f s", STAGE_TITLES[name],
                         _seconds_since(start, self.device))

    def load_stage(self, name: str, *, quiet: bool = False) -> None:
        """Read a stage's weights onto the device (no room is made: `prepare` does that first). quiet: no
        "loading" announcement and the "loaded" line at debug level (a load beside other work, which reports
        itself once it is done); `on_load` still gets the seconds."""
        if self.on_load is not None and not quiet:
            self.on_load(name, self.stage_nbytes(name), None)
        start = time.perf_counter()
        with gpu_released_on_error(f"loading the {name} weights", self.device):
            module = _LOADERS[name](self.checkpoint.root, self.device, self.dtype, **self._loader_options(name))
        self._modules[name] = module
        read_s = _seconds_since(start, self.device)
        log.log(logging.DEBUG if quiet else logging.INFO, "loaded %s weights (%.1f GB) in %.1f s", STAGE_TITLES[name],
                self.stage_nbytes(name) / GB, read_s)
        if name in _FP8_STAGES and self.takes_turns():
            weights = self._host_copy(name)
            if weights is not None:  # None: the host has no room, the stage is re-read when it returns
                copy_start = time.perf_counter()
                weights.keep_host_copy()
                log.info("made a %s host copy of the %s weights in %.1f s (the stages take turns on the GPU)",
                         "page-locked" if weights.pinned else "pageable", STAGE_TITLES[name],
                         time.perf_counter() - copy_start)
        if self.on_load is not None:
            self.on_load(name, self.stage_nbytes(name), time.perf_counter() - start)

    def start_prefetch(self, prefetch: "DecodePrefetch") -> None:
        """Run a prefetch beside the current stage (`glm_core.prefetch`); every later change of the stages waits
        for it to end first."""
        self.finish_prefetch()
        self._prefetch = prefetch
        prefetch.start()

    def finish_prefetch(self, cancel: bool = False) -> None:
        """Wait for a running prefetch (a no-op on its own thread and when none runs); cancel: it starts nothing
        more (after a failed or interrupted run)."""
        prefetch = self._prefetch
        if prefetch is not None and not prefetch.is_own_thread():
            self._prefetch = None
            if cancel:
                prefetch.cancel()
            prefetch.join()

    def ensure_free(self, working_bytes: int, keep: Sequence[str]) -> None:
        """Before a large allocation: unless placement is "gpu", move stages other than `keep` off the GPU
        (largest first) until `working_bytes` plus headroom are free."""
        if self.device.type != "cuda" or self.placement == "gpu":
            return
        self._release_until_free(working_bytes, keep, f"{working_bytes / GB:.1f} GB of working memory")

    def _release_until_free(self, needed: int, keep: Sequence[str], purpose: str) -> None:
        """Move stages other than `keep` off the GPU, largest first, until `needed` bytes plus headroom are free."""
        for name in sorted((n for n in STAGES if n not in keep and self.on_device(n)), key=self.stage_nbytes,
                           reverse=True):
            if free_bytes(self.device) >= needed + HEADROOM_BYTES:
                break
            log.info("moving the %s stage off the GPU to make room for %s (%.1f GB needed, %.1f GB free)", name,
                     purpose, needed / GB, free_bytes(self.device) / GB)
            self.release(name)

    def check(self, names: Sequence[str] = STAGES) -> None:
        """Everything about these stages' files that can be known without reading a weight: configs, shard
        indexes, every shard's header (truncated files), keys and shapes against the modules built on the meta
        device. CheckpointError names the first problem."""
        for name in names:
            self._meta_module(name)

    def _loader_options(self, name: str) -> dict:
        options = {"compile": self.compile} if name in _COMPILED_STAGES else {}
        if name in _FP8_STAGES:
            options["weights"] = self.weights
        return options

    def _meta_module(self, name: str) -> torch.nn.Module:
        """The stage built on the meta device with every file check of a real load (cached)."""
        module = self._meta.get(name)
        if module is None:
            module = self._meta[name] = _LOADERS[name](self.checkpoint.root, "meta", self.dtype, dry_run=True,
                                                       **self._loader_options(name))
        return module

    def _make_room(self, names: Sequence[str], weights_needed: int, working_bytes: int) -> None:
        needed = weights_needed + working_bytes
        others = [name for name in STAGES if name not in names and self.on_device(name)]
        if self.placement == "sequential":
            for name in others:
                self.release(name)
        elif self.placement == "auto":
            if others and free_bytes(self.device) >= needed + HEADROOM_BYTES:
                log.info("placement auto: %s fit beside the stages already on the GPU (%.1f GB needed, %.1f GB "
                         "free)", "+".join(names), needed / GB, free_bytes(self.device) / GB)
            self._release_until_free(needed, names, "+".join(names))
        free = free_bytes(self.device)
        if free < weights_needed:
            raise out_of_memory_error(f"the {'+'.join(names)} weights", self.device, needed_bytes=weights_needed)
        if free < needed:
            log.warning("%s: %.1f GB free on %s for an estimated %.1f GB; this run may run out of memory",
                        "+".join(names), free / GB, self.device, needed / GB)

    def release(self, name: str) -> None:
        """Take a stage off the GPU: into its host copy when the host has room (made the first time, free
        afterwards), else dropped (read from the files again when next needed)."""
        self.finish_prefetch()
        module = self._modules.get(name)
        if module is None or not self.on_device(name) or self.device.type != "cuda":
            return
        weights = self._host_copy(name)
        if weights is None:
            self.unload(name)
            log.info("dropped %s weights from the GPU (no room on the host for a copy; they are read from the "
                     "files when next needed)", STAGE_TITLES[name])
            return
        start, copied = time.perf_counter(), not weights.has_host_copy
        weights.to_host()
        _empty_cache(self.device)
        log.info("moved %s weights off the GPU in %.1f s%s", STAGE_TITLES[name], time.perf_counter() - start,
                 f" (a {'page-locked' if weights.pinned else 'pageable'} host copy made)" if copied else "")

    def _host_copy(self, name: str) -> StageWeights | None:
        """The stage's mover to and from its host copy, or None when the host has no room for a copy."""
        weights = self._weights.get(name)
        if weights is None:
            plan = host_copy_plan(self.stage_nbytes(name))
            if plan is None:
                return None
            weights = self._weights[name] = StageWeights(self._modules[name], pin=plan == "pinned")
        return weights

    def takes_turns(self) -> bool:
        """Whether the AR and the DiT will have to take turns on the GPU: placement "sequential", or "auto" when
        the stages of one image, with room to run a 1024² one, do not fit the GPU memory we hold or could get."""
        if self.device.type != "cuda" or self.placement == "gpu":
            return False
        if self.placement == "sequential":
            return True
        stages = ("ar", "glyph", "dit", "vae")
        needed = (sum(self.stage_nbytes(name) for name in stages) + HEADROOM_BYTES
                  + estimated_working_bytes("dit", height=1024, width=1024))
        held = sum(self.stage_nbytes(name) for name in STAGES if self.on_device(name))
        return needed > free_bytes(self.device) + held

    def on_device(self, name: str) -> bool:
        module = self._modules.get(name)
        return module is not None and _module_device(module) == self.device

    def stage_nbytes(self, name: str) -> int:
        """Bytes a stage's weights take on the device (FP8 layers included; from the meta-built module, nothing read)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        if name not in self._nbytes:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            total = 0
            for key, tensor in self._meta_module(name).state_dict().items():
                if tensor.dtype == torch.float8_e4m3fn or key.endswith(".weight_scale") or not tensor.is_floating_point():
                    total += tensor.numel() * tensor.element_size()  # stored as built (e4m3, fp32 scales, ints)
                else:
                    total += tensor.numel() * itemsize  # loaded in the model dtype
            self._nbytes[name] = total
        return self._nbytes[name]

    def offload(self, stage: str | None = None) -> None:
        """Move a stage's weights (or all stages') off the GPU (see `release`)."""
        for name in [stage] if stage else list(self._modules):
            self.release(name)

    def unload(self, stage: str | None = None) -> None:
        """Drop a stage's weights (or all) and their host copies; they are read from disk again when next needed."""
        self.finish_prefetch()
        for name in [stage] if stage else list(self._modules):
            self._modules.pop(name, None)
            self._weights.pop(name, None)
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


def _seconds_since(start: float, device: torch.device) -> float:
    """Wall seconds since `start` once this thread's stream has finished the work queued on it so far (not the
    whole device: a prefetch's loads must not wait for the AR beside them)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter() - start


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

    @property
    def reference_tokens(self) -> int:
        """AR tokens the references take in all (one per 32x32 patch of each)."""
        return sum(h * w for h, w in self.reference_grids)


def encode_prompt(model: GlmImage, prompt: str, width: int, height: int,
                  references: Sequence = ()) -> Conditioning:
    """Check the request, bring each reference to a size both stages accept (spec §4) and tokenize the
    references with the vision stage (one pass for all of them); a prompt alone needs no weights."""
    check_prompt(prompt)
    validate_target_size(height, width)
    adjusted = [adjust_reference_size(image) for image in references]
    cond = Conditioning(prompt=prompt, width=int(width), height=int(height), references=adjusted)
    if adjusted:
        pixels = [model.processor.preprocess_image(image) for image in adjusted]
        cond.reference_grids = [grid for _, grid in pixels]
        model.prepare(["vision"], estimated_working_bytes("vision", height=height, width=width))
        with gpu_released_on_error("encoding the reference images", model.device):
            ids = model.stage("vision").image_token_ids(torch.cat([rows for rows, _ in pixels]),
                                                        cond.reference_grids)
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
                    progress: Progress | None = None, interrupt: Interrupt | None = None,
                    prefetch_decode: bool = False) -> PriorTokens:
    """Sample the semantic token grid(s); item i of the batch uses seed + i. Unset sampling values come from
    the checkpoint's generation config (`GlmImage.sampling_defaults`).

    prefetch_decode: while the AR decodes, load the decode stages and warm the DiT's compiled graph for this
    conditioning on a side thread, where they fit beside the AR (`glm_core.prefetch`); `decode` waits for it."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    settings = sampling_settings(model, temperature, top_p, top_k)
    inputs = model.processor.build_inputs([cond.prompt] * batch_size, cond.height, cond.width,
                                          [cond.reference_grids] * batch_size)
    if cond.reference_ids:
        inputs.reference_ids = torch.cat([ids.flatten() for ids in cond.reference_ids]).repeat(batch_size)
    seeds = [seed + i for i in range(batch_size)]
    model.prepare(["ar"], estimated_working_bytes("ar", height=cond.height, width=cond.width, batch=batch_size,
                                                  reference_tokens=cond.reference_tokens))
    prefetch = DecodePrefetch(model, cond, batch_size) if prefetch_decode else None
    start = time.perf_counter()
    try:
        with gpu_released_on_error("sampling the AR tokens", model.device):
            grid_ids = generate_grids(model.stage("ar"), inputs, seeds=seeds, sampling_settings=settings,
                                      progress=progress, interrupt=interrupt,
                                      on_steady=None if prefetch is None else lambda: model.start_prefetch(prefetch))
    except BaseException:
        model.finish_prefetch(cancel=True)  # no thread outlives a failed or interrupted run
        raise
    seconds = _seconds_since(start, model.device)
    log.info("AR: the %dx%d token grid%s sampled in %.1f s", grid_ids.shape[1], grid_ids.shape[2],
             f" of {batch_size} images" if batch_size > 1 else "", seconds)
    return PriorTokens(grid_ids=grid_ids, height=cond.height, width=cond.width,
                       reference_sizes=cond.reference_sizes, seeds=seeds)


# -- DiT stage ---------------------------------------------------------------------------------------


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
    device = model.device
    batch = tokens.grid_ids.shape[0]
    if interrupt is not None:
        interrupt()
    model.prepare(["glyph", "dit", "vae"], estimated_working_bytes(
        "dit", height=cond.height, width=cond.width, batch=batch, reference_tokens=cond.reference_tokens))
    with gpu_released_on_error("decoding the image", device):
        return _decode(model, cond, tokens, steps, guidance, seed, progress, interrupt, on_step, latents)


def _decode(model, cond, tokens, steps, guidance, seed, progress, interrupt, on_step, latents) -> torch.Tensor:
    device, dtype = model.device, model.dtype
    batch = tokens.grid_ids.shape[0]
    glyph = model.stage("glyph")
    glyph_embeds = glyph.encode([cond.prompt] * batch, dtype=dtype)
    negative_embeds = glyph.encode_negative(batch, dtype=dtype) if uses_guidance(guidance) else None
    vae = model.stage("vae")
    dit = model.stage("dit")

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

    start = time.perf_counter()
    denoised = denoise(dit, latents, dit_cond, timesteps, sigmas, guidance, on_step=after_step)
    model.decode_graphs_run.add((batch, bool(cond.references)))
    log.info("DiT: %d steps in %.1f s", steps, _seconds_since(start, device))
    dit_cond = latents = None  # the reference K/V can be GBs: free them before the VAE's large activations
    if model.takes_turns():
        # The next image's AR needs the DiT's room anyway, and leaving costs no copy (its host copy was made at
        # load): the VAE decodes without the DiT beside it, so an image's peak is one stage's, not the DiT's plus
        # the VAE's activations (1024² under a 24 GB cap: 19.28 GB reserved instead of 22.06, H200). Only a decode
        # of the same tokens again pays the copy back.
        model.release("dit")
    # At large sizes the VAE decoder needs more than the DiT leaves free on a small card.
    model.ensure_free(VAE_DECODE_BYTES_PER_PIXEL * cond.height * cond.width * batch, keep=["vae"])
    if model.placement != "gpu":
        # Where the card is short, the DiT's cached activation blocks go back before the VAE's larger ones are
        # made, so the process holds what the VAE needs rather than both (PyTorch frees its cache only at a cap).
        _empty_cache(device)
    start = time.perf_counter()
    images = postprocess(vae.decode_latents(denoised.to(vae.dtype)))
    log.info("VAE: decoded in %.1f s", time.perf_counter() - start)  # postprocess ends on the CPU: synchronised
    return images


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
    # Every file of every stage this call runs, before the AR spends minutes on tokens the DiT cannot decode.
    model.check(["ar", "glyph", "dit", "vae"] + (["vision"] if len(references) else []))
    cond = encode_prompt(model, prompt, width, height, references)
    tokens = generate_tokens(model, cond, seed=ar_seed, temperature=temperature, top_p=top_p, top_k=top_k,
                             batch_size=batch_size, progress=ar_progress, interrupt=interrupt, prefetch_decode=True)
    return decode(model, cond, tokens, steps=steps, guidance=guidance, seed=seed, progress=dit_progress,
                  interrupt=interrupt)
