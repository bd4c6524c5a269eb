"""Test code run in a child Python process, and what it reports back.

Triton's interpreter (TRITON_INTERPRET=1) must be on before triton defines a kernel, and some GPU checks need a
process of their own (another allocator); such tests run their code with `run_child`, which prints nothing of its
own: the child prints one line `<tag> <json>` and the parent reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.paths import REPO_ROOT


def run_child(code: str, *argv: str, tag: str = "RESULT", env: dict | None = None, timeout: float = 300,
              faulthandler: bool = False):
    """Run `code` with argv in a fresh interpreter (the repository on its path, `env` added to this environment);
    return the JSON of its last line starting with `tag`. Fails the test with the child's stderr if it fails."""
    child_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    command = [sys.executable, *(["-X", "faulthandler"] if faulthandler else []), "-c", code, *argv]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(tag + " ")]
    assert lines, f"the child printed no {tag} line\n{proc.stdout[-2000:]}"
    return json.loads(lines[-1][len(tag) + 1:])
