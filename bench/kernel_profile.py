"""Kernel-by-kernel summaries of a window of work under torch's profiler (shared by bench.ar_profile and
bench.dit_profile).

A window starts and ends with a synchronisation, so it holds exactly the work launched inside it. Reported per
unit of work (a token, a guided step): every kernel's time and launches, the kernels grouped by what they do (the
caller's name fragments), the GPU's busy time (the union of the kernels' intervals) and the wall time: the gap
between busy and wall is the GPU waiting between kernels. On the CPU the "kernels" are the top-level aten ops.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

Groups = Sequence[tuple[str, str]]  # (lower-case name fragment, group); the first match wins


def profile_arguments(description: str, tiny_size: int) -> argparse.ArgumentParser:
    """--model, --tiny and --out, as both profiles take them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="GLM-Image checkpoint folder (default with --tiny: a tiny random one)")
    p.add_argument("--tiny", action="store_true", help=f"CPU, tiny checkpoint, {tiny_size}² (smoke test)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    return p


def start_profile(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, Path, str]:
    """No autograd; the device (the CPU with --tiny, else the current GPU), the output folder (made) and the
    checkpoint folder (--model, or with --tiny a tiny random one written there)."""
    torch.set_grad_enabled(False)
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = args.model
    if folder is None:
        if not args.tiny:
            p.error("--model is required on the GPU")
        from glm_core.demo_checkpoint import write_demo_checkpoint

        folder = write_demo_checkpoint(out / "tiny-checkpoint")
    return device, out, str(folder)


def kernel_group(name: str, groups: Groups) -> str:
    lowered = name.lower()
    return next((group for fragment, group in groups if fragment in lowered), "other")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def device_events(prof, on_cuda: bool) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of each GPU kernel (on the CPU: each top-level aten op)."""
    out = []
    for event in prof.events():
        is_kernel = event.device_type == torch.autograd.DeviceType.CUDA
        if on_cuda and not is_kernel:
            continue
        if not on_cuda and (is_kernel or not event.name.startswith("aten::") or event.cpu_parent is not None):
            continue
        out.append((event.name, float(event.time_range.start), float(event.time_range.end)))
    return out


def summarise(events: list[tuple[str, float, float]], units: int, wall_s: float, groups: Groups,
              unit: str = "token", top: int = 40) -> dict:
    """Per-`unit` figures of a profiled window that held `units` units of work (keys end in `_per_{unit}`)."""
    per_name = defaultdict(lambda: [0, 0.0])
    per_group = defaultdict(float)
    for name, start, end in events:
        per_name[name][0] += 1
        per_name[name][1] += end - start
        per_group[kernel_group(name, groups)] += end - start
    kernel_us = sum(us for _, us in per_name.values())
    busy = busy_us([(start, end) for _, start, end in events])
    ranked = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    return {
        "steps": units,
        f"wall_us_per_{unit}_profiled": round(wall_s / units * 1e6, 1),
        f"kernel_us_per_{unit}": round(kernel_us / units, 1),
        f"busy_us_per_{unit}": round(busy / units, 1),
        f"launches_per_{unit}": round(sum(count for count, _ in per_name.values()) / units, 1),
        f"groups_us_per_{unit}": {group: round(us / units, 1) for group, us in sorted(per_group.items(),
                                                                                    key=lambda item: -item[1])},
        "kernels": [{"name": name[:160], "group": kernel_group(name, groups), f"us_per_{unit}": round(us / units, 2),
                     f"launches_per_{unit}": round(count / units, 2), "us_per_launch": round(us / count, 2)}
                    for name, (count, us) in ranked],
    }


def markdown_tables(profile: dict, unit: str = "token", top: int = 25) -> list[str]:
    """The groups and the `top` kernels of a `summarise` result as two markdown tables (lines)."""
    lines = [f"| group | µs per {unit} |", "|---|---|"]
    lines += [f"| {group} | {us} |" for group, us in profile[f"groups_us_per_{unit}"].items()]
    lines += ["", f"| kernel | group | µs/{unit} | launches/{unit} | µs/launch |", "|---|---|---|---|---|"]
    lines += [f"| `{k['name'][:90]}` | {k['group']} | {k[f'us_per_{unit}']} | {k[f'launches_per_{unit}']} | "
              f"{k['us_per_launch']} |" for k in profile["kernels"][:top]]
    return lines


class Window:
    """Torch's profiler between two synchronisations: `start()`, the work, `stop()`; then `events` and `wall_s`."""

    def __init__(self, on_cuda: bool):
        self.on_cuda = on_cuda
        self.prof = None
        self.wall_s = None
        self._started = None

    def _sync(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()
        self._started = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.wall_s = time.perf_counter() - self._started
        self.prof.stop()

    @property
    def started(self) -> bool:
        return self.prof is not None

    @property
    def stopped(self) -> bool:
        return self.wall_s is not None

    def events(self) -> list[tuple[str, float, float]]:
        return device_events(self.prof, self.on_cuda)
