"""The pack loads like ComfyUI loads it and registers exactly the expected, fully documented nodes."""
from __future__ import annotations

import ast
import importlib
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import PackLoadError, copy_pack, input_specs, load_pack, reported_type_name
from tests.harness.loader import as_in_comfyui
from tests.harness.core_nodes import node_info

from tests.nodes.comfy_files import models_dir
from tests.nodes.pack_facts import EXPECTED_NODES, REPO_ROOT

PACK_SOURCES = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "nodes").rglob("*.py")),
                *sorted((REPO_ROOT / "glm_core").rglob("*.py"))]
OWN_SOCKET_TYPES = {"GLM_IMAGE_MODEL", "GLM_IMAGE_COND", "GLM_IMAGE_TOKENS"}


def test_pack_registers_exactly_the_expected_nodes(pack):
    assert set(pack.node_class_mappings) == EXPECTED_NODES
    assert set(pack.display_name_mappings) == EXPECTED_NODES
    assert pack.folder.name != REPO_ROOT.name and not pack.folder.name.isidentifier()


def test_loader_fails_loudly_on_a_pack_that_registers_nothing(tmp_path, comfy):
    empty = tmp_path / "empty-pack"
    empty.mkdir()
    (empty / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    with pytest.raises(PackLoadError, match="registers no nodes"):
        load_pack(empty)
    broken = tmp_path / "broken.pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("from .missing import NODE_CLASS_MAPPINGS\n")
    with pytest.raises(PackLoadError, match="IMPORT FAILED"):
        load_pack(broken)


def test_pack_loads_under_another_folder_name(tmp_path, comfy):
    other = load_pack(copy_pack(tmp_path, "ComfyUI-GLM-Image-main"))
    assert set(other.node_class_mappings) == EXPECTED_NODES
    assert not hasattr(other.module, "comfy_entrypoint")


def test_pack_imports_only_relatively():
    """An absolute `import glm_core` / `import nodes` works in this repo but fails inside ComfyUI, where the pack
    sits in custom_nodes/<any name>/ and is not on sys.path (the real server showed ModuleNotFoundError)."""
    own_packages = {"glm_core", "nodes"}
    absolute = []
    for path in PACK_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if {name.split(".")[0] for name in names} & own_packages:
                absolute.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert absolute == [], "absolute imports of the pack's own packages (use relative ones): " + ", ".join(absolute)


def test_importing_the_pack_needs_no_comfyui_and_loads_no_weights(tmp_path):
    """A fresh interpreter without any ComfyUI module: the import registers the nodes and imports neither
    glm_core's model code nor anything from ComfyUI."""
    folder = copy_pack(tmp_path)
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("pack_under_test", {str(folder / '__init__.py')!r})
module = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = module
spec.loader.exec_module(module)
print(json.dumps({{"nodes": sorted(module.NODE_CLASS_MAPPINGS),
                  "comfy": sorted(m for m in sys.modules if m == "folder_paths" or m.split(".")[0] == "comfy"),
                  "core": sorted(m for m in sys.modules if ".glm_core." in m),
                  "cuda": "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["nodes"]) == EXPECTED_NODES
    assert report["comfy"] == [] and report["core"] == [] and report["cuda"] is False


def test_root_init_guard_without_a_parent_package():
    """Executed as a plain module (no package, e.g. a tool run from the repo root) it registers nothing
    instead of failing on the relative import."""
    namespace = runpy.run_path(str(REPO_ROOT / "__init__.py"), run_name="glm_pack_root")
    assert namespace["NODE_CLASS_MAPPINGS"] == {}


@pytest.mark.parametrize("name", sorted(EXPECTED_NODES))
def test_node_follows_the_v1_contract_with_tooltips(pack, comfy, fake_model_folder, name):
    cls = pack.node_class_mappings[name]
    info = node_info(name, cls, pack.display_name_mappings[name], pack.python_module)
    json.dumps(info)  # /object_info must be JSON
    assert info["category"] == "GLM-Image"
    assert len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple)
    if cls.RETURN_TYPES:
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        assert all(len(tip) > 10 for tip in cls.OUTPUT_TOOLTIPS)
    else:
        assert cls.OUTPUT_NODE is True  # a node without outputs must be an output node or it never runs
    for spec in input_specs(info):
        assert len(spec.options.get("tooltip", "")) > 10, f"{name}.{spec.name} has no tooltip"
        if spec.type == "INT" and "seed" in spec.name:
            assert spec.options["control_after_generate"] is True
            assert (spec.options["min"], spec.options["max"]) == (0, 0xffffffffffffffff)
        if spec.type in ("INT", "FLOAT"):
            assert spec.options["min"] <= spec.options["default"] <= spec.options["max"]
        if spec.is_combo and spec.combo_options and "default" in spec.options:
            assert spec.options["default"] in spec.combo_options
    socket_types = {spec.socket_type for spec in input_specs(info)} | set(cls.RETURN_TYPES)
    assert {t for t in socket_types if t.startswith("GLM")} <= OWN_SOCKET_TYPES


def test_node_defaults_match_the_model(pack, comfy, fake_model_folder):
    def options(node, name):
        specs = {spec.name: spec for spec in input_specs(node_info(node, pack.node_class_mappings[node], None, ""))}
        return specs[name].options

    assert options("GLMImageGenerateTokens", "temperature")["default"] == 0.9
    assert options("GLMImageGenerateTokens", "top_p")["default"] == 0.75
    assert options("GLMImageGenerateTokens", "top_k")["default"] == 50
    assert options("GLMImageDiTDecode", "steps")["default"] == 50
    assert options("GLMImageDiTDecode", "guidance")["default"] == 1.5
    assert options("GLMImageDiTDecode", "guidance")["min"] == 1.0
    for side in ("width", "height"):
        size = options("GLMImageEncode", side)
        assert (size["default"], size["min"], size["max"], size["step"]) == (1024, 512, 2048, 32)
        assert "1568×1056" in size["tooltip"] and "960×1728" in size["tooltip"]
    assert options("GLMImageLoader", "dtype")["default"] == "bf16"


def test_loader_lists_glm_image_folders_from_both_roots(pack, comfy, fake_model_folder):
    models = models_dir(comfy)
    nested = models / "diffusers" / "zai-org" / "GLM-Image"
    nested.mkdir(parents=True)
    (nested / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    other = models / "diffusers" / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    extra = Path(comfy.modules["folder_paths"].base_path) / "elsewhere"
    (extra / "glm-local").mkdir(parents=True)
    (extra / "glm-local" / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    comfy.modules["folder_paths"].add_model_folder_path("glm_image", str(extra))  # extra_model_paths.yaml

    combo = pack.node_class_mappings["GLMImageLoader"].INPUT_TYPES()["required"]["model_folder"][0]
    assert combo == ["GLM-Image", "glm-local", "zai-org/GLM-Image"]
    assert ("glm_image", str(models / "glm_image"), False) in comfy.called("add_model_folder_path") or \
        str(models / "glm_image") in comfy.modules["folder_paths"].get_folder_paths("glm_image")


def test_pack_uses_only_modelled_comfyui_apis(pack, comfy, fake_model_folder):
    for cls in pack.node_class_mappings.values():
        cls.INPUT_TYPES()
    assert comfy.violations == []


def test_stubs_fail_loudly_on_unmodelled_comfyui_apis(comfy):
    import comfy.model_management as model_management  # the harness stub

    with pytest.raises(AttributeError, match="does not model"):
        model_management.get_free_memory()
    assert comfy.violations == ["comfy.model_management.get_free_memory"]
    comfy.violations.clear()


def _exception_class_definitions() -> list[tuple[tuple[str, ...], str]]:
    """(module path inside the pack, class name) of every class in the pack sources that derives from a name
    ending in Error / Exception (the AST finds them without importing anything)."""
    found = []
    for path in PACK_SOURCES[1:]:
        relative = path.relative_to(REPO_ROOT).with_suffix("")
        module_parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    (getattr(base, "id", None) or getattr(base, "attr", "")).endswith(("Error", "Exception"))
                    for base in node.bases):
                found.append((module_parts, node.name))
    return found


def test_error_types_read_short_in_comfyui_reports(pack, comfy):
    """ComfyUI names an exception by its module + class in the error report; for a class defined in the pack
    that would be '<absolute path>/custom_nodes/<folder>.glm_core.checkpoint.CheckpointError'. Each of the
    pack's exception classes reports a short public module instead."""
    definitions = _exception_class_definitions()
    assert ("glm_core", "checkpoint") in {parts for parts, _ in definitions}  # the scan finds them
    reported = {}
    with as_in_comfyui():
        for module_parts, class_name in definitions:
            module = importlib.import_module(".".join((pack.module_name, *module_parts)))
            exception_class = getattr(module, class_name)
            assert issubclass(exception_class, BaseException), (module_parts, class_name)
            reported[class_name] = reported_type_name(exception_class)
    long_names = {name: shown for name, shown in reported.items()
                  if shown.startswith(pack.module_name) or "/" in shown or shown.count(".") > 1}
    assert long_names == {}, "set __module__ to the short public package name, e.g. 'glm_core'"
    assert reported["CheckpointError"] == "glm_core.CheckpointError"


def test_frontend_script_names_what_the_pack_defines(pack, comfy):
    """web/token_files.js finds the nodes, the input and the UI output by name; a rename on either side would
    silently switch it off."""
    script = (REPO_ROOT / "web" / "token_files.js").read_text()
    constants = dict(re.findall(r'const (\w+) = "([^"]+)";', script))
    assert constants["SAVE_TOKENS"] in pack.node_class_mappings
    assert constants["LOAD_TOKENS"] in pack.node_class_mappings
    load_tokens = pack.node_class_mappings[constants["LOAD_TOKENS"]]
    assert constants["TOKENS_FILE_INPUT"] in load_tokens.INPUT_TYPES()["required"]
    assert "output?.text?.[0]" in script  # Save Tokens returns {"ui": {"text": [name]}}
    assert 'import { app } from "../../scripts/app.js";' in script  # the public entry point, 1.27 to 1.58
    assert pack.module.WEB_DIRECTORY == "./web"
