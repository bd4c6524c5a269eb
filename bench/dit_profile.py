"""Where one guided DiT step's time goes, kernel by kernel, against its floor, per variant, through glm_core's denoise
loop (the one the pipeline runs).

    python3 -m bench.dit_profile --model /tmp/glm-image --out $OUT [--variants bf16,fp8,fp8+fast] [--size 1024]
    python3 -m bench.dit_profile --tiny --out DIR      # the same code on the CPU, tiny checkpoint (ops, not kernels)

A variant is a weight format, optionally "+fast" (FP8 matmuls with cuBLAS's fast accumulation, `use_fast_accum`:
the tensor cores' own accumulator for the whole K instead of promoting partial sums to fp32; changes numbers, so
its velocity error against bf16 is reported beside its speed; glm_core's FP8 DiT uses it since 2026-11-30),
"+unfolded" (the FP8 MLP's GELU and its input quantisation as two passes, as before glm_core/dit/fp8_mlp.py folded
them), "+padded" (every FP8 matmul's input padded to 16 rows, as before glm_core.fp8.rows_to_pad), "+torchgelu"
(that fold's pass as inductor's fused ops instead of glm_core's Triton kernel), "+tuned" / "+mk" (inductor's
coordinate-descent tuning / multi-kernel reductions for the blocks' fused kernels; candidates: see docs/PERFORMANCE.md)
and optionally "@flash" / "@cudnn" / "@efficient" (the SDPA backend forced while the DiT block compiles: dynamo is
reset and the on-disk compile caches are bypassed for such a variant, so its graph is traced under that backend; the
attention kernels' names in the profile show which one ran). A variant's changes to glm_core (a module's function or
an attribute) are made with dynamo reset around them, so that the blocks are traced with them. Per variant: the DiT,
glyph encoder loaded on the GPU (all resident), one prompt's glyph
embeddings, random prior ids from the codebook (the DiT's cost does not depend on their values), the first
`--steps` steps of the 50-step schedule:
- a first run, timed (`first_run_s`: compiling or reading the compile caches, and tuning), one more warm-up run,
  then `--reps` timed runs (host clock between synchronisations): s per guided step;
- one run under torch's profiler (bench/kernel_profile.py): per guided step, kernels grouped into matmuls,
  attention, inductor's fused kernels and the rest, with the matmul and attention FLOPs counted from the config and
  the achieved rates against the matmul ceilings measured at the start of the run (bf16, and e4m3 with row-wise
  scales as the FP8 linears run it);
- the guided velocity at one fixed input (latents, timestep), compared with the first variant's (relative L2).
Results: dit_profile.json (rewritten after each variant) and dit_profile.md.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from bench import harness, kernel_profile
from bench.harness import Deadline, measure
from glm_core import fp8, pipeline
from glm_core.dit import fp8_mlp

PROMPT = 'A red fox on a snowy hill at dawn, a wooden sign that says "GLM"'
TOTAL_STEPS = 50
GUIDANCE = 1.5

KERNEL_GROUPS = [
    ("_gelu_quantize_kernel", "glm_core's GELU + e4m3 quantisation kernel (FP8 MLP)"),
    ("triton_tem", "matmul (inductor template)"),
    ("triton_", "inductor-fused: norms, modulation, rope, gates, residuals, activations, casts"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("sdpa", "attention"),
    ("attention", "attention"),
    ("cudnn", "attention"),
    ("f8f8bf16", "matmul"),
    ("gemm", "matmul"),
    ("nvjet", "matmul"),
    ("cutlass", "matmul"),
    ("xmma", "matmul"),
    ("sm90", "matmul"),
    ("addmm", "matmul"),  # the CPU's aten ops (--tiny)
    ("aten::mm", "matmul"),
    ("linear", "matmul"),
    ("_scaled_mm", "matmul"),
]
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def kernel_group(name: str) -> str:
    return kernel_profile.kernel_group(name, KERNEL_GROUPS)


FLAGS = {"fast": "fast FP8 accumulation",
         "unfolded": "the FP8 MLP's GELU and input quantisation unfolded (glm_core/dit/fp8_mlp.py folds them)",
         "padded": "every FP8 matmul's input padded to a multiple of 16 rows, as before glm_core.fp8.rows_to_pad",
         "tuned": "inductor's coordinate-descent tuning of the block's fused kernels",
         "mk": "inductor's multi-kernel reductions (persistent and looped compiled, the faster one picked when run)",
         "torchgelu": "the FP8 MLP fold's GELU + quantisation as inductor's fused ops, not glm_core's Triton kernel"}
FP8_ONLY_FLAGS = ("fast", "unfolded", "padded", "torchgelu")
INDUCTOR_OPTIONS = {"tuned": {"coordinate_descent_tuning": True}, "mk": {"triton.multi_kernel": 1}}


def parse_variant(text: str) -> dict:
    """"fp8+fast+unfolded@cudnn" -> {"weights": "fp8", "fast_accum": True, "fold_gelu": False,
    "pad_all_rows": False, "gelu_kernel": True, "inductor_options": {}, "attention": "cudnn"}."""
    rest, _, attention = text.partition("@")
    weights, *flags = rest.split("+")
    if weights not in ("bf16", "fp8") or any(flag not in FLAGS for flag in flags):
        raise ValueError(f"variant {text!r}: expected bf16 or fp8, then optionally +{'/+'.join(FLAGS)}, then "
                         f"optionally @{'/@'.join(SDPA_BACKENDS)}")
    needs_fp8 = [flag for flag in flags if flag in FP8_ONLY_FLAGS]
    if needs_fp8 and weights != "fp8":
        raise ValueError(f"variant {text!r}: +{needs_fp8[0]} ({FLAGS[needs_fp8[0]]}) needs fp8 weights")
    if attention and attention not in SDPA_BACKENDS:
        raise ValueError(f"variant {text!r}: unknown attention backend {attention!r}; one of {list(SDPA_BACKENDS)}")
    return {"name": text, "weights": weights, "fast_accum": "fast" in flags,
            "fold_gelu": "unfolded" not in flags, "pad_all_rows": "padded" in flags,
            "gelu_kernel": "torchgelu" not in flags,
            "inductor_options": {k: v for flag in flags for k, v in INDUCTOR_OPTIONS.get(flag, {}).items()},
            "attention": attention or None}


def guided_step_flops(config, text_tokens: int, image_tokens: int, guidance: float) -> dict:
    """Matmul and attention FLOPs of one guided step (the conditional pass with the glyph tokens, the unconditional
    pass with one): per block q, k, v, out (dim²) and the MLP (dim·4dim twice); attention QKᵀ and PV over every
    head. The modulation linears (one row per image) and the embeddings are left out (< 0.1 %)."""
    dim = config.inner_dim
    passes = [text_tokens + image_tokens] + ([1 + image_tokens] if guidance > 1 else [])
    linear = sum(2 * s * (4 * dim * dim + 2 * dim * 4 * dim) for s in passes) * config.num_layers
    attention = sum(4 * s * s * dim for s in passes) * config.num_layers
    return {"matmul_tflop": linear / 1e12, "attention_tflop": attention / 1e12, "sequence_lengths": passes}


def fp8_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20, fast_accum: bool = False) -> float | None:
    """e4m3 n×n×n product rate through `torch._scaled_mm` with row-wise fp32 scales and a bf16 output (the FP8
    linears' call), three operand sets rotated; None where it does not run (CPU, no FP8 units)."""
    from glm_core.fp8 import fp8_matmul_supported

    if device.type != "cuda" or not fp8_matmul_supported(device):
        return None
    sets = [(torch.randn(n, n, device=device).to(torch.float8_e4m3fn),
             torch.randn(n, n, device=device).to(torch.float8_e4m3fn)) for _ in range(3)]
    scale_a = torch.ones(n, 1, device=device)
    scale_b = torch.ones(1, n, device=device)
    state = {"i": 0}

    def run(_):
        a, b = sets[state["i"] % len(sets)]
        state["i"] += 1
        torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                         use_fast_accum=fast_accum)

    timing = measure(run, device=device, warmup=3, reps=reps)
    sets.clear()
    return 2 * n**3 / timing.median / 1e12


