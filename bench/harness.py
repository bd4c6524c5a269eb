"""What every bench entry point shares (run.py, parity_fullsize.py, fp8_kernels.py): the one clock, the time
budget, hardware ceilings, per-phase error capture, the command-line preamble, and the JSON / markdown report
that is rewritten after every measurement (a device command that runs out of time still leaves its numbers).

The clock (`time_once`, `measure`): CUDA events around the region, or, for whole runs that synchronise inside,
the host clock between two synchronisations (`wall=True`, and always on the CPU); a warm-up first, the median of
several runs, fresh random inputs for each run (drawn outside the timed region), never zeros.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

GB = 1e9  # all memory and bandwidth figures are decimal (1e9 bytes), as in baseline-h100.md


def log(msg: str, clock: "Deadline | None" = None) -> None:
    stamp = f"[{clock.elapsed():7.1f}s] " if clock is not None else ""
    print(f"{stamp}{msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Time budget


class BudgetExceeded(Exception):
    """Raised inside a phase when its share of the command's time is used up."""


class Deadline:
    """Wall-clock budget of the whole command, counted from construction."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = float(budget_s)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def check(self, what: str = "") -> None:
        if self.remaining() <= 0:
            raise BudgetExceeded(f"time budget of {self.budget_s:.0f}s used up{': ' + what if what else ''}")


@contextlib.contextmanager
def alarm_after(seconds: float):
    """Raise BudgetExceeded in the main thread after `seconds` (SIGALRM; a no-op elsewhere).

    The handler runs between Python bytecodes, so a phase stuck in one long device
    synchronisation is interrupted when that call returns, not in the middle of it.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds is None or seconds == math.inf:
        yield
        return

    def _raise(signum, frame):
        raise BudgetExceeded(f"phase ran past its {seconds:.0f}s share of the time budget")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated bytes since the last `reset_peak` (None on the CPU, where it is not tracked)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GB


def allocated_gb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    seconds: list[float]  # one entry per timed run, warm-up excluded

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart repeated runs landed."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return {"median_s": self.median, "runs_s": self.seconds, "spread": self.spread}


def time_once(fn: Callable[[], object], device: torch.device, *, wall: bool = False) -> float:
    """Seconds for one call of `fn`: CUDA events around it (the device's view), or, with `wall` (and on the CPU),
    the host clock between two synchronisations: what a user waits for a whole run that syncs inside."""
    if device.type == "cuda" and not wall:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def graph_seconds(step: Callable[[], None], *, device: torch.device, reps: int, clock: "Deadline",
                  refill: Callable[[], None] | None = None) -> float:
    """Median seconds of one replay of a CUDA graph of `step` (on the CPU: of `step` itself): launch gaps would
    otherwise dominate microsecond kernels. `refill` writes fresh values into the static inputs before every
    replay (outside the timing)."""
    refill = refill or (lambda: None)
    if device.type != "cuda":
        return measure(lambda _: step(), device=device, setup=refill, warmup=1, reps=reps, deadline=clock).median
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS workspaces, torch.compile's compilation
        for _ in range(3):
            refill()
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return measure(lambda _: graph.replay(), device=device, setup=refill, warmup=3, reps=reps, deadline=clock).median


class Laps:
    """The parts of one whole run on the same clock as `time_once(wall=True)`: `lap()` synchronises and returns
    the seconds since the previous lap (or the start); `total` is the sum so far."""

    def __init__(self, device: torch.device):
        self.device = device
        synchronize(device)
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    @property
    def total(self) -> float:
        return self.last - self.start


def measure(run: Callable[[object], object], *, device: torch.device, setup: Callable[[], object] | None = None,
            warmup: int = 1, reps: int = 5, max_s: float | None = None,
            deadline: Deadline | None = None, wall: bool = False) -> Timing:
    """Median-of-`reps` timing of `run(inputs)`, `inputs = setup()` drawn fresh before every call.

    `max_s` time-boxes the timed runs: no further run starts once another one (at the median so far)
    would end past it; at least one run is always timed. A `deadline` is checked before each run.
    `wall`: the synchronised host clock instead of CUDA events (see `time_once`).
    """
    setup = setup or (lambda: None)
    for _ in range(warmup):
        inputs = setup()
        time_once(lambda: run(inputs), device, wall=wall)
        del inputs
    seconds: list[float] = []
    while len(seconds) < max(reps, 1):
        if seconds and max_s is not None and sum(seconds) + statistics.median(seconds) > max_s:
            break
        if deadline is not None:
            deadline.check("between timed runs")
        inputs = setup()
        seconds.append(time_once(lambda: run(inputs), device, wall=wall))
        del inputs
    return Timing(seconds)


