"""One AR decode token's attention at the real model's shapes: glm_core/decode_attention.py's kernels per split size
and warps, against the compiled rotary + SDPA that the decode layer ran before them.

    python -m bench.decode_attention --out DIR                          # one GPU, about a minute on an H200
    TRITON_INTERPRET=1 python -m bench.decode_attention --tiny --out DIR  # CPU, Triton's interpreter (smoke test)

Each case (cache slots, batch) holds one KV cache per decoder layer (40 x (B, 2 kv heads, S, 128) bf16: at 1024²
more than the L2 cache, as in a decode step), the prompt's slots and half of the rest allowed, the rest future
slots. On a GPU one CUDA graph runs the attention of all layers; µs per layer = one replay / layers, the median of
--reps replays. Every variant's output (layer 0) is checked against SDPA in fp32 on the same rotated q: the
relative max error is in the table, so a fast variant that computes something else shows.

Variants: `sdpa_compiled` (torch.compile'd rotary + SDPA with enable_gqa and the boolean mask: what the compiled
decode layer ran before the kernels; cuDNN's kernel on the H200), and `ours sS wW` (`attend` with split_slots S and
num_warps W, launched eagerly inside the graph).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/decode_attention.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness  # noqa: E402
from bench.harness import Deadline, graph_seconds  # noqa: E402
from glm_core.ar.model import apply_rotary  # noqa: E402
from glm_core.decode_attention import attend  # noqa: E402

STEM = "decode_attention"


@dataclass(frozen=True)
class Shapes:
    """The AR decoder's attention (spec §1.2.3) and the cache lengths of its generations."""

    heads: int = 32
    kv_heads: int = 2
    head_dim: int = 128
    rotary_dim: int = 64
    layers: int = 40
    prompt_slots: int = 120
    # (cache slots, batch): 1024² t2i (prompt + 1281 tokens) at batch 1 and 2, and 2048² t2i
    cases: tuple = ((1408, 1), (1408, 2), (5504, 1))
    split_slots: tuple = (32, 64, 128)
    warps: tuple = (4, 8)


TINY_SHAPES = Shapes(heads=4, kv_heads=2, head_dim=32, rotary_dim=16, layers=2, prompt_slots=10,
                     cases=((70, 1), (70, 2)), split_slots=(32, 64), warps=(4,))


@dataclass
class Case:
    slots: int
    batch: int
    q: torch.Tensor  # (B, heads, head_dim) before the rotary
    cos: torch.Tensor  # (B, rotary_dim)
    sin: torch.Tensor
    caches: list  # per layer (k, v), each (B, kv_heads, S, head_dim)
    allowed: torch.Tensor  # (B, S) bool


def make_case(shapes: Shapes, slots: int, batch: int, device: torch.device) -> Case:
    bf16 = torch.bfloat16
    q = torch.randn(batch, shapes.heads, shapes.head_dim, device=device).to(bf16)
    angles = torch.rand(batch, shapes.rotary_dim // 2, device=device) * 6.0
    angles = torch.cat((angles, angles), dim=-1)
    caches = [tuple(torch.randn(batch, shapes.kv_heads, slots, shapes.head_dim, device=device).to(bf16)
                    for _ in range(2)) for _ in range(shapes.layers)]
    allowed = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    allowed[:, : shapes.prompt_slots + (slots - shapes.prompt_slots) // 2] = True  # half of the generation done
    return Case(slots, batch, q, angles.cos().to(bf16), angles.sin().to(bf16), caches, allowed)


def sdpa_attention(q, cos, sin, k, v, allowed):
    """The compiled decode layer's attention before the kernels: rotary on q, then SDPA over all query heads."""
    rotated = apply_rotary(q[:, :, None], cos[:, None, None], sin[:, None, None])  # (B, heads, 1, d)
    return F.scaled_dot_product_attention(rotated, k, v, attn_mask=allowed[:, None, None], enable_gqa=True)[:, :, 0]


def relative_error(attention, case: Case) -> float:
    k, v = case.caches[0]
    out = attention(case.q, case.cos, case.sin, k, v, case.allowed).float()
    ref = sdpa_attention(case.q.float(), case.cos.float(), case.sin.float(), k.float(), v.float(), case.allowed)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def us_per_layer(attention, case: Case, reps: int, clock: Deadline) -> float:
    def all_layers():
        for k, v in case.caches:
            attention(case.q, case.cos, case.sin, k, v, case.allowed)

    return graph_seconds(all_layers, device=case.q.device, reps=reps, clock=clock) / len(case.caches) * 1e6


def variants(shapes: Shapes, device: torch.device) -> dict:
    compiled = torch.compile(sdpa_attention, dynamic=False) if device.type == "cuda" else sdpa_attention
    out = {"sdpa_compiled" if device.type == "cuda" else "sdpa_eager": compiled}
    for split_slots in shapes.split_slots:
        for warps in shapes.warps:
            out[f"ours s{split_slots} w{warps}"] = functools.partial(attend, split_slots=split_slots, num_warps=warps)
    return out


def render_markdown(data: dict) -> str:
    return harness.kernel_bench_markdown(data, "Decode attention, one token, per layer", [
        ("slots", "slots", ""), ("batch", "batch", ""), ("variant", "variant", ""),
        ("us_per_layer", "µs per layer", ".2f"), ("relative_error", "rel. error vs fp32 SDPA", ".2e")])


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, deadline, device, report = harness.start_kernel_bench(argv, "bench.decode_attention", __doc__, 100.0,
                                                                render_markdown)
    shapes = TINY_SHAPES if args.tiny else Shapes()
    report.data["shapes"] = asdict(shapes)
    torch.manual_seed(0)
    for slots, batch in shapes.cases:
        case = make_case(shapes, slots, batch, device)
        harness.time_kernel_variants(report, deadline, {"slots": slots, "batch": batch}, variants(shapes, device),
                                     lambda step: us_per_layer(step, case, args.reps, deadline),
                                     lambda step: relative_error(step, case))
        case = None  # its 40 layers of tensors go before the next case is made
        harness.free_memory()
    print(render_markdown(report.data), flush=True)
    return harness.finish(report, STEM, deadline)


if __name__ == "__main__":
    main()
