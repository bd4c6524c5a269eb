"""One device command for the fast paths: profile, time and check them against the plain paths on the
same random bf16 weights at the real configuration (no reference libraries needed).

    python3 -m bench.fast_paths --out $OUT [--parts ar,dit] [--budget-s 220]

AR: the decode step as `generate_sequences` runs it (one CUDA graph per step, noise drawn outside),
plain (compile=False) vs fast (fused q/k/v + torch.compile'd decode layer inside the graph):
ms/step over replays, the first compile's wall time, a torch.profiler kernel table of each, and on a
short 256² generation: teacher-forced logits (rel. error), greedy tokens, sampled tokens (same seeds).
DiT: one guided step at 1024² (cond 64 glyph tokens + uncond 1 token + CFG), eager vs compiled blocks,
and the velocity's relative difference. Writes fast_paths.json and the profiler tables under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from torch._dynamo.utils import counters  # noqa: E402

from bench import models, workloads  # noqa: E402

BF16 = torch.bfloat16


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


def timed_ms(fn, device) -> float:
    """Wall time of fn() in ms: CUDA events on the GPU, the host clock on the CPU (--tiny)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def build(kind: str, config: dict, device, seed: int):
    from glm_core.checkpoint import init_computed_buffers

    if kind == "ar":
        from glm_core.ar.config import ARConfig
        from glm_core.ar.model import GlmImageAR as cls
        cfg = ARConfig.from_dict(copy.deepcopy(config))
    else:
        from glm_core.dit.config import DiTConfig
        from glm_core.dit.model import GlmImageDiT as cls
        cfg = DiTConfig.from_dict(copy.deepcopy(config))
    with torch.device("meta"):
        model = cls(cfg)
    models.materialize_(model, device, BF16)
    init_computed_buffers(model, device)
    models.random_init_(model, seed)
    return model.eval().requires_grad_(False)


def profile_table(fn, path: Path, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                                      max_name_column_width=70)
    path.write_text(table)
    return table


# --------------------------------------------------------------------------------------------
# AR


def ar_decode_timing(model, prompt, *, compile: bool, steps: int, out: Path, tag: str, clock: Clock,
                     fuse_qkv: bool = True, copies: int = 1) -> dict:
    """Set up generation like generate_sequences, warm up 3 steps, capture one step, time replays."""
    from glm_core.ar import sampling
    from glm_core.ar.decode import DecodeLoop, decode_layer_runner, prefill, prepare_prompt, setup_caches

    plan = prepare_prompt(model, prompt.ours_inputs(), copies)
    cache = setup_caches(model, plan.input_ids.shape[0], plan.input_ids.shape[1] + plan.num_new_tokens)
    loop = DecodeLoop(model, plan, cache, generators=sampling.make_generators(list(range(copies)), model.device),
                      temperature=0.9,
                      top_k=50, top_p=0.75, greedy=False, mask_grid=True,
                      run_layer=decode_layer_runner(model, compile, fuse_qkv=fuse_qkv))
    loop.first(prefill(model, plan, cache))
    device = model.device
    cuda = device.type == "cuda"
    result = {}

    def one_step():
        loop.draw_noise()
        loop.step()

    t0 = time.perf_counter()
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                one_step()
        torch.cuda.current_stream().wait_stream(side)
    else:
        for _ in range(3):
            one_step()
    sync(device)
    result["warmup_3_steps_s"] = time.perf_counter() - t0
    clock.log(f"  {tag}: warm-up (3 steps, compile included) {result['warmup_3_steps_s']:.1f} s")
    result["eager_ms_per_step"] = statistics.median(timed_ms(one_step, device) for _ in range(5))
    profile_table(lambda: [loop.step() for _ in range(2)], out / f"profile_{tag}_eager.txt")
    if cuda:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop.step()
        replay = graph.replay
    else:
        graph, replay = None, loop.step
    for _ in range(5):
        loop.draw_noise()
        replay()
    sync(device)

    def replays():
        for _ in range(steps):
            loop.draw_noise()
            replay()

    times = [timed_ms(replays, device) / steps for _ in range(3)]
    result["graph_ms_per_step"] = statistics.median(times)
    result["graph_ms_per_step_runs"] = times
    table = profile_table(lambda: [replay() for _ in range(5)], out / f"profile_{tag}_graph.txt", rows=30)
    result["graph_profile_head"] = table.splitlines()[:40]
    clock.save()
    clock.log(f"  {tag}: eager {result['eager_ms_per_step']:.2f} ms/step, graph {result['graph_ms_per_step']:.2f} "
              f"ms/step ({steps} replays x3: {', '.join(f'{t:.3f}' for t in times)})")
    del graph, loop, cache
    if cuda:
        torch.cuda.empty_cache()
    return result


