"""The AR decode's CUDA graph under both of PyTorch's CUDA allocators, each in a fresh process.

ComfyUI starts PyTorch with `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync` on Nvidia cards; the CLI and the API
run under PyTorch's own caching allocator ("native"). Under cudaMallocAsync the compiled decode layer launches its
kernels from inductor's C++ wrapper (glm_core.memory.under_cuda_malloc_async); a third child runs
cudaMallocAsync with compiling off (GLM_CORE_NO_COMPILE=1: what ComfyUI got before, the plain layers in the graph).
Each child process loads the AR (bf16, all on the GPU), samples tokens for 512² twice, a batch of two, and 1024²
twice (seeds differ; memory released between generations as ComfyUI does), and reports: the exit code (a capture
that breaks the allocator aborts the process), any CUDA-graph fallback warning, any compile fallback to eager, the
seconds and ms/token of each generation (bench.harness's clock: host time between synchronisations), and a digest
of every token grid. Every child must exit cleanly with no fallback; whether the two compiled children gave the same
tokens is reported (the same kernels, but each process autotunes its own).

    python3 -m bench.ar_graph_allocators --model /tmp/glm-image --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench.harness import named_phases

# child name: (PYTORCH_CUDA_ALLOC_CONF, compile off)
CHILDREN = {"native": (None, False), "cudaMallocAsync": ("backend:cudaMallocAsync", False),
            "cudaMallocAsync_plain_layers": ("backend:cudaMallocAsync", True)}
SAME_KERNELS = ("native", "cudaMallocAsync")
# (name, width, height, batch, seed): the first 512² includes compiling and capturing
CASES = (("512_first", 512, 512, 1, 1), ("512", 512, 512, 1, 2), ("512_batch2", 512, 512, 2, 3),
         ("1024_first", 1024, 1024, 1, 4), ("1024", 1024, 1024, 1, 5))


def child(folder: str) -> dict:
    import torch

    from bench.harness import time_once
    from bench.workloads import T2I_PROMPT
    from glm_core import pipeline

    cases = CASES

    torch.set_grad_enabled(False)
    result = {"allocator": torch.cuda.get_allocator_backend(), "cases": {}, "warnings": []}
    model = pipeline.GlmImage.from_folder(folder, placement="gpu", weights="bf16")
    device = torch.device("cuda", torch.cuda.current_device())
    result["ar_load_s"] = round(time_once(lambda: model.prepare(["ar"]), device, wall=True), 3)
    for name, width, height, batch, seed in cases:
        cond = pipeline.encode_prompt(model, T2I_PROMPT, width, height)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generated_tokens = []
            seconds = time_once(lambda: generated_tokens.append(
                pipeline.generate_tokens(model, cond, seed=seed, batch_size=batch)), device, wall=True)
            tokens = generated_tokens.pop()
        result["warnings"] += [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
        grids = tokens.grid_ids.cpu().contiguous()
        gh, gw = grids.shape[1:]
        generated = gh * gw + 16 * 16 + 1  # large grid, 16x16 preview (square t2i sizes), EOS (spec table)
        result["cases"][name] = {"s": round(seconds, 3), "ms_per_token": round(1000 * seconds / generated, 3),
                                 "tokens_sha256": hashlib.sha256(grids.numpy().tobytes()).hexdigest()[:16]}
        del tokens, grids
        gc.collect()
        torch.cuda.empty_cache()  # ComfyUI's soft_empty_cache between nodes
    result["allocated_gb_end"] = round(torch.cuda.memory_allocated() / 1e9, 3)
    from glm_core.compiling import _WRAPPERS

    result["compile_fallbacks"] = {w.name: w.fallback_reason for w in _WRAPPERS.values() if w.failed}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timeout-s", type=float, default=240)
    p.add_argument("--children", default=",".join(CHILDREN), help=f"comma-separated, of {', '.join(CHILDREN)}")
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.model)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "runs": {}}
    for name in named_phases(p, "--children", args.children, CHILDREN):
        conf, compile_off = CHILDREN[name]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        env.pop("GLM_CORE_NO_COMPILE", None)
        if conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        if compile_off:
            env["GLM_CORE_NO_COMPILE"] = "1"
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "bench.ar_graph_allocators",
                                   "--model", args.model, "--child"],
                                  env=env, capture_output=True, text=True, timeout=args.timeout_s)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            run = json.loads(lines[-1][7:]) if lines else {}
            run.update(exit_code=proc.returncode, stderr_head=proc.stderr[:3000] if proc.returncode else "",
                       stderr_tail=proc.stderr[-2000:] if proc.returncode else "")
        except subprocess.TimeoutExpired:
            run = {"exit_code": None, "error": f"timed out after {args.timeout_s} s"}
        run["process_s"] = round(time.perf_counter() - start, 1)
        report["runs"][name] = run
        print(name, json.dumps(run, indent=1), flush=True)
    digests = {name: {case: v["tokens_sha256"] for case, v in report["runs"].get(name, {}).get("cases", {}).items()}
               for name in SAME_KERNELS}
    report["same_tokens"] = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1 and all(digests.values())
    report["all_exited_cleanly"] = all(run.get("exit_code") == 0 for run in report["runs"].values())
    report["no_fallbacks"] = all(not run.get("warnings") and not run.get("compile_fallbacks")
                                 for run in report["runs"].values())
    print(f"same tokens, {' and '.join(SAME_KERNELS)}: {report['same_tokens']}; all exited cleanly: "
          f"{report['all_exited_cleanly']}; no fallbacks: {report['no_fallbacks']}", flush=True)
    (out / "ar_graph_allocators.json").write_text(json.dumps(report, indent=1))
    return 0 if report["all_exited_cleanly"] and report["no_fallbacks"] else 1


if __name__ == "__main__":
    sys.exit(main())
