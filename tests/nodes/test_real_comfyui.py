"""Integration with a real ComfyUI server (local check, skipped unless COMFYUI_PATH points at a checkout).

Starts `main.py --cpu` with the pack copied into a scratch custom_nodes folder under a random name (through
extra_model_paths.yaml, so the checkout is not modified) and the tiny checkpoint as models/glm_image/GLM-Image,
then: /object_info lists our nodes as the harness describes them, every shipped workflow (converted to API
format against the server's own /object_info) runs through /prompt to a saved image of the right size, and an
invalid prompt is refused with HTTP 400.

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/venv/bin/python] pytest tests/nodes/test_real_comfyui.py

With COMFYUI_CHROMIUM (a Chromium binary) and playwright installed in COMFYUI_PYTHON's environment, the real
frontend also opens every shipped workflow and converts it to an API prompt (tests/harness/frontend_check.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import PIL.Image
import pytest

from tests.harness import copy_pack, ui_to_api, validate_prompt
from tests.harness.core_nodes import CORE_NODE_CLASS_MAPPINGS
from tests.nodes.comfy_files import write_reference_images
from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER, EXPECTED_NODES, WORKFLOWS_DIR

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("COMFYUI_CHROMIUM")  # e.g. /usr/bin/chromium, for the frontend check
pytestmark = [
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-server "
                                                "integration test (and COMFYUI_PYTHON to its interpreter)"),
]
SIZE, STEPS = 512, 2
STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 600


class Server:
    def __init__(self, base_url: str, process: subprocess.Popen, log: Path, scratch: Path, pack_folder: Path):
        self.base_url, self.process, self.log, self.scratch, self.pack_folder = (
            base_url, process, log, scratch, pack_folder)

    def request(self, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    scratch = tmp_path_factory.mktemp("real-comfyui")
    pack_folder = copy_pack(scratch / "custom_nodes")
    (scratch / "models" / "glm_image").mkdir(parents=True)
    (scratch / "models" / "glm_image" / DEFAULT_MODEL_FOLDER).symlink_to(tiny_checkpoint, target_is_directory=True)
    for name in ("input", "output", "temp", "user"):
        (scratch / name).mkdir()
    (scratch / "user" / "default").mkdir()  # no "get started" dialog over the canvas in the frontend check
    (scratch / "user" / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}))
    (scratch / "extra_model_paths.yaml").write_text(
        f"glm_image_integration_test:\n    base_path: {scratch}\n    custom_nodes: custom_nodes\n"
        f"    glm_image: models/glm_image\n")
    port = _free_port()
    log = scratch / "comfyui.log"
    command = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--disable-auto-launch",
               "--extra-model-paths-config", str(scratch / "extra_model_paths.yaml"),
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", pack_folder.name,
               "--input-directory", str(scratch / "input"), "--output-directory", str(scratch / "output"),
               "--temp-directory", str(scratch / "temp"), "--user-directory", str(scratch / "user"),
               "--database-url", f"sqlite:///{scratch / 'comfyui.db'}"]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log_file, stderr=subprocess.STDOUT)
    running = Server(f"http://127.0.0.1:{port}", process, log, scratch, pack_folder)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{running.log_tail()}")
            try:
                if running.request("/system_stats")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{running.log_tail()}")
            time.sleep(1)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server_info(server):
    status, info = server.request("/object_info")
    assert status == 200
    return info


def test_pack_loads_in_the_real_server(server, server_info):
    log = server.log.read_text(errors="replace")
    failures = [line for line in log.splitlines()
                if server.pack_folder.name in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert failures == [], server.log_tail()
    ours = {name for name, entry in server_info.items()
            if entry["python_module"] == f"custom_nodes.{server.pack_folder.name}"}
    assert ours == EXPECTED_NODES
    assert DEFAULT_MODEL_FOLDER in server_info["GLMImageLoader"]["input"]["required"]["model_folder"][0]


def test_harness_object_info_matches_the_server(server, server_info, pack, comfy, fake_model_folder):
    """The harness's /object_info export and core-node stand-ins describe what the real server serves."""
    from tests.harness import object_info

    harness = json.loads(json.dumps(object_info(pack)))
    for name in EXPECTED_NODES:
        theirs, mine = server_info[name], harness[name]
        for key in ("input_order", "output", "output_is_list", "output_name", "display_name", "description",
                    "category", "output_node", "output_tooltips"):
            assert theirs.get(key) == mine.get(key), (name, key)
        for section, entries in mine["input"].items():
            for input_name, spec in entries.items():
                if isinstance(spec[0], list):  # combos list this test's folders: compare the options only
                    assert spec[1] == theirs["input"][section][input_name][1], (name, input_name)
                else:
                    assert spec == theirs["input"][section][input_name], (name, input_name)
    for name in CORE_NODE_CLASS_MAPPINGS:
        theirs, mine = server_info[name], harness[name]
        assert theirs["output"] == mine["output"] and theirs["output_node"] == mine["output_node"]
        assert theirs["input_order"]["required"] == mine["input_order"]["required"]
    assert {"Note", "MarkdownNote"}.isdisjoint(server_info)  # frontend-only, as the harness assumes


