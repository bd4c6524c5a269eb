"""The decode made ready while the AR decodes: on a side thread, the glyph encoder, the DiT and the VAE are read
onto the GPU and the DiT's compiled graph is traced and loaded (from torch's compile cache when it has it), so that
a fresh process's first DiT step runs at full speed instead of paying for all of that after the AR.

Why this can run beside the AR: once its CUDA graph is captured, the AR's decode needs the host for a few
microseconds per token (a graph replay and the noise draw); file reads release the GIL, and the side thread's
copies and kernels go to a stream of its own. The thread asks the interpreter to switch threads more often while
it runs, so that its Python work (dynamo's tracing) never keeps the AR's loop from queueing the next token.

It only runs where the decode stages fit beside the AR with room for the decode's work: it never moves a stage off
the GPU, and on a card where the stages take turns `decode` loads them as before.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING

import torch

from .memory import GB, estimated_working_bytes, free_bytes
from .tensor_reader import release_staging_memory, staging_kept

if TYPE_CHECKING:
    from .pipeline import Conditioning, GlmImage

log = logging.getLogger("glm_core")
DECODE_STAGES = ("glyph", "dit", "vae")
# The interpreter's thread switch interval while the prefetch runs (its default is 5 ms): a thread waiting for
# the GIL gets it after this long. The AR's loop takes the GIL a few times per token (6 ms of GPU work each).
SWITCH_INTERVAL_S = 0.0002


class DecodePrefetch:
    """One prefetch for one conditioning: `start` (the AR's decode loop is running) then `join`."""

    def __init__(self, model: "GlmImage", cond: "Conditioning", batch: int):
        self.model, self.cond, self.batch = model, cond, batch
        self._thread: threading.Thread | None = None
        self.loaded: list[str] = []  # the stages this prefetch read
        self.warmed = False  # the DiT's graph ran for this conditioning's shapes
        self.seconds = 0.0
        self.failure: str | None = None
        self._cancelled = threading.Event()

    @property
    def graph_key(self) -> tuple[int, bool]:
        """What decides which DiT graphs a decode runs: the batch and whether it has references."""
        return self.batch, bool(self.cond.references)

    def start(self) -> None:
        if self._thread is not None:
            return
        model = self.model
        if self.graph_key in model.decode_graphs_run and all(model.on_device(name) for name in DECODE_STAGES):
            return  # nothing to do: loaded, and a decode like this one has run in this process
        reason = self.skip_reason()
        if reason is not None:
            log.info("the decode stages load after the AR: %s", reason)
            return
        self._thread = threading.Thread(target=self._run, name="glm-core-decode-prefetch", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Start nothing more: a load under way finishes, the rest is left to the decode (if one comes)."""
        self._cancelled.set()

    def join(self) -> None:
        from .pipeline import STAGE_TITLES

        thread, self._thread = self._thread, None
        if thread is None:
            return
        if thread.ident is not None:  # else an interrupt landed while it started: cancelled, it starts nothing
            thread.join()
        release_staging_memory()  # kept while the AR ran (freeing page-locked memory waits for the whole GPU)
        if self.warmed and self.model.device.type == "cuda":
            # The warm-up's activations are cached for the side stream, where nothing else allocates: return them.
            torch.cuda.empty_cache()
        if not self._cancelled.is_set() and (self.loaded or self.warmed):
            done = []
            if self.loaded:
                done.append("read the " + ", ".join(STAGE_TITLES[name] for name in self.loaded) + " weights")
            if self.warmed:
                done.append("warmed the DiT's compiled graph")
            log.info("beside the AR: %s (%.1f s)", " and ".join(done), self.seconds)

    def is_own_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def skip_reason(self) -> str | None:
        """Why the decode stages may not load beside the stages on the device now (None: they may)."""
        model = self.model
        if model.placement == "sequential":
            return "placement 'sequential' keeps one stage on the GPU at a time"
        missing = [name for name in DECODE_STAGES if not model.on_device(name)]
        if model.device.type != "cuda" or model.placement == "gpu" or not missing:
            return None
        from .pipeline import HEADROOM_BYTES

        needed = (sum(model.stage_nbytes(name) for name in missing) + HEADROOM_BYTES
                  + estimated_working_bytes("dit", height=self.cond.height, width=self.cond.width, batch=self.batch,
                                            reference_tokens=self.cond.reference_tokens))
        free = free_bytes(model.device)
        if free < needed:
            return f"{needed / GB:.1f} GB needed beside the AR, {free / GB:.1f} GB free"
        return None

    def _run(self) -> None:
        model = self.model
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        try:
            stream = _side_stream(model.device.index) if model.device.type == "cuda" else None
            with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), staging_kept(), \
                    torch.no_grad():
                self._prepare()
            if stream is not None:
                stream.synchronize()
        except Exception as exc:  # the decode then loads and compiles as it would have without a prefetch
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning("preparing the decode beside the AR failed (%s); the decode loads its stages itself",
                        self.failure)
        finally:
            sys.setswitchinterval(interval)

    def _prepare(self) -> None:
        model, start = self.model, time.perf_counter()
        for name in DECODE_STAGES:
            if self._cancelled.is_set():
                return
            if not model.on_device(name):
                model.load_stage(name, quiet=True)  # reported once, by `join`
                self.loaded.append(name)
        if self._cancelled.is_set():
            return
        self.warmed = warm_up_dit(model, self.cond, self.batch)
        if self.warmed:
            model.decode_graphs_run.add(self.graph_key)
        self.seconds = time.perf_counter() - start


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """One stream per GPU for every prefetch: cuBLAS keeps a workspace per stream it ran on, and the allocator
    caches blocks per stream (a new stream each time would hold both again)."""
    return torch.cuda.Stream(device_index)


def warm_up_dit(model: "GlmImage", cond: "Conditioning", batch: int) -> bool:
    """One guided DiT velocity on zero latents and prior ids of this request's shapes (its edit graph too, with
    zero references of its references' sizes), so that dynamo traces the compiled block and inductor loads it,
    and its kernels are tuned at the real sizes, before the first real step. False when the DiT is not compiled
    (nothing to warm)."""
    from .dit.sampling import DiTConditioning, predict_velocity
    from .schedule import dit_timestep

    modules = model.stage_modules()
    glyph, dit, vae = modules["glyph"], modules["dit"], modules["vae"]
    if dit.compile_backend is None:
        return False
    device, dtype = model.device, model.dtype
    scale, patch = vae.config.scale_factor, dit.config.patch_size
    channels = dit.config.in_channels

    def zero_latents(count: int, height: int, width: int):
        latents = torch.zeros(count, channels, height // scale, width // scale, device=device, dtype=dtype)
        prior_ids = torch.zeros(count, (height // scale // patch) * (width // scale // patch), dtype=torch.long,
                                device=device)
        return latents, prior_ids

    reference_kv = None
    if cond.references:
        references = [zero_latents(1, image.height, image.width) for image in cond.references]
        reference_kv = dit.encode_references([latents for latents, _ in references], [ids[0] for _, ids in references],
                                             cond.reference_sizes)
    latents, prior_ids = zero_latents(batch, cond.height, cond.width)
    dit_cond = DiTConditioning(glyph_embeds=glyph.encode([cond.prompt] * batch, dtype=dtype),
                               negative_glyph_embeds=glyph.encode_negative(batch, dtype=dtype),
                               prior_ids=prior_ids, target_size=(cond.height, cond.width), reference_kv=reference_kv)
    timestep = dit_timestep(torch.zeros(1, device=device), batch)
    predict_velocity(dit, latents, dit_cond, timestep, guidance=2.0)  # any guidance > 1: both passes run
    return True
