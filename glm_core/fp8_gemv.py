"""One-row FP8 GEMV for decode steps: y = x @ dequant(W)^T (+ bias), reading the e4m3 weight once.

What it computes
    y[n] = weight_scale[n] * sum_k x[k] * float(weight[n, k]) (+ bias[n]) for one bf16 row x (K,), weight (N, K)
    float8_e4m3fn row-major, weight_scale (N,) fp32 (the format of glm_core/fp8.py), bias (N,) or None; y (N,) bf16.
    x is not quantised: the only roundings besides the weight's own are the fp32 products and sums and the final
    bf16 store.

Why a kernel of our own
    A batch-1 decode step is memory bound: its time is the weight bytes over the HBM bandwidth, so e4m3 weights
    should halve it against bf16. Neither library path does (bench/fp8_kernels.py, H200, one decode layer's four
    linears, compiled, in a CUDA graph): `torch._scaled_mm` pads the row to 16 and quantises it, and its GEMM
    kernels stream e4m3 at 36-37 % of the bandwidth (130-132 us against bf16's 123-133 us); inductor's own GEMV
    reduction over the widened weight reaches 38-42 %. This kernel: 73-74 us, 65 % (2026-11-30).

How the kernel is organised
    One program per BLOCK_N output channels walks the whole K in BLOCK_K steps: each step loads a
    (BLOCK_N, BLOCK_K) e4m3 tile (16-byte loads per thread), widens it to fp32 in registers and multiplies it with
    the matching slice of x (read from L2: every program reads the same 8-27 KB row), accumulating elementwise;
    one sum over the tile's columns at the end. Small BLOCK_N gives thousands of programs, so every SM keeps many
    tiles in flight without split-K, whose partial sums would need either atomics (not deterministic) or a second
    pass. Each output is summed by one program in a fixed order: the same inputs give the same bits.
    Block sizes are autotuned per (N, K) on the first call and, where triton can, kept on disk for the next process.

Where it runs (`fp8_gemv_available`)
    CUDA devices of compute capability >= 8.9 (native e4m3 conversion), not ROCm (e4m3fnuz there), with triton
    importable, and not under the cudaMallocAsync allocator (ComfyUI's default on Nvidia cards): there the AR
    decode's CUDA graph capture of a layer calling this op killed the process (SIGSEGV inside the compiled layer's
    C++ wrapper, H200, 2026-11-30, seen with the kernel on bf16 weights, the same launch); the kernel is launched from
    Python by Triton's launcher, which checks each pointer with the driver, and memory allocated during a capture
    under cudaMallocAsync has no device pointer yet (glm_core/ar/decode.py `under_cuda_malloc_async`: inductor's
    Python launchers fail the same way). Those processes keep `_scaled_mm`. This module imports without triton; the
    op is then not registered and `fp8_gemv_available` is False. On the CPU the kernel runs only under Triton's
    interpreter (TRITON_INTERPRET=1), for tests.

Torch op
    `torch.ops.glm_core.fp8_gemv(x, weight, weight_scale, bias)`: an opaque `torch.library.custom_op` with a fake
    implementation, so torch.compile'd code (the C++ wrapper included) calls it as one op and a CUDA graph captures
    its launch. Autotuning launches the kernel several times, so the first call must not be inside a capture:
    the decode loop warms up before it captures.
"""

from __future__ import annotations

import inspect
import logging

import torch

try:  # the kernel needs triton; everything else in glm_core must import without it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 — a broken triton install (not only a missing one) must not break glm_core
    triton = None
    tl = None

log = logging.getLogger("glm_core")
OP_NAME = "glm_core::fp8_gemv"
# Where autotuning cannot run (Triton's interpreter on the CPU): small blocks, so that small test shapes still span
# several programs and several K steps.
INTERPRETER_BLOCKS = {"BLOCK_N": 4, "BLOCK_K": 32}


def triton_importable() -> bool:
    return triton is not None


def fp8_gemv_available(device: torch.device | str) -> bool:
    """True where `fp8_gemv` runs: CUDA (not ROCm), compute capability >= 8.9, triton importable, PyTorch's own
    allocator (see the module docstring for cudaMallocAsync)."""
    device = torch.device(device)
    if device.type != "cuda" or triton is None or torch.version.hip is not None:
        return False
    if torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        if not _SAID_OFF_UNDER_CUDA_MALLOC_ASYNC:
            _SAID_OFF_UNDER_CUDA_MALLOC_ASYNC.append(True)
            log.info("FP8 one-row GEMV off: this process uses the cudaMallocAsync allocator (ComfyUI's default), "
                     "under which capturing it into the AR's CUDA graph crashed; FP8 decode steps take _scaled_mm "
                     "(on an H200 5.9 instead of 4.1 ms per token). ComfyUI's --disable-cuda-malloc (PyTorch's own "
                     "allocator) turns it on")
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


