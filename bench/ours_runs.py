"""glm_core timed through its public API on a checkpoint folder, as every caller runs it.

A whole image is `encode_prompt` -> `generate_tokens` -> `decode` (what `glm_core.pipeline.generate` calls, the
decode's stages prepared while the AR decodes, as it does), each part timed between synchronisations; the AR figure
is that `generate_tokens` call, the decode figure that `decode` call (glyph encoder, the 50 DiT steps, VAE). The
DiT's per-step figure times `glm_core.dit.sampling.denoise`, the loop `decode` runs, for a few steps of the real
schedule and divides.

The session's first image is the process's first call (stage loads, torch.compile); every later one is warm.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import asdict, dataclass

import torch

from bench import workloads
from bench.harness import Deadline, Laps, log, measure
from glm_core.compiling import compile_seconds


@dataclass
class ImageRun:
    """Seconds of one whole image and of its parts."""

    total_s: float
    encode_s: float  # encode_prompt (the vision stage's VQ ids of the references)
    ar_s: float  # generate_tokens
    decode_s: float  # decode: glyph encoder, DiT steps, VAE
    ar_tokens: int  # tokens the AR generated per image (preview, grid and end marker)
    compile_s: float | None  # of the total, torch.compile's own time (a warm run has none)


class OursSession:
    """One `GlmImage` on the folder for the whole process (the stages stay loaded between images)."""

    def __init__(self, folder, device: torch.device, dtype: torch.dtype | None, compile_backend: str | None = None):
        self.folder, self.device, self.dtype = folder, device, dtype
        # None: glm_core decides (compiled on CUDA); a backend name forces that torch.compile backend
        # ("eager": dynamo alone, so the recompile count means something on the CPU).
        self.compile_backend = compile_backend
        self.model = None
        self.first_image_s: float | None = None
        self.warm_kinds: set[str] = set()
        self.last_tokens = None  # the PriorTokens of the last image (they condition `dit_seconds_per_step`)

    def open(self):
        from glm_core.pipeline import GlmImage

        self.model = GlmImage.from_folder(self.folder, device=self.device, dtype=self.dtype)
        if self.compile_backend is not None:
            for stage in ("ar", "dit"):
                self.model.stage(stage).compile_backend = self.compile_backend
        return self.model

    def image(self, prompt: str, size: tuple[int, int], *, seed: int, steps: int, guidance: float,
              references=(), batch: int = 1) -> ImageRun:
        from glm_core.pipeline import decode, encode_prompt, generate_tokens
        from glm_core.processor import get_target_shape

        width, height = size
        compiled_before = compile_seconds()
        laps = Laps(self.device)
        if self.model is None:
            self.open()
        cond = encode_prompt(self.model, prompt, width, height, references)
        encode_s = laps.lap()
        tokens = generate_tokens(self.model, cond, seed=seed, batch_size=batch, prefetch_decode=True)  # as generate
        ar_s = laps.lap()
        images = decode(self.model, cond, tokens, steps=steps, guidance=guidance, seed=seed)
        decode_s = laps.lap()
        if tuple(images.shape) != (batch, height, width, 3) or not bool(torch.isfinite(images).all()):
            raise RuntimeError(f"decode returned {tuple(images.shape)} (finite: {bool(torch.isfinite(images).all())}),"
                               f" expected ({batch}, {height}, {width}, 3)")
        grid_h, grid_w, preview_h, preview_w = get_target_shape(height, width)
        ar_tokens = grid_h * grid_w + 1 + (0 if references else preview_h * preview_w)
        compiled_after = compile_seconds()
        compile_s = None if None in (compiled_before, compiled_after) else compiled_after - compiled_before
        run = ImageRun(laps.total, encode_s, ar_s, decode_s, ar_tokens, compile_s)
        if self.first_image_s is None:
            self.first_image_s = run.total_s
        self.last_tokens = tokens
        return run

    def dit_seconds_per_step(self, prompt: str, size: tuple[int, int], *, steps_timed: int, total_steps: int,
                             guidance: float, reps: int, seed: int, deadline: Deadline | None = None):
        """`denoise` over the first `steps_timed` steps of the `total_steps` schedule, divided by `steps_timed`
        (median over `reps` runs, fresh noise each): the guided step of `decode`, with the prompt's glyph
        embeddings and the last image's prior tokens. Returns (Timing of the whole runs, glyph token count)."""
        from glm_core.dit.sampling import DiTConditioning, denoise, initial_noise, uses_guidance
        from glm_core.schedule import image_seq_len, timesteps_and_sigmas

        model, (width, height) = self.model, size
        tokens = self.last_tokens
        if (tokens.height, tokens.width) != (height, width):
            raise ValueError(f"the last image was {tokens.width}x{tokens.height}, not {width}x{height}: make one "
                             "at this size first (its prior tokens condition the steps)")
        glyph, dit, vae = model.stage("glyph"), model.stage("dit"), model.stage("vae")
        batch = tokens.grid_ids.shape[0]
        cond = DiTConditioning(glyph_embeds=glyph.encode([prompt] * batch, dtype=model.dtype),
                               negative_glyph_embeds=glyph.encode_negative(batch, dtype=model.dtype)
                               if uses_guidance(guidance) else None,
                               prior_ids=tokens.prior_ids.to(model.device), target_size=(height, width))
        scale = vae.config.scale_factor
        seq_len = image_seq_len(height, width, scale, dit.config.patch_size)
        timesteps, sigmas = timesteps_and_sigmas(total_steps, seq_len, model.scheduler_config)
        seeds = iter(range(seed, seed + 1000))

        def noise():
            return initial_noise(batch, dit.config.in_channels, height // scale, width // scale, next(seeds),
                                 model.device, model.dtype)

        def run(latents):
            denoise(dit, latents, cond, timesteps[:steps_timed], sigmas[: steps_timed + 1], guidance)

        timing = measure(run, device=self.device, setup=noise, warmup=1, reps=reps, deadline=deadline, wall=True)
        return timing, int(cond.glyph_embeds.shape[1])

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _median(runs: list[ImageRun], field: str) -> float:
    return statistics.median(getattr(run, field) for run in runs)