def ar_outputs(model, small_prompt, forced, *, compile: bool) -> dict:
    from glm_core.ar.decode import cached_forced_logits, generate_sequences

    inputs = small_prompt.ours_inputs()
    return {
        "logits": cached_forced_logits(model, inputs, forced, compile=compile).float().cpu(),
        "greedy": generate_sequences(model, inputs, seeds=[0], greedy=True, compile=compile),
        "sampled": generate_sequences(model, inputs, seeds=[7], compile=compile),
    }


def compare_tokens(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = (a == b)
    first = [int((~row).nonzero()[0]) if not bool(row.all()) else None for row in same]
    return {"identical": bool(same.all()), "fraction_equal": float(same.float().mean()), "first_diff": first,
            "tokens": int(a.shape[1])}


def phase_ar(args, device, clock: Clock, report: dict, out: Path) -> None:
    cfgs = models.tiny_configs() if args.tiny else models.real_configs()
    gen = torch.Generator().manual_seed(args.seed)
    model = build("ar", cfgs.ar, device, args.seed)
    bytes_per_token = workloads.ar_decode_bytes(cfgs.ar)
    clock.log(f"AR built; decode reads {bytes_per_token / 1e9:.2f} GB per token")
    big = 256 if args.tiny else 1024
    prompt = workloads.ar_prompt(cfgs.ar, big, big, generator=gen, preview_side=2 if args.tiny else None)
    small = workloads.ar_prompt(cfgs.ar, 128 if args.tiny else 256, 128 if args.tiny else 256, generator=gen,
                                preview_side=2)
    forced = torch.randint(0, model.config.codebook_size, (1, small.num_new_tokens - 1), generator=gen)
    ar = report["ar"] = {"bytes_per_token": bytes_per_token}
    from glm_core.ar import sampling

    sampling.ONE_SORT_ON_CUDA = False  # "plain" = the code before the fast paths, sampler included
    ar["plain"] = ar_decode_timing(model, prompt, compile=False, steps=args.steps, out=out, tag="ar_plain",
                                   clock=clock)
    plain = ar_outputs(model, small, forced, compile=False)
    clock.log("  plain outputs done")
    sampling.ONE_SORT_ON_CUDA = True
    if args.unfused:
        ar["compiled_unfused"] = ar_decode_timing(model, prompt, compile=True, steps=args.steps, out=out,
                                                  tag="ar_compiled_unfused", clock=clock, fuse_qkv=False)
    from glm_core.ar import model as ar_model

    for attention in args.attention:
        ar_model.DECODE_ATTENTION = attention
        tag = f"fast_{attention}"
        ar[tag] = ar_decode_timing(model, prompt, compile=True, steps=args.steps, out=out, tag=f"ar_{tag}",
                                   clock=clock)
        fast = ar_outputs(model, small, forced, compile=True)
        ar[f"check_{attention}"] = check_ar(model, small, forced, plain, fast)
        clock.log(f"  check {attention}: {json.dumps(ar[f'check_{attention}'])}")
        clock.save()
    ar_model.DECODE_ATTENTION = args.attention[-1]
    ar["compiled_graphs"] = dict(counters["stats"])
    clock.log(f"  dynamo: {ar['compiled_graphs']}")
    if args.batch4:
        for compile in (False, True):
            sampling.ONE_SORT_ON_CUDA = compile
            tag = f"batch4_{'fast' if compile else 'plain'}"
            ar[tag] = ar_decode_timing(model, prompt, compile=compile, steps=args.steps // 2, out=out,
                                       tag=f"ar_{tag}", clock=clock, copies=4)
    if args.whole:
        from glm_core.ar.decode import generate_sequences

        for compile in (False, True):
            if clock.left() < 40:
                break
            sampling.ONE_SORT_ON_CUDA = compile
            t0 = time.perf_counter()
            generate_sequences(model, prompt.ours_inputs(), seeds=[1], compile=compile)
            ar[f"whole_1024_{'fast' if compile else 'plain'}_s"] = time.perf_counter() - t0
            clock.log(f"  whole 1024² generation ({prompt.num_new_tokens} tokens), compile={compile}: "
                      f"{time.perf_counter() - t0:.2f} s")
            clock.save()
    sampling.ONE_SORT_ON_CUDA = True
    # the one-sort top-k/top-p filter against the two-step one on CUDA, bf16-rounded logits (many ties)

    g = torch.Generator(device=device).manual_seed(5)
    same = True
    for scale in (1.0, 3.0, 10.0):
        logits = (torch.randn(4, model.config.text.vision_vocab_size, device=device, generator=g) * scale)
        logits = logits.to(BF16).float()
        same &= torch.equal(sampling.filter_logits(logits, temperature=0.9, top_k=50, top_p=0.75, one_sort=True),
                            sampling.filter_logits(logits, temperature=0.9, top_k=50, top_p=0.75, one_sort=False))
    ar["one_sort_filter_identical_on_cuda"] = bool(same)
    clock.log(f"  one-sort filter identical to two-step on CUDA: {same}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_ar(model, small, forced, plain, fast) -> dict:
    check = {
        "forced_logits_rel_err": rel_err(fast["logits"], plain["logits"]),
        "forced_argmax_equal": float((fast["logits"].argmax(-1) == plain["logits"].argmax(-1)).float().mean()),
        "greedy": compare_tokens(fast["greedy"], plain["greedy"]),
        "sampled": compare_tokens(fast["sampled"], plain["sampled"]),
    }
    device = model.device
    # a bf16 noise scale for the logits: the plain path against itself through teacher_forced_logits
    # (one whole-sequence forward: other kernels, same weights)
    from glm_core.ar.decode import prepare_prompt, teacher_forced_logits

    plan = prepare_prompt(model, small.ours_inputs())
    ids = torch.cat([plan.input_ids, forced.to(device)], dim=1)
    positions = torch.cat([plan.prefill_positions, plan.decode_positions[:, :, : forced.shape[1]]], dim=-1)
    whole = teacher_forced_logits(model, ids, positions)[:, plan.input_ids.shape[1] - 1:].float().cpu()
    check["noise_whole_vs_cached_plain_rel_err"] = rel_err(whole, plain["logits"])
    check["noise_whole_vs_cached_plain_argmax_equal"] = float(
        (whole.argmax(-1) == plain["logits"].argmax(-1)).float().mean())
    return check


# --------------------------------------------------------------------------------------------
# DiT


def phase_dit(args, device, clock: Clock, report: dict, out: Path) -> None:
    cfgs = models.tiny_configs() if args.tiny else models.real_configs()
    gen = torch.Generator().manual_seed(args.seed + 1)
    dit = build("dit", cfgs.dit, device, args.seed + 1)
    clock.log("DiT built")
    report["dit"] = res = {}

    def step(x, compile: bool):
        dit.compile_blocks = compile
        timestep = torch.full((1,), x.timestep, device=device)
        return dit.predict_velocity(x.latents.to(device, BF16), x.glyph.to(device, BF16),
                                    x.negative_glyph.to(device, BF16), x.prior_ids.to(device), timestep,
                                    (x.height, x.width), guidance=1.5)

    for size in args.dit_sizes:
        if clock.left() < (50 if size <= 1024 else 90):
            clock.log(f"  skipping DiT {size}²: {clock.left():.0f} s left")
            break
        x = workloads.dit_inputs(cfgs.dit, size, size, glyph_tokens=64, generator=gen)
        entry = res[str(size)] = {}
        outputs = {}
        for compile in (False, True):
            tag = "compiled" if compile else "eager"
            t0 = time.perf_counter()
            outputs[tag] = step(x, compile)
            sync(device)
            entry[f"{tag}_first_call_s"] = time.perf_counter() - t0
            step(x, compile)
            times = [timed_ms(lambda: step(x, compile), device) / 1e3
                     for _ in range(args.dit_reps if size <= 1024 else 2)]
            entry[f"{tag}_s_per_step"] = statistics.median(times)
            entry[f"{tag}_runs"] = times
            clock.log(f"  DiT {size}² {tag}: first call {entry[f'{tag}_first_call_s']:.1f} s, "
                      f"{entry[f'{tag}_s_per_step']:.4f} s/step")
            if size == args.dit_sizes[0] and args.profile_dit:
                profile_table(lambda: step(x, compile), out / f"profile_dit_{size}_{tag}.txt")
        entry["velocity_rel_err"] = rel_err(outputs["compiled"], outputs["eager"])
        entry["flops_per_step"] = workloads.dit_step_flops(cfgs.dit, size, size, 64)
        entry["compiled_graphs_so_far"] = dict(counters["stats"])
        clock.save()
        clock.log(f"  DiT {size}²: compiled vs eager velocity rel err {entry['velocity_rel_err']:.2e}")
    if args.dit_edit and clock.left() > 45:
        # editing: reference K/V written by compiled blocks, then a guided step that reads them
        size = args.dit_sizes[0]
        x = workloads.dit_inputs(cfgs.dit, size, size, glyph_tokens=64, generator=gen)
        latent = workloads.dit_inputs(cfgs.dit, size, size, glyph_tokens=1, generator=gen).latents.to(device, BF16)
        prior = workloads.upsampled_prior(size // 32, size // 32, int(cfgs.dit["prior_vq_quantizer_codebook_size"]),
                                          gen).to(device)
        got = {}
        for compile in (False, True):
            dit.compile_blocks = compile
            t0 = time.perf_counter()
            kv = dit.encode_references([latent], [prior], [(size, size)])
            timestep = torch.full((1,), x.timestep, device=device)
            got[compile] = (kv, dit.predict_velocity(x.latents.to(device, BF16), x.glyph.to(device, BF16),
                                                     x.negative_glyph.to(device, BF16), x.prior_ids.to(device),
                                                     timestep, (size, size), guidance=1.5, reference_kv=kv))
            sync(device)
            res[f"edit_{size}_{'compiled' if compile else 'eager'}_first_s"] = time.perf_counter() - t0
        res[f"edit_{size}_keys_rel_err"] = max(rel_err(a, b) for a, b in zip(got[True][0].keys, got[False][0].keys))
        res[f"edit_{size}_velocity_rel_err"] = rel_err(got[True][1], got[False][1])
        res["compiled_graphs_after_edit"] = dict(counters["stats"])
        clock.log(f"  DiT edit {size}²: keys rel err {res[f'edit_{size}_keys_rel_err']:.2e}, velocity rel err "
                  f"{res[f'edit_{size}_velocity_rel_err']:.2e}, graphs {res['compiled_graphs_after_edit']}")
        clock.save()
    dit.compile_blocks = None
    del dit
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="fast_paths_out")
    parser.add_argument("--parts", default="ar,dit")
    parser.add_argument("--budget-s", type=float, default=220)
    parser.add_argument("--steps", type=int, default=100, help="graph replays per timed AR run")
    parser.add_argument("--dit-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1024])
    parser.add_argument("--dit-reps", type=int, default=5)
    parser.add_argument("--profile-dit", action="store_true")
    parser.add_argument("--dit-edit", action="store_true", help="also check editing (reference K/V) compiled vs eager")
    parser.add_argument("--unfused", action="store_true", help="also time the compiled layer without fused q/k/v")
    parser.add_argument("--attention", type=lambda s: s.split(","), default=["sdpa"],
                        help="DECODE_ATTENTION modes to time (the last one stays set)")
    parser.add_argument("--batch4", action="store_true", help="also time batch-4 decode steps (plain, fast)")
    parser.add_argument("--whole", action="store_true", help="also time whole 1024² generations (plain, fast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke test of this script")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    clock = Clock(args.budget_s)
    clock.save = lambda: (out / "fast_paths.json").write_text(json.dumps(report, indent=1, default=str))
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        args.dit_sizes = [64]
    report.update(gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    clock.log(f"{report['gpu']}, torch {report['torch']}")
    parts = args.parts.split(",")
    try:
        if "ar" in parts:
            phase_ar(args, device, clock, report, out)
        if "dit" in parts:
            phase_dit(args, device, clock, report, out)
    finally:
        (out / "fast_paths.json").write_text(json.dumps(report, indent=1, default=str))
        summary(report)
    return 0


def summary(report: dict) -> None:
    print(f"\n== {report['gpu']} ==")
    ar = report.get("ar", {})
    for tag in ["plain", "compiled_unfused"] + [k for k in ar if k.startswith(("fast_", "batch4_"))]:
        if tag in ar:
            r = ar[tag]
            print(f"AR {tag:16s}: graph {r['graph_ms_per_step']:.2f} ms/token, eager {r['eager_ms_per_step']:.2f}, "
                  f"warm-up {r['warmup_3_steps_s']:.1f} s")
    for key, value in ar.items():
        if key.startswith(("check", "whole", "one_sort")):
            print(f"AR {key}: {json.dumps(value)}")
    for size, r in report.get("dit", {}).items():
        if not size.isdigit():
            print(f"DiT {size}: {json.dumps(r)}")
            continue
        print(f"DiT {size}²: eager {r.get('eager_s_per_step', float('nan')):.4f} s/step, compiled "
              f"{r.get('compiled_s_per_step', float('nan')):.4f} s/step (first call "
              f"{r.get('compiled_first_call_s', float('nan')):.1f} s), rel err {r.get('velocity_rel_err', float('nan')):.2e}")


if __name__ == "__main__":
    sys.exit(main())
