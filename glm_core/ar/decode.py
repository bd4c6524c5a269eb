"""AR generation: preallocated KV cache, prefill, one-token decode steps, CUDA-graph replay.

No `transformers.generate`. The flow for one call of `generate_grids`:
1. `prepare_prompt`: the reference images' VQ ids (computed by the vision stage) written over the
   `<|image|>` placeholders (spec §1.2.7), 3-D positions for the prompt and for every token to
   generate (positions.py), batch expansion over seeds.
2. `setup_caches`: K/V buffers sized once for prompt + generation (static shapes).
3. `prefill`: the whole left-padded prompt in one forward; samples token 0.
4. `DecodeLoop.step`: feeds token k at cache slot P + k with precomputed cos/sin column k and
   samples token k + 1, reading the step counter from a device tensor, so no step touches the host
   and one step can be captured as a CUDA graph and replayed.
The token budget is exact: t2i = preview + large + 1 (EOS), editing = large + 1.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import sampling
from ..compiling import compiled
from ..fp8 import has_fp8_linears
from ..gemv import uses_gemv
from ..memory import under_cuda_malloc_async
from ..processor import ARInputs
from .config import Sampling
from .model import GlmImageAR, TextDecoderLayer
from .positions import batch_positions

log = logging.getLogger("glm_core")

Grid = tuple[int, int]
PROGRESS_EVERY = 8  # tokens between progress / interrupt callbacks


# --------------------------------------------------------------------------------------------
# KV cache


class LayerKVCache(nn.Module):
    def __init__(self, batch: int, num_kv_heads: int, max_length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, num_kv_heads, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        length = k.shape[2]
        self.k[:, :, :length].copy_(k)
        self.v[:, :, :length].copy_(v)

    def write_at(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """index (1,) long on device; k, v (B, kv_heads, 1, d) -> the whole buffers (static shapes)."""
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v


class KVCache(nn.Module):
    """Per-layer K/V buffers plus which key slots each batch item may attend to."""

    def __init__(self, layers: Sequence[LayerKVCache], key_allowed: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("key_allowed", key_allowed, persistent=False)  # (B, S) bool

    @property
    def max_length(self) -> int:
        return self.key_allowed.shape[1]


def setup_caches(model: GlmImageAR, batch: int, max_length: int) -> KVCache:
    text = model.config.text
    layers = [
        LayerKVCache(batch, text.num_key_value_heads, max_length, text.head_dim, model.dtype, model.device)
        for _ in range(text.num_hidden_layers)
    ]
    return KVCache(layers, torch.zeros(batch, max_length, dtype=torch.bool, device=model.device))


# --------------------------------------------------------------------------------------------
# Prompt preparation


@dataclass
class PromptPlan:
    input_ids: torch.Tensor  # (B, P) long, placeholders replaced by reference VQ ids
    attention_mask: torch.Tensor  # (B, P) bool, False = left padding
    prefill_positions: torch.Tensor  # (3, B, P) long
    decode_positions: torch.Tensor  # (3, B, N) long, column k for generated token k
    target_grid: Grid
    preview_grid: Grid | None

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())

    @property
    def num_new_tokens(self) -> int:
        return self.decode_positions.shape[-1]


def _grids_per_sample(inputs: ARInputs) -> list[list[Grid]]:
    grids = [(int(h), int(w)) for _, h, w in inputs.image_grid_thw.tolist()]
    counts = [int(c) for c in inputs.images_per_sample.reshape(-1).tolist()]
    batch = inputs.input_ids.shape[0]
    if len(counts) != batch or sum(counts) != len(grids):
        raise ValueError(f"images_per_sample {counts} does not split {len(grids)} grids over a batch of {batch}")
    out, start = [], 0
    for count in counts:
        out.append(grids[start : start + count])
        start += count
    return out


def replace_image_placeholders(input_ids: torch.Tensor, image_token_id: int, reference_ids: torch.Tensor | None,
                               source_grids: Sequence[Grid]) -> torch.Tensor:
    """Write the reference images' VQ ids (Σ h·w,) over the `<|image|>` placeholders (spec §1.2.7)."""
    placeholder = input_ids == image_token_id
    count = int(placeholder.sum())
    expected = sum(h * w for h, w in source_grids)
    given = 0 if reference_ids is None else reference_ids.numel()
    if count != expected or given != expected:
        raise ValueError(f"the prompt has {count} <|image|> placeholders and {given} reference ids, but the "
                         f"reference grids {list(source_grids)} need {expected}")
    if count == 0:
        return input_ids
    return input_ids.masked_scatter(placeholder, reference_ids.to(input_ids.device))


