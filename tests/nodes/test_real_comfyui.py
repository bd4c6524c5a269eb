"""Integration with a real ComfyUI server (local check, skipped unless COMFYUI_PATH points at a checkout).

Starts `main.py --cpu` with the pack copied into a scratch custom_nodes folder under a random name (through
extra_model_paths.yaml, so the checkout is not modified) and the tiny checkpoint as models/glm_image/GLM-Image
(tests/harness/real_server.py), then: /object_info lists our nodes as the harness describes them for that
ComfyUI release, every shipped workflow (converted to API format against the server's own /object_info) runs
through /prompt to a saved image of the right size, caching, interrupts and model management behave, our
errors reach the client with a short type and the next prompt runs, a token file saved in the session loads
without a restart, and an invalid prompt is refused with HTTP 400.

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/venv/bin/python] pytest tests/nodes/test_real_comfyui.py

With COMFYUI_CHROMIUM (a Chromium binary) and playwright installed in COMFYUI_PYTHON's environment, the real
frontend also opens every shipped workflow in a 1600x1000 window (tests/harness/frontend_check.py): it loads
and converts them like our converter, shows each whole at its saved view, finds our nodes in its search and
our workflows among its templates, shows the file Save Tokens wrote, and shows our errors with a short type.
tests/nodes/README.md has the matrix of ComfyUI and frontend versions this runs against.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import PIL.Image
import pytest

from tests.harness import shrink_for_cpu, ui_to_api, validate_prompt
from tests.harness.core_nodes import core_node_class_mappings, parse_version
from tests.harness.real_server import ServerError, prepare_scratch, start
from tests.nodes.comfy_files import write_reference_images
from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER, EXPECTED_NODES, WORKFLOWS_DIR

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
CHROMIUM = os.environ.get("COMFYUI_CHROMIUM")  # e.g. /usr/bin/chromium, for the frontend check
pytestmark = [
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-server "
                                                "integration test (and COMFYUI_PYTHON to its interpreter)"),
]
needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="set COMFYUI_CHROMIUM (and install playwright beside "
                                                         "ComfyUI) to check the real frontend")
SIZE, STEPS = 512, 2
RUN_TIMEOUT_S = 600
INCOMPLETE_MODEL_FOLDER = "GLM-Image-incomplete"  # listed by the loader (model_index.json), no components
TOKENS_SUFFIX = ".glm_tokens.safetensors [output]"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    scratch = tmp_path_factory.mktemp("real-comfyui")
    pack_folder = prepare_scratch(scratch, tiny_checkpoint)
    incomplete = scratch / "models" / "glm_image" / INCOMPLETE_MODEL_FOLDER
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    write_reference_images(scratch / "input")
    try:
        running = start(COMFYUI_PATH, COMFYUI_PYTHON, scratch, pack_folder)
    except ServerError as error:
        pytest.fail(str(error))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server_info(server):
    status, info = server.request("/object_info")
    assert status == 200
    return info


@pytest.fixture(scope="module")
def comfyui_version(server) -> tuple[int, ...]:
    status, stats = server.request("/system_stats")
    assert status == 200
    return parse_version(stats["system"]["comfyui_version"])


def pack_module_name(server) -> str:
    """The module name ComfyUI gives the pack: its folder's absolute path with "." replaced."""
    return str(server.pack_folder).replace(".", "_x_")


