"""FP8 linear layers at GLM-Image's real shapes: bf16 F.linear against glm_core.fp8's two paths.

    python -m bench.fp8_kernels --out DIR          # one GPU, < 120 s on an H200
    python -m bench.fp8_kernels --tiny --out DIR   # small shapes on the CPU (bf16 and dequant only), seconds

Variants of one linear layer y = x W^T (+ b), W random bf16 (std 0.02), quantised with glm_core.fp8:
- bf16: F.linear on the bf16 weight (the yardstick);
- fp8: `scaled_mm_linear` (x quantised per row, `torch._scaled_mm` with row-wise scales), the path Fp8Linear
  takes on sm_89+; fp8_fast_accum: the same with use_fast_accum=True; fp8_unpadded (decode): without padding
  M to 16 rows, measured only if this torch accepts it (the probe phase says);
- dequant: `dequant_linear` (e4m3 weight cast inside the matmul, per-channel scale on the output), the path
  of GPUs without FP8 matrix units;
- DiT only: fp8_gemm_only = `torch._scaled_mm` on an input quantised outside the timed region (what the
  activation quantisation costs is fp8 minus this), fp8_compiled = `scaled_mm_linear` under torch.compile
  (quantisation fused into one kernel, as inside the compiled DiT block).

Phases: ceilings (bf16 8192³ matmul, device-to-device copy), probe, ar.gemv (M = 1 and 4: q/k/v fused,
o, gate_up, down), gemv.sweep (glm_core/gemv.py's kernel at those shapes, M = 1, per block shape, on the e4m3
and on the bf16 weights; with --tiny and TRITON_INTERPRET=1 in Triton's CPU interpreter), ar.layer (those four
chained as one decode layer's worth, inside a CUDA graph, eager ops and torch.compile'd), dit.gemm (M = 4096+64
and 16384+64 tokens), dit.compiled. Each result is written to fp8_kernels.json / .md as soon as it is measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # `python bench/fp8_kernels.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness  # noqa: E402
from bench.harness import Deadline, PhaseRunner, Report, fmt, graph_seconds, log, measure  # noqa: E402
from glm_core import fp8  # noqa: E402
from glm_core.gemv import GemvLinear  # noqa: E402

BF16 = torch.bfloat16
STEM = "fp8_kernels"

# Share of the time budget each phase may use at most.
PHASE_SHARE = {"ceilings": 0.06, "probe": 0.03, "ar.gemv": 0.15, "gemv.sweep": 0.5, "ar.layer": 0.6, "dit.gemm": 0.22,
               "dit.compiled": 0.18}


@dataclass(frozen=True)
class Shapes:
    """Linear shapes (in, out, bias) and token counts of the AR decoder and the DiT blocks (spec §1)."""

    ar_hidden: int = 4096
    ar_qkv: int = 4608  # 32 query heads + 2 x 2 key/value heads, head dim 128, fused
    ar_intermediate: int = 13696
    ar_rows: tuple = (1, 4)  # decode: batch 1 and batch 4
    dit_dim: int = 4096
    dit_ff: int = 16384
    dit_rows: tuple = (4096 + 64, 16384 + 64)  # 1024² and 2048² image tokens + 64 glyph tokens

    def ar_linears(self) -> list[tuple[str, int, int, bool]]:
        h = self.ar_hidden
        return [("qkv", h, self.ar_qkv, True), ("o", h, h, False),
                ("gate_up", h, 2 * self.ar_intermediate, False), ("down", self.ar_intermediate, h, False)]

    def dit_linears(self) -> list[tuple[str, int, int, bool]]:
        d = self.dit_dim
        return [("attn_out", d, d, True), ("qkv", d, 3 * d, True), ("ff_up", d, self.dit_ff, True),
                ("ff_down", self.dit_ff, d, True)]


TINY_SHAPES = Shapes(ar_hidden=64, ar_qkv=96, ar_intermediate=128, ar_rows=(1, 4), dit_dim=64, dit_ff=256,
                     dit_rows=(32 + 8, 64 + 8))

NOTES = [
    "Random bf16 weights (std 0.02) and standard-normal inputs, drawn fresh before every timed run (never zeros); "
    "fp8 weights are those bf16 weights quantised by glm_core.fp8 (e4m3, one fp32 scale per output channel).",
    "Decode GEMVs and the decode layer run inside a CUDA graph over several weight copies whose fp8 bytes together "
    "exceed 4x the L2 cache (weights come from HBM, as in a real decode step); time per call = replay time / calls.",
    "GB/s counts the weight bytes one call must read (bf16: 2 bytes per weight; fp8: 1 byte + 4-byte scale per "
    "output channel); the ceiling is the measured device-to-device copy rate (bytes read + written).",
    "DiT GEMMs run eagerly (each call is long enough); TFLOP/s = 2 M K N / time, against the measured bf16 "
    "8192³ matmul rate. fp8 includes the activation quantisation (a few kernels eagerly, one when compiled).",
    "Errors: relative Frobenius error of the output against an fp32 matmul of the same weights (the dequantised "
    "fp8 weights for fp8 variants, the bf16 weights for bf16) and against bf16 F.linear on the original weights.",
]


# --------------------------------------------------------------------------------------------
# Context


class Bench:
    def __init__(self, args, device: torch.device, report: Report, deadline: Deadline):
        self.args, self.device, self.report, self.deadline = args, device, report, deadline
        self.shapes = TINY_SHAPES if args.tiny else Shapes()
        self.reps = args.reps
        self.on_cuda = device.type == "cuda"
        if args.force_scaled_mm:  # tests: the CPU runs torch._scaled_mm's reference kernel
            fp8._PATH_BY_DEVICE[str(device)] = True  # Fp8Linear.forward's per-device memo of the path
        self.fp8_matmul = args.force_scaled_mm or fp8.fp8_matmul_supported(device)
        self.unpadded_ok = False  # set by the probe
        # 50 MB (an H100's L2) where this torch does not report it
        properties = torch.cuda.get_device_properties(device) if self.on_cuda else None
        self.l2_bytes = getattr(properties, "L2_cache_size", 50 << 20) if self.on_cuda else 0
        torch.manual_seed(args.seed)

    def weight_copies(self, fp8_bytes: int) -> int:
        """How many weight sets to rotate so that the fp8 ones alone are >= 4x the L2 cache."""
        return max(1, math.ceil(4 * self.l2_bytes / fp8_bytes)) if self.on_cuda else 1

    def gemv_variants(self) -> list[str]:
        names = ["bf16"]
        if self.fp8_matmul:
            names += ["fp8", "fp8_fast_accum"] + (["fp8_unpadded"] if self.unpadded_ok else [])
        return names + ["dequant"]


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


@dataclass
class Weights:
    """One linear layer's weights in both forms."""

    bf16: torch.Tensor  # (out, in)
    fp8: torch.Tensor  # (out, in) e4m3
    scale: torch.Tensor  # (out,) fp32
    bias: torch.Tensor | None  # (out,) bf16

    @staticmethod
    def random(in_features: int, out_features: int, bias: bool, device) -> Weights:
        weight = torch.randn(out_features, in_features, device=device, dtype=BF16) * 0.02
        quantised, scale = fp8.quantize_weight(weight)
        b = torch.randn(out_features, device=device, dtype=BF16) * 0.02 if bias else None
        return Weights(weight, quantised, scale, b)

    def bytes(self, variant: str) -> int:
        n, k = self.bf16.shape
        return 2 * n * k if variant == "bf16" else n * k + 4 * n

    def reference_fp32(self, x: torch.Tensor, variant: str) -> torch.Tensor:
        weight = self.bf16.float() if variant == "bf16" else fp8.dequantize_weight(self.fp8, self.scale)
        return F.linear(x.float(), weight, None if self.bias is None else self.bias.float())


