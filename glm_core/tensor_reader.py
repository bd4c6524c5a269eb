"""Reading safetensors tensors straight onto a device, several at once.

A safetensors file is 8 bytes (little-endian u64 N), an N-byte JSON header (key -> dtype, shape, data_offsets
relative to the end of the header) and the raw little-endian tensor bytes. `TensorReader.read` copies a
tensor's byte range from the file into a tensor on the target device:
- on the CPU, the file is read straight into the new tensor's memory;
- on a GPU, through a page-locked bounce buffer per reading thread, in chunks, each chunk copied to the GPU
  asynchronously on the thread's own stream while the thread reads the next one.

Why not `safe_open(..., device="cuda").get_tensor`: it copies each tensor into pageable host memory, from where
the driver copies it again through its own staging buffer, one tensor at a time (17.8 GB of the AR from the page
cache in 4.6 s on the H200). Reads of the file release the GIL, so `read_in_order` keeps several tensors in
flight on a small thread pool. The headers are still validated by safetensors itself (`checkpoint._read_header`)
before anything is read; this module only trusts the byte ranges it is given.
"""
from __future__ import annotations

import contextlib
import json
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

# safetensors dtype strings -> torch dtypes (the ones this project's checkpoints hold, and their neighbours).
STORED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Bytes per read and per host-to-GPU copy: large enough to stream at full speed, small enough that a
# page-locked buffer per thread costs little to allocate.
CHUNK_BYTES = 32 << 20
# Reading threads. The AR's files (20.2 GB) from the page cache onto the H200 (bench/weight_reading.py):
# safetensors one at a time 5.0-6.7 GB/s, 1 thread 5.2-5.4, 6 threads 8.2-8.7, 12 threads 12-13 GB/s.
READ_THREADS = 12

T = TypeVar("T")
R = TypeVar("R")


def data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (first byte, end byte) of its data in the file, absolute offsets."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    start = 8 + header_size
    return {key: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
            for key, entry in header.items() if key != "__metadata__"}


class TensorReader:
    """Reads tensors by byte range onto `device`; `read` may be called from several threads at once."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._ranges: dict[Path, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: page-locked buffer and copy stream (GPU only)

    def byte_range(self, path: Path, key: str) -> tuple[int, int]:
        with self._lock:
            ranges = self._ranges.get(path)
            if ranges is None:
                ranges = self._ranges[path] = data_ranges(path)
        return ranges[key]

    def read(self, path: Path, key: str, stored_dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `key` of file `path` on the reader's device, in its stored dtype."""
        first, end = self.byte_range(path, key)
        out = torch.empty(shape, dtype=STORED_DTYPES[stored_dtype], device=self.device)
        nbytes = out.numel() * out.element_size()
        if end - first != nbytes:
            raise EOFError(f"{key!r} holds {end - first} bytes in the file, expected {nbytes} for shape "
                           f"{list(shape)} {stored_dtype}")
        if nbytes == 0:
            return out
        flat = out.reshape(-1).view(torch.uint8)  # (nbytes,)
        with open(path, "rb", buffering=0) as f:
            f.seek(first)
            if self.device.type == "cpu":
                _read_exactly(f, flat.numpy(), path, key)
            else:
                self._read_to_gpu(f, flat, path, key)
        return out

    def _read_to_gpu(self, f, flat: torch.Tensor, path: Path, key: str) -> None:
        staging, stream = self._staging()
        for start in range(0, flat.numel(), CHUNK_BYTES):
            size = min(CHUNK_BYTES, flat.numel() - start)
            stream.synchronize()  # the previous chunk has left the buffer
            _read_exactly(f, staging[:size].numpy(), path, key)
            with torch.cuda.stream(stream):
                flat[start:start + size].copy_(staging[:size], non_blocking=True)
        stream.synchronize()  # the tensor is complete before any other stream uses it

    def _staging(self) -> tuple[torch.Tensor, torch.cuda.Stream]:
        local = self._local
        if getattr(local, "staging", None) is None:
            local.staging = torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
            local.stream = torch.cuda.Stream(self.device)
        return local.staging, local.stream


_staging_holds = 0
_staging_holds_lock = threading.Lock()


def release_staging_memory() -> None:
    """Give the page-locked bounce buffers of finished reads back to the OS: torch's pinned-memory cache would
    otherwise keep READ_THREADS * CHUNK_BYTES of host RAM locked for the rest of the process. Nothing while a
    `staging_kept()` block runs anywhere."""
    with _staging_holds_lock:
        if _staging_holds:
            return
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is not None and torch.cuda.is_initialized():
        empty_host_cache()


@contextlib.contextmanager
def staging_kept():
    """Reads inside keep their bounce buffers cached: freeing page-locked memory waits for the whole GPU (the
    driver synchronises the device), which a read beside a running stage must not do. The caller releases them
    (`release_staging_memory`) once nothing else runs."""
    global _staging_holds
    with _staging_holds_lock:
        _staging_holds += 1
    try:
        yield
    finally:
        with _staging_holds_lock:
            _staging_holds -= 1


def _read_exactly(f, buffer, path: Path, key: str) -> None:
    view = memoryview(buffer)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise EOFError(f"{path} ends inside the data of {key!r}")
        done += got


def read_in_order(items: Iterable[T], read: Callable[[T], R], threads: int = READ_THREADS) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in the items' order, with up to 2 * threads reads in flight on a thread pool (bounded,
    so that reads never run far ahead of the caller that consumes their tensors). A failed read raises from
    this iterator, with the item attached as the exception's `item`; reads not yet started are cancelled."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        for item in items:
            yield item, _attach_item(read, item)
        return
    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="glm-core-read")
    try:
        queue = iter(items)
        for item in queue:
            pending.append((item, pool.submit(_attach_item, read, item)))
            if len(pending) >= 2 * threads:
                item_done, future = pending.popleft()
                yield item_done, future.result()
        while pending:
            item_done, future = pending.popleft()
            yield item_done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _attach_item(read: Callable[[T], R], item: T) -> R:
    try:
        return read(item)
    except Exception as exc:
        exc.item = item
        raise
