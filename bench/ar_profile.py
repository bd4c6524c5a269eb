"""Where one AR decode step's time goes, kernel by kernel, in bf16 and in FP8, through glm_core's public API.

    python3 -m bench.ar_profile --model /tmp/glm-image --out $OUT [--weights bf16,fp8] [--window 128]
    python3 -m bench.ar_profile --tiny --out DIR      # the same code on the CPU, tiny checkpoint (ops, not kernels)

Per weight format: the AR stage alone on the GPU, one whole 1024² generation to compile and capture, one more timed
(ms per token over the whole generation), then a third with torch's profiler on for `--window` tokens from token
400 on (bench/kernel_profile.py says what is reported per token). The profiler adds host work per launch, not GPU
time: the kernel times are what a step costs, the window's wall time is not (the timed run's ms per token is).
Results: ar_profile.json (rewritten after each weight format) and ar_profile.md.
"""
from __future__ import annotations

import json
import time

import torch

from bench import kernel_profile
from bench.harness import time_once
from glm_core import gemv, pipeline

PROMPT = 'A red fox on a snowy hill at dawn, a wooden sign that says "GLM"'
WINDOW_START = 400  # tokens: past the capture, the bounded queue full, the cache a third filled

# Kernel name fragments -> what the kernel does (the first match wins; lower-case).
# Inductor names its fused kernels after the ops they hold, the GEMV op beside them among those: "triton_" first.
KERNEL_GROUPS = [
    ("gemv_kernel", "linear: GEMV (ours, glm_core/gemv.py)"),
    ("split_kernel", "attention (ours, glm_core/decode_attention.py)"),
    ("combine_kernel", "attention (ours, glm_core/decode_attention.py)"),
    ("triton_", "inductor-fused: norms, rope, residuals, cache writes, attention inputs"),
    ("gemv", "linear: cuBLAS GEMV / GEMM"),
    ("gemm", "linear: cuBLAS GEMV / GEMM"),
    ("nvjet", "linear: cuBLAS GEMV / GEMM"),
    ("splitk", "linear: cuBLAS GEMV / GEMM"),
    ("cutlass", "linear: cuBLAS GEMV / GEMM"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("attention", "attention"),
    ("cudnn", "attention"),
    ("sort", "sampling (sort, scan)"),
    ("scan", "sampling (sort, scan)"),
    ("linear", "linear: cuBLAS GEMV / GEMM"),  # the CPU's aten::linear (--tiny)
]


def kernel_group(name: str) -> str:
    return kernel_profile.kernel_group(name, KERNEL_GROUPS)


def profile_generation(model, cond, start_at: int, window: int, on_cuda: bool) -> dict:
    """One generation with the profiler on for `window` tokens from `start_at` (progress callbacks come every
    few tokens; the window is widened to the next one)."""
    profiled = kernel_profile.Window(on_cuda)
    state = {}

    def progress(done: int, total: int) -> None:
        if not profiled.started and done >= min(start_at, total // 3):
            profiled.start()
            state["first"] = done
        elif profiled.started and not profiled.stopped and done >= state["first"] + min(window, total // 3):
            profiled.stop()
            state["last"] = done

    pipeline.generate_tokens(model, cond, seed=11, progress=progress)
    if not profiled.stopped:
        raise RuntimeError("the generation ended before the profiling window closed")
    return kernel_profile.summarise(profiled.events(), state["last"] - state["first"], profiled.wall_s,
                                    KERNEL_GROUPS)


def profile_weights(folder: str, weights: str, device: torch.device, size: int, window: int) -> dict:
    model = pipeline.GlmImage.from_folder(folder, device=device, weights=weights, placement="gpu"
                                          if device.type == "cuda" else "auto")
    try:
        cond = pipeline.encode_prompt(model, PROMPT, size, size)
        first_s = time_once(lambda: pipeline.generate_tokens(model, cond, seed=10), device, wall=True)
        timed_s = time_once(lambda: pipeline.generate_tokens(model, cond, seed=10), device, wall=True)
        from glm_core.processor import get_target_shape

        grid_h, grid_w, preview_h, preview_w = get_target_shape(size, size)
        count = grid_h * grid_w + preview_h * preview_w + 1
        result = {"weights": weights, "size": size, "tokens": count, "first_generation_s": round(first_s, 2),
                  "ms_per_token": round(timed_s / count * 1e3, 3)}
        result["profile"] = profile_generation(model, cond, WINDOW_START if size >= 1024 else 8, window,
                                               device.type == "cuda")
        result["gemv_block_shapes"] = gemv.tuned_block_shapes()
        return result
    finally:
        model.unload()


def render_markdown(data: dict) -> str:
    lines = [f"# GLM-Image AR decode step, kernel by kernel ({data['meta']['device']}, {data['meta']['date']})", ""]
    for weights, result in data["results"].items():
        if "error" in result:
            lines += [f"## {weights}: failed: {result['error']}", ""]
            continue
        prof = result["profile"]
        lines += [f"## {weights}: {result['ms_per_token']} ms/token over a whole {result['size']}² generation "
                  f"({result['tokens']} tokens)", "",
                  f"Profiled window: {prof['steps']} tokens; per token: kernels {prof['kernel_us_per_token']} µs, "
                  f"GPU busy {prof['busy_us_per_token']} µs, {prof['launches_per_token']} launches.", ""]
        lines += kernel_profile.markdown_tables(prof, "token", top=25) + [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = kernel_profile.profile_arguments(__doc__.splitlines()[0], tiny_size=512)
    p.add_argument("--weights", default="bf16,fp8")
    p.add_argument("--window", type=int, default=128, help="tokens profiled")
    args = p.parse_args(argv)
    device, out, folder = kernel_profile.start_profile(p, args)
    data = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "model": str(folder)}, "results": {}}
    for weights in [w.strip() for w in args.weights.split(",") if w.strip()]:
        try:
            data["results"][weights] = profile_weights(str(folder), weights, device, 512 if args.tiny else 1024,
                                                       args.window)
        except Exception as exc:  # noqa: BLE001 — the other format is still measured
            data["results"][weights] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({weights: {k: v for k, v in data["results"][weights].items() if k != "profile"}}),
              flush=True)
        (out / "ar_profile.json").write_text(json.dumps(data, indent=1))
        (out / "ar_profile.md").write_text(render_markdown(data))
    return 0 if all("error" not in r for r in data["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