_SAID_OFF_UNDER_CUDA_MALLOC_ASYNC: list = []  # said once per process


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16 holding one row once the leading dims are folded -> (..., N) bf16."""
    out_features, in_features = weight.shape
    y = torch.ops.glm_core.fp8_gemv(x.reshape(in_features), weight, weight_scale, bias)  # (N,)
    return y.reshape(*x.shape[:-1], out_features)


def check_inputs(x, weight, weight_scale, bias) -> None:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.float8_e4m3fn or weight_scale.dtype != torch.float32:
        raise ValueError(f"fp8_gemv takes x bf16, weight float8_e4m3fn, weight_scale fp32; got {x.dtype}, "
                         f"{weight.dtype}, {weight_scale.dtype}")
    out_features, in_features = weight.shape
    if x.shape != (in_features,) or weight_scale.shape != (out_features,):
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)} (one row of {in_features}), weight {tuple(weight.shape)}, "
                         f"weight_scale {tuple(weight_scale.shape)} do not fit together")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"fp8_gemv: bias {tuple(bias.shape)} for {out_features} outputs")


# --------------------------------------------------------------------------------------------
# The kernel (defined only where triton imports)

if triton is not None:
    # The fastest block shapes of a sweep over 60 (bench/fp8_kernels.py, phase gemv.sweep, H200, 2026-11-30): (2, 2048,
    # 4 warps, 2 stages) was best or within 1 % for q/k/v, o and gate_up, (8, 1024, 4, 3) for down, (4, 512, 8, 1) for
    # o; the others were within 2 % of the best on two shapes each. Autotuning picks among them per (N, K).
    CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in [(2, 2048, 4, 2), (8, 1024, 4, 3), (4, 512, 8, 1), (4, 2048, 8, 1), (4, 1024, 4, 1)]
    ]

    @triton.jit
    def fp8_gemv_kernel(x_ptr, weight_ptr, scale_ptr, bias_ptr, y_ptr, N, K: tl.constexpr,
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
        y = tl.sum(acc, axis=1) * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)  # (BLOCK_N,) fp32
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(tl.bfloat16), mask=col_ok)

    _autotune_options = ({"cache_results": True}
                         if "cache_results" in inspect.signature(triton.autotune).parameters else {})
    fp8_gemv_autotuned = triton.autotune(configs=CONFIGS, key=["N", "K"], **_autotune_options)(fp8_gemv_kernel)


def launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           y: torch.Tensor, config: dict | None = None) -> None:
    """Writes the GEMV into y (N,) bf16. `config` (BLOCK_N, BLOCK_K, num_warps, num_stages) skips autotuning
    (benchmarks sweep block shapes with it)."""
    out_features, in_features = weight.shape
    # bias_ptr is never read without HAS_BIAS; the scale stands in for it so that every argument is a tensor
    args = (x, weight, weight_scale, bias if bias is not None else weight_scale, y, out_features, in_features)
    if x.device.type == "cpu":  # only reachable under TRITON_INTERPRET=1 (tests): no autotuning there
        config = {**INTERPRETER_BLOCKS, "num_warps": 1, "num_stages": 1}
    if config is not None:
        grid = (triton.cdiv(out_features, config["BLOCK_N"]),)
        fp8_gemv_kernel[grid](*args, HAS_BIAS=bias is not None, **config)
        return

    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_N"]),)

    fp8_gemv_autotuned[grid](*args, HAS_BIAS=bias is not None)


def _fp8_gemv_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    check_inputs(x, weight, weight_scale, bias)
    y = torch.empty(weight.shape[0], device=x.device, dtype=torch.bfloat16)
    launch(x.contiguous(), weight.contiguous(), weight_scale, bias, y)
    return y


if triton is not None:
    _op = torch.library.custom_op(OP_NAME, _fp8_gemv_op, mutates_args=())

    @_op.register_fake
    def _(x, weight, weight_scale, bias):
        return x.new_empty(weight.shape[0], dtype=torch.bfloat16)