# --------------------------------------------------------------------------------------------
# Hardware ceilings (measured once at the start of a run, METHOD.md "Two numbers first")


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """bf16 n×n×n matrix product rate, random data, three operand sets rotated (no cache reuse)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sets = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
            for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    state = {"i": 0}

    def run(_):
        a, b = sets[state["i"] % len(sets)]
        state["i"] += 1
        torch.mm(a, b, out=out)

    timing = measure(run, device=device, warmup=3, reps=reps)
    if not torch.isfinite(out).all():
        raise RuntimeError("matmul ceiling produced non-finite values")
    del sets, out
    return 2 * n**3 / timing.median / 1e12


def copy_gbps(device: torch.device, nbytes: int = 4 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    numel = nbytes // 2
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    timing = measure(lambda _: dst.copy_(src), device=device, warmup=3, reps=reps)
    if not torch.equal(dst[:1024], src[:1024]):
        raise RuntimeError("copy ceiling: destination differs from source")
    del src, dst
    return 2 * numel * 2 / timing.median / GB


# --------------------------------------------------------------------------------------------
# Versions and environment


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(name)
            versions[name] = module.__version__
            versions[name + "_path"] = str(Path(module.__file__).parent)
        except Exception as exc:  # reported, not fatal: the phase that needs it fails on its own
            versions[name] = f"unavailable ({type(exc).__name__}: {exc})"
    return versions


EXPECTED_REFERENCE_VERSIONS = {"transformers": "5.23.0", "diffusers": "0.42.1"}


def version_warnings(versions: dict) -> list[str]:
    return [f"reference library {name} is {versions.get(name)}, the spec and the baseline were measured "
            f"with {want}" for name, want in EXPECTED_REFERENCE_VERSIONS.items() if versions.get(name) != want]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------------------------
# Report: one dict, rewritten as JSON + markdown after every change


class Report:
    def __init__(self, out_dir: Path | None, stem: str, meta: dict,
                 render_markdown: Callable[[dict], str]):
        self.out_dir = Path(out_dir) if out_dir else None
        self.stem = stem
        self.data: dict = dict(meta)
        self.data.setdefault("phases", {})
        self.data.setdefault("errors", [])
        self.data.setdefault("notes", [])
        self.render_markdown = render_markdown
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    # recording ------------------------------------------------------------------------------
    def set(self, path: str, value) -> None:
        """`path` is dot-separated: `report.set("ours.ar_ms_per_token", 12.3)`."""
        node = self.data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        self.write()

    def get(self, path: str, default=None):
        node = self.data
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def phase(self, name: str, entry: dict) -> None:
        """Status of a phase; `name` may contain dots ("ar.ours"): it is one key, not a path."""
        self.data["phases"][name] = entry
        self.write()

    def note(self, text: str) -> None:
        if text not in self.data["notes"]:
            self.data["notes"].append(text)
        self.write()

    def error(self, phase: str, exc: BaseException, tb: str) -> None:
        self.data["errors"].append({"phase": phase, "error": f"{type(exc).__name__}: {exc}", "traceback": tb})
        self.write()

    # output ---------------------------------------------------------------------------------
    def write(self) -> None:
        if self.out_dir is None:
            return
        _atomic_write(self.out_dir / f"{self.stem}.json", json.dumps(_jsonable(self.data), indent=2) + "\n")
        try:
            text = self.render_markdown(self.data)
        except Exception as exc:  # a rendering bug must not cost the JSON
            text = f"(markdown rendering failed: {type(exc).__name__}: {exc})\n"
        _atomic_write(self.out_dir / f"{self.stem}.md", text)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def base_meta(device: torch.device, argv: list[str], mode: str) -> dict:
    versions = library_versions()
    return {
        "gpu": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python"] + argv),
        "mode": mode,
        "reference_versions": versions,
        "python_bytecode": python_bytecode(),
    }


def python_bytecode() -> dict:
    """Whether this Python finds torch byte-compiled (.pyc) and may write .pyc files, and where it keeps them.

    A process that finds no .pyc compiles every module it imports from source. pip writes them when it installs
    a package; the device machine's image sets PYTHONDONTWRITEBYTECODE and ships none, so a fresh CLI process there
    spent 7.0 s importing instead of 3.1 s (2026-11-30), which a user's install never pays."""
    import importlib.util

    cached = importlib.util.cache_from_source(torch.__file__)  # follows sys.pycache_prefix
    return {"torch_byte_compiled": os.path.exists(cached), "writes_pyc": not sys.dont_write_bytecode,
            "pycache_prefix": sys.pycache_prefix}


def bytecode_warning(state: dict) -> str | None:
    """The report's note when fresh processes would compile torch from source, with the fix."""
    if state["torch_byte_compiled"]:
        return None
    return ("torch is not byte-compiled for this Python (no .pyc" + ("" if state["writes_pyc"] else
            ", and PYTHONDONTWRITEBYTECODE is set") + "): fresh processes (cold CLI, ComfyUI restarts) compile "
            "what they import from source, which a pip install does not; first run `export "
            "PYTHONPYCACHEPREFIX=/tmp/pycache; python -m compileall -q -j 0 <site-packages folders>` (bench/README.md)")


