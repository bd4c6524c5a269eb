"""AR generation: preallocated KV cache, prefill, one-token decode steps, CUDA-graph replay.

No `transformers.generate`. The flow for one call of `generate_tokens`:
1. `prepare_prompt`: reference images -> VQ ids written over the `<|image|>` placeholders
   (spec §1.2.7), 3-D positions for the prompt and for every token to generate (positions.py),
   batch expansion over seeds.
2. `setup_caches`: K/V buffers sized once for prompt + generation (static shapes).
3. `prefill`: the whole left-padded prompt in one forward; samples token 0.
4. `DecodeLoop.step`: feeds token k at cache slot P + k with precomputed cos/sin column k and
   samples token k + 1, reading the step counter from a device tensor, so no step touches the host
   and one step can be captured as a CUDA graph and replayed.
The token budget is exact: t2i = preview + large + 1 (EOS), editing = large + 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import sampling
from ..compiling import compile_wanted, compiled
from .model import GlmImageAR, TextDecoderLayer
from .positions import batch_positions

Grid = tuple[int, int]
PROGRESS_EVERY = 8  # tokens between progress / interrupt callbacks


@dataclass
class PriorTokens:
    grid_ids: torch.Tensor  # (B, gh, gw) long: the large grid, codebook ids
    prior_ids: torch.Tensor  # (B, 4*gh*gw) long: 2x nearest upsample, what the DiT takes
    height: int
    width: int
    reference_sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) pixels per reference
    seeds: list[int] = field(default_factory=list)
    reference_grid_ids: list[torch.Tensor] = field(default_factory=list)  # (gh_i, gw_i) VQ ids per reference


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


def _grids_per_sample(image_grid_thw, images_per_sample, batch: int) -> list[list[Grid]]:
    grids = [(int(h), int(w)) for _, h, w in torch.as_tensor(image_grid_thw).tolist()]
    if images_per_sample is None:
        if batch != 1 and len(grids) % batch:
            raise ValueError(f"image_grid_thw has {len(grids)} grids, not divisible over a batch of {batch}")
        counts = [len(grids) // batch] * batch
    else:
        counts = [int(c) for c in torch.as_tensor(images_per_sample).reshape(-1).tolist()]
    if len(counts) != batch or sum(counts) != len(grids):
        raise ValueError(f"images_per_sample {counts} does not split {len(grids)} grids over a batch of {batch}")
    out, start = [], 0
    for count in counts:
        out.append(grids[start : start + count])
        start += count
    return out


def replace_image_placeholders(
    model: GlmImageAR, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, source_grids: Sequence[Grid],
    reference_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the reference images' VQ ids over the `<|image|>` placeholders (spec §1.2.7).

    `reference_ids` (Σ h·w,), when given, are those ids already computed from `pixel_values`."""
    placeholder = input_ids == model.config.image_token_id
    count = int(placeholder.sum())
    expected = sum(h * w for h, w in source_grids)
    have_images = pixel_values is not None or reference_ids is not None
    if count != expected or (count and not have_images):
        raise ValueError(
            f"the prompt has {count} <|image|> placeholders but the reference grids {list(source_grids)} "
            f"need {expected}{'' if have_images else ' and no pixel_values were given'}"
        )
    if count == 0:
        return input_ids
    if reference_ids is None:
        reference_ids = model.image_token_ids(pixel_values, source_grids)
    elif reference_ids.numel() != expected:
        raise ValueError(f"{reference_ids.numel()} precomputed reference ids for grids {list(source_grids)} "
                         f"that need {expected}")
    return input_ids.masked_scatter(placeholder, reference_ids.to(input_ids.device))


