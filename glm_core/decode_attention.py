"""Attention for one decode token over the preallocated KV cache, in two Triton kernels of our own.

What it computes
    For each batch item b and query head h (kv head h // group, spec §1.2.3's GQA):
        q = rotary(q_raw[b, h], cos[b], sin[b])  (rotate-half over the first rotary_dim dims, fp32, then bf16)
        out[b, h] = softmax(q · K[b, h // group]^T / sqrt(head_dim), over the allowed keys) · V[b, h // group]
    over every slot of the static cache where key_allowed[b, slot] (the prompt without its padding and the tokens
    written so far, the current one included). The same as the compiled decode layer's rotary + SDPA before it: q
    rounded to bf16 once after the rotary, scores and softmax in fp32, the probabilities rounded to bf16 for P·V
    (as flash kernels do), out in bf16.

Why kernels of our own
    The compiled decode layer's attention was cuDNN's SDPA (6.6 µs per layer on the H200 at 1024², one thread block
    per kv head and query tile) plus its split reduction (1.9 µs) plus two inductor kernels that prepared its inputs
    (the rotary of q, the boolean mask as an additive float mask; ~1 µs each): 40 layers, ~0.45 ms of a 5.5 ms
    token (bench/ar_profile.py, 2026-11-30). Here:
    - `split_kernel`: one program per (batch item, kv head, slice of the cache); the kv head's `group` query heads
      are the rows of one tensor-core tile (16 for the real model), the rotary is applied to q as it loads, the
      boolean mask is read as it is, and a tile of slots none of which is allowed (future slots, left padding) is
      skipped without reading its keys or values: on average half of the generation's slots.
    - `combine_kernel`: the slices' partial softmax sums merged (flash-decoding), one program per query head.
    Each output is summed in a fixed order: the same inputs give the same bits, in a CUDA graph or not.
    Measured (bench/ar_profile.py, H200, 2026-11-30 13:14, 1024² t2i): 4.8 + 2.7 µs per layer against the 10.6 of
    the four kernels they replace; a whole generation's token 5.23 ms in bf16 (5.55 before) and 3.82 in FP8 (4.15).

Where it runs (`takes_decode_attention`)
    Only inside torch.compile'd code (the AR decode layer, glm_core/ar/decode.py), on CUDA devices of compute
    capability >= 8.0 (bf16 tensor cores), not ROCm, with triton importable. There it is traced as user-defined
    Triton kernels that inductor compiles and launches with the layer's own kernels (from C++ under its C++
    wrapper), which a CUDA graph captures under both of PyTorch's allocators (see glm_core/gemv.py for why
    Triton's Python launcher must not run inside a capture under cudaMallocAsync). Eager calls keep SDPA. On the
    CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1), for tests (`attend`).
"""

from __future__ import annotations

import math

import torch

from .gemv import constant_per_device

try:  # the kernels need triton; everything else in glm_core must import without it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 — a broken triton install (not only a missing one) must not break glm_core
    triton = None
    tl = None

BLOCK_SLOTS = 32  # cache slots per tile: the tensor-core tile's N, and the unit a fully masked tile skips
# Slots per program of the split kernel and splits per step of the combine kernel: constants, not derived from the
# cache length, which is a dynamic size of the compiled decode layer (one graph for every length; a constexpr taken
# from it would recompile the layer for each new prompt length or image size). 1024² t2i (~1400 slots): 44 splits
# per kv head, 88 programs at batch 1.
SPLIT_SLOTS = 32
COMBINE_BLOCK_SPLITS = 64


def decode_attention_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or triton is None or torch.version.hip is not None:
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


DECODE_ATTENTION_BY_DEVICE: dict[str, bool] = {}  # tests set an entry to route a CPU layer to the interpreted kernels
uses_decode_attention = constant_per_device(decode_attention_available, DECODE_ATTENTION_BY_DEVICE)


def takes_decode_attention(q: torch.Tensor) -> bool:
    """Whether a decode token's attention runs here: inside compiled code, bf16, on a device where it runs."""
    return torch.compiler.is_compiling() and q.dtype == torch.bfloat16 and uses_decode_attention(str(q.device))


