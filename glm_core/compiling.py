"""When to use `torch.compile` for the hot loops (AR decode layer, DiT block), and a wrapper that falls
back to eager when the compiler itself fails.

On by default on CUDA only (where it was measured faster); off on the CPU (slow to compile, no gain
for tests). Switches, strongest first: an explicit `compile=True/False` argument, then the
environment variable GLM_CORE_NO_COMPILE=1 (any value other than "" / "0" turns it off).

Each stage module carries the backend it runs its hot function through (`compile_backend`: None =
eager), set once by its loader from `compile_backend(device, compile)`.

What torch compiles is kept on disk for the next process (`use_persistent_compile_cache`): a fresh process
then reads the kernels instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .memory import is_out_of_memory

NO_COMPILE_ENV = "GLM_CORE_NO_COMPILE"
DEFAULT_BACKEND = "inductor"
# torch's own variable: inductor's FX-graph cache, the AOTAutograd cache and Triton's kernels all live under it.
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
log = logging.getLogger("glm_core")


def compile_cache_dir() -> Path:
    """The folder of torch's compile caches: $TORCHINDUCTOR_CACHE_DIR when the user set it, else
    glm_core/torch_compile in the user's cache folder ($XDG_CACHE_HOME, or ~/.cache)."""
    chosen = os.environ.get(CACHE_DIR_ENV, "").strip()
    # Importing torch._dynamo writes torch's own /tmp default into the variable: that value is not a choice.
    if chosen and os.path.abspath(chosen) != _torch_default_cache_dir():
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "glm_core" / "torch_compile"


def _torch_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: its default then only counts as the user's choice
        return None
    return os.path.abspath(default_cache_dir())


def use_persistent_compile_cache() -> Path:
    """Point torch's on-disk compile caches at `compile_cache_dir()` before the first compile, so that the next
    process reads this one's graphs and kernels instead of compiling them again (torch's own default folder is
    in /tmp, which a reboot empties). A folder the user chose through TORCHINDUCTOR_CACHE_DIR is kept. torch
    reads the variable whenever it opens its caches, so setting it here, before any compile, is enough."""
    folder = compile_cache_dir()
    os.environ[CACHE_DIR_ENV] = str(folder)
    return folder


def compile_wanted(device: torch.device | str, requested: bool | None = None) -> bool:
    """requested True/False wins; None = on for CUDA devices unless GLM_CORE_NO_COMPILE is set."""
    if requested is not None:
        return bool(requested)
    if os.environ.get(NO_COMPILE_ENV, "").strip() not in ("", "0"):
        return False
    return torch.device(device).type == "cuda"


def compile_backend(device: torch.device | str, requested: bool | None = None) -> str | None:
    """The backend a stage's hot function runs through: "inductor" when compiling is wanted, else None."""
    return DEFAULT_BACKEND if compile_wanted(device, requested) else None


def is_compiler_error(exc: BaseException) -> bool:
    """True for a failure of dynamo / the backend compiler itself, never for an out-of-memory error (an OOM
    during compilation is the run's OOM: falling back to eager would hide it and make every later image slower)."""
    from torch._dynamo import exc as dynamo_exc

    compiler_errors: tuple[type, ...] = (dynamo_exc.TorchDynamoException,)
    try:
        from torch._inductor.exc import InductorError
        compiler_errors += (InductorError,)
    except ImportError:  # older torch: inductor errors reach us wrapped in BackendCompilerFailed
        pass
    return isinstance(exc, compiler_errors) and not is_out_of_memory(exc)


def compiler_failure_reason(exc: BaseException) -> str:
    """One line saying why the compiler failed: the error's type and first line, and for a backend failure (whose
    own first line is only "backend='inductor' raised:") the error the backend raised."""
    def first_line(error: BaseException) -> str:
        return next((line.strip() for line in str(error).splitlines() if line.strip()), "")

    reason = f"{type(exc).__name__}: {first_line(exc)}"
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, BaseException):
        reason = f"{type(exc).__name__}: {type(inner).__name__}: {first_line(inner)}"
    return reason[:500]


