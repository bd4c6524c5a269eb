"""One-row GEMV for decode steps: y = x @ W^T (+ bias), reading the weight once, for e4m3 and for bf16 weights.

What it computes
    y[n] = s[n] * sum_k x[k] * float(weight[n, k]) (+ bias[n]) for one bf16 row x (K,) and a row-major weight (N, K),
    either float8_e4m3fn with per-output-channel fp32 scales s = weight_scale (N,) (the format of glm_core/fp8.py),
    or bf16 without scales (s = 1); bias (N,) or None; y (N,) bf16. x is not quantised: the only roundings besides
    the weight's own are the fp32 products and sums and the final bf16 store.

Why a kernel of our own
    A batch-1 decode step is memory bound: its time is the weight bytes over the HBM bandwidth. Neither library path
    reaches it at one row (bench/fp8_kernels.py, H200, 2026-11-30, CUDA graphs over weight copies larger than L2):
    - e4m3: `torch._scaled_mm` pads the row to 16 and quantises it, and its GEMM kernels stream e4m3 at 36-37 % of
      the copy bandwidth (one decode layer's four linears: 130-132 us against bf16's 123-133 us); inductor's own
      reduction over the widened weight reaches 38-42 %. This kernel: 73-74 us, 65 %.
    - bf16: cuBLAS's GEMVs take 15.5 / 13.5 / 56.5 us for the AR's q/k/v, o and gate_up; this kernel 11.2 / 10.0 /
      52.2 us (80, 79 and 100 % of the copy bandwidth).

How the kernel is organised
    One program per BLOCK_N output channels walks the whole K in BLOCK_K steps: each step loads a (BLOCK_N, BLOCK_K)
    weight tile (16-byte loads per thread), widens it to fp32 in registers and multiplies it with the matching slice
    of x (read from L2: every program reads the same 8-27 KB row), accumulating elementwise; one sum over the tile's
    columns at the end. Small BLOCK_N gives thousands of programs, so every SM keeps many tiles in flight without
    split-K, whose partial sums would need either atomics (not deterministic) or a second pass. Each output is
    summed by one program in a fixed order: the same inputs give the same bits, in a CUDA graph or not.
    Block sizes are autotuned per weight format and (N, K) on the first call and, where triton can, kept on disk.

Where it runs (`gemv_available`)
    CUDA devices of compute capability >= 8.9 (native e4m3 conversion; measured on an H200 only), not ROCm (e4m3fnuz
    there), with triton importable. Under the cudaMallocAsync allocator (ComfyUI's default on Nvidia cards) only
    inside torch.compile'd code (`gemv_launchable`), where it is traced as a user-defined Triton kernel that inductor
    compiles and launches with its own (from C++ under its C++ wrapper): the opaque op, launched by Triton's Python
    launcher, killed the process when the AR decode's CUDA graph captured it there (SIGSEGV, H200, 2026-11-30), as
    that launcher checks each pointer with the driver and memory allocated during a capture under cudaMallocAsync has
    no device pointer yet (glm_core/memory.py `under_cuda_malloc_async`). Eager calls there take the library paths.
    This module imports without triton; the op is then not registered and `gemv_available` is False. On the CPU the
    kernel runs only under Triton's interpreter (TRITON_INTERPRET=1), for tests. Who calls it: `Fp8Linear` and
    `GemvLinear` (below; the AR decoder's bf16 linears and its head), each for one static bf16 row (`takes_gemv`).

Torch op
    `torch.ops.glm_core.gemv(x, weight, weight_scale, bias)`: an opaque `torch.library.custom_op` with a fake
    implementation, so torch.compile'd code (the C++ wrapper included) calls it as one op and a CUDA graph captures
    its launch. Autotuning launches the kernel several times, so the first call must not be inside a capture:
    the decode loop warms up before it captures.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .memory import under_cuda_malloc_async

try:  # the kernel needs triton; everything else in glm_core must import without it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 — a broken triton install (not only a missing one) must not break glm_core
    triton = None
    tl = None

log = logging.getLogger("glm_core")
OP_NAME = "glm_core::gemv"
WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.bfloat16)
# Where autotuning cannot run (Triton's interpreter on the CPU): small blocks, so that small test shapes still span
# several programs and several K steps.
INTERPRETER_BLOCKS = {"BLOCK_N": 4, "BLOCK_K": 32}


def triton_importable() -> bool:
    return triton is not None


def gemv_available(device: torch.device | str) -> bool:
    """True where `gemv` runs: CUDA (not ROCm), compute capability >= 8.9, triton importable (under cudaMallocAsync
    only inside compiled code: `gemv_launchable`)."""
    device = torch.device(device)
    if device.type != "cuda" or triton is None or torch.version.hip is not None:
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


# the allocator is fixed for the process: a constant when traced (no graph break)
_traced_under_cuda_malloc_async = torch._dynamo.assume_constant_result(under_cuda_malloc_async)


def gemv_launchable() -> bool:
    """Whether a call here may launch the kernel: always under PyTorch's own allocator; under cudaMallocAsync only
    while torch.compile traces, where inductor launches the kernel itself (see the module docstring)."""
    if torch.compiler.is_compiling() or not under_cuda_malloc_async():
        return True
    if not _SAID_EAGER_OFF_UNDER_CUDA_MALLOC_ASYNC:
        _SAID_EAGER_OFF_UNDER_CUDA_MALLOC_ASYNC.append(True)
        log.info("one-row GEMV: not run outside compiled code under the cudaMallocAsync allocator (its capture into a "
                 "CUDA graph crashed there); those steps take the library matmuls")
    return False


_SAID_EAGER_OFF_UNDER_CUDA_MALLOC_ASYNC: list = []  # said once per process


def constant_per_device(check: Callable[[str], bool], memo: dict[str, bool]) -> Callable[[str], bool]:
    """check(device), memoised in `memo` and run once at trace time by torch.compile (its result becomes a
    constant): the choice of path is no data-dependent branch and costs nothing in compiled code or CUDA graphs."""

    @torch._dynamo.assume_constant_result
    def constant(device: str) -> bool:
        if device not in memo:
            memo[device] = check(device)
        return memo[device]

    return constant


GEMV_BY_DEVICE: dict[str, bool] = {}  # tests set an entry to route a CPU layer to a stand-in of the kernel
uses_gemv = constant_per_device(gemv_available, GEMV_BY_DEVICE)


def one_static_row(x: torch.Tensor) -> bool:
    # Under torch.compile size-1 dims are plain ints (dynamo specialises them), so batch-1 decode steps trace as one
    # row while symbolic (dynamic) sizes take the matmul paths, without adding a guard.
    return all(isinstance(size, int) and size == 1 for size in x.shape[:-1])


def takes_gemv(x: torch.Tensor) -> bool:
    """Whether a layer's input goes through `gemv`: one static bf16 row on a device where the kernel runs (the
    layer checks its own weight's format)."""
    return x.dtype == torch.bfloat16 and one_static_row(x) and uses_gemv(str(x.device)) and gemv_launchable()


def gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16 holding one row once the leading dims are folded -> (..., N) bf16."""
    out_features, in_features = weight.shape
    if torch.compiler.is_compiling() and _traced_under_cuda_malloc_async():
        y = _traced_gemv(x.reshape(in_features), weight, weight_scale, bias)
    else:
        y = torch.ops.glm_core.gemv(x.reshape(in_features), weight, weight_scale, bias)  # (N,)
    return y.reshape(*x.shape[:-1], out_features)


def _traced_gemv(x, weight, weight_scale, bias) -> torch.Tensor:
    """The kernel called as a user-defined Triton kernel inside torch.compile: inductor compiles and launches it
    with the layer's own kernels (from C++ under its C++ wrapper), not through Triton's Python launcher, whose
    pointer checks fail on memory allocated during a CUDA graph capture under cudaMallocAsync."""
    y = torch.empty(weight.shape[0], device=x.device, dtype=torch.bfloat16)
    launch(x, weight, weight_scale, bias, y)
    return y


def check_inputs(x, weight, weight_scale, bias) -> None:
    if x.dtype != torch.bfloat16 or weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"gemv takes x bf16 and a float8_e4m3fn or bf16 weight; got {x.dtype}, {weight.dtype}")
    if (weight.dtype == torch.float8_e4m3fn) != (weight_scale is not None):
        raise ValueError("gemv: an e4m3 weight needs its fp32 weight_scale, a bf16 weight takes none")
    if weight_scale is not None and weight_scale.dtype != torch.float32:
        raise ValueError(f"gemv: weight_scale must be fp32, got {weight_scale.dtype}")
    out_features, in_features = weight.shape
    if x.shape != (in_features,) or (weight_scale is not None and weight_scale.shape != (out_features,)):
        raise ValueError(f"gemv: x {tuple(x.shape)} (one row of {in_features}), weight {tuple(weight.shape)}, "
                         f"weight_scale {None if weight_scale is None else tuple(weight_scale.shape)} do not fit "
                         "together")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} for {out_features} outputs")


# --------------------------------------------------------------------------------------------
# The kernel (defined only where triton imports)

if triton is not None:
    # The fastest block shapes of sweeps over 60 (bench/fp8_kernels.py, phase gemv.sweep, H200, 2026-11-30).
    # e4m3: (2, 2048, 4 warps, 1-2 stages) was best or within 1 % for q/k/v and gate_up, (8, 1024, 4, 3) for down
    # and o. bf16 weights want twice the warps for the same bytes per tile: (2, 2048, 8 warps) was best for q/k/v, o
    # and gate_up. Autotuning picks between two per weight format and (N, K): each candidate is one more kernel to
    # compile per K in a process's very first run (a cold CLI run with five each took 6.8 s longer in its AR).
    CONFIGS = {
        torch.float8_e4m3fn: [(2, 2048, 4, 2), (8, 1024, 4, 3)],
        torch.bfloat16: [(2, 2048, 8, 1), (8, 1024, 4, 3)],
    }

    @triton.jit
    def gemv_kernel(x_ptr, weight_ptr, scale_ptr, bias_ptr, y_ptr, N, K: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        # int64 row offsets: n * K stays inside int32 for these layers (gate_up: 112 M), not for every layer
        w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :]  # (BLOCK_N, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)  # (BLOCK_N,) fp32
        if HAS_SCALE:
            y *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(tl.bfloat16), mask=col_ok)

    _autotune_options = ({"cache_results": True}
                         if "cache_results" in inspect.signature(triton.autotune).parameters else {})
    # One autotuned kernel per weight format: the key (N, K) alone would let a bf16 layer reuse an e4m3 layer's pick.
    AUTOTUNED = {
        dtype: triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                                        for n, k, w, s in shapes], key=["N", "K"], **_autotune_options)(gemv_kernel)
        for dtype, shapes in CONFIGS.items()
    }


def launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
           y: torch.Tensor, config: dict | None = None) -> None:
    """Writes the GEMV into y (N,) bf16. `config` (BLOCK_N, BLOCK_K, num_warps, num_stages) skips autotuning
    (benchmarks sweep block shapes with it)."""
    out_features, in_features = weight.shape
    # scale_ptr / bias_ptr are never read without HAS_SCALE / HAS_BIAS; x stands in so that every argument is a tensor
    # (not the written y: inductor, tracing the kernel in `_traced_gemv`, would see an input aliasing the output)
    args = (x, weight, weight_scale if weight_scale is not None else x, bias if bias is not None else x, y,
            out_features, in_features)
    flags = {"HAS_SCALE": weight_scale is not None, "HAS_BIAS": bias is not None}
    if x.device.type == "cpu":  # only reachable under TRITON_INTERPRET=1 (tests): no autotuning there
        config = {**INTERPRETER_BLOCKS, "num_warps": 1, "num_stages": 1}
    if config is not None:
        grid = (triton.cdiv(out_features, config["BLOCK_N"]),)
        gemv_kernel[grid](*args, **flags, **config)
        return

    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_N"]),)

    AUTOTUNED[weight.dtype][grid](*args, **flags)


def tuned_block_shapes() -> dict[str, dict[str, str]]:
    """What autotuning picked in this process (or read from triton's disk cache), per weight format and key (N, K,
    argument dtypes): for benchmarks to record beside their timings, since a pick made on a noisy timing stays on
    disk. Covers the launches through the op (PyTorch's allocator); inside compiled code under cudaMallocAsync
    inductor tunes the traced kernel itself."""
    if triton is None:
        return {}
    return {str(dtype).removeprefix("torch."): {str(key): str(config) for key, config in tuner.cache.items()}
            for dtype, tuner in AUTOTUNED.items() if getattr(tuner, "cache", None)}


def _gemv_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
             bias: torch.Tensor | None) -> torch.Tensor:
    check_inputs(x, weight, weight_scale, bias)
    y = torch.empty(weight.shape[0], device=x.device, dtype=torch.bfloat16)
    launch(x.contiguous(), weight.contiguous(), weight_scale, bias, y)
    return y


if triton is not None:
    _op = torch.library.custom_op(OP_NAME, _gemv_op, mutates_args=())

    @_op.register_fake
    def _(x, weight, weight_scale, bias):
        return x.new_empty(weight.shape[0], dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# The bf16 layer


class GemvLinear(nn.Linear):
    """nn.Linear (same parameters, state_dict keys and other paths) whose one static bf16 row takes the GEMV where it
    runs: the AR decoder's linears and its head in bf16, whose batch-1 decode steps are GEMVs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16 and takes_gemv(x):
            return gemv(x, self.weight, None, self.bias)
        return F.linear(x, self.weight, self.bias)
