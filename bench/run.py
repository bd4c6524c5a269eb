"""Speed at the wall: glm_core against the reference, whole images from one GLM-Image checkpoint folder.

    python -m bench.run --model FOLDER --out DIR                           # every phase (~15 min on an H200)
    python -m bench.run --model FOLDER --out DIR --phases reference,ours   # one device call (bench/README.md)
    python -m bench.run --tiny --model TINY_FOLDER --out DIR               # the same code on the CPU, small sizes

The folder is a real GLM-Image download or a random-weight one at the real size (bench/fullsize_checkpoint.py).
Phases, in this order and in one process; the hardware ceilings (bf16 matmul rate, copy bandwidth) come first:
- reference: diffusers' GlmImagePipeline, warmed cheaply, then one whole t2i 1024² call and one edit
  (reference_runs.py); freed before ours loads. It runs first: once ours has compiled in a process, the
  reference's host-bound AR measured 3x slower.
- ours: glm_core's public API: the process's first image (loads + compile), warm t2i 1024², the first edit in
  the warm process and later ones, the DiT per step through `denoise` (ours_runs.py);
- cold: fresh `python -m glm_core` processes with empty and with warm compile caches (cold_start.py); this
  process first lets go of everything it holds on the GPU;
- recompiles: torch's recompile counter over a scripted run of normal use (recompiles.py);
- ours_2048: one whole 2048² image and the DiT per step at 2048².
Every figure is measured, none extrapolated; medians where repeated. bench.json / bench.md are rewritten after
each figure, and `--budget-s` skips what no longer fits, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness, models, workloads  # noqa: E402
from bench.cold_start import phase_cold  # noqa: E402
from bench.harness import Deadline, PhaseRunner, fmt, log  # noqa: E402
from bench.ours_runs import OursSession, phase_ours, phase_ours_large  # noqa: E402
from bench.recompiles import phase_recompiles  # noqa: E402
from bench.reference_runs import phase_reference  # noqa: E402

# Phase, function, and the seconds it needs at least (full size, tiny): a phase that cannot get them is skipped,
# and each phase leaves the later ones their minimum.
PHASES = {
    "reference": (phase_reference, 200.0, 5.0),
    "ours": (phase_ours, 90.0, 5.0),
    "cold": (phase_cold, 110.0, 5.0),
    "recompiles": (phase_recompiles, 120.0, 5.0),
    "ours_2048": (phase_ours_large, 90.0, 5.0),
}

# (label, key, unit, floor key, issue 9's target) of the table; the reference's column is empty where it has no run.
TABLE_ROWS = [
    ("End to end t2i 1024², 50 steps", "e2e_s_t2i_1024", "s", "e2e_s_t2i_1024", "≤ 14.5"),
    ("End to end edit 1024², one 1024² reference", "e2e_s_edit_1024", "s", None, None),
    ("End to end t2i 2048², 50 steps", "e2e_s_t2i_2048", "s", None, None),
    ("AR whole t2i 1024² generation", "ar_s_t2i_1024", "s", "ar_s_t2i_1024", None),
    ("AR per token (whole 1024² generation / its tokens)", "ar_ms_per_token", "ms", "ar_ms_per_token", "≤ 4.4"),
    ("AR whole edit generation (+ reference VQ ids)", "ar_s_edit_1024", "s", None, None),
    ("Decode t2i 1024² (glyph, 50 DiT steps, VAE)", "decode_s_t2i_1024", "s", "decode_s_t2i_1024", None),
    ("DiT guided step 1024²", "dit_s_per_step_1024", "s", "dit_s_per_step_1024", "≤ 0.165"),
    ("DiT guided step 2048²", "dit_s_per_step_2048", "s", "dit_s_per_step_2048", "≤ 0.95"),
    ("First image in the process (loads, compile), t2i 1024²", "first_call_s_t2i_1024", "s", None, None),
    ("First edit in a warm process", "first_edit_s_1024", "s", None, None),
    ("First edit / later edits", "first_edit_ratio", "×", None, "≤ 1.1"),
    ("Fresh CLI process, compile cache warm", "cold_cli_s_t2i_1024", "s", None, "≤ 28"),
    ("Fresh CLI process, empty caches (very first run)", "first_run_s_t2i_1024", "s", None, "≤ 60"),
    ("Recompiles in normal use", "recompiles_in_normal_use", "count", None, "0"),
    ("Frames compiled after the warm-up", "compiles_after_warm_up", "count", None, "0"),
    ("Peak GPU memory", "peak_gb", "GB", None, None),
]

NOTES = [
    "Both sides run the same checkpoint folder, prompt, size, 50 steps and guidance 1.5, each warm, in one process; "
    "the reference first, then freed before glm_core loads. Times are the host clock between synchronisations.",
    "Reference t2i: ONE whole GlmImagePipeline.__call__; its AR figure is the generate call inside it, its DiT step "
    "the mean interval of callback_on_step_end timestamps. Reference edit: the pipeline's own prior generation "
    "is broken for editing (spec §6.26), so the edit is its AR half (processor, the reference's VQ ids, generate "
    "for the edit prompt) plus the pipeline call given those tokens, each whole.",
    "Random-weight guards in the reference's generate (inside the timed calls, no cost of note): min_new_tokens = "
    "max_new_tokens, and generated ids outside the DiT's codebook folded into it (their count is reported).",
    "Ours: encode_prompt + generate_tokens + decode, i.e. glm_core.pipeline.generate, each part timed. AR per token "
    "= the whole generate_tokens call / tokens (prefill and CUDA-graph capture included), the same for the "
    "reference. DiT step: glm_core.dit.sampling.denoise (decode's loop) over the first steps of the 50-step "
    "schedule, divided by their number.",
    "Cold start: fresh `python -m glm_core` processes, weights in the page cache; the split comes from the CLI's "
    "--timings file. Recompiles: dynamo's recompile log and compiled frames over the scripted run after one t2i "
    "and one edit.",
    "Floors: AR = decoder + head weight bytes / measured copy bandwidth per token; DiT = guided-step FLOPs / "
    "measured bf16 matmul rate; end to end = AR floor + 50 DiT floors (glyph encoder and VAE excluded). GB = 1e9 "
    "bytes; peak = torch.cuda.max_memory_allocated after a reset, weights included.",
]


# --------------------------------------------------------------------------------------------
# What the phases share


class Bench:
    """The run's settings, report and the one glm_core session every phase of ours uses."""

    def __init__(self, args, device: torch.device, report: harness.Report, deadline: Deadline):
        self.args, self.device, self.report, self.deadline = args, device, report, deadline
        self.folder = Path(args.model)
        self.sizes = workloads.TINY_E2E_SIZES if args.tiny else workloads.E2ESizes()
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # glm_core's own default
        self.configs = models.folder_configs(self.folder)
        self.glyph_tokens: int | None = None
        self._session: OursSession | None = None

    def record(self, side: str, key: str, value, detail=None) -> None:
        self.report.set(f"{side}.{key}", value)
        if detail is not None:
            self.report.set(f"details.{side}.{key}", detail)
        log(f"  {side:9s} {key} = {fmt(value, 4)}", self.deadline)

    def fits(self, clock: Deadline, estimate_s: float, what: str) -> bool:
        """Whether `what`, expected to take `estimate_s`, fits what is left of the phase; noted when it does not."""
        if clock.remaining() >= 1.2 * estimate_s:
            return True
        self.report.note(f"skipped {what}: {clock.remaining():.0f} s left in its phase, ~{estimate_s:.0f} s needed")
        log(f"  skipped {what} (time budget)", self.deadline)
        return False

    def session(self) -> OursSession:
        if self._session is None:
            self._session = OursSession(self.folder, self.device, None, self.args.compile_backend)
        return self._session

    def close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def reset_peak(self) -> None:
        harness.reset_peak(self.device)

    def peak(self) -> float | None:
        value = harness.peak_gb(self.device)
        return None if value is None else round(value, 2)

    def allocated(self) -> float | None:
        value = harness.allocated_gb(self.device)
        return None if value is None else round(value, 2)

    def compile_cache_state(self) -> dict:
        from glm_core.compiling import compile_cache_dir

        folder = compile_cache_dir()
        files = sum(1 for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0
        return {"folder": str(folder), "files": files}

    def count_outside_codebook(self, count: int) -> None:
        total = (self.report.get("reference.ids_outside_codebook") or 0) + count
        self.report.set("reference.ids_outside_codebook", total)


def phase_ceilings(b: Bench, clock: Deadline) -> None:
    small = b.args.tiny or b.device.type != "cuda"
    tflops = harness.matmul_tflops(b.device, **({"n": 512, "reps": 5} if small else {}))
    gbps = harness.copy_gbps(b.device, **({"nbytes": 64 << 20, "reps": 5} if small else {}))
    b.report.set("ceilings", {"matmul_tflops": float(f"{tflops:.4g}"), "copy_gbps": float(f"{gbps:.4g}")})
    log(f"  ceilings: matmul {tflops:.1f} TFLOP/s (bf16 8192³), copy {gbps:.1f} GB/s (read + write)", b.deadline)


# --------------------------------------------------------------------------------------------
# Floors and the table


def floors(b: Bench) -> dict:
    """What no implementation beats on this GPU (from the ceilings measured in this run)."""
    from glm_core.processor import get_target_shape

    ceilings = b.report.data.get("ceilings") or {}
    if not ceilings.get("copy_gbps") or not ceilings.get("matmul_tflops"):
        return {}
    bandwidth, rate = ceilings["copy_gbps"] * 1e9, ceilings["matmul_tflops"] * 1e12
    s, glyph_tokens = b.sizes, b.glyph_tokens or 1
    grid_h, grid_w, preview_h, preview_w = get_target_shape(s.t2i[1], s.t2i[0])
    tokens = grid_h * grid_w + preview_h * preview_w + 1
    per_token = workloads.ar_decode_bytes(b.configs.ar) / bandwidth
    step = {size: workloads.dit_step_flops(b.configs.dit, size[1], size[0], glyph_tokens) / rate
            for size in (s.t2i, s.large)}
    return {"ar_ms_per_token": 1e3 * per_token, "ar_s_t2i_1024": tokens * per_token,
            "dit_s_per_step_1024": step[s.t2i], "dit_s_per_step_2048": step[s.large],
            "decode_s_t2i_1024": s.steps * step[s.t2i], "e2e_s_t2i_1024": tokens * per_token + s.steps * step[s.t2i],
            "basis": {"ar_tokens": tokens, "glyph_tokens": glyph_tokens,
                      "ar_decode_bytes_per_token": workloads.ar_decode_bytes(b.configs.ar)}}


def table_rows(data: dict) -> list[list[str]]:
    ours, ref, floor = data.get("ours") or {}, data.get("reference") or {}, data.get("floors") or {}
    rows = []
    for label, key, unit, floor_key, target in TABLE_ROWS:
        a, r = ours.get(key), ref.get(key)
        if a is None and r is None:
            continue
        numbers = isinstance(a, (int, float)) and isinstance(r, (int, float))
        ratio = f"{r / a:.2f}×" if numbers and a > 0 else "–"
        bound = floor.get(floor_key) if floor_key else None
        share = f"{bound / a:.0%}" if bound and isinstance(a, (int, float)) and a > 0 else "–"
        rows.append([f"{label} [{unit}]", fmt(a), fmt(r), ratio, fmt(bound), share, target or "–"])
    return rows


TABLE_HEADER = ["measure", "ours", "reference", "ref/ours", "floor", "ours % of floor", "target (issue 9)"]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def cold_split_rows(data: dict) -> list[list[str]]:
    details = (data.get("details") or {}).get("ours") or {}
    runs = [details.get("first_run_s_t2i_1024") or {}, details.get("cold_cli_s_t2i_1024") or {}]
    if not any(runs):
        return []
    rows = [["whole process (wall)"] + [fmt(r.get("wall_s")) for r in runs],
            ["interpreter start + imports before the CLI's clock"] + [fmt(r.get("startup_s")) for r in runs]]
    parts = list(dict.fromkeys(k for r in runs for k in (r.get("parts_s") or {})))
    rows += [[f"part: {part}"] + [fmt((r.get("parts_s") or {}).get(part)) for r in runs] for part in parts]
    stages = list(dict.fromkeys(k for r in runs for k in (r.get("loads_s") or {})))
    rows += [[f"  of which loading {stage}"] + [fmt((r.get("loads_s") or {}).get(stage)) for r in runs]
             for stage in stages]
    rows.append(["  of which torch.compile (dynamo + backend)"] + [fmt(r.get("compile_s")) for r in runs])
    return rows


def render_markdown(data: dict) -> str:
    lines = harness.markdown_header("GLM-Image benchmark: whole images, glm_core vs reference", data)
    ceilings = data.get("ceilings") or {}
    if ceilings:
        lines.append(f"- ceilings (measured in this run): bf16 matmul {fmt(ceilings.get('matmul_tflops'))} TFLOP/s, "
                     f"device-to-device copy {fmt(ceilings.get('copy_gbps'))} GB/s (read + write)")
    sizes = data.get("sizes") or {}
    if sizes:
        lines.append(f"- sizes: t2i {'x'.join(map(str, sizes['t2i']))}, large {'x'.join(map(str, sizes['large']))}, "
                     f"edit reference {'x'.join(map(str, sizes['edit_reference']))}, {sizes['steps']} steps, "
                     f"guidance {sizes['guidance']} (the row labels name the full-size workloads)")
    lines += ["", *_markdown_table(TABLE_HEADER, table_rows(data)), ""]
    ours = data.get("ours") or {}
    outside = (data.get("reference") or {}).get("ids_outside_codebook")
    if outside:
        lines += [f"- the reference's generate sampled {outside} ids outside the codebook (random weights); "
                  "folded into it before its DiT", ""]
    split = cold_split_rows(data)
    if split:
        lines += ["## Cold start, part by part [s]", "",
                  *_markdown_table(["part", "empty compile caches", "compile cache warm"], split), ""]
    recompiles = ((data.get("details") or {}).get("ours") or {}).get("recompiles_in_normal_use")
    if recompiles:
        lines += ["## Recompiles in normal use", "",
                  f"{ours.get('recompiles_in_normal_use')} recompile(s), {ours.get('compiles_after_warm_up')} frame(s) "
                  "compiled after the warm-up (" + ", ".join(w["run"] for w in recompiles["warm_up"]) + ").", ""]
        lines += _markdown_table(["run", "seconds", "recompiles"],
                                 [[r["run"], fmt(r["seconds"]), str(r["recompiles"])] for r in recompiles["runs"]])
        lines += [""] + [f"- {reason}" for reason in recompiles["reasons"]] + [""]
    lines += harness.markdown_tail(data)
    return "\n".join(lines)


def table_text(data: dict) -> str:
    rows = [TABLE_HEADER] + table_rows(data)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv):
    p = harness.common_arguments(__doc__.split("\n\n")[0], "out/bench")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, run in this order: "
                   f"{', '.join(PHASES)} (the ceilings always run first)")
    p.add_argument("--compile-backend", default=None, help="force this torch.compile backend on glm_core's AR and "
                   "DiT (e.g. 'eager': dynamo alone, so --tiny counts recompiles on the CPU); default: glm_core's "
                   "own choice (inductor on CUDA, off on the CPU)")
    args = harness.parse_common(p, argv)
    if not args.model:
        p.error("--model FOLDER is required: a GLM-Image folder (python -m bench.fullsize_checkpoint --out FOLDER "
                "writes a random-weight one at the real size; add --tiny for the tiny one)")
    named = harness.named_phases(p, "--phases", args.phases, PHASES)
    args.chosen = [name for name in PHASES if name in named]  # in running order
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    mode = "tiny, CPU" if args.tiny else "checkpoint folder"
    report, deadline, device = harness.open_report(args, argv, "bench.run", "bench", mode, render_markdown)
    for note in NOTES:
        report.data["notes"].append(note)
    bench = Bench(args, device, report, deadline)
    report.set("sizes", asdict(bench.sizes))
    report.set("configuration", f"checkpoint folder {bench.folder}")
    chosen = args.chosen
    runner = PhaseRunner(report, deadline, device)
    runner.run("ceilings", lambda: phase_ceilings(bench, Deadline(60.0)), share=0.2)
    column = 2 if args.tiny else 1
    for index, name in enumerate(chosen):
        fn, needs = PHASES[name][0], PHASES[name][column]
        later = sum(PHASES[other][column] for other in chosen[index + 1:])
        cap = max(deadline.remaining() - later, needs)
        runner.run(name, lambda fn=fn, cap=cap: fn(bench, Deadline(cap)),
                   share=min(1.0, cap / max(deadline.remaining(), 1e-3)), min_s=needs)
    bench.close_session()
    report.set("floors", floors(bench))
    ceilings = report.data.get("ceilings") or {}
    print(f"\n{report.data['gpu']}, {report.data['date']}; ceilings: bf16 matmul {fmt(ceilings.get('matmul_tflops'))} "
          f"TFLOP/s, copy {fmt(ceilings.get('copy_gbps'))} GB/s; {bench.folder}", flush=True)
    print(table_text(report.data), flush=True)
    return harness.finish(report, "bench", deadline)


if __name__ == "__main__":
    main()
