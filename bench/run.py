"""Side-by-side speed benchmark: glm_core against the reference (transformers / diffusers) at
GLM-Image's real configuration, random bf16 weights built directly on the GPU, in one command.

    python -m bench.run --out DIR            # full size, one GPU, < 10 minutes on an H100
    python -m bench.run --tiny               # same code paths at the tiny configuration, CPU, seconds
    python -m bench.run --only ar,dit        # phases: ar, dit, vae (the ceilings always run first)
    python -m bench.run --model FOLDER       # real weights from a GLM-Image folder (reference loads them,
                                             # ours shares the very same tensors)

Phases run one at a time and free the GPU in between: ceilings (matmul TFLOP/s, copy GB/s), then
for each of AR, DiT, VAE: build the reference with random weights, give ours the same tensors,
time ours, time the reference. A phase that fails or runs out of its share of the time budget is
recorded and the next one runs; bench.json / bench.md are rewritten after every measurement.

How each figure is measured (also written into the output's notes):
- AR, ours: whole `generate_tokens` calls (prefill + every decode step, CUDA graph capture
  included). ms/token = (T(1024², 1281 tokens) − T(512², 513 tokens)) / 768; batch 4 likewise from
  512² and 256² generations with 4 sequences (ms per decode step, each step emits 4 tokens).
- AR, reference: `generate(min_new_tokens = max_new_tokens)` so random weights cannot stop early;
  ms/token = (T(long) − T(short)) / (long − short) as in baseline-h100.md; the whole 1024²
  generation is *extrapolated*: T(short) + (1281 − short) · ms/token.
- Prefill: prompt → first logits with the KV cache filled (reference: `forward(use_cache=True)`
  incl. the vision encoder + VQ for the editing prompt; ours: prepare_prompt + setup_caches + prefill).
- DiT: one guided step = conditional (64 glyph tokens) + unconditional (1 glyph token, prior dropped)
  + guidance + Euler update; with a reference, its K/V are written once (timed separately) and read by
  the conditional pass only.
- End to end: composed as AR(1281 tokens) + 50 DiT steps + VAE decode (glyph encoder not included).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness, models, workloads  # noqa: E402
from bench.harness import Deadline, PhaseRunner, Report, fmt, log, measure, peak_gb, reset_peak  # noqa: E402

BF16 = torch.bfloat16

# Share of the whole time budget each phase may use at most (the rest is start-up and slack).
PHASE_SHARE = {
    "ceilings": 0.04,
    "ar.build": 0.05, "ar.ours": 0.22, "ar.reference": 0.26,  # the reference AR is ~2.3x slower on an H100
    "dit.build": 0.03, "dit.ours": 0.16, "dit.reference": 0.10,  # ours includes ~30 s of torch.compile
    "vae.build": 0.02, "vae.ours": 0.04, "vae.reference": 0.04,
}

# (label, key, unit, floor key) rows of the printed table; floors are computed in `summarise`.
TABLE_ROWS = [
    ("AR decode, batch 1", "ar_ms_per_token", "ms/token", "ar_ms_per_token"),
    ("AR decode, batch 4 (per step of 4 tokens)", "ar_ms_per_token_batch4", "ms/step", "ar_ms_per_token"),
    ("AR whole t2i 1024² (1281 tokens)", "ar_s_t2i_1024", "s", "ar_s_t2i_1024"),
    ("AR prefill, t2i prompt (~101 tokens)", "ar_prefill_s_t2i", "s", None),
    ("AR prefill, edit prompt + one 1024² ref", "ar_prefill_s_edit_1024", "s", None),
    ("DiT guided step 1024²", "dit_s_per_step_1024", "s", "dit_s_per_step_1024"),
    ("DiT guided step 2048²", "dit_s_per_step_2048", "s", "dit_s_per_step_2048"),
    ("DiT guided step 1024² + one 1024² ref", "dit_s_per_step_edit_1024", "s", "dit_s_per_step_edit_1024"),
    ("DiT reference K/V write, 1024² ref", "dit_s_reference_write_1024", "s", None),
    ("VAE decode 1024²", "vae_decode_s_1024", "s", None),
    ("VAE decode 2048²", "vae_decode_s_2048", "s", None),
    ("VAE encode 1024² ref", "vae_encode_s_1024", "s", None),
    ("End to end t2i 1024², 50 steps (composed)", "e2e_s_t2i_1024", "s", "e2e_s_t2i_1024"),
    ("Peak GPU memory, AR phase", "peak_gb_ar", "GB", None),
    ("Peak GPU memory, DiT phase", "peak_gb_dit", "GB", None),
    ("Peak GPU memory, VAE phase", "peak_gb_vae", "GB", None),
]

REQUIRED_KEYS = ["ar_ms_per_token", "ar_ms_per_token_batch4", "ar_s_t2i_1024", "ar_prefill_s_edit_1024",
                 "dit_s_per_step_1024", "dit_s_per_step_2048", "dit_s_per_step_edit_1024", "vae_decode_s_1024",
                 "vae_decode_s_2048", "e2e_s_t2i_1024", "peak_gb_ar", "peak_gb_dit"]


# --------------------------------------------------------------------------------------------
# Context shared by the phases


class Bench:
    def __init__(self, args, device: torch.device, report: Report, deadline: Deadline):
        self.args, self.device, self.report, self.deadline = args, device, report, deadline
        self.configs = models.configs_for(args)
        self.folder = Path(args.model) if args.model else None
        self.sizes = workloads.TINY_SIZES if args.tiny else workloads.Sizes()
        self.gen = torch.Generator().manual_seed(args.seed)
        self.reps = args.reps

    def record(self, side: str, key: str, value, detail=None) -> None:
        self.report.set(f"{side}.{key}", value)
        if detail is not None:
            self.report.set(f"details.{side}.{key}", detail)
        log(f"  {side:9s} {key} = {fmt(value, 4)}", self.deadline)

    def timed(self, run, setup, clock: Deadline, *, warmup: int = 1, share: float = 0.3, reps: int | None = None):
        """measure() with at most `share` of what is left of the phase for the timed runs."""
        reps = self.reps if reps is None else min(reps, self.reps)
        return measure(run, device=self.device, setup=setup, warmup=warmup, reps=reps,
                       max_s=max(clock.remaining() * share, 0.0), deadline=clock)

    def peak(self, side: str, key: str) -> None:
        value = peak_gb(self.device)
        if value is not None:
            self.record(side, key, round(value, 3))


# --------------------------------------------------------------------------------------------
# Ceilings


def phase_ceilings(b: Bench, clock: Deadline) -> None:
    if b.args.tiny or b.device.type != "cuda":
        tflops = harness.matmul_tflops(b.device, n=512, reps=5)
        gbps = harness.copy_gbps(b.device, nbytes=64 << 20, reps=5)
    else:
        tflops = harness.matmul_tflops(b.device)
        gbps = harness.copy_gbps(b.device)
    b.report.set("ceilings", {"matmul_tflops": float(f"{tflops:.4g}"), "copy_gbps": float(f"{gbps:.4g}")})
    log(f"  ceilings: matmul {tflops:.1f} TFLOP/s (bf16 8192³), copy {gbps:.1f} GB/s (read + write)", b.deadline)


# --------------------------------------------------------------------------------------------
# AR


def build_pair(b: Bench, group: str, make_reference, make_ours) -> dict:
    """The reference with random weights, then ours on the same tensors. If ours cannot be built the
    error is recorded and the reference is still measured (its phase runs; ours' phase fails)."""
    ref = make_reference()
    held = {"ref": ref, "ours": None}
    try:
        held["ours"] = make_ours(ref)
    except Exception as exc:  # noqa: BLE001 — recorded; the reference's numbers are still wanted
        b.report.error(f"{group}.build (ours)", exc, traceback.format_exc())
        log(f"  {group}: glm_core model could not be built: {type(exc).__name__}: {exc}", b.deadline)
    log(f"  {group} built: {models.parameter_bytes(ref) / 1e9:.2f} GB of bf16 weights"
        f"{', shared by both' if held['ours'] is not None else ' (reference only)'}", b.deadline)
    return held


def ours_model(h: dict):
    if h.get("ours") is None:
        raise RuntimeError("glm_core's model could not be built (see the build error); nothing to time")
    return h["ours"]


def build_ar(b: Bench) -> dict:
    return build_pair(b, "ar", lambda: models.reference_ar(b.configs.ar, b.device, BF16, b.args.seed, b.folder),
                      lambda ref: models.ours_ar(b.configs.ar, ref, b.device))


def ar_ours(b: Bench, h: dict, clock: Deadline) -> None:
    from glm_core.ar.decode import generate_tokens, prefill, prepare_prompt, setup_caches

    model, s, cfg = ours_model(h), b.sizes, b.configs.ar
    reset_peak(b.device)

    def generation(size: int, batch: int):
        expected = {}

        def setup():
            prompt = workloads.ar_prompt(cfg, size, size, generator=b.gen, preview_side=s.preview)
            expected["n"] = prompt.num_new_tokens
            return prompt

        def run(prompt):  # what glm_core.pipeline.generate_tokens runs
            tokens = generate_tokens(model, prompt.ours_inputs(), seeds=[b.args.seed + i for i in range(batch)])
            th, tw = prompt.target_grid
            if tuple(tokens.grid_ids.shape) != (batch, th, tw):
                raise RuntimeError(f"generate_tokens returned a grid {tuple(tokens.grid_ids.shape)}, expected "
                                   f"{(batch, th, tw)}")
        return setup, run, expected

    # 1. the whole 1024² text-to-image generation, batch 1
    setup, run, n_hi = generation(s.ar_t2i, 1)
    t_hi = b.timed(run, setup, clock, share=0.3, reps=3)
    b.record("ours", "ar_s_t2i_1024", t_hi.median, t_hi.as_dict() | {"tokens": n_hi["n"]})
    # 2. per-token from a shorter generation
    setup, run, n_lo = generation(s.ar_t2i_small, 1)
    t_lo = b.timed(run, setup, clock, share=0.2, reps=3, warmup=0)  # same shapes as above: already warm
    b.record("ours", "ar_ms_per_token", 1e3 * (t_hi.median - t_lo.median) / (n_hi["n"] - n_lo["n"]),
             {"method": f"(T({n_hi['n']} tokens) - T({n_lo['n']} tokens)) / {n_hi['n'] - n_lo['n']}",
              "short_generation": t_lo.as_dict()})
    # 3. prefill, text-to-image and editing with one reference
    for key, reference in (("ar_prefill_s_t2i", None), ("ar_prefill_s_edit_1024", (s.ar_reference,) * 2)):
        def setup(reference=reference):
            return workloads.ar_prompt(cfg, s.ar_t2i, s.ar_t2i, reference=reference, generator=b.gen,
                                       preview_side=s.preview)

        def run(prompt):
            plan = prepare_prompt(model, prompt.ours_inputs())
            cache = setup_caches(model, plan.input_ids.shape[0], plan.input_ids.shape[1] + plan.num_new_tokens)
            prefill(model, plan, cache)

        t = b.timed(run, setup, clock, share=0.1, warmup=2)
        b.record("ours", key, t.median, t.as_dict())
    # 4. batch 4 (one prompt, four seeds), per decode step
    small = max(s.ar_t2i_small // 2, 32)
    setup, run, n4_hi = generation(s.ar_t2i_small, 4)
    t4_hi = b.timed(run, setup, clock, share=0.4, reps=3)
    setup, run, n4_lo = generation(small, 4)
    t4_lo = b.timed(run, setup, clock, share=0.5, reps=3, warmup=0)
    b.record("ours", "ar_ms_per_token_batch4", 1e3 * (t4_hi.median - t4_lo.median) / (n4_hi["n"] - n4_lo["n"]),
             {"method": f"batch 4: (T({n4_hi['n']} tokens) - T({n4_lo['n']} tokens)) / "
                        f"{n4_hi['n'] - n4_lo['n']}", "long": t4_hi.as_dict(), "short": t4_lo.as_dict()})
    b.peak("ours", "peak_gb_ar")


def ar_reference(b: Bench, h: dict, clock: Deadline) -> None:
    model, s, cfg = h["ref"], b.sizes, b.configs.ar
    eos = int(cfg["text_config"].get("eos_token_id", 16385))
    reset_peak(b.device)

    def prompt_setup(size, reference=None, batch=1):
        return lambda: workloads.ar_prompt(cfg, size, size, reference=reference, batch=batch, generator=b.gen,
                                           preview_side=s.preview)

    def generate(n: int):
        def run(prompt):
            torch.manual_seed(b.args.seed)
            out = model.generate(**prompt.reference_kwargs(b.device), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=True, temperature=0.9, top_p=0.75, top_k=50,
                                 pad_token_id=eos, eos_token_id=eos)
            if out.shape[1] != prompt.input_ids.shape[1] + n:
                raise RuntimeError(f"reference generate returned {out.shape[1] - prompt.input_ids.shape[1]} "
                                   f"new tokens, expected {n}")
        return run

    def forward(prompt):
        model(**prompt.reference_kwargs(b.device), use_cache=True, logits_to_keep=1)

    # 1. prefill, text-to-image
    t = b.timed(forward, prompt_setup(s.ar_t2i), clock, share=0.05, warmup=2)
    b.record("reference", "ar_prefill_s_t2i", t.median, t.as_dict())
    # 2. decode, batch 1: (T(long) - T(short)) / (long - short); whole generation extrapolated
    short, long = s.ref_decode_short, s.ref_decode_long
    t_short = b.timed(generate(short), prompt_setup(s.ar_t2i), clock, share=0.1, reps=3)
    t_long = b.timed(generate(long), prompt_setup(s.ar_t2i), clock, share=0.3, reps=3, warmup=0)
    per_token = (t_long.median - t_short.median) / (long - short)
    b.record("reference", "ar_ms_per_token", 1e3 * per_token,
             {"method": f"(T({long}) - T({short})) / {long - short} new tokens, generate(min_new_tokens="
                        "max_new_tokens)", "short": t_short.as_dict(), "long": t_long.as_dict()})
    n_full = workloads.ar_prompt(cfg, s.ar_t2i, s.ar_t2i, preview_side=s.preview).num_new_tokens
    b.record("reference", "ar_s_t2i_1024", t_short.median + (n_full - short) * per_token,
             {"method": f"extrapolated: T({short}) + ({n_full} - {short}) * ms/token", "extrapolated": True})
    # 3. prefill, editing with one reference image (vision encoder + VQ + LM prefill)
    t = b.timed(forward, prompt_setup(s.ar_t2i, (s.ar_reference,) * 2), clock, share=0.1, warmup=2)
    b.record("reference", "ar_prefill_s_edit_1024", t.median, t.as_dict())
    # 4. decode, batch 4
    t4_short = b.timed(generate(short), prompt_setup(s.ar_t2i, batch=4), clock, share=0.2, reps=3)
    t4_long = b.timed(generate(long), prompt_setup(s.ar_t2i, batch=4), clock, share=0.6, reps=3, warmup=0)
    b.record("reference", "ar_ms_per_token_batch4", 1e3 * (t4_long.median - t4_short.median) / (long - short),
             {"method": f"batch 4: (T({long}) - T({short})) / {long - short}", "short": t4_short.as_dict(),
              "long": t4_long.as_dict()})
    b.peak("reference", "peak_gb_ar")


# --------------------------------------------------------------------------------------------
# DiT


def build_dit(b: Bench) -> dict:
    return build_pair(b, "dit",
                      lambda: models.reference_dit(b.configs.dit, b.device, BF16, b.args.seed + 1, b.folder),
                      lambda ref: models.ours_dit(b.configs.dit, ref, b.device))


SIGMA, SIGMA_NEXT = 0.5, 0.48  # any two sigmas: the Euler update's cost does not depend on them


def _dit_setup(b: Bench, size: int):
    def setup():
        x = workloads.dit_inputs(b.configs.dit, size, size, glyph_tokens=b.sizes.glyph_tokens, generator=b.gen)
        for name in ("latents", "glyph", "negative_glyph", "prior_ids"):
            setattr(x, name, getattr(x, name).to(b.device))
        return x
    return setup


def _reference_latent(b: Bench):
    r = b.sizes.dit_reference
    latent = workloads.dit_inputs(b.configs.dit, r, r, glyph_tokens=1, generator=b.gen).latents.to(b.device)
    codebook = int(b.configs.dit["prior_vq_quantizer_codebook_size"])
    prior = workloads.upsampled_prior(r // 32, r // 32, codebook, b.gen).to(b.device)
    return latent, prior, (r, r)


def dit_ours(b: Bench, h: dict, clock: Deadline) -> None:
    from glm_core.schedule import euler_step

    dit, s = ours_model(h), b.sizes
    reset_peak(b.device)

    def step(x, reference_kv=None, **options):  # one iteration of glm_core.pipeline.decode's loop
        timestep = torch.full((1,), x.timestep, device=b.device)
        velocity = dit.predict_velocity(x.latents.to(dit.dtype), x.glyph.to(dit.dtype),
                                        x.negative_glyph.to(dit.dtype), x.prior_ids, timestep,
                                        (x.height, x.width), guidance=s.guidance, reference_kv=reference_kv,
                                        **options)
        euler_step(x.latents, velocity, SIGMA, SIGMA_NEXT)

    t = b.timed(step, _dit_setup(b, s.dit_1), clock, share=0.15, warmup=2)
    b.record("ours", "dit_s_per_step_1024", t.median, t.as_dict())
    latent, prior, size = _reference_latent(b)
    holder = {}

    def write(_):
        holder["kv"] = dit.encode_references([latent], [prior], [size])

    t = b.timed(write, None, clock, share=0.05, warmup=1, reps=3)
    b.record("ours", "dit_s_reference_write_1024", t.median, t.as_dict())
    t = b.timed(lambda x: step(x, holder["kv"]), _dit_setup(b, s.dit_1), clock, share=0.2, warmup=1)
    b.record("ours", "dit_s_per_step_edit_1024", t.median, t.as_dict())
    holder.clear()
    t = b.timed(step, _dit_setup(b, s.dit_2), clock, share=0.6, warmup=1, reps=3)
    b.record("ours", "dit_s_per_step_2048", t.median, t.as_dict())
    # the other CFG mode of predict_velocity, for the record (the pipeline uses the default)
    t = b.timed(lambda x: step(x, batched_cfg=not _default_batched_cfg()), _dit_setup(b, s.dit_1), clock,
                share=0.5, warmup=1, reps=3)
    b.record("ours", f"dit_s_per_step_1024_batched_cfg_{not _default_batched_cfg()}".lower(), t.median, t.as_dict())
    b.peak("ours", "peak_gb_dit")


def _default_batched_cfg() -> bool:
    import inspect

    from glm_core.dit.model import GlmImageDiT

    return bool(inspect.signature(GlmImageDiT.predict_velocity).parameters["batched_cfg"].default)


def dit_reference(b: Bench, h: dict, clock: Deadline) -> None:
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    dit, s = h["ref"], b.sizes
    reset_peak(b.device)

    def setup_for(size):
        base = _dit_setup(b, size)

        def setup():
            x = base()
            ids = x.prior_ids
            # built once outside the loop, as the pipeline does (pipeline_glm_image.py L950-L985)
            x.extra = {
                "latent_in": None,
                "drop_cond": torch.zeros_like(ids, dtype=torch.bool),
                "drop_uncond": torch.ones_like(ids, dtype=torch.bool),
                "target": torch.tensor([[size, size]], dtype=BF16, device=b.device),
                "crop": torch.zeros(1, 2, dtype=BF16, device=b.device),
                "glyph": x.glyph.to(BF16), "negative": x.negative_glyph.to(BF16),
                "timestep": torch.full((1,), x.timestep, device=b.device),
            }
            return x
        return setup

    def step(x, kv=None):
        e = x.extra
        latent_in = x.latents.to(BF16)
        common = dict(hidden_states=latent_in, prior_token_id=x.prior_ids, timestep=e["timestep"],
                      target_size=e["target"], crop_coords=e["crop"], return_dict=False)
        if kv is not None:
            kv.set_mode("read")
        cond = dit(encoder_hidden_states=e["glyph"], prior_token_drop=e["drop_cond"], kv_caches=kv,
                   **common)[0].float()
        if kv is not None:
            kv.set_mode("skip")
        uncond = dit(encoder_hidden_states=e["negative"], prior_token_drop=e["drop_uncond"], kv_caches=kv,
                     **common)[0].float()
        velocity = uncond + s.guidance * (cond - uncond)
        x.latents.float() + (SIGMA_NEXT - SIGMA) * velocity

    t = b.timed(step, setup_for(s.dit_1), clock, share=0.15, warmup=2)
    b.record("reference", "dit_s_per_step_1024", t.median, t.as_dict())
    latent, prior, size = _reference_latent(b)
    kv = GlmImageKVCache(num_layers=int(b.configs.dit["num_layers"]))
    text_dim = int(b.configs.dit["text_embed_dim"])

    def write(_):  # pipeline_glm_image.py L909-L948, one reference
        kv.clear()
        kv.set_mode("write")
        dit(hidden_states=latent.to(BF16), encoder_hidden_states=torch.zeros(1, 0, text_dim, dtype=BF16,
                                                                             device=b.device),
            prior_token_id=prior, prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
            timestep=torch.zeros((1,), device=b.device), target_size=torch.tensor([size], device=b.device),
            crop_coords=torch.zeros((1, 2), device=b.device), kv_caches=kv)

    t = b.timed(write, None, clock, share=0.05, warmup=1, reps=3)
    b.record("reference", "dit_s_reference_write_1024", t.median, t.as_dict())
    t = b.timed(lambda x: step(x, kv), setup_for(s.dit_1), clock, share=0.2, warmup=1)
    b.record("reference", "dit_s_per_step_edit_1024", t.median, t.as_dict())
    kv.clear()
    t = b.timed(step, setup_for(s.dit_2), clock, share=0.8, warmup=1, reps=3)
    b.record("reference", "dit_s_per_step_2048", t.median, t.as_dict())
    b.peak("reference", "peak_gb_dit")


# --------------------------------------------------------------------------------------------
# VAE


def build_vae(b: Bench) -> dict:
    return build_pair(b, "vae",
                      lambda: models.reference_vae(b.configs.vae, b.device, BF16, b.args.seed + 2, b.folder),
                      lambda ref: models.ours_vae(b.configs.vae, ref, b.device))


def _vae_phase(b: Bench, side: str, decode, encode, clock: Deadline) -> None:
    s = b.sizes
    reset_peak(b.device)

    def latents(size):
        return lambda: workloads.vae_latents(b.configs.vae, size, size, b.gen).to(b.device)

    t = b.timed(decode, latents(s.vae_1), clock, share=0.2, warmup=2)
    b.record(side, "vae_decode_s_1024", t.median, t.as_dict())
    t = b.timed(encode, lambda: workloads.vae_images(s.vae_1, s.vae_1, b.gen).to(b.device), clock, share=0.2,
                warmup=1)
    b.record(side, "vae_encode_s_1024", t.median, t.as_dict())
    t = b.timed(decode, latents(s.vae_2), clock, share=0.8, warmup=1, reps=3)
    b.record(side, "vae_decode_s_2048", t.median, t.as_dict())
    b.peak(side, "peak_gb_vae")


def vae_ours(b: Bench, h: dict, clock: Deadline) -> None:
    vae = ours_model(h)
    _vae_phase(b, "ours", lambda z: vae.decode_latents(z), lambda x: vae.encode_latents(x), clock)


def vae_reference(b: Bench, h: dict, clock: Deadline) -> None:
    vae = h["ref"]
    mean, std = workloads.latent_stats(b.configs.vae, b.device, BF16)

    def decode(z):  # pipeline_glm_image.py L1057-L1067
        vae.decode(z.to(BF16) * std + mean, return_dict=False)

    def encode(x):  # pipeline_glm_image.py L930-L934
        latent = vae.encode(x.to(BF16)).latent_dist.mode()
        (latent - mean) / std

    _vae_phase(b, "reference", decode, encode, clock)


# --------------------------------------------------------------------------------------------
# Summary: composed end to end, floors, table


def summarise(b: Bench) -> None:
    data, s = b.report.data, b.sizes
    for side in ("ours", "reference"):
        d = data.setdefault(side, {})
        parts = [d.get("ar_s_t2i_1024"), d.get("dit_s_per_step_1024"), d.get("vae_decode_s_1024")]
        if all(isinstance(p, (int, float)) for p in parts):
            d["e2e_s_t2i_1024"] = parts[0] + s.steps * parts[1] + parts[2]
        for key in REQUIRED_KEYS:
            d.setdefault(key, None)
    ceilings = data.get("ceilings") or {}
    floors = {}
    if ceilings.get("copy_gbps") and ceilings.get("matmul_tflops"):
        bw, rate = ceilings["copy_gbps"] * 1e9, ceilings["matmul_tflops"] * 1e12
        cfg_ar, cfg_dit = b.configs.ar, b.configs.dit
        per_token = workloads.ar_decode_bytes(cfg_ar) / bw
        n_full = workloads.ar_prompt(cfg_ar, s.ar_t2i, s.ar_t2i, preview_side=s.preview).num_new_tokens
        ref_tokens = (s.dit_reference // 16) ** 2
        floors = {
            "ar_ms_per_token": 1e3 * per_token,
            "ar_s_t2i_1024": n_full * per_token,
            "dit_s_per_step_1024": workloads.dit_step_flops(cfg_dit, s.dit_1, s.dit_1, s.glyph_tokens) / rate,
            "dit_s_per_step_2048": workloads.dit_step_flops(cfg_dit, s.dit_2, s.dit_2, s.glyph_tokens) / rate,
            "dit_s_per_step_edit_1024": workloads.dit_step_flops(cfg_dit, s.dit_1, s.dit_1, s.glyph_tokens,
                                                                 ref_tokens) / rate,
        }
        floors["e2e_s_t2i_1024"] = floors["ar_s_t2i_1024"] + s.steps * floors["dit_s_per_step_1024"]
        floors["basis"] = {
            "ar_decode_bytes_per_step": workloads.ar_decode_bytes(cfg_ar),
            "dit_step_flops_1024": workloads.dit_step_flops(cfg_dit, s.dit_1, s.dit_1, s.glyph_tokens),
            "dit_step_flops_2048": workloads.dit_step_flops(cfg_dit, s.dit_2, s.dit_2, s.glyph_tokens),
            "note": "AR: decoder + lm_head weight bytes / measured copy bandwidth (KV-cache reads excluded); "
                    "DiT: guided-step FLOPs / measured bf16 matmul rate; e2e: AR floor + 50 DiT floors "
                    "(VAE excluded)",
        }
    data["floors"] = floors
    b.report.write()


def render_markdown(data: dict) -> str:
    lines = harness.markdown_header("GLM-Image benchmark: glm_core vs reference", data)
    ceilings = data.get("ceilings") or {}
    if ceilings:
        lines.append(f"- ceilings (measured in this run): bf16 matmul 8192³ {fmt(ceilings.get('matmul_tflops'))} "
                     f"TFLOP/s, device-to-device copy {fmt(ceilings.get('copy_gbps'))} GB/s (read + write)")
    lines += ["", table_markdown(data), ""]
    lines += harness.markdown_tail(data)
    return "\n".join(lines)


def table_rows(data: dict) -> list[list[str]]:
    ours, ref, floors = data.get("ours") or {}, data.get("reference") or {}, data.get("floors") or {}
    rows = []
    for label, key, unit, floor_key in TABLE_ROWS:
        a, r = ours.get(key), ref.get(key)
        if a is None and r is None:
            continue
        ratio = r / a if isinstance(a, (int, float)) and isinstance(r, (int, float)) and a > 0 else None
        floor = floors.get(floor_key) if floor_key else None
        frac = lambda v: f"{floor / v:.0%}" if floor and isinstance(v, (int, float)) and v > 0 else "–"  # noqa: E731
        extrapolated = (data.get("details", {}).get("reference", {}).get(key) or {}).get("extrapolated")
        rows.append([f"{label} [{unit}]", fmt(a), fmt(r) + (" (extrapolated)" if extrapolated else ""),
                     f"{ratio:.2f}×" if ratio else "–", fmt(floor), frac(a), frac(r)])
    return rows


TABLE_HEADER = ["measure", "ours", "reference", "ref/ours", "floor", "ours % of floor", "ref % of floor"]


def table_markdown(data: dict) -> str:
    rows = table_rows(data)
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def table_text(data: dict) -> str:
    rows = [TABLE_HEADER] + table_rows(data)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# --------------------------------------------------------------------------------------------
# Entry point


NOTES = [
    "Random bf16 weights at the stated configuration (speed does not depend on weight values); both "
    "implementations run the very same weight tensors.",
    "AR ours: whole generate_tokens calls (prefill + all decode steps + CUDA graph capture); ms/token "
    "= difference of a 1024² (1281 tokens) and a 512² (513 tokens) generation / 768; batch 4 from 512² "
    "and 256² generations of 4 sequences, in ms per decode step (4 tokens per step).",
    "AR reference: generate(do_sample, T=0.9, top_p=0.75, top_k=50, min_new_tokens=max_new_tokens); "
    "ms/token = (T(long) - T(short)) / (long - short) (baseline-h100.md method); its whole 1024² "
    "generation is extrapolated from that, not measured.",
    "DiT step = conditional (64 glyph tokens) + unconditional (1 glyph token, prior dropped) + CFG 1.5 + "
    "Euler update; ours = one iteration of glm_core.pipeline.decode's loop (predict_velocity with its "
    "default CFG mode, see details; the other mode is reported as an extra key).",
    "End to end is composed: AR 1024² generation + 50 DiT steps at 1024² + VAE decode 1024²; the glyph "
    "encoder (ByT5, small) and host-side pre/post-processing are not included.",
    "Ratio = reference / ours (> 1: ours is faster or smaller). Floor: AR = weight bytes / copy "
    "bandwidth; DiT = FLOPs / matmul rate, both measured at the start of this run.",
    "For comparison, baseline-h100.md (H100, 2026-11-25) measured the reference at 89.7 ms/token (batch 1), "
    "0.312 s / 1.64 s per guided DiT step at 1024² / 2048², 0.19 s VAE decode 1024², ceilings 788 TFLOP/s "
    "and 3.01 TB/s.",
    "Timing: CUDA events, warm-up first, median of the runs (count in details), fresh random inputs per "
    "run; GB = 1e9 bytes; peak = torch.cuda.max_memory_allocated after a reset, weights included.",
]


def parse_args(argv):
    p = harness.common_arguments(__doc__.split("\n\n")[0], "out/bench")
    p.add_argument("--only", default="", help="comma-separated phases among ar,dit,vae (default all); the "
                   "ceilings are always measured first")
    p.add_argument("--reps", type=int, default=5, help="timed runs per measurement (fewer if time is short)")
    return harness.parse_common(p, argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    deadline, device = harness.start_run(args)
    mode = "tiny" if args.tiny else ("checkpoint" if args.model else "full size, random weights")
    report = Report(Path(args.out) if args.out else None, "bench",
                    harness.base_meta(device, ["-m", "bench.run"] + argv, mode), render_markdown)
    for note in NOTES:
        report.data["notes"].append(note)
    versions = report.data["reference_versions"]
    log(f"GPU: {report.data['gpu']}; torch {versions['torch']} (CUDA {versions['cuda']}), transformers "
        f"{versions.get('transformers')}, diffusers {versions.get('diffusers')}", deadline)
    for warning in harness.version_warnings(versions):
        log(f"WARNING: {warning}", deadline)
        report.note(warning)
    bench = Bench(args, device, report, deadline)
    report.set("sizes", asdict(bench.sizes))
    report.set("configuration", bench.configs.source)
    selected = {p.strip() for p in args.only.split(",") if p.strip()} or None
    runner = PhaseRunner(report, deadline, device, selected)

    def cap(name):  # seconds a phase may take at most
        seconds = PHASE_SHARE[name] * args.budget_s
        if args.model and name.endswith(".build"):  # reading a real checkpoint from disk takes longer
            seconds = max(seconds, 150.0)
        return seconds

    def run_phase(name, fn):
        share = min(1.0, cap(name) / max(deadline.remaining(), 1e-3))
        return runner.run(name, lambda: fn(Deadline(cap(name))), share=share, min_s=min(20.0, cap(name) / 3))

    runner.selected = None  # the ceilings always run (seconds; the floor column needs them)
    run_phase("ceilings", lambda clock: phase_ceilings(bench, clock))
    runner.selected = selected
    # The reference runs first in each group: once ours has compiled (inductor, CUDA graphs) in this
    # process, the reference's host-bound AR generate measured 3x slower (111 vs 35 ms/token, H200).
    for group, build, parts in (
        ("ar", build_ar, (("reference", ar_reference), ("ours", ar_ours))),
        ("dit", build_dit, (("reference", dit_reference), ("ours", dit_ours))),
        ("vae", build_vae, (("reference", vae_reference), ("ours", vae_ours))),
    ):
        if not runner.wanted(group):
            continue
        runner.selected = None if selected is None else selected | {f"{group}.build", f"{group}.ours",
                                                                     f"{group}.reference"}
        held: dict = {}
        if run_phase(f"{group}.build", lambda clock, build=build: held.update(build(bench))):
            for side, fn in parts:
                run_phase(f"{group}.{side}", lambda clock, fn=fn: fn(bench, held, clock))
        held.clear()
        harness.free_memory()
        runner.selected = selected
    try:
        report.set("ours_settings", {"predict_velocity_batched_cfg_default": _default_batched_cfg()})
    except Exception as exc:  # noqa: BLE001 — informative only
        report.note(f"could not read predict_velocity's default CFG mode: {exc}")
    summarise(bench)
    ceilings = report.data.get("ceilings") or {}
    print(f"\n{report.data['gpu']}, {report.data['date']}; ceilings: bf16 matmul {fmt(ceilings.get('matmul_tflops'))} "
          f"TFLOP/s, copy {fmt(ceilings.get('copy_gbps'))} GB/s; configuration: {bench.configs.source}", flush=True)
    print(table_text(report.data), flush=True)
    return harness.finish(report, "bench", deadline)


if __name__ == "__main__":
    main()
