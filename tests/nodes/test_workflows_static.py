"""The shipped UI-format workflows validate against the node definitions and convert to valid API prompts;
the validator and converter themselves catch what they claim to catch."""
from __future__ import annotations

import copy
import json
import subprocess
import tomllib

import pytest

from tests.harness import object_info, ui_to_api, validate_prompt, validate_ui_workflow
from tests.harness.workflow_builder import SAFE_CANVAS_BOX
from tests.nodes.pack_facts import (DEFAULT_MODEL_FOLDER, REPO_ROOT, SHIPPED_WORKFLOWS, WORKFLOWS_DIR,
                                     comfy_cli_executable)

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
WORKFLOW_NAMES = ["image_edit.json", "multi_subject.json", "text_to_image.json", "token_reuse.json"]
NODE_TITLE_HEIGHT = 30  # the frontend draws a node's title bar above `pos`


def load(name):
    return json.loads((WORKFLOWS_DIR / name).read_text())


def nodes_of(workflow, node_type):
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def test_the_four_workflows_are_shipped():
    assert [path.name for path in SHIPPED_WORKFLOWS] == WORKFLOW_NAMES


@pytest.fixture
def ready(comfy, fake_model_folder, reference_images, info):
    """Folders as a user who followed the notes has them: the model folder and the reference images."""
    return info()


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_validates(ready, name):
    workflow = load(name)
    assert validate_ui_workflow(workflow, ready) == []
    prompt = ui_to_api(workflow, ready)
    assert validate_prompt(prompt, ready) == []
    assert not any(node["class_type"] in ("Note", "MarkdownNote") for node in prompt.values())


