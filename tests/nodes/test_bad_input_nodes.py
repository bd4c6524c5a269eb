"""The node pack given bad input the way ComfyUI meets it (issue 11), in the in-repo harness on the tiny checkpoint.

Two layers, as in a ComfyUI server:
- `/prompt` validation (HTTP 400): a value below its minimum, a wrong type, a missing required input, an unknown
  node, a combo value not offered, a link of the wrong type. Nothing runs.
- a node raising while the prompt runs: the server reports the node and its error and keeps serving.

For every case: the error's kind (validation type, or node and exception class) and key words, nothing written
to the output folder (which already holds earlier results), and the "server" still up: the next good prompt runs.
"""
from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field

import PIL.Image
import pytest
import torch

from tests.fixtures.damaged_checkpoint import damaged_copy
from tests.harness import ComfyStubs, Executor, class_mappings, object_info, validate_prompt
from tests.nodes.comfy_files import install_checkpoint, models_dir, write_reference_images

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 512
# Node ids as in the shipped text_to_image graph (tests/harness/workflow_builder.py).
LOADER, ENCODE, AR, PREVIEW_TOKENS, PREVIEW, DIT, SAVE = "2", "3", "4", "5", "6", "7", "8"


@dataclass
class Answer:
    """What the server answers to one queued prompt."""

    validation_errors: list = field(default_factory=list)  # non-empty: HTTP 400, nothing ran
    result: object = None  # the executor's RunResult when the prompt was accepted


@dataclass
class Server:
    comfy: ComfyStubs
    executor: Executor
    pack: object

    def queue(self, prompt: dict) -> Answer:
        """POST /prompt: validate against /object_info; run only a prompt without errors."""
        errors = validate_prompt(prompt, object_info(self.pack))
        if errors:
            return Answer(validation_errors=errors)
        return Answer(result=self.executor.run(prompt))

    def outputs(self) -> dict[str, bytes]:
        folder = self.comfy.directories["output"]
        return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
                if path.is_file()}


@pytest.fixture(scope="module")
def server(comfy_stubs, pack, tiny_checkpoint, tmp_path_factory):
    comfy_stubs.configure(tmp_path_factory.mktemp("comfyui-bad-input"))
    install_checkpoint(comfy_stubs, tiny_checkpoint)
    write_reference_images(comfy_stubs.directories["input"])
    PIL.Image.new("RGB", (8, 8), (10, 200, 90)).save(comfy_stubs.directories["input"] / "thumbnail.png")
    server = Server(comfy_stubs, Executor(class_mappings(pack)), pack)
    with comfy_stubs.installed():  # module set-up runs outside the per-test installation
        assert server.queue(good_prompt(server)).result.status == "success"  # earlier results in the output folder
    return server


@pytest.fixture
def comfy(server):
    server.comfy.reset_records()
    yield server.comfy
    server.comfy.reset_records()


_decode_seeds = iter(range(1000, 10**6))


def good_prompt(server, *, new_decode=False) -> dict:
    """Text to image as an API client queues it: 512x512, 1 DiT step without guidance, fp32 (CPU). new_decode: a
    DiT seed not used before, so that DiT Decode and Save Image really run (not answered from the cache)."""
    model = [LOADER, 0]
    return {
        LOADER: {"class_type": "GLMImageLoader",
                 "inputs": {"model_folder": "GLM-Image", "dtype": "fp32", "weights": "auto", "placement": "auto"}},
        ENCODE: {"class_type": "GLMImageEncode",
                 "inputs": {"model": model, "prompt": 'a shop sign that says "OPEN"', "width": SIZE, "height": SIZE}},
        AR: {"class_type": "GLMImageGenerateTokens",
             "inputs": {"model": model, "cond": [ENCODE, 0], "seed": 42, "temperature": 0.9, "top_p": 0.75,
                        "top_k": 50, "batch_size": 1}},
        DIT: {"class_type": "GLMImageDiTDecode",
              "inputs": {"model": model, "cond": [ENCODE, 0], "tokens": [AR, 0], "steps": 1, "guidance": 1.0,
                         "seed": next(_decode_seeds) if new_decode else 0}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DIT, 0], "filename_prefix": "GLM-Image/t2i"}},
    }


def ar_only(prompt: dict) -> dict:
    """The prompt's AR branch alone, ending in Preview Tokens -> Preview Image."""
    prompt = {key: value for key, value in copy.deepcopy(prompt).items() if key not in (DIT, SAVE)}
    prompt[PREVIEW_TOKENS] = {"class_type": "GLMImagePreviewTokens", "inputs": {"tokens": [AR, 0]}}
    prompt[PREVIEW] = {"class_type": "PreviewImage", "inputs": {"images": [PREVIEW_TOKENS, 0]}}
    return prompt


