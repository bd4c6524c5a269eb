"""Cold start: what a fresh `python -m glm_core --model FOLDER` process costs for one image, part by part.

Two fresh processes, one after the other, with the weights in the page cache (the folder is read once first):
- `first_run_s_t2i_1024`: torch's compile caches empty (TORCHINDUCTOR_CACHE_DIR pointed at a new, empty folder;
  TRITON_CACHE_DIR unset so that Triton's kernels follow it);
- `cold_cli_s_t2i_1024`: the same command again, the caches warm from the first process.
Each figure is the process's wall time from start to exit; the split comes from the CLI's own `--timings` file
(parts, stage loads, torch.compile's total); start-up = the wall time the CLI did not see (interpreter, imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import workloads
from bench.harness import Deadline, log

REPO_ROOT = Path(__file__).resolve().parent.parent


def read_into_page_cache(folder: Path) -> tuple[int, float]:
    """Read every file of the folder once (bytes, seconds), so that the runs find the weights in the page cache."""
    start, total = time.perf_counter(), 0
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while chunk := handle.read(64 << 20):
                    total += len(chunk)
    return total, time.perf_counter() - start


def cli_command(folder: Path, out_dir: Path, tag: str, sizes: workloads.E2ESizes, device: str | None) -> list[str]:
    width, height = sizes.t2i
    command = [sys.executable, "-m", "glm_core", "--model", str(folder), "--prompt", workloads.T2I_PROMPT,
               "--width", str(width), "--height", str(height), "--steps", str(sizes.steps),
               "--out", str(out_dir / f"{tag}.png"), "--timings", str(out_dir / f"{tag}_timings.json")]
    return command + (["--device", device] if device else [])


def run_cli(command: list[str], cache_dir: Path, timeout_s: float, one_thread: bool = False) -> dict:
    """One fresh process; its wall time, exit code, --timings split and the last lines of its stderr.
    `one_thread` (CPU runs): a token-by-token loop on a shared CPU runs many times slower with several threads."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env.pop("TRITON_CACHE_DIR", None)  # this process's torch may have set it to its own cache folder
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    timings = json.loads(Path(command[command.index("--timings") + 1]).read_text())
    files = sum(1 for path in cache_dir.rglob("*") if path.is_file())
    return {"wall_s": wall, "startup_s": wall - timings["total_s"], **timings, "cache_files_after": files,
            "stderr_tail": proc.stderr.strip().splitlines()[-40:]}


def phase_cold(b, clock: Deadline) -> None:
    """Both fresh processes (this process holds no GPU memory while they run)."""
    b.close_session()
    nbytes, seconds = read_into_page_cache(b.folder)
    b.record("ours", "page_cache_read_s", seconds, {"bytes": nbytes, "gpu_gb_held_by_this_process": b.allocated()})
    device = b.args.device or ("cpu" if b.device.type == "cpu" else None)
    with tempfile.TemporaryDirectory(prefix="glm_bench_cold_") as scratch:
        scratch = Path(scratch)
        cache = scratch / "torch_compile"
        cache.mkdir()
        on_cpu = b.device.type == "cpu"
        first = run_cli(cli_command(b.folder, scratch, "first_run", b.sizes, device), cache, clock.remaining(),
                        on_cpu)
        b.record("ours", "first_run_s_t2i_1024", first["wall_s"], first)
        if not b.fits(clock, first["wall_s"], "the cold CLI run (warm compile cache)"):
            return
        warm = run_cli(cli_command(b.folder, scratch, "cold_cli", b.sizes, device), cache, clock.remaining(), on_cpu)
        b.record("ours", "cold_cli_s_t2i_1024", warm["wall_s"], warm)
    log(f"  fresh CLI processes: {first['wall_s']:.1f} s with empty compile caches, {warm['wall_s']:.1f} s with "
        "warm ones", b.deadline)
