"""The model the loader opened last, held for a few minutes after its last use so that a loader that runs again
gets the same object back.

ComfyUI 0.33's default cache (RAM pressure) releases the outputs of every node that the running workflow does
not use as soon as another workflow runs (its inactive headroom defaults to all of the host's RAM). Our loader
then runs again, and every stage was read from the files again and its host copy remade: under a 24 GB budget
with another model used between our queues, 3.9 s of a 27.0 s re-queue on an H200 (2026-11-30). Held here, the
model comes back with its stages, host copies and compiled graphs; its stages stay registered with ComfyUI's
model management, which moves them off the GPU when others need the room, as before.

Only one model is held (a loader run with other inputs replaces it), and only while the host has memory to
spare: it is let go KEEP_S seconds after its last use, or as soon as the host's available memory falls below
ComfyUI's own cache headroom (10% of RAM, 2-10 GB), whichever comes first. Letting go only drops this
reference; if ComfyUI still caches the loader's output, nothing is freed until ComfyUI lets go too. A watcher thread
checks every POLL_S seconds, so the model is let go even when no node of ours runs again; the last reference then
dies in that thread, as ComfyUI's own models do when a garbage collection runs in a thread other than its worker.
"""
from __future__ import annotations

import threading
import time
import weakref

KEEP_S = 300.0
POLL_S = 5.0
GB = 1024 ** 3

_lock = threading.Lock()
_held: dict = {}  # "key", "model", "last_use"
_keys: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()  # model -> its loader key
_watcher: threading.Thread | None = None


def get(key: tuple):
    """The held model if it was loaded with `key`, else None."""
    with _lock:
        if _held.get("key") == key:
            _held["last_use"] = time.monotonic()
            return _held["model"]
    return None


def put(key: tuple, model) -> None:
    """Hold `model` (loaded with `key`) instead of whatever was held."""
    with _lock:
        _keys[model] = key
    _hold(key, model)


def touch(model) -> None:
    """A node used `model`: hold it (again) from now on."""
    with _lock:
        key = _keys.get(model)
    if key is not None:
        _hold(key, model)


def _hold(key: tuple, model) -> None:
    with _lock:
        replaced = _held.get("model")
        _held.update(key=key, model=model, last_use=time.monotonic())
    del replaced  # outside the lock: if this was its last reference, its finalizers run here
    _watch()


def held():
    """The model held now, or None."""
    with _lock:
        return _held.get("model")


def let_go() -> None:
    """Hold nothing (from now until the next `put` or `touch`)."""
    with _lock:
        released = _held.pop("model", None)
        _held.clear()
    del released  # outside the lock: if this was its last reference, its finalizers run here


def let_go_if_due(now: float | None = None) -> bool:
    """Drop the held model if its time is up or the host is short of memory. True if nothing is held afterwards."""
    now = time.monotonic() if now is None else now
    short = host_memory_short()
    with _lock:
        released = None
        if _held and (now - _held["last_use"] > KEEP_S or short):
            released = _held.pop("model")
            _held.clear()
        nothing_held = not _held
    del released
    return nothing_held


def host_memory_short() -> bool:
    """Whether the host's available memory is below ComfyUI's cache headroom (10% of RAM, at least 2 GB, at most
    10 GB), or unknown."""
    from ..glm_core.residency import host_memory_available, host_memory_total

    available, total = host_memory_available(), host_memory_total()
    if available <= 0 or total <= 0:
        return True
    return available < min(10 * GB, max(2 * GB, 0.1 * total))


def _watch() -> None:
    """Start the thread that lets the model go when due, unless it runs."""
    global _watcher
    with _lock:
        if _watcher is None:
            _watcher = threading.Thread(target=_watch_loop, name="glm-image-recent-model", daemon=True)
            _watcher.start()


def _watch_loop() -> None:
    global _watcher
    while True:
        time.sleep(POLL_S)
        let_go_if_due()
        with _lock:  # decided under the lock: a `put` after this starts a new watcher
            if not _held:
                _watcher = None
                return