# --------------------------------------------------------------------------------------------
# Phases


@dataclass
class PhaseRunner:
    """Runs named phases one after the other; a failure or a timeout in one is recorded and the
    next one still runs. Memory is released between phases so each starts from an empty GPU."""

    report: Report
    deadline: Deadline
    device: torch.device
    selected: set[str] | None = None  # None = all
    results: dict = field(default_factory=dict)

    def wanted(self, name: str) -> bool:
        return self.selected is None or name in self.selected

    def run(self, name: str, fn: Callable[[], None], *, share: float = 1.0, min_s: float = 0.0) -> bool:
        """Run `fn` with at most `share` of the remaining budget; skip it if less than `min_s` is left."""
        if not self.wanted(name):
            return False
        remaining = self.deadline.remaining()
        if remaining < min_s:
            log(f"phase {name}: skipped, {remaining:.0f}s left of the budget (needs {min_s:.0f}s)", self.deadline)
            self.report.phase(name, {"status": "skipped (time budget)", "seconds": 0.0})
            return False
        cap = max(remaining * share, 1.0)
        log(f"phase {name}: start (cap {cap:.0f}s, {remaining:.0f}s left)", self.deadline)
        self.report.phase(name, {"status": "running"})
        t0 = time.monotonic()
        status = "ok"
        try:
            with alarm_after(cap):
                fn()
        except BudgetExceeded as exc:
            status = f"stopped: {exc}"
            log(f"phase {name}: {status}", self.deadline)
            self.report.error(name, exc, "")
        except Exception as exc:  # noqa: BLE001 — any failure is recorded and the next phase runs
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            status = f"failed: {type(exc).__name__}: {exc}"
            self.report.error(name, exc, tb)
            del exc, tb
        finally:
            free_memory()
        seconds = time.monotonic() - t0
        entry = {"status": status, "seconds": round(seconds, 2)}
        if self.device.type == "cuda":
            entry["allocated_gb_after"] = round(allocated_gb(self.device), 3)
        self.report.phase(name, entry)
        log(f"phase {name}: {status} in {seconds:.1f}s", self.deadline)
        return status == "ok"


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


# --------------------------------------------------------------------------------------------
# Command line shared by the entry points