class CompiledOrEager:
    """`fn` through torch.compile; when the compiler fails, it logs the reason once and runs `fn` eagerly
    from then on. Any other exception (an out-of-memory error, an interrupt, a bad input) propagates.

    Only for functions that may safely run again after a failed attempt (pure, or whose side effects
    are idempotent, like writing the same K/V into the same cache slot). One wrapper per function is
    shared by all model instances: dynamo keys its cache on the code object, so identical layers
    compile once (regional compilation) and every instance reuses the code.
    """

    def __init__(self, fn: Callable, name: str, *, backend: str = DEFAULT_BACKEND, dynamic: bool | None = None,
                 options: dict | None = None):
        use_persistent_compile_cache()
        self.fn, self.name, self.backend = fn, name, backend
        self.compiled = torch.compile(fn, backend=backend, dynamic=dynamic, options=options)
        self.fallback_reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.fallback_reason is not None

    def __call__(self, *args, **kwargs):
        if self.fallback_reason is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                if not is_compiler_error(exc):
                    raise
                self.fallback_reason = compiler_failure_reason(exc)
                log.warning("%s: torch.compile failed (%s); running eagerly from now on (set %s=1 to skip "
                            "compiling)", self.name, self.fallback_reason, NO_COMPILE_ENV)
                log.debug("%s: the compiler's traceback", self.name, exc_info=exc)
        return self.fn(*args, **kwargs)


_WRAPPERS: dict[tuple, CompiledOrEager] = {}

# The C++ wrapper's options, each measured on the H200 (tiny AR decode layer, a fresh process, torch 2.11):
# - kernels tuned when they first run, not while compiling as inductor does by default for the C++ wrapper:
#   51 s instead of 69 with empty caches (2026-11-29);
# - no host vector ISA: to pick one, inductor builds a test library per candidate ISA and loads each in a fresh
#   Python that imports torch, in every process and even when its graph cache hits: 42 s of the 45 s that a process
#   with warm caches spent (2026-11-30). The wrapper only launches GPU kernels, so it needs no CPU vector code.
CPP_WRAPPER_OPTIONS = {"cpp_wrapper": True, "triton.autotune_at_compile_time": False, "cpp.vec_isa_ok": False}


def compiled(fn: Callable, name: str, backend: str = DEFAULT_BACKEND, *,
             cpp_wrapper: bool = False, tune_reductions: bool = False) -> CompiledOrEager:
    """The one shared CompiledOrEager for (fn, backend, cpp_wrapper); created on first use.

    dynamic=True: token counts, cache lengths and batch sizes (other than 1, which dynamo always
    specialises) stay symbolic, so a new resolution or prompt length does not recompile; the feature
    dims that the fused kernels loop over are fixed by the weights anyway.
    cpp_wrapper: inductor launches the kernels from generated C++ instead of Python (inductor only), with
    CPP_WRAPPER_OPTIONS.
    tune_reductions: inductor's coordinate-descent tuning (inductor only; kept in its autotune cache). With it,
    inductor also writes a one-row matmul as a reduction, which fuses the widening of FP8 weights into the GEMV
    where the FP8 GEMV kernel does not run (`fp8.Fp8Linear`); the FP8 decode layer compiles with it.
    """
    key = (fn, backend, cpp_wrapper, tune_reductions)
    wrapper = _WRAPPERS.get(key)
    if wrapper is None:
        options = dict(CPP_WRAPPER_OPTIONS) if cpp_wrapper and backend == "inductor" else None
        if tune_reductions and backend == "inductor":
            options = {**(options or {}), "coordinate_descent_tuning": True}
        wrapper = _WRAPPERS[key] = CompiledOrEager(fn, name, backend=backend, dynamic=True, options=options)
    return wrapper


def compile_seconds() -> float | None:
    """torch.compile's own time so far in this process (dynamo tracing + the backend), None where torch does not say."""
    by_kind = compile_seconds_by_kind()
    return None if by_kind is None else by_kind.get("entire_frame_compile", 0.0)


def compile_seconds_by_kind() -> dict[str, float] | None:
    """torch.compile's time so far by the kinds torch counts (tracing the frame, the backend, inductor's code
    generation, cache loads, ...), None where torch does not say."""
    if "torch._dynamo" not in sys.modules:
        return {}
    try:
        from torch._dynamo.utils import calculate_time_spent

        return {kind: float(seconds) for kind, seconds in calculate_time_spent().items()}
    except (ImportError, AttributeError):
        return None
