"""Consumer cards on the H200: memory, stage swaps and FP8 through glm_core's public API, on a checkpoint folder.

    python -m bench.memory --model FOLDER --out DIR [--phases bf16_cap24,fp8,accuracy,errors,soak] [--budget-s 540]
    python -m bench.memory --tiny --out DIR     # the same code on the CPU, tiny checkpoint, seconds (no caps there)

A smaller card is emulated with `torch.cuda.set_per_process_memory_fraction` (cap in decimal GB); every image run
under a cap also checks `torch.cuda.max_memory_reserved` against it, and the cap is written beside each figure.
Phases (each records what it finished, even when a later step fails or the budget runs out):
- bf16_cap24: weights bf16, placement auto, 24 GB cap: t2i 1024² twice (the second is the warm figure: swaps
  included), edit with two 1024² references, t2i 2048²; peak per stage and per image; swap seconds (stage moves
  timed on the device) per image; a stage brought back from its pinned host copy against re-read from the files.
- fp8: weights fp8 (quantised as they load), all on the GPU: AR ms/token over a whole 1024² generation, DiT s per
  guided step (the pipeline's denoise loop), end to end; then one stage at a time under 16 GB and 12 GB caps.
- accuracy: FP8 against bf16 on the same weights: AR teacher-forced top-1 agreement (overall and where the bf16
  top-two margin > 0.25), DiT guided-velocity relative error, image PSNR with the same tokens and noise.
- errors: GPU memory before/after an interrupted AR, an interrupted DiT, a refused (bad) request and an
  out-of-memory run; the next call after them gives the same image as before.
- soak: N generations alternating text-to-image and edits at mixed sizes with an interrupt and an error thrown
  in; allocated / reserved / host RSS after each.
Results: memory.json (rewritten after every figure) and memory.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from glm_core import pipeline  # noqa: E402
from glm_core.memory import NotEnoughGpuMemory  # noqa: E402
from glm_core.residency import StageWeights  # noqa: E402
from glm_core.vae import GlmImageVAE  # noqa: E402

GB = 1e9
PROMPT = 'A red fox on a snowy hill at dawn, a wooden sign that says "GLM"'
EDIT_PROMPT = "Put both subjects in one room, warm light"


class Interrupted(Exception):
    """What a host's stop button raises (ComfyUI: InterruptProcessingException)."""


class Run:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv,
                              "torch": torch.__version__, "device": self.device_name()},
                     "results": {}, "errors": [], "notes": []}

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", flush=True)

    def record(self, phase: str, key: str, value) -> None:
        self.data["results"].setdefault(phase, {})[key] = value
        self.log(f"{phase}.{key} = {value}")
        self.write()

    def write(self) -> None:
        text = json.dumps(self.data, indent=2, default=str)
        (self.out / "memory.json.partial").write_text(text)
        os.replace(self.out / "memory.json.partial", self.out / "memory.json")


# -- device helpers --------------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reserved(device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def host_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def set_cap(run: Run, cap_gb: float | None) -> None:
    """Emulate a card of `cap_gb` (decimal GB) on this GPU; None lifts the cap."""
    if run.device.type != "cuda":
        return
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(run.device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gb is None else cap_gb * GB / total, run.device)


_OPEN_PEAK_WINDOWS: list[dict] = []  # running maxima of the windows now open, outermost first


def _fold_peaks(device) -> None:
    """Fold torch's peak since its last reset into every open window (before a reset, and at a window's end)."""
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    for window in _OPEN_PEAK_WINDOWS:
        window["allocated"] = max(window["allocated"], allocated)
        window["reserved"] = max(window["reserved"], reserved)


@contextmanager
def peak_window(run: Run, sink: dict, key: str):
    """Peak allocated / reserved (GB) of the block into sink[key]. Windows nest: an inner window's reset of torch's
    peak counters does not hide the inner peak from the outer window."""
    if run.device.type != "cuda":
        yield
        return
    sync(run.device)
    _fold_peaks(run.device)
    torch.cuda.reset_peak_memory_stats(run.device)
    window = {"allocated": 0, "reserved": 0}
    _OPEN_PEAK_WINDOWS.append(window)
    try:
        yield
    finally:
        sync(run.device)
        _fold_peaks(run.device)
        del _OPEN_PEAK_WINDOWS[next(i for i, w in enumerate(_OPEN_PEAK_WINDOWS) if w is window)]  # not ==
    sink[key] = {"allocated_gb": round(window["allocated"] / GB, 3), "reserved_gb": round(window["reserved"] / GB, 3)}


