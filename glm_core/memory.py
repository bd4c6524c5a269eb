"""GPU memory: how much a stage needs against what is free, the error that says so, and which allocator runs.

An out-of-memory error is never hidden (not by a compile fallback, not as a "corrupt file"): it becomes
`NotEnoughGpuMemory`, which names what ran out, the memory needed against the memory free, and the
options that make the run fit. It subclasses torch.OutOfMemoryError, so hosts that treat OOMs
specially (ComfyUI unloads its models on one) still recognise it.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import torch

GB = 1e9
FIT_OPTIONS = ("load the weights as FP8 (weights='fp8') and/or run one stage at a time (placement='sequential'), "
               "choose a smaller image size, or close other programs that use the GPU")


def under_cuda_malloc_async() -> bool:
    """True under the cudaMallocAsync allocator (ComfyUI's default on Nvidia cards), where CUDA graph captures
    differ in three ways (2026-11-29/30 on the H200):
    - memory the capture itself allocates is a graph allocation that has no device pointer yet, and Python-side
      kernel launchers (inductor's static launcher and Triton's) check every argument's pointer with
      cuPointerGetAttribute: the AR decode's capture failed at the compiled layer's first kernel ("CUDA driver
      error: invalid argument"). The C++ wrapper that inductor can generate instead launches without that check, so
      the decode layer is compiled with it there (`glm_core.ar.decode.decode_layer_runner`): same kernels, 6.0
      ms/token at 1024²;
    - the one-row GEMV (glm_core/gemv.py), launched by Triton's Python launcher, killed the process in that capture,
      so there it runs only inside compiled code, where inductor launches it (as it does the decode attention's
      kernels, glm_core/decode_attention.py);
    - freeing what a failed capture allocated aborts the process (`glm_core.ar.decode`'s
      `_keep_leftovers_of_failed_capture`)."""
    return torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync"


class NotEnoughGpuMemory(torch.OutOfMemoryError):
    """A GPU allocation failed; the message says how much was needed, how much was free, and what to change."""

    __module__ = "glm_core"  # ComfyUI shows module + class; inside ComfyUI the real module name is a long path


def gpu_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes on a CUDA device as the driver reports them, or None for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)


def free_bytes(device) -> int:
    """Bytes a new allocation on `device` can still get: the driver's free memory (or what a per-process memory
    fraction still allows, if that is less) plus the blocks PyTorch's caching allocator holds unused."""
    info = gpu_memory(device)
    if info is None:
        return 1 << 62
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    reserved = torch.cuda.memory_reserved(device)
    free = info[0]
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        free = min(free, int(fraction(device) * info[1]) - reserved)
    return max(free, 0) + reserved - torch.cuda.memory_allocated(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc`, or an error it wraps (a compiler's inner exception, a cause, a context), is a GPU
    out-of-memory error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return False


def out_of_memory_error(what: str, device, cause: BaseException | None = None,
                        needed_bytes: int | None = None) -> NotEnoughGpuMemory:
    """The error for an allocation that failed while doing `what` on `device` (call it after the failed
    allocation's tensors are released, so that `free` is what the next attempt would have)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    info = gpu_memory(device)
    needed = f"about {needed_bytes / GB:.1f} GB" if needed_bytes else "more memory"
    free = f"{info[0] / GB:.1f} GB free of {info[1] / GB:.1f} GB on {device}" if info else f"on {device}"
    detail = f" ({str(cause).splitlines()[0]})" if cause is not None and str(cause) else ""
    return NotEnoughGpuMemory(f"not enough GPU memory for {what}: it needs {needed}, {free}{detail}. "
                              f"To fit: {FIT_OPTIONS}.")


@contextmanager
def gpu_released_on_error(what: str, device):
    """Around a stage's work: on any error or interrupt, the locals of the frames that failed are cleared
    (a traceback keeps every frame, and every GPU tensor in it, alive), the allocator's cache returns to
    the driver, and an out-of-memory error becomes `NotEnoughGpuMemory` with the numbers."""
    device = torch.device(device)
    try:
        yield
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if isinstance(exc, torch.OutOfMemoryError) and not isinstance(exc, NotEnoughGpuMemory):
            raise out_of_memory_error(what, device, exc) from None
        raise


def estimated_working_bytes(stage: str, *, height: int, width: int, batch: int = 1, reference_tokens: int = 0,
                            itemsize: int = 2) -> int:
    """Activation memory a stage needs at the real model's widths beyond its weights (an upper estimate,
    measured on an H200: docs/PERFORMANCE.md, memory table). Used to decide what must leave the GPU first."""
    pixels = height * width * batch
    if stage == "vision":
        return int(0.5 * GB)
    if stage == "ar":
        tokens = (height // 32) * (width // 32) + 400 + reference_tokens  # large grid + preview/prompt + references
        kv_cache = 40 * 1024 * tokens * batch  # 40 layers x K,V x 2 kv heads x 128 x bf16 (spec §5.1)
        return int(GB + kv_cache)
    if stage == "dit":
        image_tokens = pixels // 256  # one DiT token per 16x16 pixels
        reference_kv = 480 * 1024 * reference_tokens * 4  # DiT tokens per reference AR token: 2x2 (spec §5.2)
        return int(GB + image_tokens * 160 * 1024 + reference_kv + VAE_DECODE_BYTES_PER_PIXEL * pixels)
    raise ValueError(f"unknown stage {stage!r}")


# The VAE decoder's peak activations per output pixel in bf16 (its full-resolution levels dominate).
VAE_DECODE_BYTES_PER_PIXEL = 2048
