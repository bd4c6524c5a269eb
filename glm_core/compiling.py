"""When to use `torch.compile` for the hot loops (AR decode layer, DiT block), and a wrapper that falls
back to eager on any compile error.

On by default on CUDA only (where it was measured faster); off on the CPU (slow to compile, no gain
for tests). Switches, strongest first: an explicit `compile=True/False` argument, then the
environment variable GLM_CORE_NO_COMPILE=1 (any value other than "" / "0" turns it off).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

NO_COMPILE_ENV = "GLM_CORE_NO_COMPILE"


def compile_wanted(device: torch.device | str, requested: bool | None = None) -> bool:
    """requested True/False wins; None = on for CUDA devices unless GLM_CORE_NO_COMPILE is set."""
    if requested is not None:
        return bool(requested)
    if os.environ.get(NO_COMPILE_ENV, "").strip() not in ("", "0"):
        return False
    return torch.device(device).type == "cuda"


class CompiledOrEager:
    """`fn` through torch.compile; on the first exception it warns once and runs `fn` eagerly from then on.

    Only for functions that may safely run again after a failed attempt (pure, or whose side effects
    are idempotent, like writing the same K/V into the same cache slot). One wrapper per function is
    shared by all model instances: dynamo keys its cache on the code object, so identical layers
    compile once (regional compilation) and every instance reuses the code.
    """

    def __init__(self, fn: Callable, name: str, *, backend: str = "inductor", dynamic: bool | None = None):
        self.fn, self.name = fn, name
        self.compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 — any compile problem: same results eagerly
                self.failed = True
                warnings.warn(f"{self.name}: torch.compile failed ({type(exc).__name__}: {exc}); running eagerly "
                              f"(set {NO_COMPILE_ENV}=1 to skip compiling)", RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)


_WRAPPERS: dict[tuple, CompiledOrEager] = {}


def compiled(fn: Callable, name: str, backend: str = "inductor") -> CompiledOrEager:
    """The one shared CompiledOrEager for (fn, backend); created on first use.

    dynamic=True: token counts, cache lengths and batch sizes (other than 1, which dynamo always
    specialises) stay symbolic, so a new resolution or prompt length does not recompile; the feature
    dims that the fused kernels loop over are fixed by the weights anyway.
    """
    key = (fn, backend)
    wrapper = _WRAPPERS.get(key)
    if wrapper is None:
        wrapper = _WRAPPERS[key] = CompiledOrEager(fn, name, backend=backend, dynamic=True)
    return wrapper
