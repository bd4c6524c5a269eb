"""Does normal use compile again? torch's recompile counter over one scripted run (issue 9).

After one warm-up text to image and one warm-up edit, the script makes text-to-image images at the documented
sizes, edits with 1 to 4 references and batches of 1 to 4 (a few DiT steps each: the step count changes no shape).
`CompileCounter` counts, over that run, dynamo's recompilations (its "recompiles" log, with the failed guard that
caused each) and every frame dynamo compiled (a first compile of a path the warm-up missed counts too).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from bench import workloads
from bench.harness import Deadline, log

RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"  # torch's artifact logger behind TORCH_LOGS=recompiles


class CompileCounter(logging.Handler):
    """Context manager: recompilations and compiled frames while it is open (`recompiles`, `compiled_frames`,
    `reasons`: the first line of each recompile's first failed guard)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.compiled_frames = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def recompiles(self) -> int:
        return len(self.messages)

    @property
    def reasons(self) -> list[str]:
        """Per recompile: the function, then the guard each of its cached graphs failed ("graph/entry: guard")."""
        out = []
        for message in self.messages:
            lines = [line.strip() for line in message.splitlines()]
            guards = [" ".join(line[2:].split("#")[0].split()) for line in lines
                      if line.startswith("- ") and line[2:3].isdigit()]
            out.append(f"{lines[0]}: " + " | ".join(guards))
        return out

    def __enter__(self) -> "CompileCounter":
        from torch._dynamo.utils import counters

        torch._logging.set_logs(recompiles=True)
        self._logger = logging.getLogger(RECOMPILES_LOGGER)
        self._logger.addHandler(self)
        self._frames_before = counters["frames"]["ok"]
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.utils import counters

        self.compiled_frames = counters["frames"]["ok"] - self._frames_before
        self._logger.removeHandler(self)
        torch._logging.set_logs()


@dataclass(frozen=True)
class ScriptedRun:
    kind: str  # "t2i" or "edit"
    size: tuple[int, int]  # (width, height)
    references: tuple[tuple[int, int], ...] = ()
    batch: int = 1

    @property
    def label(self) -> str:
        text = f"{self.kind} {self.size[0]}x{self.size[1]}"
        if self.references:
            text += f", {len(self.references)} ref(s) " + " ".join(f"{w}x{h}" for w, h in self.references)
        return text + (f", batch {self.batch}" if self.batch > 1 else "")


def warm_up_runs(sizes: workloads.E2ESizes) -> list[ScriptedRun]:
    return [ScriptedRun("t2i", sizes.t2i), ScriptedRun("edit", sizes.t2i, sizes.recompile_references[:1])]


def scripted_runs(sizes: workloads.E2ESizes) -> list[ScriptedRun]:
    """Normal use after the warm-up: every documented size, 1-4 references, batches 1-4."""
    runs = [ScriptedRun("t2i", size) for size in sizes.recompile_sizes]
    runs += [ScriptedRun("edit", sizes.t2i, sizes.recompile_references[:count])
             for count in range(1, len(sizes.recompile_references) + 1)]
    runs += [ScriptedRun("t2i", sizes.t2i, batch=batch) for batch in sizes.recompile_batches if batch > 1]
    return runs


def make(session, run: ScriptedRun, sizes: workloads.E2ESizes, seed: int):
    """One scripted image through the public API (ours_runs.OursSession.image)."""
    references = [workloads.reference_image(w, h, seed + i) for i, (w, h) in enumerate(run.references)]
    prompt = workloads.EDIT_PROMPT if references else workloads.T2I_PROMPT
    return session.image(prompt, run.size, seed=seed, steps=sizes.recompile_steps, guidance=sizes.guidance,
                         references=references, batch=run.batch)


def count_recompiles(session, sizes: workloads.E2ESizes, seed: int, deadline: Deadline | None = None) -> dict:
    """Warm-up (one t2i, one edit), then the scripted run under a CompileCounter. Returns the counts, the reasons
    and each run's seconds and recompiles; a run that does not fit the deadline stops the script (`complete`)."""
    warm = []
    for index, run in enumerate(warm_up_runs(sizes)):
        warm.append({"run": run.label, "seconds": make(session, run, sizes, seed + index).total_s})
    done, complete = [], True
    with CompileCounter() as counter:
        for index, run in enumerate(scripted_runs(sizes)):
            if deadline is not None and done and deadline.remaining() < 1.5 * max(d["seconds"] for d in done):
                complete = False
                break
            before = counter.recompiles
            seconds = make(session, run, sizes, seed + 100 + index).total_s
            done.append({"run": run.label, "seconds": seconds, "recompiles": counter.recompiles - before})
            log(f"  {run.label}: {seconds:.1f} s, {counter.recompiles - before} recompile(s)", deadline)
    return {"recompiles": counter.recompiles, "compiled_frames": counter.compiled_frames, "reasons": counter.reasons,
            "complete": complete, "warm_up": warm, "runs": done,
            "script": [asdict(run) for run in scripted_runs(sizes)]}


def phase_recompiles(b, clock: Deadline) -> None:
    session = b.session()
    result = count_recompiles(session, b.sizes, b.args.seed + 60, clock)
    if session.model.stage("dit").compile_backend is None:
        b.report.note("recompile count: glm_core compiled nothing in this run (compiling is off on the CPU; "
                      "--compile-backend eager turns dynamo on), so its 0 says nothing")
    if not result["complete"]:
        b.report.note(f"recompile count: the script stopped after {len(result['runs'])} of "
                      f"{len(result['script'])} runs (time budget); the count covers those runs only")
    b.record("ours", "recompiles_in_normal_use", result["recompiles"], result)
    b.record("ours", "compiles_after_warm_up", result["compiled_frames"])