def attend(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           key_allowed: torch.Tensor, *, split_slots: int = SPLIT_SLOTS, num_warps: int = 4) -> torch.Tensor:
    """q (B, heads, head_dim) bf16 before the rotary; cos, sin (B, rotary_dim) bf16; k_cache, v_cache
    (B, kv_heads, S, head_dim) bf16 holding this token's keys and values already; key_allowed (B, S) bool
    -> out (B, heads, head_dim) bf16. split_slots (a multiple of BLOCK_SLOTS) and num_warps: for benchmarks
    (bench/decode_attention.py)."""
    if split_slots % BLOCK_SLOTS:
        raise ValueError(f"split_slots must be a multiple of {BLOCK_SLOTS}, got {split_slots}")
    batch, heads, head_dim = q.shape
    _, kv_heads, slots, _ = k_cache.shape
    group = heads // kv_heads
    rotary_dim = cos.shape[-1]
    block_rows = max(16, triton.next_power_of_2(group))  # tensor-core tiles have at least 16 rows
    block_dim = max(16, triton.next_power_of_2(head_dim))
    splits = triton.cdiv(slots, split_slots)
    partial_out = torch.empty(batch * kv_heads, splits, block_rows, block_dim, device=q.device, dtype=torch.float32)
    partial_max = torch.empty(batch * kv_heads, splits, block_rows, device=q.device, dtype=torch.float32)
    partial_sum = torch.empty(batch * kv_heads, splits, block_rows, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, heads, head_dim, device=q.device, dtype=torch.bfloat16)
    interpreted = q.device.type == "cpu"  # TRITON_INTERPRET=1 (tests)
    split_kernel[(batch * kv_heads, splits)](
        q, cos, sin, k_cache, v_cache, key_allowed, partial_out, partial_max, partial_sum,
        q.stride(0), q.stride(1), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), key_allowed.stride(0),
        slots, (1.0 / math.sqrt(head_dim)) * 1.4426950408889634,  # log2(e): the kernel uses exp2
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, SPLIT_SLOTS=split_slots,
        BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim, BLOCK_SLOTS=BLOCK_SLOTS,
        DOT_IN_FP32=interpreted, num_warps=1 if interpreted else num_warps)
    combine_kernel[(batch * heads,)](
        partial_out, partial_max, partial_sum, out, out.stride(0), out.stride(1), splits,
        HEADS=heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SPLITS=COMBINE_BLOCK_SPLITS, BLOCK_ROWS=block_rows,
        BLOCK_DIM=block_dim, num_warps=1 if interpreted else num_warps)
    return out