def _details(runs: list[ImageRun]) -> dict:
    return {"runs": [asdict(run) for run in runs]}


def ensure_first_image(b, session: OursSession) -> None:
    """The process's first image (loads + compile) if nothing ran yet: a t2i at the workload's size."""
    if session.first_image_s is not None:
        return
    sizes = b.sizes
    cache = b.compile_cache_state()
    run = session.image(workloads.T2I_PROMPT, sizes.t2i, seed=b.args.seed, steps=sizes.steps,
                        guidance=sizes.guidance)
    b.record("ours", "first_call_s_t2i_1024", run.total_s, {"run": asdict(run), "compile_cache_before": cache,
                                                           "weights": session.model.weights,
                                                           "placement": session.model.placement})
    session.warm_kinds.add("t2i")


def phase_ours(b, clock: Deadline) -> None:
    """First call in the process; warm t2i 1024²; the first edit in the warm process and later edits; the DiT
    per-step figure at 1024²."""
    sizes, seed, session = b.sizes, b.args.seed, b.session()
    b.reset_peak()
    ensure_first_image(b, session)
    runs = []
    for rep in range(sizes.warm_reps):
        if runs and not b.fits(clock, max(r.total_s for r in runs), "a further warm t2i run"):
            break
        runs.append(session.image(workloads.T2I_PROMPT, sizes.t2i, seed=seed + 10 + rep, steps=sizes.steps,
                                  guidance=sizes.guidance))
        b.record("ours", "e2e_s_t2i_1024", _median(runs, "total_s"), _details(runs))
    b.record("ours", "ar_s_t2i_1024", _median(runs, "ar_s"))
    b.record("ours", "ar_ms_per_token", 1e3 * _median(runs, "ar_s") / runs[0].ar_tokens)
    b.record("ours", "decode_s_t2i_1024", _median(runs, "decode_s"))

    timing, glyph_tokens = session.dit_seconds_per_step(
        workloads.T2I_PROMPT, sizes.t2i, steps_timed=sizes.dit_steps_timed, total_steps=sizes.steps,
        guidance=sizes.guidance, reps=sizes.dit_reps, seed=seed + 20, deadline=clock)
    b.record("ours", "dit_s_per_step_1024", timing.median / sizes.dit_steps_timed,
             timing.as_dict() | {"steps_per_run": sizes.dit_steps_timed, "glyph_tokens": glyph_tokens})
    b.glyph_tokens = glyph_tokens

    edits = []
    first_edit = "edit" not in session.warm_kinds
    for rep in range(1 + sizes.warm_reps):
        if edits and not b.fits(clock, max(r.total_s for r in edits), "a further edit"):
            break
        image = workloads.reference_image(*sizes.edit_reference, seed + 30 + rep)
        edits.append(session.image(workloads.EDIT_PROMPT, sizes.t2i, seed=seed + 30 + rep, steps=sizes.steps,
                                   guidance=sizes.guidance, references=[image]))
        session.warm_kinds.add("edit")
        if first_edit and len(edits) == 1:
            b.record("ours", "first_edit_s_1024", edits[0].total_s, _details(edits))
            continue
        later = edits[1:] if first_edit else edits
        if later:
            b.record("ours", "e2e_s_edit_1024", _median(later, "total_s"), _details(later))
            b.record("ours", "ar_s_edit_1024", _median(later, "ar_s"))
            if first_edit:
                b.record("ours", "first_edit_ratio", edits[0].total_s / _median(later, "total_s"),
                         {"decode_ratio": edits[0].decode_s / _median(later, "decode_s")})
    b.record("ours", "peak_gb", b.peak())


def phase_ours_large(b, clock: Deadline) -> None:
    """A whole t2i at 2048² (warm at 1024² first if this process has not run an image yet) and the DiT per-step
    figure at 2048²."""
    sizes, seed, session = b.sizes, b.args.seed, b.session()
    ensure_first_image(b, session)
    run = session.image(workloads.T2I_PROMPT, sizes.large, seed=seed + 40, steps=sizes.steps,
                        guidance=sizes.guidance)
    b.record("ours", "e2e_s_t2i_2048", run.total_s, {"run": asdict(run)})
    b.record("ours", "ar_s_t2i_2048", run.ar_s)
    b.record("ours", "decode_s_t2i_2048", run.decode_s)
    if not b.fits(clock, 3 * sizes.dit_steps_timed_large * run.decode_s / sizes.steps, "the DiT steps at 2048²"):
        return
    timing, _ = session.dit_seconds_per_step(
        workloads.T2I_PROMPT, sizes.large, steps_timed=sizes.dit_steps_timed_large, total_steps=sizes.steps,
        guidance=sizes.guidance, reps=max(1, sizes.dit_reps - 1), seed=seed + 50, deadline=clock)
    b.record("ours", "dit_s_per_step_2048", timing.median / sizes.dit_steps_timed_large,
             timing.as_dict() | {"steps_per_run": sizes.dit_steps_timed_large})
    log(f"  ours at 2048²: {run.total_s:.1f} s whole (AR {run.ar_s:.1f} s)", b.deadline)
