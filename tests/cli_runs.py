"""`python -m glm_core` in a subprocess, as a user runs it, for the tests of the command line.

One OpenMP thread: the AR decodes token by token, and on a shared 2-core machine a second thread spinning
against other processes makes each small op far slower (about 20x for the tiny checkpoint's AR); the results do
not depend on it as long as both runs being compared use the same setting.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.paths import REPO_ROOT

CLI_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def loaded_weights(self) -> bool:
        """The CLI prints "loaded <stage> weights ..." after each stage's weights are read."""
        return "loaded " in self.stderr and " weights (" in self.stderr

    @property
    def ran_ar(self) -> bool:
        return "AR tokens" in self.stderr


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "glm_core", *map(str, args)]


def run_cli(*args, timeout: float = 300, preexec_fn=None) -> CliRun:
    start = time.perf_counter()
    result = subprocess.run(cli_command(*args), cwd=REPO_ROOT, env={**os.environ, **CLI_ENV}, capture_output=True,
                            text=True, timeout=timeout, check=False, preexec_fn=preexec_fn)
    return CliRun(result.returncode, result.stdout, result.stderr, time.perf_counter() - start)


def interrupt_cli_when(line_starts: str, *args, timeout: float = 300) -> tuple[CliRun, list[str]]:
    """Run the CLI and press Ctrl-C (SIGINT) as soon as a stderr line starts with `line_starts`.
    Returns the run and the stderr lines printed before the interrupt."""
    start = time.perf_counter()
    process = subprocess.Popen(cli_command(*args), cwd=REPO_ROOT, env={**os.environ, **CLI_ENV},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = []
    try:
        for line in process.stderr:
            before.append(line)
            if line.startswith(line_starts):
                process.send_signal(signal.SIGINT)
                break
        stdout, rest = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return CliRun(process.returncode, stdout, "".join(before) + rest, time.perf_counter() - start), before


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included: a left-over partial file counts) with its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def obeying_file_modes():
    """A preexec_fn for `run_cli` under which the child obeys file permission bits even when the tests run as root
    (as in many containers): it gives up the two capabilities that let root read and write any file. None (no
    change needed) for an ordinary user."""
    if os.geteuid() != 0:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop_file_capabilities():
        for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
            if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: cannot make root obey file modes")

    return drop_file_capabilities