class SwapClock:
    """Device time spent moving stages (StageWeights.to_host / to_device), measured around each move, and apart
    from it the host copies made right after a load (StageWeights.keep_host_copy outside a move)."""

    def __init__(self, device):
        self.device, self.seconds, self.host_copy_seconds, self.moves = device, 0.0, 0.0, []
        self._patched = []
        self._depth = 0

    def __enter__(self):
        for name in ("to_host", "to_device", "keep_host_copy"):
            original = getattr(StageWeights, name)

            def timed(weights, *args, _original=original, _name=name, **kwargs):
                if self._depth:  # a host copy made inside a move is part of that move
                    return _original(weights, *args, **kwargs)
                sync(self.device)
                start = time.perf_counter()
                self._depth += 1
                try:
                    result = _original(weights, *args, **kwargs)
                finally:
                    self._depth -= 1
                sync(self.device)
                took = time.perf_counter() - start
                if _name == "keep_host_copy":
                    self.host_copy_seconds += took
                else:
                    self.seconds += took
                self.moves.append((_name, round(weights.nbytes / GB, 2), round(took, 3)))
                return result

            setattr(StageWeights, name, timed)
            self._patched.append((name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(StageWeights, name, original)


def timed(run: Run, fn):
    sync(run.device)
    start = time.perf_counter()
    value = fn()
    sync(run.device)
    return value, time.perf_counter() - start


def reference_pictures(sides, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pictures = []
    for height, width in sides:
        base = torch.rand(height // 16 + 1, width // 16 + 1, 3, generator=g)
        small = Image.fromarray((base * 255).to(torch.uint8).numpy())
        pictures.append(small.resize((width, height), Image.BILINEAR))
    return pictures


@contextmanager
def vae_peak_apart(run: Run, sink: dict):
    """Inside a decode: the peak up to the VAE's call into sink["dit"], the VAE's own into sink["vae"]."""
    original = GlmImageVAE.decode_latents

    def decode_latents(vae, *args, **kwargs):
        if _OPEN_PEAK_WINDOWS:  # the decode's window, so far: everything before the VAE
            sync(run.device)
            _fold_peaks(run.device)
            sink["dit"] = {"allocated_gb": round(_OPEN_PEAK_WINDOWS[-1]["allocated"] / GB, 3),
                           "reserved_gb": round(_OPEN_PEAK_WINDOWS[-1]["reserved"] / GB, 3)}
        with peak_window(run, sink, "vae"):
            return original(vae, *args, **kwargs)

    GlmImageVAE.decode_latents = decode_latents
    try:
        yield
    finally:
        GlmImageVAE.decode_latents = original


def image(run: Run, model, size, refs=(), steps=None, seed=0, ar_seed=0, prompt=PROMPT, **kwargs):
    """One whole image through the public API; returns (images, seconds, split). split["peaks"]: the peak
    allocated / reserved GB of each part (ar: the token generation, dit: the decode up to the VAE, vae)."""
    height, width = size
    steps = steps or run.args.steps
    split, peaks = {}, {}
    start = time.perf_counter()
    cond = pipeline.encode_prompt(model, prompt if not refs else EDIT_PROMPT, width, height, list(refs))
    with peak_window(run, peaks, "ar"):
        tokens, split["ar_s"] = timed(run, lambda: pipeline.generate_tokens(model, cond, seed=ar_seed, **kwargs))
    with peak_window(run, {}, "decode"), vae_peak_apart(run, peaks):
        images, split["decode_s"] = timed(run, lambda: pipeline.decode(model, cond, tokens, steps=steps, seed=seed))
    sync(run.device)
    if peaks:
        split["peaks"] = peaks
    return images, time.perf_counter() - start, split


def sizes(run: Run, real):
    return (512, 512) if run.args.tiny else real


# -- phases ----------------------------------------------------------------------------------------------------


def phase_bf16_cap24(run: Run) -> None:
    cap = None if run.args.tiny else 24.0
    set_cap(run, cap)
    phase = "bf16_cap24"
    run.record(phase, "cap_gb", cap)
    model = pipeline.GlmImage.from_folder(run.args.model, weights="bf16", placement="auto")
    peaks = {}
    for index in (1, 2):
        with SwapClock(run.device) as swaps, peak_window(run, peaks, f"t2i_1024_image{index}"):
            _, seconds, split = image(run, model, sizes(run, (1024, 1024)), steps=run.args.steps)
        run.record(phase, f"t2i_1024_image{index}", {"s": round(seconds, 2), **split, "swap_s": round(swaps.seconds, 2),
                                                     "host_copy_at_load_s": round(swaps.host_copy_seconds, 2),
                                                     "moves": swaps.moves, "peak": peaks.get(f"t2i_1024_image{index}")})
    run.record(phase, "e2e_s_t2i_1024_cap24", run.data["results"][phase]["t2i_1024_image2"]["s"])
    run.record(phase, "swap_s_per_image", run.data["results"][phase]["t2i_1024_image2"]["swap_s"])
    if run.device.type == "cuda":
        run.record(phase, "peak_gb_sequential_bf16_1024", peaks["t2i_1024_image2"]["reserved_gb"])
    with peak_window(run, peaks, "edit2"):
        _, seconds, split = image(run, model, sizes(run, (1024, 1024)), refs=reference_pictures([(1024, 1024)] * 2),
                                  steps=min(run.args.steps, 10))
    run.record(phase, "edit_2refs_1024", {"s": round(seconds, 2), **split, "peak": peaks.get("edit2")})
    with peak_window(run, peaks, "t2i_2048"):
        _, seconds, split = image(run, model, sizes(run, (2048, 2048)), steps=min(run.args.steps, 10))
    run.record(phase, "t2i_2048", {"s": round(seconds, 2), **split, "peak": peaks.get("t2i_2048")})
    if run.device.type == "cuda":
        run.record(phase, "peak_gb_sequential_bf16_2048", peaks["t2i_2048"]["reserved_gb"])
        within = all(p["reserved_gb"] <= cap for p in peaks.values())
        run.record(phase, "all_within_cap", within)
    # Bringing the AR back: from its pinned host copy, against dropping it and re-reading the files.
    model.release("dit"), model.release("vae"), model.release("glyph")
    model.prepare(["ar"])
    model.release("ar")
    _, pinned = timed(run, lambda: model.prepare(["ar"]))
    model.unload("ar")
    _, reread = timed(run, lambda: model.prepare(["ar"]))
    run.record(phase, "ar_back_to_gpu_s", {"from_pinned_host_copy": round(pinned, 2), "reread_from_files": round(reread, 2),
                                           "host_copy_page_locked": bool(model._weights["ar"].pinned) if "ar" in model._weights else None,
                                           "gb": round(model.stage_nbytes("ar") / GB, 2)})
    del model
    set_cap(run, None)


def phase_fp8(run: Run) -> None:
    phase = "fp8"
    set_cap(run, None)
    model = pipeline.GlmImage.from_folder(run.args.model, weights="fp8", placement="gpu")
    run.record(phase, "stage_gb", {s: round(model.stage_nbytes(s) / GB, 2) for s in ("ar", "dit", "vae", "glyph")})
    image(run, model, sizes(run, (1024, 1024)), steps=2)  # load, quantise, compile
    _, seconds, split = image(run, model, sizes(run, (1024, 1024)))
    cond = pipeline.encode_prompt(model, PROMPT, *sizes(run, (1024, 1024)))
    tokens, ar_s = timed(run, lambda: pipeline.generate_tokens(model, cond, seed=1))
    run.record(phase, "fp8_e2e_s_t2i_1024", round(seconds, 2))
    from glm_core.processor import get_target_shape

    grid_h, grid_w, preview_h, preview_w = get_target_shape(cond.height, cond.width)
    run.record(phase, "fp8_ar_ms_per_token", round(ar_s / (grid_h * grid_w + preview_h * preview_w + 1) * 1e3, 3))
    from glm_core.gemv import tuned_block_shapes

    run.record(phase, "gemv_block_shapes", tuned_block_shapes())  # the GEMV's autotuned picks behind that figure
    run.record(phase, "fp8_dit_s_per_step_1024", round(dit_seconds_per_step(run, model, cond, tokens), 4))
    for cap in ((16.0, 12.0) if run.device.type == "cuda" else ()):
        model.placement = "sequential"
        for stage in ("ar", "dit", "vae", "glyph", "vision"):
            model.release(stage)
        set_cap(run, cap)
        peaks = {}
        try:
            with peak_window(run, peaks, "image"):
                _, seconds, split = image(run, model, (1024, 1024))
            ok = peaks["image"]["reserved_gb"] <= cap
            run.record(phase, f"cap{int(cap)}", {"ok": ok, "s": round(seconds, 2), **split, "peak": peaks["image"]})
        except NotEnoughGpuMemory as error:
            ok = False
            run.record(phase, f"cap{int(cap)}", {"ok": False, "error": str(error)})
        if cap == 16.0 and ok:
            run.record(phase, "peak_gb_sequential_fp8_1024", peaks["image"]["reserved_gb"])
        if cap == 12.0:
            run.record(phase, "fp8_cap12_ok", ok)
        set_cap(run, None)
    del model


def dit_seconds_per_step(run: Run, model, cond, tokens, steps: int = 10) -> float:
    """The pipeline's own loop (glm_core.dit.sampling.denoise) for `steps` steps, divided."""
    from glm_core.dit.sampling import DiTConditioning, denoise, initial_noise
    from glm_core.schedule import image_seq_len, timesteps_and_sigmas

    model.prepare(["glyph", "dit", "vae"])
    dit, glyph = model.stage("dit"), model.stage("glyph")
    dit_cond = DiTConditioning(glyph.encode([cond.prompt], dtype=model.dtype), tokens.prior_ids[:1].to(model.device),
                               (cond.height, cond.width), glyph.encode_negative(1, dtype=model.dtype))
    scale, patch = model.stage("vae").config.scale_factor, dit.config.patch_size
    latents = initial_noise(1, dit.config.in_channels, cond.height // scale, cond.width // scale, 0, model.device,
                            model.dtype)
    timesteps, sigmas = timesteps_and_sigmas(50, image_seq_len(cond.height, cond.width, scale, patch),
                                             model.scheduler_config)
    denoise(dit, latents, dit_cond, timesteps[:2], sigmas[:3], 1.5)  # warm
    _, seconds = timed(run, lambda: denoise(dit, latents, dit_cond, timesteps[:steps], sigmas[: steps + 1], 1.5))
    return seconds / steps


def phase_accuracy(run: Run) -> None:
    """FP8 against bf16 on the same weights (random weights: see docs/PARITY.md for what that means)."""
    from glm_core.dit.sampling import DiTConditioning, predict_velocity
    from tests.forcing import cached_forced_logits

    phase = "accuracy"
    set_cap(run, None)
    bf16 = pipeline.GlmImage.from_folder(run.args.model, weights="bf16", placement="gpu", compile=False)
    fp8 = pipeline.GlmImage.from_folder(run.args.model, weights="fp8", placement="gpu", compile=False)
    size = sizes(run, (1024, 1024))
    cond = pipeline.encode_prompt(bf16, PROMPT, size[1], size[0])
    tokens = pipeline.generate_tokens(bf16, cond, seed=3)
    # AR: teacher-forced logits over the first N generated tokens of a real prompt.
    inputs = bf16.processor.build_inputs([cond.prompt], cond.height, cond.width)
    n = run.args.forced_tokens
    from glm_core.ar.decode import generate_sequences
    forced = generate_sequences(bf16.stage("ar"), inputs, seeds=[5], sampling_settings=bf16.sampling_defaults)
    forced = forced[:, : n - 1]
    logits = {}
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        logits[name] = cached_forced_logits(model.stage("ar"), inputs, forced)[0, :n].float()
    top2 = logits["bf16"].topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = logits["bf16"].argmax(-1) == logits["fp8"].argmax(-1)
    confident = margin > 0.25
    rel = ((logits["fp8"] - logits["bf16"]).norm() / logits["bf16"].norm()).item()
    run.record(phase, "ar_logits", {"rows": n, "rel_err": round(rel, 5), "top1_agreement": round(agree.float().mean().item(), 4),
                                    "top1_agreement_margin_gt_0.25": round(agree[confident].float().mean().item(), 4)
                                    if confident.any() else None, "rows_margin_gt_0.25": int(confident.sum())})
    # DiT: one guided velocity at t = 966 on the same inputs.
    velocities = {}
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        model.prepare(["glyph", "dit", "vae"])
        glyph = model.stage("glyph")
        dit_cond = DiTConditioning(glyph.encode([cond.prompt], dtype=model.dtype), tokens.prior_ids.to(model.device),
                                   (cond.height, cond.width), glyph.encode_negative(1, dtype=model.dtype))
        scale = model.stage("vae").config.scale_factor
        noise = torch.randn(1, model.stage("dit").config.in_channels, cond.height // scale, cond.width // scale,
                            generator=torch.Generator().manual_seed(9))
        velocities[name] = predict_velocity(model.stage("dit"), noise.to(model.device, model.dtype), dit_cond,
                                            torch.tensor([965.0], device=model.device), 1.5).float().cpu()
    rel = ((velocities["fp8"] - velocities["bf16"]).norm() / velocities["bf16"].norm()).item()
    run.record(phase, "dit_velocity_rel_err", round(rel, 5))
    # Whole decode with the same tokens and noise.
    images = {name: pipeline.decode(model, cond, tokens, seed=4, steps=run.args.steps) for name, model in
              (("bf16", bf16), ("fp8", fp8))}
    mse = ((images["fp8"].double() - images["bf16"].double()) ** 2).mean().item()
    run.record(phase, "image_psnr_db", round(10 * math.log10(1 / mse), 2) if mse else float("inf"))


def phase_errors(run: Run) -> None:
    """Memory after an interrupt, a refused request and an OOM comes back; the next call gives the same image."""
    phase = "errors"
    set_cap(run, None)
    model = pipeline.GlmImage.from_folder(run.args.model, placement="auto")
    size = sizes(run, (1024, 1024))
    cond = pipeline.encode_prompt(model, PROMPT, size[1], size[0])
    tokens = pipeline.generate_tokens(model, cond, seed=7)
    reference = pipeline.decode(model, cond, tokens, seed=8, steps=4)
    results = {}

    def check(name, action):
        gc.collect()
        before = allocated(run.device)
        try:
            action()
            outcome = "no error"
        except (Interrupted, ValueError, NotEnoughGpuMemory) as error:
            outcome = f"{type(error).__name__}: {str(error)[:160]}"
        gc.collect()
        after = allocated(run.device)
        results[name] = {"outcome": outcome, "allocated_before_gb": round(before / GB, 3),
                         "allocated_after_gb": round(after / GB, 3), "returned_within_100mb": abs(after - before) <= 1e8}
        run.record(phase, name, results[name])

    def interrupt_after(count):
        calls = []

        def interrupt():
            calls.append(1)
            if len(calls) >= count:
                raise Interrupted("stop")
        return interrupt

    check("interrupt_ar", lambda: pipeline.generate_tokens(model, cond, seed=7, interrupt=interrupt_after(20)))
    check("interrupt_dit", lambda: pipeline.decode(model, cond, tokens, seed=8, steps=4, interrupt=interrupt_after(3)))
    bad = pipeline.PriorTokens(tokens.grid_ids.clone().fill_(10 ** 6), tokens.height, tokens.width)
    check("refused_request", lambda: pipeline.decode(model, cond, bad, seed=8, steps=4))
    if run.device.type == "cuda":
        # An out-of-memory run: the DiT stage on the GPU, nothing allowed to leave, a cap just above what is held.
        model.placement = "gpu"
        model.prepare(["glyph", "dit", "vae"])
        held = allocated(run.device)
        set_cap(run, held / GB + 1.0)
        big = pipeline.encode_prompt(model, PROMPT, 2048, 2048)
        big_tokens = pipeline.PriorTokens(torch.zeros(1, 64, 64, dtype=torch.long), 2048, 2048)
        check("out_of_memory", lambda: pipeline.decode(model, big, big_tokens, seed=8, steps=2))
        set_cap(run, None)
        model.placement = "auto"
    again = pipeline.decode(model, cond, tokens, seed=8, steps=4)
    run.record(phase, "next_call_same_image", bool(torch.equal(again, reference)))


def phase_soak(run: Run) -> None:
    phase = "soak"
    set_cap(run, None)
    model = pipeline.GlmImage.from_folder(run.args.model, placement="auto")
    plan = [(512, 512), (768, 768), (512, 768), (1024, 1024)] if not run.args.tiny else [(512, 512)]
    refs = reference_pictures([(512, 512)], seed=2)
    curve = []
    for index in range(run.args.soak):
        if run.left() < 30:
            run.data["notes"].append(f"soak stopped by the budget after {index} generations")
            break
        size = plan[index % len(plan)]
        kind = "edit" if index % 2 else "t2i"
        outcome = "ok"
        try:
            if index == run.args.soak // 3:
                kind = "interrupted"
                calls = []

                def stop():
                    calls.append(1)
                    if len(calls) > 5:
                        raise Interrupted("stop")
                cond = pipeline.encode_prompt(model, PROMPT, size[1], size[0])
                pipeline.generate_tokens(model, cond, seed=index, interrupt=stop)
            elif index == 2 * run.args.soak // 3:
                kind = "error"
                cond = pipeline.encode_prompt(model, PROMPT, size[1], size[0])
                pipeline.decode(model, cond, pipeline.PriorTokens(torch.zeros(1, 1, 1, dtype=torch.long), 64, 64))
            else:
                image(run, model, size, refs=refs if kind == "edit" else (), steps=run.args.soak_steps, seed=index,
                      ar_seed=index)
        except (Interrupted, ValueError) as error:
            outcome = type(error).__name__
        gc.collect()
        peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else 0
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        curve.append({"i": index, "kind": kind, "size": f"{size[1]}x{size[0]}", "outcome": outcome,
                      "allocated_gb": round(allocated(run.device) / GB, 3), "reserved_gb": round(reserved(run.device) / GB, 3),
                      "peak_gb": round(peak / GB, 3), "host_rss_gb": round(host_rss() / GB, 3)})
        run.data["results"].setdefault(phase, {})["curve"] = curve
        run.write()
    done = [c for c in curve if c["outcome"] == "ok"]
    if len(done) >= 8:
        first, last = done[: len(done) // 4], done[-(len(done) // 4):]
        for key in ("allocated_gb", "peak_gb", "host_rss_gb"):
            growth = max(c[key] for c in last) - max(c[key] for c in first)
            run.record(phase, f"{key}_growth", round(growth, 3))
    run.record(phase, "generations", len(curve))


PHASES = {"bf16_cap24": phase_bf16_cap24, "fp8": phase_fp8, "accuracy": phase_accuracy, "errors": phase_errors,
          "soak": phase_soak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GLM-Image folder (bench/fullsize_checkpoint.py writes one)")
    parser.add_argument("--out", type=Path, default=Path("out/memory"))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--steps", type=int, default=50, help="DiT steps of the timed images")
    parser.add_argument("--soak", type=int, default=50, help="generations in the soak")
    parser.add_argument("--soak-steps", type=int, default=4)
    parser.add_argument("--forced-tokens", type=int, default=513, help="AR rows compared in the accuracy phase")
    parser.add_argument("--tiny", action="store_true", help="CPU, the tiny demo checkpoint, 2 steps")
    args = parser.parse_args(argv)
    if args.tiny:
        from glm_core.demo_checkpoint import write_demo_checkpoint

        args.model = args.model or write_demo_checkpoint()
        args.steps, args.soak, args.soak_steps, args.forced_tokens = 2, min(args.soak, 6), 1, 32
    if args.model is None:
        parser.error("--model FOLDER is required (or --tiny)")
    run = Run(args)
    for name in args.phases.split(","):
        if run.left() < 20:
            run.data["notes"].append(f"phase {name} skipped: the time budget is used up")
            continue
        run.log(f"phase {name}")
        try:
            PHASES[name](run)
        except Exception as error:  # noqa: BLE001 - one phase's failure is recorded, the next one runs
            run.data["errors"].append({"phase": name, "error": f"{type(error).__name__}: {error}",
                                       "traceback": traceback.format_exc()[-4000:]})
            run.log(f"phase {name} failed: {type(error).__name__}: {error}")
        finally:
            set_cap(run, None)
            gc.collect()
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        run.write()
    print(json.dumps(run.data["results"], indent=1, default=str)[-6000:])
    print("errors:", [e["phase"] + ": " + e["error"][:300] for e in run.data["errors"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