def _wait_for(server, prompt_id) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        status, history = server.request(f"/history/{prompt_id}")
        if status == 200 and prompt_id in history and history[prompt_id].get("status", {}).get("completed") \
                is not None and (history[prompt_id]["status"]["completed"]
                                 or history[prompt_id]["status"].get("status_str") == "error"):
            return history[prompt_id]
        time.sleep(1)
    pytest.fail(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s:\n{server.log_tail()}")


def shipped_prompt(server, name, *, size=SIZE, steps=STEPS):
    """The workflow converted against the server's current /object_info, shrunk for the CPU like the harness
    tests do (512x512, 2 steps, fp32)."""
    _, info = server.request("/object_info")
    workflow = json.loads((WORKFLOWS_DIR / name).read_text())
    prompt = ui_to_api(workflow, info)
    for node in prompt.values():
        if node["class_type"] == "GLMImageLoader":
            node["inputs"]["dtype"] = "fp32"
        if node["class_type"] == "GLMImageEncode":
            node["inputs"].update(width=size, height=size)
        if node["class_type"] == "GLMImageDiTDecode":
            node["inputs"]["steps"] = steps
    assert validate_prompt(prompt, info) == []
    return workflow, prompt


def queue(server, prompt, workflow=None) -> str:
    extra = {"extra_pnginfo": {"workflow": workflow}} if workflow else {}
    status, queued = server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                                "extra_data": extra})
    assert status == 200, queued
    return queued["prompt_id"]


def messages(entry, kind):
    return [data for message_kind, data in entry["status"]["messages"] if message_kind == kind]


@pytest.mark.parametrize("name", ["text_to_image.json", "image_edit.json", "multi_subject.json",
                                  "token_reuse.json"])
def test_shipped_workflow_runs_through_prompt(server, server_info, name):
    write_reference_images(server.scratch / "input")
    workflow, prompt = shipped_prompt(server, name)
    entry = _wait_for(server, queue(server, prompt, workflow))
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
    saves = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    for node_id in saves:
        (image,) = entry["outputs"][node_id]["images"]
        path = server.scratch / "output" / image["subfolder"] / image["filename"]
        assert PIL.Image.open(path).size == (SIZE, SIZE)


def test_real_server_reuses_the_tokens_when_only_the_dit_changes(server):
    _, prompt = shipped_prompt(server, "text_to_image.json")
    ar = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageGenerateTokens")
    dit = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageDiTDecode")
    prompt[ar]["inputs"]["seed"] = 9001
    assert _wait_for(server, queue(server, prompt))["status"]["status_str"] == "success"
    prompt[dit]["inputs"]["seed"] += 1
    entry = _wait_for(server, queue(server, prompt))
    assert entry["status"]["status_str"] == "success"
    (cached,) = messages(entry, "execution_cached")
    assert ar in cached["nodes"] and dit not in cached["nodes"]