def common_arguments(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every bench entry point takes (phase-specific ones are added by the caller)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configuration on the CPU (smoke test)")
    p.add_argument("--model", help="GLM-Image checkpoint folder (real weights) instead of random weights")
    p.add_argument("--out", default=os.environ.get("OUT") or default_out, help="folder for the .json / .md results")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all phases")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    return p


def parse_common(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.model:
        from glm_core.checkpoint import is_glm_image_folder

        if not is_glm_image_folder(args.model):
            p.error(f"--model {args.model}: not a GLM-Image checkpoint folder (needs model_index.json naming "
                    "GlmImagePipeline and its component sub-folders)")
    return args


def named_phases(p: argparse.ArgumentParser, option: str, text: str, phases) -> list[str]:
    """The phase names in `text` (comma-separated, blanks ignored), in the order given; a name that is not one of
    `phases` stops the parser with an error listing them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(phases))
    if unknown:
        p.error(f"{option}: unknown {unknown}; choose from {', '.join(phases)}")
    return names


def open_report(args: argparse.Namespace, argv: list[str], module: str, stem: str, mode: str,
                render_markdown: Callable[[dict], str]) -> tuple["Report", "Deadline", torch.device]:
    """The preamble of every bench entry point: device and budget (`start_run`), the report with the run's
    meta data, and a first log line naming the GPU and the library versions (a version other than the
    spec's is logged and noted in the report)."""
    deadline, device = start_run(args)
    report = Report(Path(args.out) if args.out else None, stem, base_meta(device, ["-m", module] + argv, mode),
                    render_markdown)
    versions = report.data["reference_versions"]
    log(f"GPU: {report.data['gpu']}; torch {versions['torch']} (CUDA {versions['cuda']}), transformers "
        f"{versions.get('transformers')}, diffusers {versions.get('diffusers')}", deadline)
    warnings = version_warnings(versions) + [bytecode_warning(report.data["python_bytecode"])]
    for warning in filter(None, warnings):
        log(f"WARNING: {warning}", deadline)
        report.note(warning)
    return report, deadline, device


def resolve_reps(parser: argparse.ArgumentParser, args: argparse.Namespace, *, tiny: int, full: int = 20) -> None:
    """args.reps: `tiny` with --tiny and `full` otherwise when not given; at least 1."""
    if args.reps is None:
        args.reps = tiny if args.tiny else full
    if args.reps < 1:
        parser.error("--reps must be at least 1")


def start_run(args: argparse.Namespace) -> tuple["Deadline", torch.device]:
    """Line-buffered output, no autograd, the device, and the wall-clock budget."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # for child processes; this one is line-buffered below
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    deadline = Deadline(args.budget_s)
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.set_grad_enabled(False)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: thread oversubscription made tiny runs 10-20x slower
    return deadline, device


def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 — a missing or broken triton install
        return None
    return triton.__version__


def start_kernel_bench(argv: list[str], module: str, description: str, budget_s: float,
                       render_markdown: Callable[[dict], str]) -> tuple[argparse.Namespace, "Deadline", torch.device,
                                                                           "Report"]:
    """The start of a bench of our own Triton kernels (bench.decode_attention): --tiny, --out,
    --budget-s, --reps, --device parsed; the run started; on the CPU only under Triton's interpreter; the report
    (`<stem>.json` / `.md` in --out, stem = the module's last name) with the run's meta and an empty results list."""
    stem = module.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (with TRITON_INTERPRET=1)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help=f"folder for {stem}.json / .md")
    p.add_argument("--budget-s", type=float, default=budget_s)
    p.add_argument("--reps", type=int, default=None, help="timed replays per variant (default 20; --tiny 2)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    args = p.parse_args(argv)
    resolve_reps(p, args, tiny=2)
    if triton_version() is None:
        raise SystemExit(f"{module} needs the triton package")
    deadline, device = start_run(args)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on the CPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    meta = {"gpu": device_name(device), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "-m", module] + argv),
            "mode": "tiny, CPU interpreter" if args.tiny else f"real shapes, {device.type}",
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
                         "python": platform.python_version()}, "results": []}
    return args, deadline, device, Report(Path(args.out) if args.out else None, stem, meta, render_markdown)


def time_kernel_variants(report: "Report", deadline: "Deadline", fields: dict, variants: dict,
                         us_per_layer: Callable, relative_error: Callable) -> None:
    """One result per variant of a kernel bench's case (`fields` name the case): µs per layer and the relative
    error, recorded and written as each finishes; a variant that the budget no longer leaves time for is noted."""
    label = " ".join(str(value) for value in fields.values())
    for name, step in variants.items():
        if deadline.remaining() < 5:
            report.note(f"budget spent: {label}, {name} and later variants not run")
            return
        result = {**fields, "variant": name, "us_per_layer": round(us_per_layer(step), 3),
                  "relative_error": relative_error(step)}
        report.data["results"].append(result)
        report.write()
        log(f"  {label}, {name}: {result['us_per_layer']:.2f} µs per layer, rel. error "
            f"{result['relative_error']:.1e}", deadline)


def kernel_bench_markdown(data: dict, title: str, columns: list[tuple[str, str, str]]) -> str:
    """A kernel bench's report: its meta, then one row per result with `columns` (key, header, format spec)."""
    versions = data.get("versions") or {}
    lines = [f"# {title} ({data.get('mode', '')})", "",
             f"- GPU: {data.get('gpu')}", f"- date: {data.get('date')}", f"- command: `{data.get('command')}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
             "| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in data.get("results", []):
        lines.append("| " + " | ".join(format(r[key], spec) for key, _, spec in columns) + " |")
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Markdown shared by the reports


def markdown_header(title: str, data: dict) -> list[str]:
    """Title, GPU, date, command and library versions of a run."""
    versions = data.get("reference_versions") or {}
    return [f"# {title} ({data.get('mode', '')})", "",
            f"- GPU: {data.get('gpu')}", f"- date: {data.get('date')}", f"- command: `{data.get('command')}`",
            "- versions: " + ", ".join(f"{k} {versions.get(k)}"
                                       for k in ("torch", "cuda", "transformers", "diffusers", "python"))]


def markdown_tail(data: dict) -> list[str]:
    """Notes, per-phase status and errors of a run."""
    lines: list[str] = []
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    phases = data.get("phases") or {}
    if phases:
        lines += ["## Phases", "", "| phase | status | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('status')} | {v.get('seconds', '')} |" for k, v in phases.items()]
        lines.append("")
    if data.get("errors"):
        lines += ["## Errors", ""] + [f"- {e['phase']}: {e['error']}" for e in data["errors"]] + [""]
    return lines


def finish(report: "Report", name: str, clock: "Deadline") -> dict:
    """Print the phases that failed and where the results went; the report's data for the caller."""
    if report.data["errors"]:
        print(f"\n{len(report.data['errors'])} phase(s) reported errors: "
              + "; ".join(f"{e['phase']}: {e['error']}" for e in report.data["errors"]), flush=True)
    if report.out_dir:
        log(f"wrote {report.out_dir / (name + '.json')} and {name}.md", clock)
    return report.data