def set_fast_accum(dit: torch.nn.Module, on: bool) -> int:
    from glm_core.fp8 import Fp8Linear

    layers = [module for module in dit.modules() if isinstance(module, Fp8Linear)]
    for layer in layers:
        layer.use_fast_accum = on
    return len(layers)


@contextlib.contextmanager
def attention_backend(name: str | None):
    """Force one SDPA backend while the DiT compiles and runs, with dynamo reset and the on-disk caches bypassed
    (their keys need not record the backend); nothing is changed for name None."""
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch._dynamo.reset()
    saved = (torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    try:
        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])]):
            yield
    finally:
        torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache = saved
        torch._dynamo.reset()


@contextlib.contextmanager
def gelu_fold(dit: torch.nn.Module, enabled: bool):
    """The FP8 MLP's fold (glm_core/dit/fp8_mlp.py) turned off on every block for an "+unfolded" variant, dynamo reset
    around it (the blocks share one compiled function, whose recompile limit the changed modules would use up)."""
    if enabled:
        yield
        return
    torch._dynamo.reset()
    blocks = list(dit.transformer_blocks)
    for block in blocks:
        block.ff.folds_gelu = False
    try:
        yield
    finally:
        for block in blocks:
            block.ff.folds_gelu = True
        torch._dynamo.reset()