def assert_server_still_serves(server, before_outputs):
    """The next good prompt runs (its decode is new, so it really executes) and adds exactly its image."""
    answer = server.queue(good_prompt(server, new_decode=True))
    assert answer.validation_errors == [] and answer.result.status == "success", answer
    assert DIT in answer.result.executed and SAVE in answer.result.executed
    added = set(server.outputs()) - set(before_outputs)
    assert len(added) == 1, added
    assert {name: data for name, data in server.outputs().items() if name in before_outputs} == before_outputs


# -- /prompt validation: HTTP 400, nothing runs -------------------------------------------------------------

def below_min(prompt):
    prompt[ENCODE]["inputs"]["width"] = 256


def wrong_type(prompt):
    prompt[DIT]["inputs"]["steps"] = "many"


def missing_required(prompt):
    del prompt[ENCODE]["inputs"]["prompt"]


def unknown_node(prompt):
    prompt["50"] = {"class_type": "GLMImageUpscale", "inputs": {"images": [DIT, 0]}}


def not_in_list(prompt):
    prompt[LOADER]["inputs"]["dtype"] = "fp16"


def wrong_link_type(prompt):
    prompt[DIT]["inputs"]["tokens"] = [ENCODE, 0]  # a GLM_IMAGE_COND into the tokens socket


def temperature_below_min(prompt):
    prompt[AR]["inputs"]["temperature"] = 0.0


def batch_above_max(prompt):
    prompt[AR]["inputs"]["batch_size"] = 64