if triton is not None:

    @triton.jit
    def split_kernel(q_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, allowed_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
                     stride_qb, stride_qh, stride_cos, stride_sin, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_ab, slots, qk_scale_log2,
                     KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
                     SPLIT_SLOTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
                     BLOCK_SLOTS: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        item_head = tl.program_id(0)  # b * KV_HEADS + kv head
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        b = item_head // KV_HEADS
        kv_head = item_head % KV_HEADS
        rows = tl.arange(0, BLOCK_ROWS)  # the kv head's query heads
        dims = tl.arange(0, BLOCK_DIM)
        row_ok = rows < GROUP
        dim_ok = dims < HEAD_DIM
        q_rows = q_ptr + b * stride_qb + (kv_head * GROUP + rows)[:, None] * stride_qh
        q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        if ROTARY_DIM > 0:
            # rotate-half over the first ROTARY_DIM dims: d < half takes -q[d + half], half <= d < ROTARY_DIM q[d - half]
            half: tl.constexpr = ROTARY_DIM // 2
            rotated = dims < ROTARY_DIM
            partner = tl.where(dims < half, dims + half, dims - half)
            sign = tl.where(dims < half, -1.0, 1.0)
            q_partner = tl.load(q_rows + partner[None, :], mask=row_ok[:, None] & rotated[None, :], other=0.0)
            cos = tl.load(cos_ptr + b * stride_cos + dims, mask=rotated, other=1.0).to(tl.float32)
            sin = tl.load(sin_ptr + b * stride_sin + dims, mask=rotated, other=0.0).to(tl.float32)
            q = tl.where(rotated[None, :], q * cos[None, :] + sign[None, :] * q_partner.to(tl.float32) * sin[None, :], q)
        q = q.to(tl.bfloat16)
        if DOT_IN_FP32:  # Triton's interpreter (3.6) multiplies bf16 bit patterns as integers in tl.dot
            q = q.to(tl.float32)

        running_max = tl.full((BLOCK_ROWS,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_ROWS, BLOCK_DIM), dtype=tl.float32)
        slot_offsets = tl.arange(0, BLOCK_SLOTS)
        k_head = k_ptr + b * stride_kb + kv_head * stride_kh
        v_head = v_ptr + b * stride_vb + kv_head * stride_vh
        first_slot = split * SPLIT_SLOTS
        for tile_start in range(0, SPLIT_SLOTS, BLOCK_SLOTS):
            slot = first_slot + tile_start + slot_offsets
            allowed = tl.load(allowed_ptr + b * stride_ab + slot, mask=slot < slots, other=0) != 0
            if tl.max(allowed.to(tl.int32), axis=0) > 0:  # a tile without an allowed key is not read at all
                kv_mask = allowed[:, None] & dim_ok[None, :]
                k = tl.load(k_head + slot[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
                if DOT_IN_FP32:
                    k = k.to(tl.float32)
                # (rows, slots), log2 units; fp32 also where inductor passes the scale as an fp64 constant
                scores = (tl.dot(q, tl.trans(k)) * qk_scale_log2).to(tl.float32)
                scores = tl.where(allowed[None, :], scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # finite: some key is allowed
                correction = tl.exp2(running_max - new_max)  # 0 while running_max is still -inf
                probs = tl.exp2(scores - new_max[:, None])
                running_sum = running_sum * correction + tl.sum(probs, axis=1)
                v = tl.load(v_head + slot[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
                probs = probs.to(tl.bfloat16)
                if DOT_IN_FP32:
                    v, probs = v.to(tl.float32), probs.to(tl.float32)
                acc = acc * correction[:, None] + tl.dot(probs, v)
                running_max = new_max
        part = item_head * splits + split
        tl.store(part_out_ptr + (part * BLOCK_ROWS + rows)[:, None] * BLOCK_DIM + dims[None, :], acc)
        tl.store(part_max_ptr + part * BLOCK_ROWS + rows, running_max)
        tl.store(part_sum_ptr + part * BLOCK_ROWS + rows, running_sum)

    @triton.jit
    def combine_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, stride_ob, stride_oh, splits,
                       HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr):
        query = tl.program_id(0)  # b * HEADS + head
        b = query // HEADS
        head = query % HEADS
        item_head = b * (HEADS // GROUP) + head // GROUP
        row = head % GROUP
        offsets = tl.arange(0, BLOCK_SPLITS)
        dims = tl.arange(0, BLOCK_DIM)
        first_part = item_head * splits
        # the largest partial maximum over all splits, then the splits' sums rescaled to it, in a fixed order
        # (while loops: Triton's interpreter cannot range over a runtime argument)
        maxima = tl.full((BLOCK_SPLITS,), float("-inf"), dtype=tl.float32)
        first = tl.full([], 0, tl.int32)  # a loop-carried scalar, not a constant
        while first < splits:
            split = first + offsets
            parts = (first_part + split) * BLOCK_ROWS + row
            maxima = tl.maximum(maxima, tl.load(part_max_ptr + parts, mask=split < splits, other=float("-inf")))
            first += BLOCK_SPLITS
        overall = tl.max(maxima, axis=0)  # finite: the current token's slot is always allowed
        sums = tl.zeros((BLOCK_SPLITS,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_SPLITS, BLOCK_DIM), dtype=tl.float32)
        first = tl.full([], 0, tl.int32)  # a loop-carried scalar, not a constant
        while first < splits:
            split = first + offsets
            split_ok = split < splits
            parts = (first_part + split) * BLOCK_ROWS + row
            weights = tl.exp2(tl.load(part_max_ptr + parts, mask=split_ok, other=float("-inf")) - overall)
            sums += weights * tl.load(part_sum_ptr + parts, mask=split_ok, other=0.0)  # weight 0: no allowed key
            outs = tl.load(part_out_ptr + parts[:, None] * BLOCK_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
            acc += outs * weights[:, None]
            first += BLOCK_SPLITS
        total = tl.sum(acc, axis=0) / tl.sum(sums, axis=0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, total.to(tl.bfloat16), mask=dims < HEAD_DIM)