@contextlib.contextmanager
def patched(module, name: str, value, apply: bool):
    """module.name set to value while a variant compiles and runs (when `apply`), dynamo reset around it so that the
    blocks are traced with it."""
    if not apply:
        yield
        return
    torch._dynamo.reset()
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)
        torch._dynamo.reset()


@contextlib.contextmanager
def inductor_options(options: dict):
    """Inductor's config patched while the blocks compile and run ("+tuned", "+mk"), dynamo reset around it."""
    if not options:
        yield
        return
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(options):
            yield
    finally:
        torch._dynamo.reset()


class Workload:
    """The conditioning, schedule and noise of the timed steps for one loaded model."""

    def __init__(self, model: pipeline.GlmImage, size: int, steps: int, seed: int):
        from glm_core.dit.sampling import DiTConditioning
        from glm_core.schedule import image_seq_len, timesteps_and_sigmas
        from glm_core.tokens import PriorTokens

        glyph, self.dit, vae = model.stage("glyph"), model.stage("dit"), model.stage("vae")
        self.model, self.size, self.steps = model, size, steps
        self.scale = vae.config.scale_factor
        grid = size // (self.scale * self.dit.config.patch_size * 2)  # the AR's large grid (each id covers 2x2 patches)
        ids = torch.randint(0, self.dit.config.prior_vq_quantizer_codebook_size, (1, grid, grid),
                            generator=torch.Generator().manual_seed(seed))
        tokens = PriorTokens(grid_ids=ids, height=size, width=size)
        self.cond = DiTConditioning(glyph_embeds=glyph.encode([PROMPT], dtype=model.dtype),
                                    negative_glyph_embeds=glyph.encode_negative(1, dtype=model.dtype),
                                    prior_ids=tokens.prior_ids.to(model.device), target_size=(size, size))
        self.image_tokens = image_seq_len(size, size, self.scale, self.dit.config.patch_size)
        self.timesteps, self.sigmas = timesteps_and_sigmas(TOTAL_STEPS, self.image_tokens, model.scheduler_config)
        self.seed = seed

    def noise(self, seed: int) -> torch.Tensor:
        from glm_core.dit.sampling import initial_noise

        side = self.size // self.scale
        return initial_noise(1, self.dit.config.in_channels, side, side, seed, self.model.device, self.model.dtype)

    def run(self, latents: torch.Tensor) -> None:
        from glm_core.dit.sampling import denoise

        denoise(self.dit, latents, self.cond, self.timesteps[: self.steps], self.sigmas[: self.steps + 1], GUIDANCE)

    def velocity(self) -> torch.Tensor:
        """The guided velocity at the schedule's 10th step for fixed noise (fp32, on the CPU)."""
        from glm_core.dit.sampling import predict_velocity
        from glm_core.schedule import dit_timestep

        step = min(10, TOTAL_STEPS - 1)
        t = dit_timestep(self.timesteps[step : step + 1].to(self.model.device), 1)
        return predict_velocity(self.dit, self.noise(self.seed + 999), self.cond, t, GUIDANCE).float().cpu()