VALIDATION_CASES = {
    "value_below_min": (below_min, "value_smaller_than_min", ENCODE, "width: 256 < 512"),
    "wrong_type": (wrong_type, "invalid_input_type", DIT, "steps"),
    "missing_required_input": (missing_required, "required_input_missing", ENCODE, "prompt"),
    "unknown_node": (unknown_node, "invalid_prompt", "50", "GLMImageUpscale"),
    "combo_value_not_offered": (not_in_list, "value_not_in_list", LOADER, "'fp16'"),
    "link_of_wrong_type": (wrong_link_type, "return_type_mismatch", DIT, "GLM_IMAGE_COND"),
    "temperature_below_min": (temperature_below_min, "value_smaller_than_min", AR, "temperature: 0.0 < 0.05"),
    "batch_above_max": (batch_above_max, "value_bigger_than_max", AR, "batch_size: 64 > 16"),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_prompt_refused_by_validation(server, comfy, case):
    spoil, error_type, node_id, words = VALIDATION_CASES[case]
    prompt = good_prompt(server, new_decode=True)
    spoil(prompt)
    before = server.outputs()
    answer = server.queue(prompt)
    assert answer.result is None, "a prompt that fails validation must not run"
    assert [(e["type"], e["node_id"]) for e in answer.validation_errors] == [(error_type, node_id)], \
        answer.validation_errors
    assert words in answer.validation_errors[0]["details"], answer.validation_errors
    # Building /object_info lists the folders; nothing else of ComfyUI's was touched (no memory, no progress).
    assert [call for call in comfy.calls if call[0] != "folder_paths"] == [] and server.outputs() == before
    assert_server_still_serves(server, before)


# -- a node raises while the prompt runs: reported, the server keeps serving ----------------------------------

def run_failing(server, comfy, prompt, node_id, error_class, *words):
    before = server.outputs()
    answer = server.queue(prompt)
    assert answer.validation_errors == [], answer.validation_errors
    result = answer.result
    assert result.status == "error" and result.error_node == node_id, (result.status, result.error_node,
                                                                       result.error)
    assert type(result.error) is error_class, repr(result.error)
    for word in words:
        assert word in str(result.error), str(result.error)
    assert node_id not in server.executor.cached_node_ids()
    assert server.outputs() == before
    return before, result


def test_both_sides_wrong_from_an_api_client(server, comfy):
    """Issue 11 §1 and §5 through the nodes: API clients may skip the frontend's widget limits; the core still
    names both sides (and 0 is an error, not the default)."""
    prompt = good_prompt(server, new_decode=True)
    prompt[ENCODE]["inputs"].update(width=0, height=1000)
    before = server.outputs()
    result = server.executor.run(prompt)  # queued without /prompt validation
    assert result.status == "error" and result.error_node == ENCODE and type(result.error) is ValueError
    assert "width 0 is below the minimum 512" in str(result.error) and "height 1000" in str(result.error)
    assert AR not in result.executed and comfy.called("ProgressBar") == []
    assert server.outputs() == before
    assert_server_still_serves(server, before)


def test_empty_prompt(server, comfy):
    prompt = good_prompt(server, new_decode=True)
    prompt[ENCODE]["inputs"]["prompt"] = "  \n"
    before, result = run_failing(server, comfy, prompt, ENCODE, ValueError, "prompt is empty")
    assert comfy.called("ProgressBar") == []
    assert_server_still_serves(server, before)


@pytest.mark.parametrize("damage", ["missing_dit_shard", "broken_vae_config"])
def test_damaged_model_folder_found_by_the_loader(server, comfy, tiny_checkpoint, tmp_path, damage):
    """Issue 11 §3 through the nodes: Load GLM-Image checks every file, so the AR never runs for a DiT or a VAE
    that cannot load."""
    from glm_core.checkpoint import CheckpointError

    folder, what = damaged_copy(tiny_checkpoint, tmp_path / "damaged", damage)
    name = f"GLM-Image-{damage}"
    (models_dir(server.comfy) / "glm_image" / name).symlink_to(folder, target_is_directory=True)
    prompt = good_prompt(server, new_decode=True)
    prompt[LOADER]["inputs"]["model_folder"] = name
    before = server.outputs()
    result = server.queue(prompt).result
    assert result.status == "error" and result.error_node == LOADER, (result.error_node, result.error)
    # The pack is imported under its own module name: compare the class by name and base.
    assert type(result.error).__name__ == CheckpointError.__name__ and isinstance(result.error, ValueError)
    assert what in str(result.error)
    assert result.executed == [] and comfy.called("ProgressBar") == [] and comfy.called("load_models_gpu") == []
    assert server.outputs() == before
    assert_server_still_serves(server, before)


def test_save_tokens_outside_the_output_folder(server, comfy):
    prompt = {key: node for key, node in good_prompt(server).items() if key in (LOADER, ENCODE, AR)}
    prompt["90"] = {"class_type": "GLMImageSaveTokens",
                    "inputs": {"tokens": [AR, 0], "filename_prefix": "../../escaped/tokens"}}
    before = server.outputs()
    result = server.queue(prompt).result
    assert result.status == "error" and result.error_node == "90" and type(result.error) is ValueError
    assert "points outside" in str(result.error)
    assert server.outputs() == before
    assert not (server.comfy.directories["output"].parent.parent / "escaped").exists()
    assert_server_still_serves(server, before)


def test_tiny_reference_warns_of_the_upscale(server, comfy, caplog):
    """Issue 11 §6 through the nodes: an 8x8 LoadImage into Encode is used, with a warning in the console."""
    prompt = good_prompt(server, new_decode=True)
    prompt["60"] = {"class_type": "LoadImage", "inputs": {"image": "thumbnail.png"}}
    prompt[ENCODE]["inputs"]["image_1"] = ["60", 0]
    with caplog.at_level(logging.WARNING, logger="glm_core"):
        answer = server.queue(prompt)
    assert answer.validation_errors == [] and answer.result.status == "success", answer
    warnings = [r.getMessage() for r in caplog.records if r.name == "glm_core" and r.levelno == logging.WARNING]
    assert any("reference image 8x8 is upscaled to 512x512" in w for w in warnings), warnings


def test_out_of_memory_while_the_dit_loads(server, comfy, tiny_checkpoint, monkeypatch):
    """Issue 11 §4 through the nodes: an OOM while DiT Decode loads its weights (simulated as in
    tests/unit/test_bad_input_api.py) is reported on that node as an out-of-memory error with the numbers; the
    next prompt runs."""
    name = "GLM-Image-oom"
    link = models_dir(server.comfy) / "glm_image" / name
    if not link.exists():
        link.symlink_to(tiny_checkpoint, target_is_directory=True)
    prompt = good_prompt(server, new_decode=True)
    prompt[LOADER]["inputs"]["model_folder"] = name  # a model whose DiT is not loaded yet
    # The AR part first, so that only the DiT's load meets the failure.
    assert server.queue(ar_only(prompt)).result.status == "success"
    reader = sys.modules[f"{server.pack.module_name}.glm_core.tensor_reader"]

    def read_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    before = server.outputs()
    with monkeypatch.context() as patch:
        patch.setattr(reader.TensorReader, "read", read_out_of_memory)
        # The pack's own copy of glm_core (imported under the pack's module name, as ComfyUI does).
        patch.setattr(sys.modules[f"{server.pack.module_name}.glm_core.memory"], "gpu_memory",
                      lambda device: (int(0.5e9), int(12e9)))
        result = server.queue(prompt).result
    assert result.status == "error" and result.error_node == DIT, (result.error_node, result.error)
    assert isinstance(result.error, torch.OutOfMemoryError) and type(result.error).__name__ == "NotEnoughGpuMemory"
    message = str(result.error)
    assert "not enough GPU memory for loading" in message and "0.5 GB free of 12.0 GB" in message
    assert "it needs about" in message and "weights='fp8'" in message
    assert AR in result.cached and server.outputs() == before
    assert_server_still_serves(server, before)