def linear_fn(variant: str) -> Callable[[torch.Tensor, Weights], torch.Tensor]:
    """y = variant(x, weights) for the variants measured on single GEMMs."""
    if variant == "bf16":
        return lambda x, w: F.linear(x, w.bf16, w.bias)
    if variant == "fp8":
        return lambda x, w: fp8.scaled_mm_linear(x, w.fp8, w.scale, w.bias)
    if variant == "fp8_fast_accum":
        return lambda x, w: fp8.scaled_mm_linear(x, w.fp8, w.scale, w.bias, use_fast_accum=True)
    if variant == "fp8_unpadded":
        return lambda x, w: fp8.scaled_mm_linear(x, w.fp8, w.scale, w.bias, pad_rows=False)
    if variant == "dequant":
        return lambda x, w: fp8.dequant_linear(x, w.fp8, w.scale, w.bias)
    raise ValueError(f"unknown variant {variant!r}")


def fresh_(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.normal_()


# --------------------------------------------------------------------------------------------
# Phases


def phase_ceilings(b: Bench, clock: Deadline) -> None:
    n, nbytes = (8192, 4 << 30) if b.on_cuda and not b.args.tiny else (256, 16 << 20)
    tflops = harness.matmul_tflops(b.device, n=n, reps=20 if n == 8192 else 3)
    gbps = harness.copy_gbps(b.device, nbytes=nbytes, reps=20 if n == 8192 else 3)
    b.report.set("ceilings", {"matmul_tflops": _rate(tflops), "copy_gbps": _rate(gbps), "matmul_n": n,
                              "copy_bytes": nbytes})
    log(f"  ceilings: bf16 matmul {n}³ {tflops:.1f} TFLOP/s, copy {gbps:.1f} GB/s (read + write)", clock)


def phase_probe(b: Bench, clock: Deadline) -> None:
    """What this GPU and torch support: the path Fp8Linear takes, and whether M needs padding."""
    probe = {"fp8_matmul_supported": fp8.fp8_matmul_supported(b.device), "fp8_variants_run": b.fp8_matmul,
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "capability": list(torch.cuda.get_device_capability(b.device)) if b.on_cuda else None,
             "l2_cache_mb": b.l2_bytes / 1e6}
    if b.fp8_matmul:
        k = b.shapes.ar_hidden
        w = Weights.random(k, b.shapes.ar_qkv, True, b.device)
        for rows in (1, 3, 4, 17):
            x = torch.randn(rows, k, device=b.device, dtype=BF16)
            padded = fp8.scaled_mm_linear(x, w.fp8, w.scale, w.bias)
            try:
                unpadded = fp8.scaled_mm_linear(x, w.fp8, w.scale, w.bias, pad_rows=False)
                harness.synchronize(b.device)
                probe[f"unpadded_m{rows}"] = {"ok": True, "relative_difference_to_padded":
                                              relative_error(unpadded, padded)}
            except Exception as exc:  # noqa: BLE001 — the answer we are after
                probe[f"unpadded_m{rows}"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        b.unpadded_ok = all(probe[f"unpadded_m{r}"]["ok"]
                            and probe[f"unpadded_m{r}"]["relative_difference_to_padded"] < 1e-2 for r in (1, 3, 4, 17))
    b.report.set("probe", probe)
    log(f"  probe: {probe}", clock)


def _record(b: Bench, group: str, what: str, rows: int, variant: str, entry: dict) -> None:
    """One measurement, stored under results.<group>["<what> m=<rows> <variant>"] (no dots: Report.set splits them)."""
    entry = {"what": what, "rows": rows, "variant": variant, **entry}
    b.report.set(f"results.{group}", {**(b.report.get(f"results.{group}") or {}), f"{what} m={rows} {variant}": entry})
    time_text = f"{entry['us']} us" if "us" in entry else f"{entry['ms']} ms"
    rate_text = f"{fmt(entry['gbps'])} GB/s" if "gbps" in entry else f"{fmt(entry['tflops'])} TFLOP/s"
    errors = ", ".join(f"{k} {fmt(v)}" for k, v in entry.items() if k.startswith("err") and v is not None)
    log(f"  {group} {what} m={rows} {variant}: {time_text}, {rate_text}; {errors}", b.deadline)


def _rate(value: float) -> float:
    return float(f"{value:.4g}")


def phase_ar_gemv(b: Bench, clock: Deadline) -> None:
    """Each decode linear alone at M = 1 and 4, inside a CUDA graph over rotated weight copies."""
    copy_gbps = (b.report.get("ceilings") or {}).get("copy_gbps")
    for name, k, n, bias in b.shapes.ar_linears():
        probe = Weights.random(k, n, bias, b.device)
        copies = b.weight_copies(probe.bytes("fp8"))
        weights = [probe] + [Weights.random(k, n, bias, b.device) for _ in range(copies - 1)]
        for rows in b.shapes.ar_rows:
            inputs = [torch.randn(rows, k, device=b.device, dtype=BF16) for _ in weights]
            for variant in b.gemv_variants():
                clock.check(f"{name} M={rows} {variant}")
                fn = linear_fn(variant)
                outputs: list = [None] * len(weights)

                def step(fn=fn, outputs=outputs, inputs=inputs, weights=weights):
                    for i, (x, w) in enumerate(zip(inputs, weights)):
                        outputs[i] = fn(x, w)

                seconds = graph_seconds(step, device=b.device, reps=b.reps, clock=clock,
                                        refill=lambda inputs=inputs: fresh_(inputs)) / len(weights)
                # outputs[0] is what the last (graph) run computed from the inputs now in place
                x, out = inputs[0], outputs[0]
                gbps = probe.bytes(variant) / seconds / 1e9
                entry = {"us": round(seconds * 1e6, 2), "gbps": _rate(gbps), "weight_copies": copies,
                         "fraction_of_copy_bw": round(gbps / copy_gbps, 3) if copy_gbps else None,
                         "err_vs_fp32": relative_error(out, weights[0].reference_fp32(x, variant)),
                         "err_vs_bf16": (None if variant == "bf16"
                                         else relative_error(out, linear_fn("bf16")(x, weights[0]))),
                         "graph_vs_direct_call": relative_error(out, fn(x, weights[0]))}
                _record(b, "ar_gemv", name, rows, variant, entry)
        del weights, probe
        harness.free_memory()


def gemv_sweep_configs(tiny: bool) -> list[dict]:
    """Block shapes of glm_core/gemv.py's kernel to time one by one (at most 64 accumulators per thread)."""
    if tiny:
        return [{"BLOCK_N": n, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1} for n in (2, 4)]
    return [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": st}
            for n in (2, 4, 8, 16) for k in (512, 1024, 2048) for w in (4, 8) for st in (1, 2, 3)
            if n * k <= 64 * 32 * w]


def phase_gemv_sweep(b: Bench, clock: Deadline) -> None:
    """The GEMV kernel at each AR linear shape (M = 1) for every block shape of `gemv_sweep_configs` and the autotuned
    op, inside a CUDA graph over rotated weight copies, on the e4m3 and / or the bf16 weights (`--gemv-weights`);
    the bf16 F.linear (cuBLAS) beside them."""
    from glm_core import gemv

    interpreted = b.args.tiny and gemv.triton_importable() and os.environ.get("TRITON_INTERPRET") == "1"
    if not (interpreted or (b.on_cuda and gemv.gemv_available(b.device))):
        b.report.note("gemv.sweep: the GEMV kernel does not run here (gemv_available is False)")
        return
    copy_gbps = (b.report.get("ceilings") or {}).get("copy_gbps")
    for name, k, n, bias in b.shapes.ar_linears():
        probe = Weights.random(k, n, bias, b.device)
        copies = b.weight_copies(probe.bytes("fp8"))
        weights = [probe] + [Weights.random(k, n, bias, b.device) for _ in range(copies - 1)]
        inputs = [torch.randn(k, device=b.device, dtype=BF16) for _ in weights]
        outputs = [torch.empty(n, device=b.device, dtype=BF16) for _ in weights]

        def time_of(step) -> float:
            return graph_seconds(step, device=b.device, reps=b.reps, clock=clock,
                                refill=lambda: fresh_(inputs)) / len(weights)

        def sweep(variant: str, configs: list) -> list[dict]:
            """The kernel on the e4m3 weights and their scales ("fp8") or on the bf16 weights ("bf16": against
            cuBLAS's GEMV for the bf16 AR); config None = the autotuned op."""
            timings = []
            for config in configs:
                clock.check(f"gemv sweep {name} {variant} {config}")

                def step(config=config):
                    for x, w, y in zip(inputs, weights, outputs):
                        if variant == "fp8":
                            gemv.launch(x, w.fp8, w.scale, w.bias, y, config)
                        else:
                            gemv.launch(x, w.bf16, None, w.bias, y, config)

                try:
                    seconds = time_of(step)
                except Exception as exc:  # noqa: BLE001 — a config that does not compile is a result, not an end
                    timings.append({"config": config, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                error = relative_error(outputs[0], weights[0].reference_fp32(inputs[0][None], variant)[0])
                timings.append({"config": config or "autotuned", "us": round(seconds * 1e6, 2), "err_vs_fp32": error,
                                "fraction_of_copy_bw": round(probe.bytes(variant) / seconds / 1e9 / copy_gbps, 3)
                                if copy_gbps else None})
            return timings

        configs = [None] + gemv_sweep_configs(b.args.tiny)
        timings = sweep("fp8", configs) if "fp8" in b.args.gemv_weights else []
        bf16_us = time_of(lambda: [F.linear(x, w.bf16, w.bias) for x, w in zip(inputs, weights)]) * 1e6
        bf16_timings = sweep("bf16", configs) if "bf16" in b.args.gemv_weights else []
        ranked = sorted((t for t in timings if "us" in t), key=lambda t: t["us"])
        ranked_bf16 = sorted((t for t in bf16_timings if "us" in t), key=lambda t: t["us"])
        b.report.set(f"results.gemv_sweep.{name}", {"n": n, "k": k, "bf16_linear_us": round(bf16_us, 2),
                                                    "best": ranked[:6], "all": timings,
                                                    "bf16_weights_best": ranked_bf16[:3],
                                                    "bf16_weights_all": bf16_timings})
        best = ranked[0] if ranked else {}
        best_bf16 = ranked_bf16[0] if ranked_bf16 else {}
        log(f"  gemv sweep {name} {n}x{k}: best {best.get('us')} us {best.get('config')} "
            f"({best.get('fraction_of_copy_bw')} of copy bw); bf16 F.linear {bf16_us:.1f} us; "
            f"autotuned {next((t.get('us') for t in timings if t['config'] == 'autotuned'), None)} us; "
            f"bf16 weights through the kernel {best_bf16.get('us')} us {best_bf16.get('config')}", clock)
    harness.free_memory()


class _DequantLinear(fp8.Fp8Linear):
    """Fp8Linear forced onto the weight-only path (what a GPU without FP8 matrix units runs)."""

    def forward(self, x):
        return fp8.dequant_linear(x, self.weight, self.weight_scale, self.bias)


class _ScaledMmLinear(fp8.Fp8Linear):
    """Fp8Linear forced onto `torch._scaled_mm` also for one row under torch.compile (its path before the
    one-row reduction)."""

    def forward(self, x):
        return fp8.scaled_mm_linear(x, self.weight, self.weight_scale, self.bias)


class _OneRowBf16Linear(nn.Linear):
    """bf16 nn.Linear written as a one-row reduction under torch.compile (is inductor's GEMV better than cuBLAS's?)."""

    def forward(self, x):
        if torch.compiler.is_compiling() and x.shape[0] == 1:
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        return super().forward(x)


class DecodeLayer(nn.Module):
    """The four linears of one AR decoder layer, chained as in a decode step (attention itself left out:
    the first hidden-size columns of q/k/v stand in for its output)."""

    def __init__(self, s: Shapes, variant: str, device):
        super().__init__()
        self.hidden = s.ar_hidden
        made = {name: Weights.random(k, n, bias, device) for name, k, n, bias in s.ar_linears()}
        for name, w in made.items():
            setattr(self, name, self._linear(w, variant))

    @staticmethod
    def _linear(w: Weights, variant: str) -> nn.Module:
        out_features, in_features = w.bf16.shape
        if variant.startswith("bf16"):
            kind = {"bf16_one_row": _OneRowBf16Linear, "bf16_gemv": GemvLinear}.get(variant, nn.Linear)
            layer = kind(in_features, out_features, bias=w.bias is not None, device="meta")
            layer.weight = nn.Parameter(w.bf16, requires_grad=False)
            if w.bias is not None:
                layer.bias = nn.Parameter(w.bias, requires_grad=False)
            return layer
        kind = {"dequant": _DequantLinear, "fp8_scaled_mm": _ScaledMmLinear}.get(variant, fp8.Fp8Linear)
        layer = kind(in_features, out_features, bias=w.bias is not None, device="meta", dtype=BF16,
                     use_fast_accum=variant == "fp8_fast_accum")
        layer.load_state_dict({"weight": w.fp8, "weight_scale": w.scale,
                               **({"bias": w.bias} if w.bias is not None else {})}, assign=True)
        return layer

    def forward(self, x):  # x (M, hidden)
        qkv = self.qkv(x)  # (M, 4608)
        h = x + self.o(qkv[:, : self.hidden])
        gate, up = self.gate_up(h).chunk(2, dim=-1)  # (M, 13696) each
        return h + self.down(F.silu(gate) * up)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


def phase_ar_layer(b: Bench, clock: Deadline) -> None:
    """One decode layer's worth (q/k/v, o, gate_up, down) in a CUDA graph: on the GPU the compiled one-row
    variants first (the decode step's question), then eager ops, then compiled at more rows."""
    copy_gbps = (b.report.get("ceilings") or {}).get("copy_gbps")
    copies = b.weight_copies(sum(n * k + 4 * n for _, k, n, _ in b.shapes.ar_linears()))
    fp8_variants = ["fp8", "fp8_fast_accum"] if b.fp8_matmul else []
    jobs = [("graph_eager" if b.on_cuda else "eager", variant, rows) for rows in b.shapes.ar_rows
            for variant in ["bf16"] + fp8_variants + ["dequant"]]
    if b.on_cuda:
        # Compiled, one row first (a decode step): Fp8Linear (the GEMV where it runs, else its one-row reduction) with
        # and without inductor's coordinate-descent tuning (`graph_compiled_tuned`, what the FP8 decode layer
        # compiles with), against `_scaled_mm`, bf16 through cuBLAS, bf16 through the GEMV (GemvLinear) and bf16 as
        # inductor's reduction. Fast accumulation is the same compiled code around the GEMM: measured eagerly only.
        one_row = [("graph_compiled_tuned", "fp8"), ("graph_compiled", "fp8"), ("graph_compiled", "bf16"),
                   ("graph_compiled", "bf16_gemv"),
                   ("graph_compiled_tuned", "bf16"), ("graph_compiled_tuned", "bf16_one_row")]
        if b.fp8_matmul:
            one_row.append(("graph_compiled", "fp8_scaled_mm"))
        one_row.append(("graph_compiled_tuned", "dequant"))
        jobs = [(mode, variant, 1) for mode, variant in one_row] + jobs
        jobs += [("graph_compiled", variant, rows) for rows in b.shapes.ar_rows if rows != 1
                 for variant in fp8_variants[:1] + ["bf16"]]
    for mode, variant, rows in jobs:
        clock.check(f"layer {variant} {mode} M={rows}")
        layers = [DecodeLayer(b.shapes, variant, b.device) for _ in range(copies)]
        torch._dynamo.reset()
        options = {"coordinate_descent_tuning": True} if mode == "graph_compiled_tuned" else None
        run_layer = (torch.compile(DecodeLayer.forward, fullgraph=True, dynamic=False, options=options)
                     if mode.startswith("graph_compiled") else DecodeLayer.forward)
        inputs = [torch.randn(rows, b.shapes.ar_hidden, device=b.device, dtype=BF16) for _ in layers]
        outputs: list = [None] * len(layers)

        def step(inputs=inputs, outputs=outputs, run_layer=run_layer, layers=layers):
            for i, (layer, x) in enumerate(zip(layers, inputs)):
                outputs[i] = run_layer(layer, x)

        seconds = graph_seconds(step, device=b.device, reps=b.reps, clock=clock,
                                refill=lambda inputs=inputs: fresh_(inputs)) / len(layers)
        gbps = layers[0].weight_bytes() / seconds / 1e9
        entry = {"us": round(seconds * 1e6, 2), "gbps": _rate(gbps), "layer_copies": copies,
                 "fraction_of_copy_bw": round(gbps / copy_gbps, 3) if copy_gbps else None,
                 "err_vs_eager": relative_error(outputs[0], DecodeLayer.forward(layers[0], inputs[0]))}
        _record(b, "ar_layer", f"decode layer, {mode}", rows, variant, entry)
        del layers, run_layer, inputs, outputs, step
        harness.free_memory()
    torch._dynamo.reset()


def _dit_variants(b: Bench) -> list[str]:
    return ["bf16"] + (["fp8", "fp8_fast_accum", "fp8_gemm_only"] if b.fp8_matmul else []) + ["dequant"]


def phase_dit_gemm(b: Bench, clock: Deadline, compiled: bool = False) -> None:
    """DiT block GEMMs at 1024² and 2048² token counts, eager (or, with `compiled`, fp8 under torch.compile)."""
    matmul_tflops = (b.report.get("ceilings") or {}).get("matmul_tflops")
    weights = {name: Weights.random(k, n, bias, b.device) for name, k, n, bias in b.shapes.dit_linears()}
    for rows in b.shapes.dit_rows:  # all of 1024² first: the budget may stop a phase part-way
        for name, w in weights.items():
            n, k = w.bf16.shape
            x0 = torch.randn(rows, k, device=b.device, dtype=BF16)
            bf16_out = F.linear(x0, w.bf16, w.bias)
            variants = ["fp8_compiled"] if compiled else _dit_variants(b)
            for variant in variants:
                clock.check(f"dit {name} M={rows} {variant}")
                if variant == "fp8_gemm_only":
                    def setup(rows=rows, k=k):
                        return fp8.quantize_rows(torch.randn(rows, k, device=b.device, dtype=BF16))

                    def run(q, w=w):
                        return torch._scaled_mm(q[0], w.fp8.t(), scale_a=q[1], scale_b=w.scale.view(1, -1),
                                                bias=w.bias, out_dtype=BF16)

                    out = run(fp8.quantize_rows(x0))
                else:
                    if variant == "fp8_compiled":
                        torch._dynamo.reset()
                        compiled_fn = torch.compile(fp8.scaled_mm_linear, fullgraph=True, dynamic=False)
                        fn = lambda x, w, f=compiled_fn: f(x, w.fp8, w.scale, w.bias)
                    else:
                        fn = linear_fn(variant)

                    def setup(rows=rows, k=k):
                        return torch.randn(rows, k, device=b.device, dtype=BF16)

                    def run(x, fn=fn, w=w):
                        return fn(x, w)

                    out = run(x0)
                seconds = measure(run, device=b.device, setup=setup, warmup=2, reps=b.reps, deadline=clock).median
                tflops = 2 * rows * k * n / seconds / 1e12
                entry = {"ms": _rate(seconds * 1e3), "tflops": _rate(tflops),
                         "fraction_of_bf16_matmul": round(tflops / matmul_tflops, 3) if matmul_tflops else None,
                         "err_vs_fp32": relative_error(out, w.reference_fp32(x0, "bf16" if variant == "bf16"
                                                                              else "fp8")),
                         "err_vs_bf16": None if variant == "bf16" else relative_error(out, bf16_out)}
                _record(b, "dit_gemm", name, rows, variant, entry)
                del out
            del x0, bf16_out
            harness.free_memory()
    del weights
    if compiled:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Report


def table_rows(data: dict) -> list[list[str]]:
    results = data.get("results") or {}
    rows = []
    for group in ("ar_gemv", "ar_layer", "dit_gemm"):
        for e in (results.get(group) or {}).values():
            time_text = f"{fmt(e['us'])} us" if "us" in e else f"{fmt(e['ms'])} ms"
            rate = f"{fmt(e['gbps'])} GB/s" if "gbps" in e else f"{fmt(e['tflops'])} TFLOP/s"
            fraction = e.get("fraction_of_copy_bw", e.get("fraction_of_bf16_matmul"))
            err = e.get("err_vs_fp32", e.get("err_vs_eager"))
            rows.append([group, e["what"], str(e["rows"]), e["variant"], time_text, rate,
                         f"{fraction:.0%}" if fraction else "–", fmt(err), fmt(e.get("err_vs_bf16"))])
    for name, e in (results.get("gemv_sweep") or {}).items():
        autotuned = next((t for t in e["all"] if t["config"] == "autotuned" and "us" in t), None)
        for label, t in (("best block shape", (e["best"] or [None])[0]), ("autotuned op", autotuned),
                         ("bf16 weights, best block shape", (e.get("bf16_weights_best") or [None])[0])):
            if t is None:
                continue
            c = t["config"]
            shape = ("" if isinstance(c, str)
                     else f" N{c['BLOCK_N']} K{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}")
            fraction = t.get("fraction_of_copy_bw")
            rows.append(["gemv_sweep", f"{name} {e['n']}x{e['k']} (bf16 {fmt(e['bf16_linear_us'])} us)", "1",
                         label + shape, f"{fmt(t['us'])} us", "–", f"{fraction:.0%}" if fraction else "–",
                         fmt(t.get("err_vs_fp32")), "–"])
    return rows


TABLE_HEADER = ["group", "linear", "M", "variant", "time", "rate", "of ceiling", "err vs fp32 (layer: vs eager)",
                "err vs bf16"]


def table_text(data: dict) -> str:
    rows = [TABLE_HEADER] + table_rows(data)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def render_markdown(data: dict) -> str:
    versions = data.get("versions") or {}
    ceilings = data.get("ceilings") or {}
    lines = [f"# GLM-Image FP8 linear kernels ({data.get('mode', '')})", "",
             f"- GPU: {data.get('gpu')}", f"- date: {data.get('date')}", f"- command: `{data.get('command')}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- ceilings: bf16 matmul {ceilings.get('matmul_n')}³ {fmt(ceilings.get('matmul_tflops'))} TFLOP/s, "
             f"device-to-device copy "
             f"{fmt(ceilings.get('copy_gbps'))} GB/s (read + write)",
             f"- probe: {data.get('probe')}", "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(data)]
    lines.append("")
    lines += harness.markdown_tail(data)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (bf16 and dequant paths), seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="folder for fp8_kernels.json / .md")
    p.add_argument("--budget-s", type=float, default=100.0, help="wall-clock budget for all phases (the GPU run "
                                                                 "is meant to end inside 120 s)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 20; --tiny 3)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--only", default="", help="comma-separated phases: probe, ar.gemv, gemv.sweep, ar.layer, dit.gemm, "
                                              "dit.compiled (the ceilings always run)")
    p.add_argument("--gemv-weights", default="fp8,bf16",
                   help="gemv.sweep: the weight formats to sweep the kernel on (fp8, bf16 or both; each is about half "
                        "of the phase's time: both did not fit 70 s on an H200 on 2026-11-30)")
    p.add_argument("--force-scaled-mm", action="store_true",
                   help="testing: run the fp8 variants even where fp8_matmul_supported is False (torch 2.13's CPU "
                        "build runs torch._scaled_mm), to exercise this script's fp8 code without a GPU")
    args = p.parse_args(argv)
    args.gemv_weights = [w.strip() for w in args.gemv_weights.split(",") if w.strip()]
    if not args.gemv_weights or set(args.gemv_weights) - {"fp8", "bf16"}:
        p.error("--gemv-weights takes fp8, bf16 or fp8,bf16")
    harness.resolve_reps(p, args, tiny=3)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    deadline, device = harness.start_run(args)
    meta = {"gpu": harness.device_name(device),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "-m", "bench.fp8_kernels"] + argv),
            "mode": "tiny, CPU" if args.tiny else f"real shapes, {device.type}",
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}}
    report = Report(Path(args.out) if args.out else None, STEM, meta, render_markdown)
    b = Bench(args, device, report, deadline)
    report.set("shapes", asdict(b.shapes))
    for note in NOTES:
        report.note(note)
    if args.force_scaled_mm:
        report.note("--force-scaled-mm: the fp8 variants ran through torch._scaled_mm on a device without FP8 "
                    "matrix units; their times mean nothing.")
    if not b.fp8_matmul:
        report.note(f"{device}: no FP8 matrix path here (fp8_matmul_supported is False); only bf16 and dequant run.")
    selected = {p.strip() for p in args.only.split(",") if p.strip()} or None
    runner = PhaseRunner(report, deadline, device, None)

    def run_phase(name, fn):
        cap = PHASE_SHARE[name] * args.budget_s
        share = min(1.0, cap / max(deadline.remaining(), 1e-3))
        runner.run(name, lambda: fn(Deadline(cap)), share=share, min_s=min(5.0, cap / 3))

    run_phase("ceilings", lambda clock: phase_ceilings(b, clock))
    runner.selected = selected
    run_phase("probe", lambda clock: phase_probe(b, clock))
    run_phase("ar.gemv", lambda clock: phase_ar_gemv(b, clock))
    run_phase("gemv.sweep", lambda clock: phase_gemv_sweep(b, clock))
    run_phase("ar.layer", lambda clock: phase_ar_layer(b, clock))
    run_phase("dit.gemm", lambda clock: phase_dit_gemm(b, clock))
    if b.fp8_matmul:
        run_phase("dit.compiled", lambda clock: phase_dit_gemm(b, clock, compiled=True))
    print(f"\n{report.data['gpu']}, {report.data['date']}; ceilings: {report.data.get('ceilings')}", flush=True)
    print(table_text(report.data), flush=True)
    return harness.finish(report, STEM, deadline)


if __name__ == "__main__":
    main()
