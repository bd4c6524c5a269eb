"""bench/memory.py's tiny mode on the CPU: the errors phase runs end to end through the public API and records
that memory and results come back after an interrupt and a refused request (the GPU figures come from the
device run, docs/PERFORMANCE.md)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.paths import REPO_ROOT


def test_memory_bench_tiny_errors_phase(tmp_path, demo_folder):
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--tiny", "--model", str(demo_folder),
                           "--phases", "errors", "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["errors"] == [], data["errors"]
    errors = data["results"]["errors"]
    assert errors["interrupt_ar"]["outcome"].startswith("Interrupted")
    assert errors["interrupt_dit"]["outcome"].startswith("Interrupted")
    assert errors["refused_request"]["outcome"].startswith("ValueError") and "codebook" in errors["refused_request"]["outcome"]
    assert errors["next_call_same_image"] is True
