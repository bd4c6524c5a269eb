"""Our stages under a real ComfyUI's model management, beside another model (local check, skipped unless
COMFYUI_PATH points at a ComfyUI checkout, like test_real_comfyui.py).

A real server runs our pack and the test-only memory pack (tests/nodes/comfy_memory_pack). Our text-to-image
workflow and the memory pack's big model are queued alternately on a device emulated to hold only a little more
than the big model (the memory pack's `budget_gb`: ComfyUI's own `free_memory` picks what to evict; before our
workflow, the room our stages need is requested against that budget, since ComfyUI's load_models_gpu does not
free memory for a CPU device, nor on a large GPU for small models). Checked
through the memory pack's report of ComfyUI's loaded-model list: loading their model evicts our stages, our next
load evicts theirs, every queue completes, and our stages come back as the same modules (not read from disk
again) through ComfyUI's `load_models_gpu` ("Requested to load ..." in the server log). Twice: with ComfyUI's default
cache, which drops our loader's output when the other workflow runs (the loader, run again, hands back the model it
holds), and with `--cache-lru 100`, which keeps it.

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] [COMFYUI_DEVICE=cuda] \
        pytest tests/nodes/test_real_comfyui_memory.py

COMFYUI_DEVICE=cuda runs the server on its GPU (default: `--cpu`). The server is started by bench/comfy_queue.py's
`comfy_server` (API-only: an empty web root, so a ComfyUI without its frontend package, as bench/comfy_gpu_bundle.sh
unpacks it, works too).
"""
from __future__ import annotations

import os
import sys

import pytest

from bench.comfy_queue import (big_model_prompt, comfy_server, free_memory_prompt, node_of, queue_and_wait,
                               report_of, with_report, workflow_prompt)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
ON_GPU = os.environ.get("COMFYUI_DEVICE", "cpu") == "cuda"
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run the "
                                                         "real-server memory test (and COMFYUI_PYTHON to its interpreter)")
THEIRS_GB = 0.02  # the memory pack's model: 20 MB of bf16 weights
# One MB more than their model: any of our stages (fp32 tiny: 0.2 to 19 MB) loaded beside it is over budget.
BUDGET_GB = THEIRS_GB + 0.001
TIMEOUT_S = 600
# Each cache, a server of its own. "default": ComfyUI's own (0.33: RAM pressure; 0.3.x: classic), which drops our
# workflow's outputs as soon as another workflow runs, so our loader runs again and hands back the model it holds
# (nodes/recent_model.py). "keep_outputs": --cache-lru (0.3.x and 0.33 alike) keeps them, and ComfyUI answers our
# loader and AR nodes from its cache.
CACHES = {"default": [], "keep_outputs": ["--cache-lru", "100"]}


@pytest.fixture(scope="module", params=list(CACHES))
def run(request, tmp_path_factory, tiny_checkpoint):
    scratch = tmp_path_factory.mktemp(f"real-comfyui-memory-{request.param}")
    with comfy_server(COMFYUI_PATH, tiny_checkpoint, scratch, python=os.environ.get("COMFYUI_PYTHON", sys.executable),
                      extra_args=CACHES[request.param] + ([] if ON_GPU else ["--cpu"])) as running:
        yield running


def ours(report: dict) -> dict:
    return {m["model"]: m for m in report["loaded_models"] if m["model"].startswith("GlmImage")}


def theirs(report: dict) -> list[dict]:
    return [m for m in report["loaded_models"] if m["model"] == "MemoryTestWeights"]


def loaded(models) -> int:
    return sum(m["loaded_bytes"] for m in (models.values() if isinstance(models, dict) else models))


def succeeded(result):
    assert result.status == "success", (result.name, result.status, result.error, result.log[-20:])
    return result


def test_comfyui_evicts_our_stages_and_theirs_and_ours_come_back(run, request):
    prompt = workflow_prompt(run, "text_to_image.json", cpu=not ON_GPU, size=512, steps=2)
    dit = node_of(prompt, "GLMImageDiTDecode")

    before = report_of(succeeded(queue_and_wait(run, with_report(prompt), "ours", TIMEOUT_S)))
    ours_before = ours(before)
    assert {"GlmImageGlyphStage", "GlmImageDiTStage", "GlmImageVAEStage"} <= set(ours_before), before
    dit_stages = {k: v for k, v in ours_before.items() if k != "GlmImageARStage"}
    assert all(m["loaded_bytes"] == m["model_bytes"] > 0 for m in dit_stages.values()), before
    our_bytes = sum(m["model_bytes"] for m in dit_stages.values())

    # Their model needs the room: ComfyUI unloads our stages (ours are the only other models on the device).
    used = succeeded(queue_and_wait(run, big_model_prompt(THEIRS_GB, 256, 1, BUDGET_GB), "theirs", TIMEOUT_S))
    after_theirs = used.outputs["2"]["memory_report"][0]
    (their_model,) = theirs(after_theirs)
    assert their_model["loaded_bytes"] == their_model["model_bytes"] >= 0.9 * THEIRS_GB * 1e9, after_theirs
    assert loaded(ours(after_theirs)) == 0, after_theirs
    assert any("Requested to load MemoryTestWeights" in line for line in used.log), used.log

    # Our next load needs room within the emulated budget: the request our stages' load makes (which ComfyUI's
    # load_models_gpu skips for a CPU device, and which on a large GPU would find room without evicting) is
    # made against the budget; ComfyUI evicts theirs.
    room = succeeded(queue_and_wait(run, free_memory_prompt(our_bytes / 1e9, BUDGET_GB), "make room", 60))
    assert loaded(theirs(room.outputs["1"]["memory_report"][0])) < their_model["loaded_bytes"]
    prompt[dit]["inputs"]["seed"] += 1  # only the DiT stages run again
    back = succeeded(queue_and_wait(run, with_report(prompt), "ours again", TIMEOUT_S))
    after_ours = report_of(back)
    assert loaded(theirs(after_ours)) < their_model["loaded_bytes"], after_ours
    for name in dit_stages:
        assert any(f"Requested to load {name}" in line for line in back.log), (name, back.log)
    # Our stages are loaded again, and they are the same modules: evicted to the offload device, not dropped
    # and read from disk again.
    ours_back = ours(after_ours)
    for name, entry in dit_stages.items():
        assert ours_back[name]["loaded_bytes"] == ours_back[name]["model_bytes"] > 0, after_ours
        assert ours_back[name]["module_id"] == entry["module_id"], name
    if request.node.callspec.params["run"] == "keep_outputs":
        assert node_of(prompt, "GLMImageGenerateTokens") in back.cached
    else:  # the outputs were dropped: the loader ran again and handed back the same model
        assert node_of(prompt, "GLMImageLoader") not in back.cached

    # And once more the other way round: every queue keeps completing.
    again = succeeded(queue_and_wait(run, big_model_prompt(THEIRS_GB, 256, 2, BUDGET_GB), "theirs again", TIMEOUT_S))
    assert loaded(ours(again.outputs["2"]["memory_report"][0])) == 0
    assert not any("memory leak" in line.lower() for line in run.server.log.read_text(errors="replace").splitlines())