def prepare_prompt(model: GlmImageAR, inputs: ARInputs, num_copies: int = 1) -> PromptPlan:
    """ARInputs -> PromptPlan on the model's device; each prompt repeated `num_copies` times
    (consecutively) for several seeds of one prompt."""
    config = model.config
    input_ids = inputs.input_ids.long()
    mask = inputs.attention_mask.bool()
    grids = _grids_per_sample(inputs)
    num_generated = 2 if inputs.preview_grid is not None else 1
    source_grids = [g for sample in grids for g in sample[: len(sample) - num_generated]]
    input_ids = replace_image_placeholders(input_ids, config.image_token_id, inputs.reference_ids, source_grids)
    prefill_pos, decode_pos = batch_positions(
        input_ids.cpu(),
        mask.cpu(),
        grids,
        image_start_token_id=config.image_start_token_id,
        image_end_token_id=config.image_end_token_id,
    )
    target, preview = tuple(inputs.target_grid), inputs.preview_grid
    expected = target[0] * target[1] + (preview[0] * preview[1] if preview else 0) + 1
    if decode_pos.shape[-1] != expected:
        raise ValueError(
            f"the prompt's grids {grids} give {decode_pos.shape[-1]} tokens to generate, but target grid "
            f"{target} and preview grid {preview} need {expected}"
        )
    if num_copies > 1:
        input_ids = input_ids.repeat_interleave(num_copies, dim=0)
        mask = mask.repeat_interleave(num_copies, dim=0)
        prefill_pos = prefill_pos.repeat_interleave(num_copies, dim=1)
        decode_pos = decode_pos.repeat_interleave(num_copies, dim=1)
    device = model.device
    return PromptPlan(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        prefill_positions=prefill_pos.to(device),
        decode_positions=decode_pos.to(device),
        target_grid=target,
        preview_grid=preview,
    )


# --------------------------------------------------------------------------------------------
# Forward passes


def prompt_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) bool valid -> (B, 1, P, P) bool: causal, padded keys masked. Each query may always see
    itself, so padded rows never have an empty softmax (which would put NaN into the cache)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    return (causal & (attention_mask[:, None, None, :] | diagonal))


@torch.no_grad()
def prefill(model: GlmImageAR, plan: PromptPlan, cache: KVCache) -> torch.Tensor:
    """Run the prompt, fill cache slots [0, P); returns the last position's logits (B, V)."""
    length = plan.input_ids.shape[1]
    hidden = model.embed(plan.input_ids)
    cos, sin = model.rotary_cos_sin(plan.prefill_positions, hidden.dtype)
    cache.key_allowed.zero_()
    cache.key_allowed[:, :length] = plan.attention_mask
    mask = prompt_attention_mask(plan.attention_mask) if plan.padded else None  # None: causal kernels
    hidden = model.hidden_states(hidden, cos, sin, mask, kv_cache=cache)
    return model.logits(hidden[:, -1])