def profile_variant(workload: Workload, reps: int, clock: Deadline) -> dict:
    device = workload.model.device
    on_cuda = device.type == "cuda"
    seeds = iter(range(workload.seed, workload.seed + 1000))
    # the first run: what compiling (or reading the compile caches) and tuning add for this variant
    first_run_s = harness.time_once(lambda: workload.run(workload.noise(next(seeds))), device, wall=True)
    timing = measure(workload.run, device=device, setup=lambda: workload.noise(next(seeds)), warmup=1, reps=reps,
                     deadline=clock, wall=True)
    latents = workload.noise(next(seeds))
    window = kernel_profile.Window(on_cuda)
    window.start()
    workload.run(latents)
    window.stop()
    profile = kernel_profile.summarise(window.events(), workload.steps, window.wall_s, KERNEL_GROUPS, unit="step")
    return {"s_per_step": _sig(timing.median / workload.steps), "timing": timing.as_dict(),
            "first_run_s": _sig(first_run_s),
            "steps_per_run": workload.steps, "glyph_tokens": int(workload.cond.glyph_embeds.shape[1]),
            "image_tokens": workload.image_tokens, "profile": profile}


def add_rates(result: dict, flops: dict, ceilings: dict, weights: str, fast_accum: bool) -> None:
    """Achieved TFLOP/s of the matmul and attention groups, and the step's floor from the ceilings."""
    groups = result["profile"]["groups_us_per_step"]
    matmul_us = sum(us for group, us in groups.items() if group.startswith("matmul"))
    attention_us = groups.get("attention", 0.0)
    wanted = "bf16_matmul_tflops" if weights == "bf16" else (
        "fp8_matmul_tflops_fast_accum" if fast_accum else "fp8_matmul_tflops")
    ceiling_key = wanted if wanted in ceilings else "bf16_matmul_tflops"  # no FP8 units: the weights are widened
    matmul_ceiling, attention_ceiling = ceilings.get(ceiling_key), ceilings.get("bf16_matmul_tflops")
    rates = {"matmul_tflop_per_step": _sig(flops["matmul_tflop"]),
             "attention_tflop_per_step": _sig(flops["attention_tflop"]), "matmul_ceiling": ceiling_key}
    if matmul_us > 0:
        rates["matmul_tflops_achieved"] = _sig(flops["matmul_tflop"] / (matmul_us * 1e-6))
    if attention_us > 0:
        rates["attention_tflops_achieved"] = _sig(flops["attention_tflop"] / (attention_us * 1e-6))
    if matmul_ceiling and attention_ceiling:
        floor_s = flops["matmul_tflop"] / matmul_ceiling + flops["attention_tflop"] / attention_ceiling
        rates["floor_s_per_step"] = _sig(floor_s)
        rates["percent_of_floor"] = round(100 * floor_s / result["s_per_step"], 1)
        if matmul_us > 0:
            rates["matmul_percent_of_ceiling"] = round(100 * rates["matmul_tflops_achieved"] / matmul_ceiling, 1)
        if attention_us > 0:
            rates["attention_percent_of_bf16_ceiling"] = round(
                100 * rates["attention_tflops_achieved"] / attention_ceiling, 1)
    result["rates"] = rates


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def render_markdown(data: dict) -> str:
    ceilings = ", ".join(f"{k} {v}" for k, v in data["ceilings"].items())
    lines = [f"# GLM-Image DiT guided step, kernel by kernel ({data['meta']['device']}, {data['meta']['date']})", "",
             f"`{data['meta']['command']}`; {data['meta']['size']}², the first {data['meta']['steps']} steps of the "
             f"{TOTAL_STEPS}-step schedule, guidance {GUIDANCE}; ceilings (TFLOP/s): {ceilings}.", "",
             "| variant | s per guided step | floor | % of floor | matmul TFLOP/s (% of ceiling) | attention TFLOP/s "
             "(% of bf16 ceiling) | velocity rel. error vs first |", "|---|---|---|---|---|---|---|"]
    for name, result in data["results"].items():
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error'][:200]} | | | | | |")
            continue
        rates = result.get("rates", {})
        lines.append(f"| {name} | {result['s_per_step']} | {rates.get('floor_s_per_step', '–')} | "
                     f"{rates.get('percent_of_floor', '–')} | {rates.get('matmul_tflops_achieved', '–')} "
                     f"({rates.get('matmul_percent_of_ceiling', '–')}) | {rates.get('attention_tflops_achieved', '–')}"
                     f" ({rates.get('attention_percent_of_bf16_ceiling', '–')}) | "
                     f"{result.get('velocity_relative_error', '–')} |")
    lines.append("")
    for name, result in data["results"].items():
        if "error" in result:
            continue
        prof = result["profile"]
        lines += [f"## {name}", "",
                  f"Per guided step: kernels {prof['kernel_us_per_step']} µs, GPU busy {prof['busy_us_per_step']} µs, "
                  f"profiled wall {prof['wall_us_per_step_profiled']} µs, {prof['launches_per_step']} launches.", ""]
        lines += kernel_profile.markdown_tables(prof, "step", top=20) + [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = kernel_profile.profile_arguments(__doc__.splitlines()[0], tiny_size=256)
    p.add_argument("--variants", default="bf16,fp8,fp8+fast")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --tiny 256)")
    p.add_argument("--steps", type=int, default=5, help="guided steps per timed run")
    p.add_argument("--reps", type=int, default=3, help="timed runs per variant")
    p.add_argument("--budget-s", type=float, default=400.0)
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    except ValueError as exc:
        p.error(str(exc))
    clock = Deadline(args.budget_s)
    device, out, folder = kernel_profile.start_profile(p, args)
    size = args.size or (256 if args.tiny else 1024)
    ceilings = {"bf16_matmul_tflops": _sig(harness.matmul_tflops(device, n=512 if args.tiny else 8192))}
    for fast in (False, True):
        rate = fp8_matmul_tflops(device, fast_accum=fast)
        if rate is not None:
            ceilings["fp8_matmul_tflops" + ("_fast_accum" if fast else "")] = _sig(rate)
    data = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                     "device": harness.device_name(device), "model": str(folder), "size": size, "steps": args.steps,
                     "command": "python3 -m bench.dit_profile " + " ".join(argv if argv is not None else
                                                                          sys.argv[1:])},
            "ceilings": ceilings, "results": {}}
    print(json.dumps({"ceilings": ceilings}), flush=True)
    first_velocity = None
    loaded: tuple[str, pipeline.GlmImage, Workload] | None = None
    for variant in variants:
        name = variant["name"]
        try:
            clock.check(f"variant {name}")
            if loaded is None or loaded[0] != variant["weights"]:
                if loaded is not None:
                    loaded[1].unload()
                    loaded = None
                    harness.free_memory()
                model = pipeline.GlmImage.from_folder(str(folder), device=device, weights=variant["weights"],
                                                      placement="gpu" if device.type == "cuda" else "auto")
                loaded = (variant["weights"], model, Workload(model, size, args.steps, seed=7))
            workload = loaded[2]
            set_fast_accum(workload.dit, variant["fast_accum"])
            with (attention_backend(variant["attention"]), gelu_fold(workload.dit, variant["fold_gelu"]),
                  patched(fp8, "rows_to_pad", lambda rows: (-rows) % fp8.SCALED_MM_ALIGNMENT, variant["pad_all_rows"]),
                  inductor_options(variant["inductor_options"]),
                  patched(fp8_mlp, "takes_gelu_quantize_kernel", lambda hidden: False, not variant["gelu_kernel"])):
                result = profile_variant(workload, args.reps, clock)
                velocity = workload.velocity()
            if first_velocity is None:
                first_velocity = velocity
            result["velocity_relative_error"] = float(f"{float((velocity - first_velocity).norm() / first_velocity.norm()):.3e}")
            flops = guided_step_flops(workload.dit.config, result["glyph_tokens"], result["image_tokens"], GUIDANCE)
            add_rates(result, flops, ceilings, variant["weights"], variant["fast_accum"])
            result["attention_kernels"] = sorted({k["name"][:100] for k in result["profile"]["kernels"]
                                                  if k["group"] == "attention"})
            data["results"][name] = result
        except Exception as exc:  # noqa: BLE001 — the other variants are still measured
            data["results"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        summary = {k: v for k, v in data["results"][name].items() if k not in ("profile", "timing")}
        print(json.dumps({name: summary}), flush=True)
        (out / "dit_profile.json").write_text(json.dumps(data, indent=1))
        (out / "dit_profile.md").write_text(render_markdown(data))
    if loaded is not None:
        loaded[1].unload()
    return 0 if all("error" not in r for r in data["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