def prepare_prompt(model: GlmImageAR, ar_inputs, num_copies: int = 1) -> PromptPlan:
    """ARInputs -> PromptPlan on the model's device; each prompt repeated `num_copies` times
    (consecutively) for several seeds of one prompt."""
    config = model.config
    input_ids = torch.as_tensor(ar_inputs.input_ids).long()
    batch = input_ids.shape[0]
    mask = getattr(ar_inputs, "attention_mask", None)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    grids = _grids_per_sample(ar_inputs.image_grid_thw, getattr(ar_inputs, "images_per_sample", None), batch)
    preview = getattr(ar_inputs, "preview_grid", None)
    num_generated = 2 if preview is not None else 1
    source_grids = [g for sample in grids for g in sample[: len(sample) - num_generated]]

    input_ids = replace_image_placeholders(model, input_ids, getattr(ar_inputs, "pixel_values", None), source_grids,
                                           getattr(ar_inputs, "reference_ids", None))
    prefill_pos, decode_pos = batch_positions(
        input_ids.cpu(),
        mask.cpu(),
        grids,
        image_start_token_id=config.image_start_token_id,
        image_end_token_id=config.image_end_token_id,
    )
    target = tuple(int(x) for x in ar_inputs.target_grid)
    preview = None if preview is None else tuple(int(x) for x in preview)
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
def teacher_forced_logits(
    model: GlmImageAR,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, L, vision_vocab) for a whole given sequence in one forward, with explicit
    positions (3, B, L). input_ids must already hold VQ ids instead of image placeholders."""
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(model.device).bool()
    hidden = model.embed(input_ids)
    cos, sin = model.rotary_cos_sin(positions.to(model.device), hidden.dtype)
    mask = None if bool(attention_mask.all()) else prompt_attention_mask(attention_mask)
    hidden = model.hidden_states(hidden, cos, sin, mask)
    return model.logits(hidden)


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

    def __init__(self, model: GlmImageAR, plan: PromptPlan, cache: KVCache, *, generators, temperature,
                 top_k, top_p, greedy: bool, mask_grid: bool, run_layer=None):
        self.model, self.cache = model, cache
        self.run_layer = run_layer  # None: plain layer calls; else e.g. decode_layer_runner()
        self.prompt_length = plan.input_ids.shape[1]
        self.num_tokens = plan.num_new_tokens
        batch = plan.input_ids.shape[0]
        device = model.device
        config = model.config
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
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
        return sampling.next_tokens(logits, noise=self.noise, masks=self.masks, at_end=at_end, **self.sampling)

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


def decode_layer_runner(model: GlmImageAR, compile: bool | None = None, backend: str = "inductor", *,
                        fuse_qkv: bool = True):
    """What the decode step calls per layer: None (plain calls), or, when compiling is wanted
    (`compiling.compile_wanted`: default on CUDA), a torch.compile'd layer call after fusing q/k/v.
    Inductor fuses each layer's norms (fp32 statistics kept), rope, residual adds and cache write into
    a few kernels; all 40 layers share one compiled graph, captured with the rest of the step into the
    decode loop's CUDA graph. Falls back to eager on a compile error (a rerun of a layer rewrites the
    same K/V slot, so it is safe)."""
    if not compile_wanted(model.device, compile):
        return None
    if fuse_qkv:  # False only to measure the two changes apart (bench/fast_paths.py)
        model.fuse_projections()
    layer_call = compiled(_decode_layer, "AR decode layer", backend)

    def run_layer(layer, hidden, cos, sin, attn_mask, layer_cache, cache_index):
        return layer_call(layer, hidden, cos, sin, attn_mask, layer_cache.k, layer_cache.v, cache_index)

    return run_layer


def _run_steps(loop: DecodeLoop, steps: int, on_tokens: Callable[[int], None], use_cuda_graph: bool) -> None:
    """Run `steps` decode steps; on_tokens(done) every PROGRESS_EVERY tokens (done = tokens so far)."""
    done = 0
    run = loop.step
    if use_cuda_graph and steps > 0:
        warmup = min(3, steps)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # real steps, also warm up kernels/allocator outside the capture
                loop.draw_noise()
                loop.step()
        torch.cuda.current_stream().wait_stream(side)
        done = warmup
        if done < steps:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):  # records one step; nothing runs during capture
                    loop.step()
                run = graph.replay
            except RuntimeError as exc:  # an op that cannot be captured: stay eager, same results
                warnings.warn(f"AR decode: CUDA graph capture failed ({exc}); decoding eagerly", RuntimeWarning)
                torch.cuda.synchronize()
    while done < steps:
        loop.draw_noise()
        run()
        done += 1
        if done % PROGRESS_EVERY == 0:
            on_tokens(done + 1)


@torch.no_grad()
def generate_sequences(
    model: GlmImageAR,
    ar_inputs,
    *,
    seeds: Sequence[int],
    temperature: float = 0.9,
    top_p: float = 0.75,
    top_k: int | None = 50,
    greedy: bool = False,
    mask_grid: bool = True,
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], None] | None = None,
    use_cuda_graph: bool | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """All generated tokens (B, N) long on the CPU: preview grid (t2i), large grid, EOS slot.

    seeds: one per batch item. With one prompt and several seeds the prompt is repeated; otherwise
    len(seeds) must equal the number of prompts. Item i's tokens come from seeds[i] alone.
    compile: torch.compile the decode layer and fuse q/k/v (`decode_layer_runner`); None = on for CUDA
    unless GLM_CORE_NO_COMPILE=1. Same tokens up to bf16 rounding differences.
    """
    seeds = [int(s) for s in seeds]
    prompts = torch.as_tensor(ar_inputs.input_ids).shape[0]
    if prompts == 1 and len(seeds) >= 1:
        copies = len(seeds)
    elif len(seeds) == prompts:
        copies = 1
    else:
        raise ValueError(f"got {len(seeds)} seeds for {prompts} prompts: pass one seed per prompt (or one prompt)")
    if interrupt:
        interrupt()
    plan = prepare_prompt(model, ar_inputs, copies)
    device = model.device
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    total = plan.num_new_tokens
    cache = loop = None
    try:
        cache = setup_caches(model, plan.input_ids.shape[0], plan.input_ids.shape[1] + total)
        loop = DecodeLoop(
            model, plan, cache,
            generators=None if greedy else sampling.make_generators(seeds, device),
            temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, mask_grid=mask_grid,
            run_layer=decode_layer_runner(model, compile),
        )
        loop.first(prefill(model, plan, cache))

        reported = [0]

        def on_tokens(done: int) -> None:
            if interrupt:
                interrupt()
            if progress:
                progress(done, total)
            reported[0] = done

        on_tokens(1)
        _run_steps(loop, total - 1, on_tokens, use_cuda_graph)
        tokens = loop.tokens.cpu()  # the one host sync
        if progress and reported[0] != total:
            progress(total, total)
        return tokens
    finally:
        del loop, cache  # free the KV cache and the graph's buffers even when interrupted


@torch.no_grad()
def cached_forced_logits(model: GlmImageAR, ar_inputs, forced_tokens: torch.Tensor, *, compile: bool = False,
                         backend: str = "inductor") -> torch.Tensor:
    """Teacher forcing through the real generation path (prefill + cached one-token steps).

    forced_tokens (B, N - 1): generated tokens 0 .. N-2 to feed. Returns logits (B, N, V): row 0
    from the prefill, row k + 1 from the step that fed token k. For tests and benchmarks.
    compile: run the steps through `decode_layer_runner` (off by default here: eager reference path).
    """
    plan = prepare_prompt(model, ar_inputs)
    batch, total = plan.input_ids.shape[0], plan.num_new_tokens
    cache = setup_caches(model, batch, plan.input_ids.shape[1] + total)
    loop = DecodeLoop(model, plan, cache, generators=None, temperature=1.0, top_k=None, top_p=None,
                      greedy=True, mask_grid=False, run_layer=decode_layer_runner(model, compile, backend))
    loop.tokens[:, : total - 1] = forced_tokens.to(loop.tokens.device)
    rows = [prefill(model, plan, cache)]
    for _ in range(total - 1):
        rows.append(loop.forward())
        loop.step_index.add_(1)
    return torch.stack(rows, dim=1)


def split_sequences(tokens: torch.Tensor, target_grid: Grid, preview_grid: Grid | None) -> torch.Tensor:
    """(B, N) generated tokens -> the large grid (B, gh, gw): skip the preview, drop EOS (spec §6.11)."""
    gh, gw = target_grid
    offset = preview_grid[0] * preview_grid[1] if preview_grid else 0
    return tokens[:, offset : offset + gh * gw].reshape(-1, gh, gw)


def upsample_prior(grid_ids: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) -> (B, 4*gh*gw): each AR token covers a 2x2 block of DiT patches (spec §6.12)."""
    return grid_ids.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1)


