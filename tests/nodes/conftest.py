"""Fixtures for the node-pack tests: ComfyUI stubs, the pack loaded from a randomly named folder, ComfyUI-like
folders per test, and model folders (a fake one for definition checks, the tiny checkpoint for execution).
Plain helpers for the same folders: comfy_files.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.harness import ComfyStubs, class_mappings, copy_pack, load_pack, object_info, unload_pack
from tests.nodes.comfy_files import install_checkpoint, models_dir, write_reference_images
from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER

@pytest.fixture(scope="session")
def comfy_stubs(tmp_path_factory):
    return ComfyStubs(tmp_path_factory.mktemp("comfyui-session"))


@pytest.fixture(autouse=True)
def _comfy_stubs_installed(comfy_stubs):
    """The stub ComfyUI modules are importable during each node test only, never in other tests' way."""
    with comfy_stubs.installed():
        yield


@pytest.fixture(autouse=True)
def _no_model_held_across_tests():
    """The loader holds the last model it opened (nodes/recent_model.py); no test gets another test's."""
    yield
    for name, module in list(sys.modules.items()):
        if name.endswith(".nodes.recent_model") and hasattr(module, "let_go"):
            module.let_go()


@pytest.fixture(scope="session")
def pack(comfy_stubs, tmp_path_factory):
    """The pack copied to custom_nodes/<random name with dots and dashes> and imported like ComfyUI does."""
    folder = copy_pack(tmp_path_factory.mktemp("custom_nodes"))
    with comfy_stubs.installed():
        loaded = load_pack(folder)
    yield loaded
    unload_pack(loaded)


@pytest.fixture
def comfy(comfy_stubs, tmp_path):
    """ComfyUI folders (models/, input/, output/, temp/) under this test's tmp_path, records cleared."""
    comfy_stubs.configure(tmp_path / "comfyui")
    yield comfy_stubs
    comfy_stubs.reset_records()


@pytest.fixture
def fake_model_folder(comfy) -> Path:
    """models/glm_image/GLM-Image holding only a GLM-Image model_index.json (enough for the folder list)."""
    folder = models_dir(comfy) / "glm_image" / DEFAULT_MODEL_FOLDER
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    return folder


@pytest.fixture
def installed_checkpoint(comfy, tiny_checkpoint) -> Path:
    return install_checkpoint(comfy, tiny_checkpoint)


@pytest.fixture
def reference_images(comfy) -> list[str]:
    return write_reference_images(comfy.directories["input"])


@pytest.fixture
def info(pack, comfy):
    """`/object_info` as the server would build it now (combo lists reflect this test's folders)."""
    return lambda: object_info(pack)


@pytest.fixture
def mappings(pack):
    return class_mappings(pack)
