"""The FP8 AR's one-row GEMV on the tensor cores: candidate kernels (not used by glm_core) timed against glm_core's.

    python -m bench.gemv_dot --out DIR                           # one GPU, about two minutes on an H200
    TRITON_INTERPRET=1 python -m bench.gemv_dot --tiny --out DIR   # CPU, Triton's interpreter (smoke test)

Why (bench.ar_profile, H200, 2026-11-30 17:32): the e4m3 GEMVs of an FP8 decode token take 2630 µs against a floor
of 1960 µs for their bytes (75 %), while the same kernel on bf16 weights reaches 94 %. Per byte read, glm_core's
kernel (glm_core/gemv.py) does twice the arithmetic on e4m3 as on bf16: each weight is converted to fp32 and
multiplied on the CUDA cores (about three instructions per element), enough to stop short of the bandwidth. The
tensor cores can take that work: the one input row padded to the 16 rows an MMA needs (15 of them zero), the
weight tile read as the second operand, fp32 accumulation.

Variants per AR linear (q/k/v, o, gate_up, down), each over 40 layers' e4m3 weights in one CUDA graph (more than
L2, as in a decode step), µs per layer = one replay / 40, median of --reps replays:
- `glm_core`: glm_core's GEMV, autotuned, as the decode layer calls it;
- `dot16 bN kK wW sS`: weights e4m3 -> fp16 in registers (exact), the row bf16 -> fp16, fp16 MMA;
- `dot8 bN kK wW sS`: the row quantised to e4m3 with one scale (its max / 448), e4m3 MMA: no conversion of the
  weights at all. The row's quantisation is made outside the timed graph (in a decode layer it would fold into the
  RMSNorm or silu·up kernel before the GEMV); its error is in the relative error.
Each variant's output is compared with the float64 product of the dequantised weights and the bf16 row.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/gemv_dot.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness  # noqa: E402
from bench.harness import Deadline, graph_seconds  # noqa: E402
from glm_core import gemv as glm_gemv  # noqa: E402
from glm_core.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_weight  # noqa: E402

STEM = "gemv_dot"
MMA_ROWS = 16  # the smallest M of an MMA that Triton's tl.dot takes

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 — the bench says so when it runs
    triton = None
    tl = None


if triton is not None:
    @triton.jit
    def dot_gemv_kernel(x_ptr, x_scale_ptr, weight_ptr, scale_ptr, bias_ptr, y_ptr, N, K: tl.constexpr,
                        X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        ROWS: tl.constexpr):
        """y (N,) = scale ∘ (W x) (· x_scale) (+ bias) with W (N, K) e4m3 read as the MMA's second operand (K, BLOCK_N)
        and x as row 0 of the first (ROWS, K); rows 1.. are masked to zero, so the column sums are row 0."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
        col_ok = cols < N
        rows = tl.arange(0, ROWS)
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N): Wᵀ, K-major
        x_ptrs = x_ptr + rows[:, None] * 0 + ks[None, :]  # (ROWS, BLOCK_K), every row pointing at x
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptrs, mask=(rows[:, None] == 0) & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
            if X_FP8:
                acc = tl.dot(x, w, acc)
            else:
                acc = tl.dot(x.to(tl.float16), w.to(tl.float16), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=0) * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)  # (BLOCK_N,) fp32
        if X_FP8:
            y *= tl.load(x_scale_ptr)
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(tl.bfloat16), mask=col_ok)


def quantize_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (K,) bf16 -> (e4m3 (K,), fp32 scale (1,)): one scale for the row, its max |x| / 448."""
    scale = (x.float().abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dot_gemv(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """x (K,) e4m3 with its x_scale (dot8) or bf16 without (dot16); weight (N, K) e4m3 -> y (N,) bf16."""
    out_features, in_features = weight.shape
    y = torch.empty(out_features, device=weight.device, dtype=torch.bfloat16)
    x_fp8 = x.dtype == FP8_DTYPE
    dot_gemv_kernel[(triton.cdiv(out_features, config["BLOCK_N"]),)](
        x, x_scale if x_fp8 else weight_scale, weight, weight_scale, bias if bias is not None else weight_scale, y,
        out_features, in_features, X_FP8=x_fp8, HAS_BIAS=bias is not None, ROWS=MMA_ROWS, **config)
    return y


@dataclass(frozen=True)
class Shapes:
    """The AR decoder's linears (spec §1: hidden 4096, 32 q heads and 2 kv heads of 128, MLP 13696), 40 layers."""
    linears: tuple = (("qkv", 4608, 4096, True), ("o", 4096, 4096, False), ("gate_up", 27392, 4096, False),
                      ("down", 4096, 13696, False))
    layers: int = 40
    configs: tuple = ((16, 512, 4, 3), (16, 1024, 4, 3), (32, 512, 4, 3), (32, 256, 4, 4), (16, 256, 4, 4),
                      (64, 256, 4, 3))