def generate_tokens(
    model: GlmImageAR,
    ar_inputs,
    *,
    seeds: Sequence[int],
    temperature: float = 0.9,
    top_p: float = 0.75,
    top_k: int | None = 50,
    greedy: bool = False,
    mask_grid: bool = True,
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], None] | None = None,
    compile: bool | None = None,
) -> PriorTokens:
    """Sample the prior tokens for a batch (several prompts, or one prompt with several seeds)."""
    tokens = generate_sequences(
        model, ar_inputs, seeds=seeds, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
        mask_grid=mask_grid, progress=progress, interrupt=interrupt, compile=compile,
    )
    target = tuple(int(x) for x in ar_inputs.target_grid)
    preview = getattr(ar_inputs, "preview_grid", None)
    grid_ids = split_sequences(tokens, target, None if preview is None else tuple(preview))
    codebook = model.config.codebook_size
    if bool((grid_ids >= codebook).any()):
        raise ValueError(
            f"the AR sampled ids outside the codebook [0, {codebook}) inside the image grid; "
            "generate with mask_grid=True to restrict sampling to codebook ids"
        )
    reference_grids = getattr(ar_inputs, "reference_grids", None) or []
    pixels_per_token = 2 * model.config.vision.patch_size
    return PriorTokens(
        grid_ids=grid_ids,
        prior_ids=upsample_prior(grid_ids),
        height=int(ar_inputs.height),
        width=int(ar_inputs.width),
        # a reference is halved before patching, so one AR token covers 2 x patch_size pixels (spec §6.10)
        reference_sizes=[(int(h) * pixels_per_token, int(w) * pixels_per_token) for h, w in reference_grids],
        seeds=[int(s) for s in seeds],
    )
