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
# With cpp_wrapper it also counts inductor's builds of its host vector-ISA test libraries.
PROBE = """
import json, os, sys, torch
from torch._inductor import cpu_vec_isa
from glm_core.compiling import compiled
from torch._dynamo.utils import counters
isa_checks = []
check_build = cpu_vec_isa.VecISA.check_build
cpu_vec_isa.VecISA.check_build = lambda self, code: isa_checks.append(str(self)) or check_build(self, code)
def scaled_sine(x):
    return torch.sin(x) * 2 + x.cos()
wrapper = compiled(scaled_sine, "probe", "inductor", cpp_wrapper=sys.argv[1] == "cpp")
x = torch.randn(8, 4)
same = bool(torch.allclose(wrapper(x), scaled_sine(x), atol=1e-5))
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "folder": os.environ["TORCHINDUCTOR_CACHE_DIR"], "fallback": wrapper.fallback_reason,
                  "same": same, "isa_checks": isa_checks}))
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


def _probe(cache_home: Path, wrapper: str = "python") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(cache_home)
    proc = subprocess.run([sys.executable, "-c", PROBE, wrapper], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
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


def test_cpp_wrapper_never_builds_vector_isa_test_libraries(tmp_path):
    """The C++ wrapper (the AR decode layer under cudaMallocAsync) compiles without inductor's host vector-ISA
    probe, which builds and loads a test library per ISA in every fresh process, cache hit or not (42 s of a warm
    45 s on the H200 machine). Both processes: same numbers as eager, no fallback, no ISA probe; the second hits
    the cache."""
    first, second = _probe(tmp_path, "cpp"), _probe(tmp_path, "cpp")
    for run in (first, second):
        assert run["fallback"] is None and run["same"]
        assert run["isa_checks"] == []
    assert (second["hits"], second["misses"]) == (1, 0)