TINY_SHAPES = Shapes(linears=(("qkv", 48, 96, True), ("down", 32, 80, False)), layers=2, configs=((16, 32, 1, 1),))


@dataclass
class Case:
    x: torch.Tensor  # (K,) bf16
    x_fp8: torch.Tensor
    x_scale: torch.Tensor
    layers: list  # per layer (weight e4m3, weight_scale fp32, bias bf16 or None)


def make_case(n: int, k: int, with_bias: bool, layers: int, device: torch.device) -> Case:
    x = torch.randn(k, device=device).to(torch.bfloat16)
    weights = []
    for _ in range(layers):
        weight, scale = quantize_weight((torch.randn(n, k, device=device) / k ** 0.5).to(torch.bfloat16))
        bias = (0.1 * torch.randn(n, device=device)).to(torch.bfloat16) if with_bias else None
        weights.append((weight, scale, bias))
    return Case(x, *quantize_row(x), weights)


def variants(case: Case, shapes: Shapes) -> dict:
    def ours(weight, scale, bias):
        if case.x.device.type == "cpu":  # the interpreter: glm_core's kernel launched directly
            y = torch.empty(weight.shape[0], dtype=torch.bfloat16)
            glm_gemv.launch(case.x, weight, scale, bias, y)
            return y
        return glm_gemv.gemv(case.x, weight, scale, bias)

    out = {"glm_core": ours}
    for n, k, w, s in shapes.configs:
        config = {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
        out[f"dot16 b{n} k{k} w{w} s{s}"] = (
            lambda weight, scale, bias, config=config: dot_gemv(case.x, None, weight, scale, bias, config))
        out[f"dot8 b{n} k{k} w{w} s{s}"] = (
            lambda weight, scale, bias, config=config: dot_gemv(case.x_fp8, case.x_scale, weight, scale, bias, config))
    return out


def relative_error(step, case: Case) -> float:
    weight, scale, bias = case.layers[0]
    got = step(weight, scale, bias).double()
    expected = (weight.double() * scale.double()[:, None]) @ case.x.double()
    if bias is not None:
        expected = expected + bias.double()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def us_per_layer(step, case: Case, reps: int, clock: Deadline) -> float:
    def all_layers():
        for weight, scale, bias in case.layers:
            step(weight, scale, bias)

    return graph_seconds(all_layers, device=case.x.device, reps=reps, clock=clock) / len(case.layers) * 1e6


def render_markdown(data: dict) -> str:
    return harness.kernel_bench_markdown(data, "The FP8 AR's one-row GEMV on the tensor cores", [
        ("linear", "linear", ""), ("variant", "variant", ""), ("us_per_layer", "µs per layer", ".2f"),
        ("relative_error", "rel. error vs float64", ".2e")])


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, deadline, device, report = harness.start_kernel_bench(argv, "bench.gemv_dot", __doc__, 240.0,
                                                                render_markdown)
    shapes = TINY_SHAPES if args.tiny else Shapes()
    torch.manual_seed(0)
    for name, n, k, with_bias in shapes.linears:
        case = make_case(n, k, with_bias, shapes.layers, device)
        harness.time_kernel_variants(report, deadline, {"linear": f"{name} {n}x{k}"}, variants(case, shapes),
                                     lambda step: us_per_layer(step, case, args.reps, deadline),
                                     lambda step: relative_error(step, case))
        case = None  # its 40 layers of weights go before the next linear's are made
        harness.free_memory()
    print(render_markdown(report.data), flush=True)
    return harness.finish(report, STEM, deadline)


if __name__ == "__main__":
    main()
