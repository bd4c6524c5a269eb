"""GPU memory: how much a stage needs against what is free, and the error that says so.

An out-of-memory error is never hidden (not by a compile fallback, not as a "corrupt file"): it becomes
`NotEnoughGpuMemory`, which names what ran out, the memory needed against the memory free, and the
options that make the run fit. It subclasses torch.OutOfMemoryError, so hosts that treat OOMs
specially (ComfyUI unloads its models on one) still recognise it.
"""

from __future__ import annotations

import torch

GB = 1e9
FIT_OPTIONS = ("load the weights as FP8 (weights='fp8') and/or run one stage at a time (placement='sequential'), "
               "choose a smaller image size, or close other programs that use the GPU")


class NotEnoughGpuMemory(torch.OutOfMemoryError):
    """A GPU allocation failed; the message says how much was needed, how much was free, and what to change."""


def gpu_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes on a CUDA device as the driver reports them, or None for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)


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
