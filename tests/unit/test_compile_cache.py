"""torch's compile caches persist under the user's cache folder, so that a second process compiles nothing again
(glm_core.compiling.use_persistent_compile_cache, issue 9)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.paths import REPO_ROOT

# A fresh process compiles one small function with inductor through glm_core's wrapper; it prints the FX-graph
# cache's hits and misses and the folder torch used.
PROBE = """
import json, os, torch
from glm_core.compiling import compiled
from torch._dynamo.utils import counters
def scaled_sine(x):
    return torch.sin(x) * 2 + x.cos()
wrapper = compiled(scaled_sine, "probe", "inductor")
wrapper(torch.randn(8, 4))
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "folder": os.environ["TORCHINDUCTOR_CACHE_DIR"], "fallback": wrapper.fallback_reason}))
"""


def test_cache_folder_is_the_users_choice_or_the_user_cache(monkeypatch, tmp_path):
    from glm_core.compiling import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "glm_core" / "torch_compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache_dir() == Path.home() / ".cache" / "glm_core" / "torch_compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    # importing torch._dynamo writes torch's /tmp default into the variable: not the user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compile_cache_dir() == Path.home() / ".cache" / "glm_core" / "torch_compile"


def _probe(cache_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(cache_home)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_reads_the_first_ones_compiled_graph(tmp_path):
    first, second = _probe(tmp_path), _probe(tmp_path)
    folder = tmp_path / "glm_core" / "torch_compile"
    assert first["folder"] == second["folder"] == str(folder)
    assert first["fallback"] is None and second["fallback"] is None
    assert (first["hits"], first["misses"]) == (0, 1)
    assert (second["hits"], second["misses"]) == (1, 0)
    assert any((folder / "fxgraph").rglob("*")), "nothing was written to the cache folder"
