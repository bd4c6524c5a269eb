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

import argparse
import datetime as _dt
import functools
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/decode_attention.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness  # noqa: E402
from bench.harness import Deadline, Report, graph_seconds, log  # noqa: E402
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
    versions = data.get("versions") or {}
    lines = [f"# Decode attention, one token, per layer ({data.get('mode', '')})", "",
             f"- GPU: {data.get('gpu')}", f"- date: {data.get('date')}", f"- command: `{data.get('command')}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    lines += ["", "| slots | batch | variant | µs per layer | rel. error vs fp32 SDPA |", "|---|---|---|---|---|"]
    for r in data.get("results", []):
        lines.append(f"| {r['slots']} | {r['batch']} | {r['variant']} | {r['us_per_layer']:.2f} | "
                     f"{r['relative_error']:.2e} |")
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001
        return None
    return triton.__version__


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (with TRITON_INTERPRET=1)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="folder for decode_attention.json / .md")
    p.add_argument("--budget-s", type=float, default=100.0)
    p.add_argument("--reps", type=int, default=None, help="timed replays per variant (default 20; --tiny 2)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    args = p.parse_args(argv)
    harness.resolve_reps(p, args, tiny=2)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    deadline, device = harness.start_run(args)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on the CPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    shapes = TINY_SHAPES if args.tiny else Shapes()
    meta = {"gpu": harness.device_name(device),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "-m", "bench.decode_attention"] + argv),
            "mode": "tiny, CPU interpreter" if args.tiny else f"real shapes, {device.type}",
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version(),
                         "python": platform.python_version()},
            "shapes": asdict(shapes), "results": []}
    report = Report(Path(args.out) if args.out else None, STEM, meta, render_markdown)
    torch.manual_seed(0)
    for slots, batch in shapes.cases:
        case = make_case(shapes, slots, batch, device)
        for name, attention in variants(shapes, device).items():
            if deadline.remaining() < 5:
                report.note(f"budget spent: {name} at {slots} slots, batch {batch} and later variants not run")
                break
            result = {"slots": slots, "batch": batch, "variant": name,
                      "us_per_layer": round(us_per_layer(attention, case, args.reps, deadline), 3),
                      "relative_error": relative_error(attention, case)}
            report.data["results"].append(result)
            report.write()
            log(f"  {slots} slots, batch {batch}, {name}: {result['us_per_layer']:.2f} µs per layer, "
                f"rel. error {result['relative_error']:.1e}", deadline)
        del case
        harness.free_memory()
    print(render_markdown(report.data), flush=True)
    return harness.finish(report, STEM, deadline)


if __name__ == "__main__":
    main()
