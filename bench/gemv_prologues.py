"""Folding the AR decode layer's small elementwise kernels into the GEMVs that read their output: a candidate kernel
(not used by glm_core) timed against what the compiled decode layer runs today.

    python -m bench.gemv_prologues --out DIR                           # one GPU, about a minute on an H200
    TRITON_INTERPRET=1 python -m bench.gemv_prologues --tiny --out DIR   # CPU, Triton's interpreter (smoke test)

Why (bench.ar_profile, H200, 2026-11-30 15:15): the linears of a bf16 decode token run at 94 % of the bandwidth floor,
the other ~0.9 ms per token are 8 small kernels a layer bound by launch and ramp-up latency, and the gaps between
541 launches add 0.27 ms. Two of those kernels only prepare a GEMV's input:
- the input RMSNorm before q/k/v (1.8 µs a layer): a GEMV that walks the whole row anyway can sum its squares as it
  goes and apply the norm's factor to the finished sums, y = rsqrt(mean(x²) + eps) · W·(g ∘ x);
- silu(gate) · up before down (1.1 µs a layer): the down GEMV can read gate and up and multiply as it loads.
Each fold saves a kernel and a launch gap, and costs the GEMV a second input read from L2.

Variants per case (q/k/v with the norm, down with silu·up; bf16 and e4m3 weights), each over 40 layers' weights in
one CUDA graph (more than L2, as in a decode step), µs per layer = one replay / 40, median of --reps replays:
- `separate`: torch.compile'd RMSNorm (or silu·up), then glm_core's GEMV (traced into the same compiled function,
  as in the decode layer);
- `fused bN kK wW sS`: the candidate kernel with that block shape, warps and stages.
Each variant's output is compared with the float64 computation (relative max error in the table).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/gemv_prologues.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness  # noqa: E402
from bench.harness import Deadline, graph_seconds  # noqa: E402
from glm_core import gemv as glm_gemv  # noqa: E402
from glm_core.fp8 import quantize_weight  # noqa: E402

STEM = "gemv_prologues"
NO_PROLOGUE, RMS_NORM, SILU_MUL = 0, 1, 2
EPS = 1e-5

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 — the bench says so when it runs
    triton = None
    tl = None


if triton is not None:
    @triton.jit
    def prologue_gemv_kernel(x_ptr, norm_ptr, eps, weight_ptr, scale_ptr, bias_ptr, y_ptr, N, K: tl.constexpr,
                             PROLOGUE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """glm_core/gemv.py's kernel with the input made as it loads: RMS_NORM reads the raw row x (K,) and the norm
        weight g (K,) and scales the finished sums by rsqrt(mean(x²) + eps); SILU_MUL reads gate = x[:K] and
        up = x[K:2K] and uses silu(gate) · up. Everything in fp32 (no bf16 rounding of the prepared input)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            if PROLOGUE == 1:
                squares += x * x
                x = x * tl.load(norm_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            if PROLOGUE == 2:
                up = tl.load(x_ptr + K + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
                x = x * tl.sigmoid(x) * up
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if PROLOGUE == 1:
            y *= tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if HAS_SCALE:
            y *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(tl.bfloat16), mask=col_ok)


def prologue_gemv(x, weight, weight_scale, bias, norm_weight, prologue: int, config: dict) -> torch.Tensor:
    """y (N,) bf16 = W · prologue(x) (· scale) (+ bias); x (K,) or, for SILU_MUL, (2K,) bf16."""
    out_features, in_features = weight.shape
    y = torch.empty(out_features, device=x.device, dtype=torch.bfloat16)
    prologue_gemv_kernel[(triton.cdiv(out_features, config["BLOCK_N"]),)](
        x, norm_weight if norm_weight is not None else y, EPS, weight, weight_scale if weight_scale is not None else y,
        bias if bias is not None else y, y, out_features, in_features, PROLOGUE=prologue,
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, **config)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """glm_core.ar.model.RMSNorm's arithmetic: normalise in fp32, cast back, then scale."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """glm_core.ar.model.TextMLP's input to down: up · silu(gate), gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def separate_step(prologue: int):
    """The decode layer's way: the elementwise op, then glm_core's GEMV on its bf16 output."""
    prepare = rms_norm if prologue == RMS_NORM else (lambda x, _: silu_mul(x))

    def step(x, weight, weight_scale, bias, norm_weight):
        prepared = prepare(x, norm_weight)
        if x.device.type == "cpu":  # the interpreter: glm_core's kernel launched directly
            y = torch.empty(weight.shape[0], dtype=torch.bfloat16)
            glm_gemv.launch(prepared, weight, weight_scale, bias, y)
            return y
        return glm_gemv.gemv(prepared, weight, weight_scale, bias)

    return step


def reference(x, weight, weight_scale, bias, norm_weight, prologue: int) -> torch.Tensor:
    x64 = x.double()
    if prologue == RMS_NORM:
        prepared = x64 * torch.rsqrt(x64.pow(2).mean() + EPS) * norm_weight.double()
    else:
        gate, up = x64.chunk(2)
        prepared = up * F.silu(gate)
    w64 = weight.double() * (weight_scale.double()[:, None] if weight_scale is not None else 1.0)
    y = w64 @ prepared
    return y + bias.double() if bias is not None else y


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096
    qkv: int = 4608  # 32 q heads + 2 × 2 kv heads, head_dim 128
    intermediate: int = 13696
    layers: int = 40
    configs: tuple = ((2, 2048, 8, 1), (8, 1024, 4, 3), (2, 2048, 4, 2), (4, 1024, 4, 2))


TINY_SHAPES = Shapes(hidden=96, qkv=48, intermediate=80, layers=2, configs=((4, 32, 1, 1),))


@dataclass
class Case:
    name: str
    prologue: int
    x: torch.Tensor
    norm_weight: torch.Tensor | None
    layers: list  # per layer (weight, weight_scale, bias)


def make_case(shapes: Shapes, name: str, weights: str, device: torch.device) -> Case:
    bf16 = torch.bfloat16
    if name == "qkv+norm":
        prologue, n, k, with_bias = RMS_NORM, shapes.qkv, shapes.hidden, True
        x = (torch.randn(k, device=device) * 3).to(bf16)
        norm_weight = (1 + 0.1 * torch.randn(k, device=device)).to(bf16)
    else:
        prologue, n, k, with_bias = SILU_MUL, shapes.hidden, shapes.intermediate, False
        x, norm_weight = torch.randn(2 * k, device=device).to(bf16), None
    layers = []
    for _ in range(shapes.layers):
        weight = (torch.randn(n, k, device=device) / k ** 0.5).to(bf16)
        scale = None
        if weights == "e4m3":
            weight, scale = quantize_weight(weight)
        bias = (0.1 * torch.randn(n, device=device)).to(bf16) if with_bias else None
        layers.append((weight, scale, bias))
    return Case(name, prologue, x, norm_weight, layers)


def variants(case: Case, shapes: Shapes, device: torch.device) -> dict:
    separate = separate_step(case.prologue)
    out = {"separate": torch.compile(separate, dynamic=False) if device.type == "cuda" else separate}
    for n, k, w, s in shapes.configs:
        config = {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
        out[f"fused b{n} k{k} w{w} s{s}"] = (
            lambda x, weight, scale, bias, norm, config=config: prologue_gemv(x, weight, scale, bias, norm,
                                                                              case.prologue, config))
    return out


def relative_error(step, case: Case) -> float:
    weight, scale, bias = case.layers[0]
    got = step(case.x, weight, scale, bias, case.norm_weight).double()
    expected = reference(case.x, weight, scale, bias, case.norm_weight, case.prologue)
    return ((got - expected).abs().max() / expected.abs().max()).item()


def us_per_layer(step, case: Case, reps: int, clock: Deadline) -> float:
    def all_layers():
        for weight, scale, bias in case.layers:
            step(case.x, weight, scale, bias, case.norm_weight)

    return graph_seconds(all_layers, device=case.x.device, reps=reps, clock=clock) / len(case.layers) * 1e6


def render_markdown(data: dict) -> str:
    return harness.kernel_bench_markdown(data, "GEMVs with their input made as they load", [
        ("case", "case", ""), ("weights", "weights", ""), ("variant", "variant", ""),
        ("us_per_layer", "µs per layer", ".2f"), ("relative_error", "rel. error vs float64", ".2e")])


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, deadline, device, report = harness.start_kernel_bench(argv, "bench.gemv_prologues", __doc__, 120.0,
                                                                render_markdown)
    shapes = TINY_SHAPES if args.tiny else Shapes()
    torch.manual_seed(0)
    for name in ("qkv+norm", "down+silu·up"):
        for weights in ("bf16", "e4m3"):
            case = make_case(shapes, name, weights, device)
            harness.time_kernel_variants(report, deadline, {"case": name, "weights": weights},
                                         variants(case, shapes, device),
                                         lambda step: us_per_layer(step, case, args.reps, deadline),
                                         lambda step: relative_error(step, case))
            case = None  # its 40 layers of weights go before the next case is made
            harness.free_memory()
    print(render_markdown(report.data), flush=True)
    return harness.finish(report, STEM, deadline)


if __name__ == "__main__":
    main()