def test_real_server_interrupt_stops_the_ar_stage(server):
    _, prompt = shipped_prompt(server, "text_to_image.json", size=2048)  # ~5000 tokens: long enough to catch
    ar = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageGenerateTokens")
    prompt[ar]["inputs"]["seed"] = 4711
    prompt_id = queue(server, prompt)
    deadline = time.monotonic() + 60
    while not server.request("/queue")[1]["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.2)
    time.sleep(1.0)
    pressed = time.monotonic()
    assert server.request("/interrupt", {})[0] == 200
    entry = _wait_for(server, prompt_id)
    assert time.monotonic() - pressed < 20
    interrupted = messages(entry, "execution_interrupted")
    assert interrupted and interrupted[0]["node_id"] == ar, entry["status"]


STAGE_HOLDERS = {"ar": "GlmImageARStage", "glyph": "GlmImageGlyphStage", "dit": "GlmImageDiTStage",
                 "vae": "GlmImageVAEStage"}


def test_real_server_loads_our_stages_through_its_model_management(server):
    """ComfyUI logs "Requested to load <class>" for each model load_models_gpu takes on: each of our stages
    goes through it (the server runs --cpu, so the moves themselves are no-ops here)."""
    _, prompt = shipped_prompt(server, "text_to_image.json")
    ar = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageGenerateTokens")
    prompt[ar]["inputs"]["seed"] = 2468
    assert _wait_for(server, queue(server, prompt))["status"]["status_str"] == "success"
    log = server.log.read_text(errors="replace")
    for holder in STAGE_HOLDERS.values():
        assert f"Requested to load {holder}" in log, server.log_tail()
    assert "memory leak" not in log.lower(), server.log_tail()


def test_real_model_management_lists_evicts_and_reloads_our_stages(server, tmp_path):
    """Our node functions run in a process that imports the real comfy.model_management and
    comfy.model_patcher (configured as `main.py --cpu`): the loaded-model list holds our stages, ComfyUI's
    unload paths move them off, and the next run brings them back with the same image."""
    checker = Path(__file__).resolve().parents[1] / "harness" / "model_management_check.py"
    out = tmp_path / "model_management.json"
    done = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(checker), COMFYUI_PATH,
                           str(server.pack_folder), str(server.scratch / "models" / "glm_image"), str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu_state"] == "CPU" and report["torch_device"] == "cpu"

    def check_loaded(entry, stage):
        assert entry["holder"] == STAGE_HOLDERS[stage] and entry["is_model_patcher"], entry
        assert entry["same_module"] and not entry["is_dead"] and not entry["lowvram"], entry
        assert entry["load_device"] == entry["entry_device"] == report["torch_device"], entry
        assert entry["offload_device"] == report["offload_device"], entry
        assert entry["loaded_size"] == entry["model_size"] > 0, entry

    assert set(report["after_ar"]) == {"ar"}
    check_loaded(report["after_ar"]["ar"], "ar")
    after_dit = report["after_dit"]
    assert {"glyph", "dit", "vae"} <= set(after_dit)
    for stage in ("glyph", "dit", "vae"):
        check_loaded(after_dit[stage], stage)
        assert after_dit[stage]["currently_used"]
    if "ar" in after_dit:  # detached by us before the DiT ran; ComfyUI drops the entry on its next free
        assert after_dit["ar"]["loaded_size"] == 0
    # ModelPatcher's bookkeeping went onto our holders, never onto the stage modules.
    assert report["stage_module_attributes"] == {stage: [] for stage in STAGE_HOLDERS}

    assert report["after_unload_all"] == {}
    assert all(devices == [report["offload_device"]] for devices in report["devices_after_unload_all"].values())

    assert {"glyph", "dit", "vae"} <= set(report["after_rerun"])
    for stage in ("glyph", "dit", "vae"):
        check_loaded(report["after_rerun"][stage], stage)
    assert report["same_tokens"] and report["same_image"]

    # A request to free one byte of the DiT unloads it whole (our stages never run split between devices).
    assert report["partial_unload_returned"] is True
    assert "dit" not in report["after_partial_unload"]
    assert report["same_image_after_partial"]
    check_loaded(report["after_partial_rerun"]["dit"], "dit")

    assert report["after_model_dropped"] == 0
    assert not [w for w in report["warnings"] if "leak" in w.lower()], report["warnings"]


def test_workflows_are_offered_as_templates(server):
    status, templates = server.request("/api/workflow_templates")
    assert status == 200
    assert sorted(templates[server.pack_folder.name]) == sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    status, served = server.request(f"/api/workflow_templates/{server.pack_folder.name}/text_to_image.json")
    assert status == 200 and served == json.loads((WORKFLOWS_DIR / "text_to_image.json").read_text())


@pytest.mark.skipif(not CHROMIUM, reason="set COMFYUI_CHROMIUM (and install playwright beside ComfyUI) to open "
                                         "the workflows in the real frontend")
def test_real_frontend_loads_and_converts_the_shipped_workflows(server, server_info, tmp_path):
    write_reference_images(server.scratch / "input")
    _, info = server.request("/object_info")
    workflows = sorted(WORKFLOWS_DIR.glob("*.json"))
    checker = Path(__file__).resolve().parents[1] / "harness" / "frontend_check.py"
    done = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(checker), server.base_url,
                           CHROMIUM, str(tmp_path), *map(str, workflows)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in workflows:
        workflow = json.loads(path.read_text())
        seen = json.loads((tmp_path / f"{path.stem}.json").read_text())
        assert seen["missing"] == [], path.name
        errors = [e for e in seen["console_errors"] if "Failed to load resource" not in e]
        assert errors == [], (path.name, errors)
        # The frontend reads every widget value exactly as written ...
        loaded = {node["id"]: node.get("widgets_values") for node in seen["serialized"]["nodes"]}
        assert loaded == {node["id"]: node.get("widgets_values") for node in workflow["nodes"]}, path.name
        # ... and queues the same API prompt as our converter.
        ours = ui_to_api(workflow, info)
        assert {k: (v["class_type"], v["inputs"]) for k, v in seen["output"].items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}, path.name


def test_invalid_prompt_is_refused_with_400(server, server_info):
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / "text_to_image.json").read_text()), server_info)
    encode = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageEncode")
    prompt[encode]["inputs"]["width"] = 100
    status, answer = server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 400
    errors = answer["node_errors"][encode]["errors"]
    assert [error["type"] for error in errors] == ["value_smaller_than_min"]
    assert server.request("/system_stats")[0] == 200  # still serving