def test_a_workflow_saved_before_the_loader_options_still_loads(ready):
    """Workflows saved before Load GLM-Image gained its optional `weights` and `placement` widgets store two values
    for it: they load with those widgets at their defaults, and queue the same model otherwise."""
    workflow = load("text_to_image.json")
    loader = next(node for node in workflow["nodes"] if node["type"] == "GLMImageLoader")
    loader["widgets_values"] = loader["widgets_values"][:2]
    assert validate_ui_workflow(workflow, ready) == []
    prompt = ui_to_api(workflow, ready)
    assert validate_prompt(prompt, ready) == []
    inputs = prompt[str(loader["id"])]["inputs"]
    assert (inputs["weights"], inputs["placement"]) == ("auto", "auto")
    assert inputs["model_folder"] == DEFAULT_MODEL_FOLDER and inputs["dtype"] == "bf16"
    loader["widgets_values"] = loader["widgets_values"][:1]  # a required widget missing is still an error
    assert validate_ui_workflow(workflow, ready) != []


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_metadata_and_notes(name):
    workflow = load(name)
    assert len(nodes_of(workflow, "MarkdownNote") + nodes_of(workflow, "Note")) >= 1
    for node in workflow["nodes"]:
        properties = node["properties"]
        if node["type"].startswith("GLMImage"):
            assert (properties["cnr_id"], properties["ver"]) == (PYPROJECT["name"], PYPROJECT["version"])
        elif node["type"] not in ("Note", "MarkdownNote"):
            assert properties["cnr_id"] == "comfy-core"
    assert [node["widgets_values"][0] for node in nodes_of(workflow, "GLMImageLoader")] == [DEFAULT_MODEL_FOLDER]


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_layout_has_no_overlapping_nodes(name):
    boxes = [(node["id"], node["pos"][0], node["pos"][1] - NODE_TITLE_HEIGHT,
              node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1]) for node in load(name)["nodes"]]
    for i, (id_a, *a) in enumerate(boxes):
        for id_b, *b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{name}: nodes {id_a} and {id_b} overlap"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_also_validates_against_newer_core_nodes(pack, comfy, fake_model_folder,
                                                                  reference_images, name):
    """Since ComfyUI 0.26 SaveImage and PreviewImage have an IMAGE output; our files (written for 0.3.64, where
    they have none) still load and convert there."""
    newer = object_info(pack, (0, 33, 0))
    assert newer["SaveImage"]["output"] == ["IMAGE"]
    workflow = load(name)
    assert validate_ui_workflow(workflow, newer) == []
    assert validate_prompt(ui_to_api(workflow, newer), newer) == []


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_fits_the_window_at_its_saved_view(name):
    """At `extra.ds` every node (title bar included) and group lands inside the part of a 1600x1000 window that
    every checked frontend leaves free (the frontend check in test_real_comfyui.py measures the real thing)."""
    workflow = load(name)
    scale, (offset_x, offset_y) = workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]
    boxes = {f"node {node['id']}": (node["pos"][0], node["pos"][1] - NODE_TITLE_HEIGHT,
                                    node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
             for node in workflow["nodes"]}
    boxes.update({f"group {group['title']}": (group["bounding"][0], group["bounding"][1],
                                              group["bounding"][0] + group["bounding"][2],
                                              group["bounding"][1] + group["bounding"][3])
                  for group in workflow["groups"]})
    left, top, right, bottom = SAFE_CANVAS_BOX
    outside = {label: [round((x + offset_x) * scale), round((y + offset_y) * scale)] for label, box in boxes.items()
               for x, y in ((box[0], box[1]), (box[2], box[3]))
               if not (left <= (x + offset_x) * scale <= right and top <= (y + offset_y) * scale <= bottom)}
    assert outside == {}
    assert scale >= 0.65  # node text stays readable


def test_workflow_shapes_match_their_purpose():
    def references(workflow):
        encode = nodes_of(workflow, "GLMImageEncode")[0]
        return [i for i in encode["inputs"] if i["name"].startswith("image_") and i["link"] is not None]

    assert references(load("text_to_image.json")) == []
    assert len(references(load("image_edit.json"))) == 1
    assert 2 <= len(references(load("multi_subject.json"))) <= 3
    reuse = load("token_reuse.json")
    assert len(nodes_of(reuse, "GLMImageGenerateTokens")) == 1
    assert len(nodes_of(reuse, "GLMImageDiTDecode")) >= 2
    assert len(nodes_of(reuse, "GLMImageSaveTokens")) == 1
    assert nodes_of(reuse, "GLMImageGenerateTokens")[0]["widgets_values"][1] == "fixed"  # cached across runs


def test_conversion_drops_control_and_upload_values(ready):
    prompt = ui_to_api(load("image_edit.json"), ready)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["LoadImage"] == {"image": "reference.png"}
    assert by_type["GLMImageGenerateTokens"] == {
        "seed": 42, "temperature": 0.9, "top_p": 0.75, "top_k": 50, "batch_size": 1,
        "model": ["2", 0], "cond": ["3", 0]}
    assert by_type["GLMImageDiTDecode"]["seed"] == 0 and "fixed" not in by_type["GLMImageDiTDecode"].values()
    assert by_type["GLMImageEncode"]["image_1"] == ["10", 0]


def test_conversion_drops_muted_nodes_and_wires_through_bypassed_ones(ready):
    workflow = load("token_reuse.json")
    for node in workflow["nodes"]:
        if node["id"] == 13:
            node["mode"] = 2  # muted SaveImage
        if node["id"] == 5:
            node["mode"] = 4  # bypassed Preview Tokens: it has no IMAGE input to pass through
    prompt = ui_to_api(workflow, ready)
    assert "13" not in prompt and "5" not in prompt
    assert "images" not in prompt["6"]["inputs"]  # no IMAGE-typed input to pass through
    assert [e["type"] for e in validate_prompt(prompt, ready)] == ["required_input_missing"]


MUTATIONS = {
    "unknown node type": (lambda w: w["nodes"][1].update(type="GLMImageNoSuchNode"), "unknown node type"),
    "out-of-range width": (lambda w: _node(w, "GLMImageEncode")["widgets_values"].__setitem__(1, 4096),
                           "value_bigger_than_max"),
    "below-min guidance": (lambda w: _node(w, "GLMImageDiTDecode")["widgets_values"].__setitem__(1, 0.5),
                           "value_smaller_than_min"),
    "string for an INT": (lambda w: _node(w, "GLMImageDiTDecode")["widgets_values"].__setitem__(0, "fifty"),
                          "invalid_input_type"),
    "model not installed": (lambda w: _node(w, "GLMImageLoader")["widgets_values"].__setitem__(0, "GLM-Image-v2"),
                            "value_not_in_list"),
    "bad control value": (lambda w: _node(w, "GLMImageGenerateTokens")["widgets_values"].__setitem__(1, "often"),
                          "control_after_generate value"),
    "missing control value": (lambda w: _node(w, "GLMImageGenerateTokens")["widgets_values"].pop(1),
                              "widgets_values has 5 entries"),
    "link type mismatch": (lambda w: w["links"][2].__setitem__(5, "IMAGE"), "type GLM_IMAGE_COND"),
    "dangling link": (lambda w: w["links"][0].__setitem__(1, 99), "refers to a missing node"),
    "unconnected required input": (lambda w: _unlink(w, 7, "tokens"), "required input 'tokens' is not connected"),
    "wrong version": (lambda w: w.update(version=1), "version"),
}


def _node(workflow, node_type):
    return nodes_of(workflow, node_type)[0]


def _unlink(workflow, node_id, input_name):
    node = next(n for n in workflow["nodes"] if n["id"] == node_id)
    slot = next(i for i in node["inputs"] if i["name"] == input_name)
    workflow["links"] = [link for link in workflow["links"] if link[0] != slot["link"]]
    for other in workflow["nodes"]:
        for output in other["outputs"]:
            if output["links"] and slot["link"] in output["links"]:
                output["links"].remove(slot["link"])
    slot["link"] = None


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_validator_catches(ready, mutation):
    change, expected = MUTATIONS[mutation]
    workflow = copy.deepcopy(load("text_to_image.json"))
    change(workflow)
    errors = validate_ui_workflow(workflow, ready)
    assert any(expected in error for error in errors), errors


def test_api_validator_catches_what_the_server_rejects(ready):
    prompt = ui_to_api(load("text_to_image.json"), ready)
    prompt["3"]["inputs"]["width"] = 100
    prompt["4"]["inputs"]["cond"] = ["2", 0]  # a MODEL into a COND socket
    del prompt["7"]["inputs"]["steps"]
    prompt["8"]["class_type"] = "NoSuchSaveNode"
    found = {(error["node_id"], error["type"]) for error in validate_prompt(prompt, ready)}
    assert found == {("3", "value_smaller_than_min"), ("4", "return_type_mismatch"),
                     ("7", "required_input_missing"), ("8", "invalid_prompt")}


@pytest.mark.skipif(comfy_cli_executable() is None, reason="comfy-cli (PyPI) is not installed")
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_comfy_cli_agrees(ready, tmp_path, name):
    """Second opinion from the official comfy-cli offline validator, UI and API format."""
    (tmp_path / "object_info.json").write_text(json.dumps(ready))
    (tmp_path / "api.json").write_text(json.dumps(ui_to_api(load(name), ready)))
    for workflow in (WORKFLOWS_DIR / name, tmp_path / "api.json"):
        done = subprocess.run(
            [comfy_cli_executable(), "--skip-prompt", "--no-enable-telemetry", "workflow", "validate", "--workflow", str(workflow),
             "--input", str(tmp_path / "object_info.json")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_conversion_matches_comfy_cli(ready, name):
    """Our UI -> API conversion gives the same prompt as comfy-cli's converter (node ids, types, inputs)."""
    converter = pytest.importorskip("comfy_cli.workflow_to_api", reason="comfy-cli (PyPI) is not installed")
    theirs = converter.convert_ui_to_api(load(name), ready)
    ours = ui_to_api(load(name), ready)
    assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in theirs.items()}
