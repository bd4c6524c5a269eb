"""Where each stage's weights live between uses: on the GPU, in a host copy, or only on disk.

Weights never change at inference, so a stage that leaves the GPU keeps one host copy of its tensors
(page-locked when the host can spare it, for fast asynchronous copies) and leaving the GPU again later
costs nothing: the GPU tensors are simply dropped. When stages must take turns, the copy is made right after
the stage loads, so that no later image pays for it. Coming back is one host-to-device copy of a single
flat buffer. When the host cannot hold a copy, the stage is dropped and re-read from the safetensors
files (from the page cache, usually) the next time it is needed.

`StageWeights` does the moving for one module; `GlmImage` decides when (see `placement`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("glm_core")
_ALIGN = 256  # bytes: every tensor view starts aligned for any dtype and for vectorised copies


def host_memory_available() -> int:
    """Bytes the host can still give, or 0 when unknown (see `_host_memory`)."""
    return _host_memory("MemAvailable", "available")


def host_memory_total() -> int:
    """Bytes of host RAM, or 0 when unknown (see `_host_memory`)."""
    return _host_memory("MemTotal", "total")


def _host_memory(meminfo_field: str, psutil_field: str) -> int:
    """A host-memory figure: Linux's /proc/meminfo, elsewhere (e.g. Windows) psutil's reading where psutil is
    installed, as it is with ComfyUI; 0 when neither answers."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(meminfo_field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return 0
    return int(getattr(psutil.virtual_memory(), psutil_field))


def _tensors(module: nn.Module) -> list[tuple[list[tuple[nn.Module, str]], torch.Tensor, bool]]:
    """(every (owner, name) that holds it, tensor, is_parameter) for each parameter and buffer, tied ones once."""
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    out = []
    for owner in module.modules():
        for kind, tensors in ((True, owner._parameters), (False, owner._buffers)):
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                if id(tensor) not in seen:
                    seen[id(tensor)] = []
                    out.append((seen[id(tensor)], tensor, kind))
                seen[id(tensor)].append((owner, name))
    return out


@dataclass
class _Slot:
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


def _unregister(pointer: int, buffer: torch.Tensor) -> None:
    """Unlock the pages before `buffer` (held by the finalizer until now) can be freed."""
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:  # noqa: BLE001 - CUDA already shut down: nothing left to unlock
        pass


def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, object | None]:
    """A host byte buffer of exactly `nbytes`, page-locked when `pin` and CUDA allows it.

    Returns (buffer, keeper): while `keeper` lives the pages stay locked; when it is collected they are
    unlocked, then freed. torch's own pinned allocator (pin_memory=True) is not used: it rounds every block up to
    a power of two (an 18 GB stage would lock 32 GB of the host's memory) and keeps freed blocks cached. Here
    the pages are touched by every core first (one thread faulting 18 GB in takes seconds), then registered with
    CUDA, as ComfyUI pins its own weights."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return buffer, None
    buffer.zero_()
    pointer = buffer.data_ptr()
    if int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0)) != 0:
        log.info("could not page-lock a %.1f GB host copy; keeping it in pageable memory (slower copies)",
                 nbytes / 1e9)
        return buffer, None
    keeper = _PinnedPages()
    finalizer = weakref.finalize(keeper, _unregister, pointer, buffer)
    finalizer.atexit = False
    return buffer, keeper


class _PinnedPages:
    """Lifetime token of a registered host buffer (see `host_buffer`)."""


class StageWeights:
    """Moves one stage's tensors between the device and a host copy (made once, see `keep_host_copy`).

    All tensors of the stage live as views of ONE flat byte buffer on each side, so a move is one
    allocation and one copy, and the memory returns whole when the device buffer is dropped.
    """

    def __init__(self, module: nn.Module, pin: bool):
        self.module = module
        self.pin = pin
        self.pinned = False
        self._host: torch.Tensor | None = None
        self._pages: object | None = None
        self._slots: list[_Slot] = []
        self._layout()

    def _layout(self) -> None:
        offset = 0
        self._slots = []
        for _, tensor, _ in _tensors(self.module):
            nbytes = tensor.numel() * tensor.element_size()
            self._slots.append(_Slot(offset, nbytes, tensor.dtype, tensor.shape))
            offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        self.nbytes = offset

    @property
    def device(self) -> torch.device:
        return _tensors(self.module)[0][1].device

    @property
    def has_host_copy(self) -> bool:
        return self._host is not None

    def _rebind(self, flat: torch.Tensor) -> None:
        """Point every tensor of the module at its view of `flat` (no copy)."""
        for (holders, _, is_param), slot in zip(_tensors(self.module), self._slots):
            view = flat[slot.offset: slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            if is_param:
                view = nn.Parameter(view, requires_grad=False)
            for owner, name in holders:  # tied tensors stay tied
                (owner._parameters if is_param else owner._buffers)[name] = view

    def keep_host_copy(self) -> None:
        """Copy the weights into the host copy now (once), so that leaving the device later costs nothing.
        Called right after a stage loads when stages will have to take turns on the GPU: the page locking and
        the copy then belong to the first image, not to the first swap of a later one."""
        if self._host is not None:
            return
        flat, self._pages = host_buffer(self.nbytes, self.pin)
        self.pinned = self._pages is not None
        for (_, tensor, _), slot in zip(_tensors(self.module), self._slots):
            flat[slot.offset: slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape).copy_(
                tensor, non_blocking=self.pinned)
        if self.pinned and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._host = flat

    def to_host(self) -> None:
        """Leave the device: the first time the weights are copied to the host copy, later they are just
        dropped from the device (the host copy already holds them)."""
        if self.device.type == "cpu":
            return
        self.keep_host_copy()
        self._rebind(self._host)

    def to_device(self, device: torch.device) -> None:
        """Come back: one flat device buffer, filled from the host copy (asynchronously when it is pinned)."""
        device = torch.device(device)
        if self.device == device:
            return
        self.keep_host_copy()
        flat = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        flat.copy_(self._host, non_blocking=self.pinned)
        self._rebind(flat)


def host_copy_plan(nbytes: int) -> str | None:
    """How a stage of `nbytes` leaves the GPU: "pinned" (page-locked host copy: fast asynchronous copies),
    "pageable" (a plain host copy), or None (no room on the host: drop it and re-read the files later).
    Pinned memory cannot be swapped out, so it is used only while it leaves the host half of what it has."""
    available = host_memory_available()
    if not torch.cuda.is_available() or available == 0:
        return None
    if nbytes < 0.5 * available:
        return "pinned"
    if nbytes < 0.8 * available:
        return "pageable"
    return None