def test_pack_loads_in_the_real_server(server, server_info):
    log = server.log.read_text(errors="replace")
    failures = [line for line in log.splitlines()
                if server.pack_folder.name in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert failures == [], server.log_tail()
    ours = {name for name, entry in server_info.items()
            if entry["python_module"] == f"custom_nodes.{server.pack_folder.name}"}
    assert ours == EXPECTED_NODES
    assert DEFAULT_MODEL_FOLDER in server_info["GLMImageLoader"]["input"]["required"]["model_folder"][0]


def test_harness_object_info_matches_the_server(server, server_info, comfyui_version, pack, comfy,
                                                fake_model_folder):
    """The harness's /object_info export and core-node stand-ins describe what the real server serves (the
    stand-ins as that ComfyUI release defines the core nodes)."""
    from tests.harness import object_info

    harness = json.loads(json.dumps(object_info(pack, comfyui_version)))
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
    for name in core_node_class_mappings(comfyui_version):
        theirs, mine = server_info[name], harness[name]
        assert (theirs["output"], theirs["output_name"], theirs["output_node"]) == \
            (mine["output"], mine["output_name"], mine["output_node"]), name
        assert theirs["input_order"]["required"] == mine["input_order"]["required"], name
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
    prompt = shrink_for_cpu(ui_to_api(workflow, info), size=size, steps=steps)
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
    done = subprocess.run([COMFYUI_PYTHON, str(checker), COMFYUI_PATH,
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
    if "ar" in after_dit:
        # Placement follows ComfyUI's memory state: with room (here the CPU) nothing leaves, so the AR stays listed
        # whole; it is never left half loaded.
        check_loaded(after_dit["ar"], "ar")
        assert not after_dit["ar"]["currently_used"]
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

    assert report["after_model_dropped_held"] >= 3 and report["loader_again_same_model"], report
    assert report["after_model_dropped"] == 0
    assert not [w for w in report["warnings"] if "leak" in w.lower()], report["warnings"]


def test_workflows_are_offered_as_templates(server):
    status, templates = server.request("/api/workflow_templates")
    assert status == 200
    assert sorted(templates[server.pack_folder.name]) == sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    status, served = server.request(f"/api/workflow_templates/{server.pack_folder.name}/text_to_image.json")
    assert status == 200 and served == json.loads((WORKFLOWS_DIR / "text_to_image.json").read_text())


# --- our errors reach the client with a short type; the server keeps going ----------------------------------

# Errors the server's validation lets through (a missing model folder or tokens file is refused at queue time).
ERROR_CASES = {  # name -> (change to text_to_image, node that fails, type the client gets, words of the message)
    "checkpoint incomplete": (lambda prompt: node_of(prompt, "GLMImageLoader")["inputs"].update(
        model_folder=INCOMPLETE_MODEL_FOLDER), "GLMImageLoader", "glm_core.CheckpointError",
        "component folder missing"),
    "size not a multiple of 32": (lambda prompt: node_of(prompt, "GLMImageEncode")["inputs"].update(width=1000),
                                  "GLMImageEncode", "ValueError", "multiple of 32"),
}


def node_of(prompt, class_type) -> dict:
    (node,) = [node for node in prompt.values() if node["class_type"] == class_type]
    return node


def queue_unchecked(server, prompt) -> str:
    """Queue without the client-side validation (the server's own checks still run; they let these through)."""
    status, queued = server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, queued
    return queued["prompt_id"]


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_our_errors_reach_the_client_with_a_short_type_and_the_next_prompt_runs(server, case):
    """`execution_error` (what the frontend's error panel shows) names the type as module + class: ours must
    not read '<absolute path>/custom_nodes/<folder>.glm_core....'; the message carries no type prefix."""
    change, class_type, reported_type, words = ERROR_CASES[case]
    _, prompt = shipped_prompt(server, "text_to_image.json")
    change(prompt)
    entry = _wait_for(server, queue_unchecked(server, prompt))
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = messages(entry, "execution_error")
    assert error["node_type"] == class_type
    assert error["exception_type"] == reported_type
    assert words in error["exception_message"] and reported_type not in error["exception_message"]
    assert pack_module_name(server) not in error["exception_type"] + error["exception_message"]

    _, good = shipped_prompt(server, "text_to_image.json")
    assert _wait_for(server, queue(server, good))["status"]["status_str"] == "success"


# --- token files: written, shown, listed and loaded in the same session --------------------------------------

def test_tokens_saved_in_this_session_load_without_a_restart(server):
    _, prompt = shipped_prompt(server, "text_to_image.json")
    ar = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageGenerateTokens")
    prompt["90"] = {"class_type": "GLMImageSaveTokens",
                    "inputs": {"tokens": [ar, 0], "filename_prefix": "tok/session"}}
    entry = _wait_for(server, queue(server, prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (name,) = entry["outputs"]["90"]["text"]  # what web/token_files.js shows on the node
    assert name.startswith("tok/session_") and name.endswith(TOKENS_SUFFIX)
    assert name in server.request("/object_info/GLMImageLoadTokens")[1]["GLMImageLoadTokens"]["input"][
        "required"]["tokens_file"][0]

    loaded = copy.deepcopy(prompt)
    del loaded["90"]
    loaded[ar] = {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": name}}
    assert _wait_for(server, queue(server, loaded))["status"]["status_str"] == "success"

    # A name the server does not have is refused at queue time with our message (VALIDATE_INPUTS).
    loaded[ar]["inputs"]["tokens_file"] = "tok/never_saved" + TOKENS_SUFFIX
    status, answer = server.request("/prompt", {"prompt": loaded, "client_id": uuid.uuid4().hex})
    assert status == 400
    (error,) = answer["node_errors"][ar]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert "tokens file not found" in error["details"] and "Save Tokens" in error["details"]


# --- the real frontend ---------------------------------------------------------------------------------------

def browser_prompt_graph(name: str, **changes) -> dict:
    """A shipped workflow as the CPU can run it quickly (fp32, 512x512, 2 steps), as a page would load it."""
    workflow = json.loads((WORKFLOWS_DIR / name).read_text())
    for node in workflow["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "GLMImageLoader":
            values[:2] = [changes.get("model_folder", DEFAULT_MODEL_FOLDER), "fp32"]
        if node["type"] == "GLMImageEncode":
            values[1:3] = [SIZE, SIZE]
        if node["type"] == "GLMImageDiTDecode":
            values[0] = STEPS
    return workflow


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    """One browser session over everything the frontend check looks at (report.json + screenshots)."""
    if not CHROMIUM:
        pytest.skip("set COMFYUI_CHROMIUM (and install playwright beside ComfyUI) to check the real frontend")
    out = tmp_path_factory.mktemp("frontend")
    plan = {
        "workflows": [str(path) for path in sorted(WORKFLOWS_DIR.glob("*.json"))],
        "search": {"query": "GLM-Image"},
        "templates": {"module": server.pack_folder.name},
        "tokens": {"workflow": browser_prompt_graph("token_reuse.json")},
        "error": {"workflow": browser_prompt_graph("text_to_image.json", model_folder=INCOMPLETE_MODEL_FOLDER)},
    }
    (out / "plan.json").write_text(json.dumps(plan))
    checker = Path(__file__).resolve().parents[1] / "harness" / "frontend_check.py"
    done = subprocess.run([COMFYUI_PYTHON, str(checker), server.base_url, CHROMIUM, str(out), str(out / "plan.json")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    report = json.loads((out / "report.json").read_text())
    report["out_dir"] = str(out)  # screenshots to look at when a check fails
    return report


@needs_chromium
def test_real_frontend_loads_and_converts_the_shipped_workflows(server, frontend):
    _, info = server.request("/object_info")
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        workflow = json.loads(path.read_text())
        seen = frontend["workflows"][path.stem]
        assert seen["missing"] == [], path.name
        errors = [e for e in seen["console_errors"] if "Failed to load resource" not in e]
        assert errors == [], (path.name, errors)
        # The frontend reads every widget value exactly as written (1.49 and later leave widgets_values out of
        # a node without widgets, where 1.27 and our files write []) ...
        loaded = {node["id"]: node.get("widgets_values") or [] for node in seen["serialized"]["nodes"]}
        assert loaded == {node["id"]: node.get("widgets_values") or [] for node in workflow["nodes"]}, path.name
        # ... and queues the same API prompt as our converter.
        ours = ui_to_api(workflow, info)
        assert {k: (v["class_type"], v["inputs"]) for k, v in seen["output"].items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}, path.name


@needs_chromium
def test_shipped_workflows_show_whole_at_their_saved_view(frontend):
    """In a 1600x1000 window every node (with its title bar) and group lies inside the window at the view the
    workflow was saved with, and nothing of the frontend's own (menus, toolbars) covers it."""
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        layout = frontend["workflows"][path.stem]["layout"]
        saved = json.loads(path.read_text())["extra"]["ds"]
        assert layout["window"] == [1600, 1000]
        assert layout["ds"]["scale"] == pytest.approx(saved["scale"]) and \
            layout["ds"]["offset"] == pytest.approx(saved["offset"]), f"{path.name}: saved view not restored"
        hidden = {item["label"]: item["hidden"][:4] for item in layout["items"] if item["hidden"]}
        assert hidden == {}, f"{path.name}: not fully shown (see {frontend['out_dir']}/{path.stem}.view.png)"
        assert len(layout["items"]) == len(json.loads(path.read_text())["nodes"]) + \
            len(json.loads(path.read_text())["groups"])


@needs_chromium
def test_node_search_finds_every_node(server, server_info, frontend):
    shown = frontend["search"]["text"]
    ours = {server_info[name]["display_name"] for name in EXPECTED_NODES}
    assert {name for name in ours if name not in shown} == set(), f"see {frontend['out_dir']}/search.png"


@needs_chromium
def test_template_browser_lists_the_workflows(frontend):
    shown = frontend["templates"]["text"]
    missing = [path.stem for path in WORKFLOWS_DIR.glob("*.json") if path.stem not in shown]
    assert missing == [], f"see {frontend['out_dir']}/templates.png"


@needs_chromium
def test_save_tokens_shows_its_file_and_load_tokens_offers_it(frontend):
    """Queued from the page: Save Tokens shows the file it wrote, a Load Tokens node in the graph offers it
    without a reload, and the shown name changes neither the saved workflow nor the queued prompt."""
    tokens = frontend["tokens"]
    assert tokens["status"] == "success"
    name = tokens["shown"]
    assert name and name.startswith("glm_image_tokens/GLM-Image_") and name.endswith(TOKENS_SUFFIX)
    assert tokens["shown_visible"] is True
    assert name not in tokens["choices_before"] and name in tokens["load_choices"]
    assert tokens["save_widgets_values"] == ["glm_image_tokens/GLM-Image"]
    assert tokens["save_prompt_inputs"] == ["filename_prefix", "tokens"]


@needs_chromium
def test_error_panel_shows_a_short_type_and_the_message_once(server, frontend):
    """1.27 opens a dialog with the message; 1.49 and later a panel whose report lists the type and message
    (followed by the stack and the server log, which repeat it)."""
    error = frontend["error"]
    assert error["status"] == "error"
    text = error["text"]
    assert pack_module_name(server) not in text, f"see {frontend['out_dir']}/error.png"
    details = text.split("## Stack Trace")[0]
    assert details.count("component folder missing") == 1, f"see {frontend['out_dir']}/error.png"
    if error["details_opened"]:  # the report of 1.49 and later
        assert "Exception Type:** glm_core.CheckpointError" in details


def test_invalid_prompt_is_refused_with_400(server, server_info):
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / "text_to_image.json").read_text()), server_info)
    encode = next(node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageEncode")
    prompt[encode]["inputs"]["width"] = 100
    status, answer = server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 400
    errors = answer["node_errors"][encode]["errors"]
    assert [error["type"] for error in errors] == ["value_smaller_than_min"]
    assert server.request("/system_stats")[0] == 200  # still serving


def test_server_log_has_no_warnings_about_the_pack(server):
    """Runs last: nothing in the whole session's log warns about our nodes (deprecations, bad signatures)."""
    ours = ("GLMImage", "GlmImage", "glm_core", server.pack_folder.name)
    warnings = [line for line in server.log_text().splitlines()
                if any(word in line for word in ours) and ("WARNING" in line or "eprecat" in line)]
    assert warnings == []