class DecodeLoop:
    """Static buffers for one generation; `step()` has no data-dependent shapes and no host sync.

    tokens[:, 0] comes from the prefill; step k (k = 0 .. N-2) feeds tokens[:, k] and writes
    tokens[:, k + 1].
    """

    def __init__(self, model: GlmImageAR, plan: PromptPlan, cache: KVCache, *, generators,
                 sampling_settings: Sampling | None, mask_grid: bool):
        self.model, self.cache = model, cache
        self.run_layer = decode_layer_runner(model)  # None: plain layer calls
        self.prompt_length = plan.input_ids.shape[1]
        self.num_tokens = plan.num_new_tokens
        batch = plan.input_ids.shape[0]
        device = model.device
        config = model.config
        greedy = sampling_settings is None
        self.sampling = {} if greedy else {"temperature": sampling_settings.temperature,
                                           "top_k": sampling_settings.top_k or None,
                                           "top_p": sampling_settings.top_p}
        self.generators = generators
        self.noise = None if greedy else torch.empty(batch, config.vision_vocab_size, device=device)
        self.masks = (
            sampling.grid_masks(config.vision_vocab_size, config.codebook_size, config.eos_token_id, device)
            if mask_grid else None
        )
        cos, sin = model.rotary_cos_sin(plan.decode_positions, model.dtype)  # (B, 1, N, rd)
        self.cos = cos.permute(2, 0, 1, 3).unsqueeze(3).contiguous()  # (N, B, 1, 1, rd)
        self.sin = sin.permute(2, 0, 1, 3).unsqueeze(3).contiguous()
        self.tokens = torch.zeros(batch, self.num_tokens, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # k, on device

    def choose(self, logits: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """Sample the token at generated index `token_index` ((1,) long) from logits (B, V)."""
        at_end = token_index == self.num_tokens - 1 if self.masks is not None else None
        return sampling.next_tokens(logits, noise=self.noise, masks=self.masks, at_end=at_end,
                                    **(self.sampling or {"temperature": 1.0, "top_k": None, "top_p": None}))

    def draw_noise(self) -> None:
        if self.noise is not None:
            sampling.draw_noise(self.noise, self.generators)

    def first(self, logits: torch.Tensor) -> None:
        self.draw_noise()
        self.tokens[:, 0] = self.choose(logits, torch.zeros(1, dtype=torch.long, device=logits.device))

    def forward(self) -> torch.Tensor:
        """Feed tokens[:, k] (k = step_index) at cache slot P + k; returns logits (B, V) for token k + 1."""
        k = self.step_index
        token = self.tokens.index_select(1, k)  # (B, 1)
        cache_index = k + self.prompt_length
        self.cache.key_allowed.index_fill_(1, cache_index, True)
        mask = self.cache.key_allowed[:, None, None, :]  # (B, 1, 1, S)
        hidden = self.model.embed(token)
        cos, sin = self.cos.index_select(0, k)[0], self.sin.index_select(0, k)[0]
        hidden = self.model.hidden_states(hidden, cos, sin, mask, kv_cache=self.cache, cache_index=cache_index,
                                          run_layer=self.run_layer)
        return self.model.logits(hidden[:, -1])

    def step(self) -> None:
        logits = self.forward()
        next_index = self.step_index + 1
        self.tokens.index_copy_(1, next_index, self.choose(logits, next_index)[:, None])
        self.step_index.add_(1)


class _CacheSlot:
    """A layer's K/V buffers as a plain object: inside torch.compile, tensors reached through an
    nn.Module get static shapes, plain arguments do not (one compiled graph for every cache length)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    write_at = LayerKVCache.write_at


def _decode_layer(layer: TextDecoderLayer, hidden, cos, sin, attn_mask, k, v, cache_index):
    return layer(hidden, cos, sin, attn_mask, _CacheSlot(k, v), cache_index)


def inductor_writes_fp8_gemvs(model: GlmImageAR) -> bool:
    """Whether inductor has to write the FP8 decode layer's one-row matmuls itself (FP8 linears, and our GEMV kernel
    does not run on the model's device), and so needs coordinate-descent tuning for those reductions. Where our GEMV
    runs, that tuning only re-times the layer's small norm kernels on their first launch, and a noisy pick stays in
    the cache: on the H200 one of them ran 2.7, 4.8 or 7.7 µs a launch from process to process, the FP8 AR 3.80 to
    4.18 ms per token (2026-11-30 17:32-18:23)."""
    return has_fp8_linears(model) and not uses_gemv(str(model.device))


def decode_layer_runner(model: GlmImageAR):
    """What the decode step calls per layer: None (plain calls, `model.compile_backend` None), or the
    torch.compile'd layer call. Inductor fuses each layer's norms (fp32 statistics kept), rope, residual
    adds and cache write into a few kernels; all 40 layers share one compiled graph, captured with the rest
    of the step into the decode loop's CUDA graph (under cudaMallocAsync with its kernels launched from C++,
    see `under_cuda_malloc_async`). Falls back to eager on a compiler error (a rerun of a layer rewrites the same
    K/V slot, so it is safe)."""
    if model.compile_backend is None:
        return None
    layer_call = compiled(_decode_layer, "AR decode layer", model.compile_backend,
                          cpp_wrapper=under_cuda_malloc_async(), tune_reductions=inductor_writes_fp8_gemvs(model))

    def run_layer(layer, hidden, cos, sin, attn_mask, layer_cache, cache_index):
        return layer_call(layer, hidden, cos, sin, attn_mask, layer_cache.k, layer_cache.v, cache_index)

    return run_layer


def cuda_graphs_supported() -> bool:
    """Whether the decode step may be captured into a CUDA graph: yes, under both of PyTorch's allocators (see
    `under_cuda_malloc_async` for what changes there) unless a capture already failed in this process under
    cudaMallocAsync (`_keep_leftovers_of_failed_capture`)."""
    return not _FAILED_CAPTURE_LEFTOVERS


# What a failed capture under cudaMallocAsync allocated: freeing it before the graph ever ran aborts the process
# (the allocation belongs to a graph that never launched; the free fails inside a destructor). Kept for the
# process's lifetime instead, once, with what the failing step's frames hold (that generation's KV cache, tens of
# MB at 1024², and the tensors of the call that failed): a bounded leak instead of a crash; later generations
# decode without a graph.
_FAILED_CAPTURE_LEFTOVERS: list = []


def _keep_leftovers_of_failed_capture(exc: BaseException) -> None:
    if under_cuda_malloc_async():
        _FAILED_CAPTURE_LEFTOVERS.append(exc)  # its traceback's frames hold the captured tensors


@functools.cache
def _capture_stream(device_index: int) -> torch.cuda.Stream:
    """One side stream per GPU for the warm-up steps and the graph capture, reused by every generation.

    - cuBLAS keeps a 32 MiB workspace for each stream it has run on: a new pool stream per generation held one
      more workspace each time (+34 MB per image until the pool's 32 streams wrapped around, measured on the H200).
    - The capture runs on the stream the warm-up ran on (as ComfyUI captures its own graphs), so the capture
      finds that stream's cuBLAS workspace already allocated instead of allocating one into the graph.
    """
    return torch.cuda.Stream(device_index)


def _run_steps(loop: DecodeLoop, steps: int, on_tokens: Callable[[int], None], use_cuda_graph: bool,
               on_steady: Callable[[], None] | None = None) -> None:
    """Run `steps` decode steps; on_tokens(done) every PROGRESS_EVERY tokens (done = tokens so far);
    on_steady() once, before the first step that runs as it will run to the end (after the graph capture)."""
    done = 0
    run = loop.step
    if use_cuda_graph and steps > 0:
        warmup = min(3, steps)
        side = _capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # real steps, also warm up kernels/allocator outside the capture
                loop.draw_noise()
                loop.step()
        done = warmup
        if done < steps:
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: CUDA calls from other threads (a server's) neither break nor join this capture
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    loop.step()  # records one step; nothing runs during capture
                run = graph.replay
            except RuntimeError as exc:  # an op that cannot be captured: stay eager, same results
                log.debug("AR decode: CUDA graph capture failed", exc_info=True)
                _keep_leftovers_of_failed_capture(exc)
                warnings.warn(f"AR decode: CUDA graph capture failed ({exc}); decoding eagerly", RuntimeWarning)
                torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(side)
    if on_steady is not None:
        on_steady()
    in_flight = StepsInFlight(loop.model.device)
    while done < steps:
        in_flight.wait_for_room()
        loop.draw_noise()
        run()
        in_flight.queued()
        done += 1
        if done % PROGRESS_EVERY == 0:
            on_tokens(done + 1)


class StepsInFlight:
    """Keeps the host at most MAX_STEPS_AHEAD decode steps ahead of the GPU.

    Nothing in a step waits for the GPU, so without a bound the loop queues work until the driver's launch queue
    is full, and from then on waits inside a launch for room: every CUDA call of any other thread then waits
    about as long (2026-11-30, H200: the DiT's compile warm-up beside the AR took 9 s instead of 3). Waiting on
    an event of a step queued MAX_STEPS_AHEAD steps earlier instead leaves the driver free, and the GPU never
    idles: that many steps are ~100 ms of its work, against microseconds of host work per step."""

    MAX_STEPS_AHEAD = 16

    def __init__(self, device: torch.device):
        self.events = [torch.cuda.Event() for _ in range(self.MAX_STEPS_AHEAD)] if device.type == "cuda" else []
        self.count = 0

    def wait_for_room(self) -> None:
        if self.events and self.count >= len(self.events):
            self.events[self.count % len(self.events)].synchronize()  # the step queued MAX_STEPS_AHEAD ago

    def queued(self) -> None:
        if self.events:
            self.events[self.count % len(self.events)].record()
        self.count += 1


@torch.no_grad()
def generate_sequences(
    model: GlmImageAR,
    inputs: ARInputs,
    *,
    seeds: Sequence[int],
    sampling_settings: Sampling | None,
    mask_grid: bool = True,
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], None] | None = None,
    use_cuda_graph: bool | None = None,
    on_steady: Callable[[], None] | None = None,
) -> torch.Tensor:
    """All generated tokens (B, N) long on the CPU: preview grid (t2i), large grid, EOS slot.

    seeds: one per batch item. With one prompt and several seeds the prompt is repeated; otherwise
    len(seeds) must equal the number of prompts. Item i's tokens come from seeds[i] alone.
    sampling_settings None = greedy. mask_grid: only codebook ids inside the grids, EOS after them.
    on_steady: called once when the decode loop is set up (compiled, its CUDA graph captured) and only replays
    steps from then on: what may run beside it on other threads starts there (`glm_core.prefetch`).
    """
    seeds = [int(s) for s in seeds]
    prompts = inputs.input_ids.shape[0]
    if prompts == 1 and len(seeds) >= 1:
        copies = len(seeds)
    elif len(seeds) == prompts:
        copies = 1
    else:
        raise ValueError(f"got {len(seeds)} seeds for {prompts} prompts: pass one seed per prompt (or one prompt)")
    if interrupt:
        interrupt()
    plan = prepare_prompt(model, inputs, copies)
    device = model.device
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda" and cuda_graphs_supported()
    total = plan.num_new_tokens
    cache = loop = None
    try:
        cache = setup_caches(model, plan.input_ids.shape[0], plan.input_ids.shape[1] + total)
        loop = DecodeLoop(model, plan, cache,
                          generators=None if sampling_settings is None else sampling.make_generators(seeds, device),
                          sampling_settings=sampling_settings, mask_grid=mask_grid)
        loop.first(prefill(model, plan, cache))

        reported = [0]

        def on_tokens(done: int) -> None:
            if interrupt:
                interrupt()
            if progress:
                progress(done, total)
            reported[0] = done

        on_tokens(1)
        _run_steps(loop, total - 1, on_tokens, use_cuda_graph, on_steady)
        tokens = loop.tokens.cpu()  # the one host sync
        if progress and reported[0] != total:
            progress(total, total)
        return tokens
    finally:
        del loop, cache  # free the KV cache and the graph's buffers even when interrupted


def split_sequences(tokens: torch.Tensor, target_grid: Grid, preview_grid: Grid | None) -> torch.Tensor:
    """(B, N) generated tokens -> the large grid (B, gh, gw): skip the preview, drop EOS (spec §6.11)."""
    gh, gw = target_grid
    offset = preview_grid[0] * preview_grid[1] if preview_grid else 0
    return tokens[:, offset : offset + gh * gw].reshape(-1, gh, gw)


def generate_grids(model: GlmImageAR, inputs: ARInputs, *, seeds: Sequence[int], sampling_settings: Sampling,
                   progress: Callable[[int, int], None] | None = None,
                   interrupt: Callable[[], None] | None = None,
                   on_steady: Callable[[], None] | None = None) -> torch.Tensor:
    """The large token grid (B, gh, gw) long, codebook ids, of each batch item (seed i -> item i)."""
    tokens = generate_sequences(model, inputs, seeds=seeds, sampling_settings=sampling_settings, mask_grid=True,
                                progress=progress, interrupt=interrupt, on_steady=on_steady)
    return split_sequences(tokens, tuple(inputs.target_grid), inputs.preview_grid)
