"""The shipped workflows, converted to API format, run through the harness executor on the tiny checkpoint;
caching, interrupts, progress, memory etiquette and user errors behave as ComfyUI users expect.

One ComfyUI "server" (folders + executor with its output cache) serves the whole module, as in a real session:
later tests reuse AR results from earlier ones, which keeps the CPU time down. Every test still states what
it needs (a test that must see a node run changes that node's inputs to something not run before).
"""
from __future__ import annotations

import copy
import gc
import importlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import pytest
import torch

from tests.harness import ComfyStubs, Executor, class_mappings, object_info, ui_to_api, validate_prompt
from tests.nodes.comfy_files import install_checkpoint, models_dir, write_reference_images
from tests.nodes.pack_facts import WORKFLOWS_DIR


SIZE = 512  # the smallest allowed size keeps the CPU runs short; the graphs are otherwise as shipped
STEPS = 2
# bf16 matmuls are ~3x slower than fp32 on CPUs; the shipped bf16 default is for GPUs.
TEST_DTYPE = "fp32"
# Node ids of the shipped graphs (tests/harness/workflow_builder.py).
LOADER, ENCODE, AR, PREVIEW_TOKENS, DIT, SAVE = "2", "3", "4", "5", "7", "8"


@dataclass
class Server:
    comfy: ComfyStubs
    executor: Executor
    pack: object

    def info(self) -> dict:
        return object_info(self.pack)  # rebuilt like /object_info: combo lists follow the folders

    def run(self, prompt: dict):
        return self.executor.run(prompt)


@pytest.fixture(scope="module")
def server(comfy_stubs, pack, tiny_checkpoint, tmp_path_factory):
    comfy_stubs.configure(tmp_path_factory.mktemp("comfyui-run"))
    install_checkpoint(comfy_stubs, tiny_checkpoint)
    write_reference_images(comfy_stubs.directories["input"])
    return Server(comfy_stubs, Executor(class_mappings(pack)), pack)


@pytest.fixture
def comfy(server):
    """The module's ComfyUI stubs with fresh call/progress records for this test (same folders)."""
    server.comfy.reset_records()
    yield server.comfy
    server.comfy.reset_records()


def shipped_prompt(server, name, *, size=SIZE, steps=STEPS):
    info = server.info()
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / name).read_text()), info)
    for node in prompt.values():
        if node["class_type"] == "GLMImageLoader":
            node["inputs"]["dtype"] = TEST_DTYPE
        if node["class_type"] == "GLMImageEncode":
            node["inputs"].update(width=size, height=size)
        if node["class_type"] == "GLMImageDiTDecode":
            node["inputs"]["steps"] = steps
    assert validate_prompt(prompt, info) == []
    return prompt


def ids_of(prompt, class_type):
    return sorted(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def check_images(images, count, size=SIZE):
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert tuple(images.shape) == (count, size, size, 3)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def saved_files(comfy, result, prompt):
    return [comfy.directories["output"] / entry["subfolder"] / entry["filename"]
            for node_id in ids_of(prompt, "SaveImage") for entry in result.ui[node_id]["images"]]


def press_cancel_when(comfy, condition):
    """A progress hook that presses ComfyUI's cancel button once `condition(value, total)` holds."""
    pressed = []

    def hook(value, total, preview):
        if not pressed and condition(value, total):
            pressed.append(value)
            comfy.modules["comfy.model_management"].interrupt_current_processing()

    comfy.progress_hook = hook
    return pressed


# --- the shipped workflows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["text_to_image.json", "image_edit.json", "multi_subject.json",
                                  "token_reuse.json"])
def test_shipped_workflow_executes(server, comfy, name):
    prompt = shipped_prompt(server, name)
    result = server.run(prompt)
    assert result.status == "success", result.error
    decodes = ids_of(prompt, "GLMImageDiTDecode")
    for node_id in decodes:
        check_images(result.outputs[node_id][0], count=1)
    files = saved_files(comfy, result, prompt)
    assert len(files) == len(decodes)
    assert all(PIL.Image.open(path).size == (SIZE, SIZE) for path in files)
    # Token preview: one block of cells per token of the 16x16 grid of a 512x512 image.
    preview = result.outputs[PREVIEW_TOKENS][0]
    assert preview.shape[0] == 1 and preview.shape[-1] == 3 and preview.shape[1] % (SIZE // 32) == 0
    assert comfy.violations == []


def test_token_reuse_runs_the_ar_stage_once_for_three_decodes(server, comfy):
    prompt = shipped_prompt(server, "token_reuse.json")
    decodes = ids_of(prompt, "GLMImageDiTDecode")
    for node_id in decodes:
        prompt[node_id]["inputs"]["seed"] += 1000  # new decodes; the AR may be cached from the shipped run
    result = server.run(prompt)
    assert result.status == "success", result.error
    assert len(decodes) == 3 and set(decodes) <= set(result.executed)
    assert result.executed.count(AR) + result.cached.count(AR) == 1
    assert len(comfy.called("ProgressBar")) == result.executed.count(AR) + 3  # one bar per stage run


def test_only_dit_changes_do_not_rerun_the_ar_stage(server):
    prompt = shipped_prompt(server, "text_to_image.json")
    first = server.run(prompt)
    assert first.status == "success"

    prompt[DIT]["inputs"].update(steps=1, guidance=2.5, seed=123)
    second = server.run(prompt)
    assert second.status == "success"
    assert AR in second.cached and AR not in second.executed and DIT in second.executed
    assert not torch.equal(first.outputs[DIT][0], second.outputs[DIT][0])

    unchanged = server.run(prompt)
    assert unchanged.executed == [] and {AR, DIT} <= set(unchanged.cached)

    prompt[ENCODE]["inputs"]["prompt"] = ""  # upstream of both stages: Encode runs again (and refuses it)
    third = server.run(prompt)
    assert third.executed == [] and third.error_node == ENCODE and LOADER in third.cached
    assert "prompt is empty" in str(third.error)


# --- interrupt, progress, memory ---------------------------------------------------------------------------

def test_interrupt_during_ar_stops_within_a_few_tokens(server, comfy):
    prompt = shipped_prompt(server, "text_to_image.json")
    prompt[AR]["inputs"]["seed"] = 31337  # not cached
    pressed = press_cancel_when(comfy, lambda value, total: value >= 20)
    result = server.run(prompt)
    assert result.status == "interrupted" and result.error_node == AR
    ar_total = comfy.progress_updates[0][1]
    last = max(value for value, total, _ in comfy.progress_updates if total == ar_total)
    assert pressed and last - pressed[0] <= 8 and last < ar_total, (pressed, last, ar_total)
    assert AR not in server.executor.cached_node_ids()  # an interrupted node is not cached
    assert comfy.interrupted is False  # the flag is consumed by the raise, as in ComfyUI


def test_interrupt_during_dit_stops_within_one_step(server, comfy):
    prompt = shipped_prompt(server, "text_to_image.json", steps=4)
    pressed = press_cancel_when(comfy, lambda value, total: total == 4 and value == 1)
    result = server.run(prompt)
    assert result.status == "interrupted" and result.error_node == DIT
    assert pressed == [1]
    assert [value for value, total, _ in comfy.progress_updates if total == 4] == [1]  # step 2 never finished
    assert DIT not in server.executor.cached_node_ids()


def test_progress_previews_batch_and_memory_etiquette(server, comfy, tiny_checkpoint, monkeypatch):
    cli_args = comfy.modules["comfy.cli_args"]
    monkeypatch.setattr(cli_args.args, "preview_method", cli_args.LatentPreviewMethod.Auto)  # --preview-method auto
    second_copy = models_dir(comfy) / "glm_image" / "GLM-Image-copy"
    second_copy.symlink_to(tiny_checkpoint, target_is_directory=True)
    prompt = shipped_prompt(server, "text_to_image.json", steps=3)
    prompt[LOADER]["inputs"]["model_folder"] = second_copy.name  # a model with no stage loaded yet
    prompt[AR]["inputs"].update(seed=77, batch_size=2)
    result = server.run(prompt)
    assert result.status == "success", result.error
    check_images(result.outputs[DIT][0], count=2)
    assert len(saved_files(comfy, result, prompt)) == 2

    # Progress: tokens up to the end on the AR bar, then one update per DiT step with a JPEG preview.
    ar_total = comfy.progress_updates[0][1]
    ar_values = [value for value, total, _ in comfy.progress_updates if total == ar_total]
    assert ar_total >= (SIZE // 32) ** 2 and ar_values[-1] == ar_total
    assert all(later >= earlier for earlier, later in zip(ar_values, ar_values[1:])) and len(ar_values) > 10
    dit = [(value, preview) for value, total, preview in comfy.progress_updates if total == 3]
    assert [value for value, _ in dit] == [1, 2, 3]
    for _, (kind, picture, max_size) in dit:
        assert kind == "JPEG" and isinstance(picture, PIL.Image.Image) and max_size == 512
    # The loops call ComfyUI's interrupt check themselves, not only through the progress hook.
    assert len(comfy.called("throw_exception_if_processing_interrupted")) >= 3 + ar_total // 16

    # Memory: ComfyUI is asked for room before each stage loads; the AR request covers the AR weights.
    requests = [args[0] for args in comfy.called("free_memory")]
    ar_bytes = sum(p.stat().st_size for p in (tiny_checkpoint / "vision_language_encoder").glob("*.safetensors"))
    assert len(requests) == 2 and requests[0] >= ar_bytes, requests
    names = [name for _, name, _ in comfy.calls]
    assert names.index("free_memory") < names.index("ProgressBar")  # room first, then the AR runs
    assert "soft_empty_cache" in names
    assert comfy.violations == []


def test_no_step_previews_when_comfyui_shows_none(server, comfy, monkeypatch):
    """ComfyUI's default `--preview-method none`: the decode reports every step without a preview and runs the VAE
    once per image, not once more per step (each preview decode also waits for the GPU)."""
    assert comfy.modules["comfy.cli_args"].args.preview_method.value == "none"  # ComfyUI's default
    vae_module = importlib.import_module(f"{server.pack.module_name}.glm_core.vae")  # the pack's own copy
    calls = []
    original = vae_module.GlmImageVAE.decode_latents

    def counted(vae, latents):
        calls.append(tuple(latents.shape))
        return original(vae, latents)

    monkeypatch.setattr(vae_module.GlmImageVAE, "decode_latents", counted)
    prompt = shipped_prompt(server, "text_to_image.json", steps=3)
    prompt[DIT]["inputs"]["seed"] += 500  # a new decode (not from ComfyUI's cache)
    result = server.run(prompt)
    assert result.status == "success", result.error
    dit = [(value, preview) for value, total, preview in comfy.progress_updates if total == 3]
    assert [value for value, _ in dit] == [1, 2, 3] and all(preview is None for _, preview in dit)
    assert len(calls) == 1 and calls[0][-2:] == (SIZE // 8, SIZE // 8), calls


# --- tokens on disk ----------------------------------------------------------------------------------------

def with_save_tokens(prompt, prefix):
    prompt = copy.deepcopy(prompt)
    prompt["90"] = {"class_type": "GLMImageSaveTokens", "inputs": {"tokens": [AR, 0], "filename_prefix": prefix}}
    return prompt


def with_loaded_tokens(prompt, tokens_file):
    """The same graph with AR Generate Tokens replaced by Load Tokens."""
    prompt = copy.deepcopy(prompt)
    prompt[AR] = {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": tokens_file}}
    return prompt


def test_saved_tokens_decode_like_the_originals(server):
    prompt = shipped_prompt(server, "text_to_image.json")
    first = server.run(with_save_tokens(prompt, "tok/roundtrip"))
    assert first.status == "success", first.error
    (listed,) = first.ui["90"]["text"]
    assert listed == "tok/roundtrip_00001_.glm_tokens.safetensors [output]"
    assert listed in server.info()["GLMImageLoadTokens"]["input"]["required"]["tokens_file"][0]

    reloaded = with_loaded_tokens(prompt, listed)
    assert validate_prompt(reloaded, server.info()) == []
    second = server.run(reloaded)
    assert second.status == "success", second.error
    assert DIT in second.executed and torch.equal(first.outputs[DIT][0], second.outputs[DIT][0])


def test_tokens_from_another_resolution_give_a_clear_error(server):
    prompt = shipped_prompt(server, "text_to_image.json")
    assert server.run(with_save_tokens(prompt, "tok/at512")).status == "success"
    bigger = with_loaded_tokens(prompt, "tok/at512_00001_.glm_tokens.safetensors [output]")
    bigger[ENCODE]["inputs"].update(width=SIZE + 64, height=SIZE + 64)
    result = server.run(bigger)
    assert result.status == "error" and result.error_node == DIT and isinstance(result.error, ValueError)
    assert "512x512" in str(result.error) and "576x576" in str(result.error)

    # The "server" keeps working after a node error.
    assert server.run(prompt).status == "success"


def test_load_tokens_accepts_a_file_saved_after_the_page_loaded(server):
    """The page's Load Tokens list is the /object_info it read when it opened; a file saved later is still
    accepted when queued (VALIDATE_INPUTS judges the name), and the next /object_info lists it."""
    page_info = server.info()
    prompt = shipped_prompt(server, "text_to_image.json")
    saved = server.run(with_save_tokens(prompt, "tok/after_page_load"))
    assert saved.status == "success", saved.error
    (name,) = saved.ui["90"]["text"]
    assert name not in page_info["GLMImageLoadTokens"]["input"]["required"]["tokens_file"][0]
    reloaded = with_loaded_tokens(prompt, name)
    assert validate_prompt(reloaded, page_info, server.executor.class_mappings) == []
    assert name in server.info()["GLMImageLoadTokens"]["input"]["required"]["tokens_file"][0]

    missing = with_loaded_tokens(prompt, "tok/never_saved.glm_tokens.safetensors [output]")
    (error,) = validate_prompt(missing, server.info(), server.executor.class_mappings)
    assert error["node_id"] == AR and error["type"] == "custom_validation_failed"
    assert error["details"].startswith("tokens_file - GLM-Image tokens file not found") and \
        "Save Tokens" in error["details"]


def test_load_tokens_rejects_foreign_missing_and_outside_files(server, comfy):
    prompt = shipped_prompt(server, "text_to_image.json")
    (comfy.directories["input"] / "junk.glm_tokens.safetensors").write_bytes(b"not a safetensors file")
    for name, expected in (("junk.glm_tokens.safetensors", "not a GLM-Image tokens file"),
                           ("gone.glm_tokens.safetensors", "not found"),
                           ("../../outside.glm_tokens.safetensors", "outside")):
        result = server.run(with_loaded_tokens(prompt, name))
        assert result.status == "error" and result.error_node == AR, name
        assert expected in str(result.error), str(result.error)


# --- user errors -------------------------------------------------------------------------------------------

def test_reference_count_changed_between_encode_and_decode(server):
    prompt = shipped_prompt(server, "image_edit.json")  # its AR result is cached from the shipped run
    prompt["99"] = copy.deepcopy(prompt[ENCODE])
    del prompt["99"]["inputs"]["image_1"]
    prompt[DIT]["inputs"]["cond"] = ["99", 0]  # tokens made with one reference, decoded with none
    result = server.run(prompt)
    assert result.status == "error" and result.error_node == DIT
    assert "1 reference" in str(result.error) and "0" in str(result.error)


@pytest.mark.parametrize("width", [1000, 500, 2080])
def test_bad_sizes_through_the_encode_node(server, width):
    prompt = shipped_prompt(server, "text_to_image.json")
    prompt[ENCODE]["inputs"]["width"] = width
    if width % 32 == 0:  # out of range: the server's validation rejects it before anything runs
        assert {e["type"] for e in validate_prompt(prompt, server.info())} & {"value_smaller_than_min",
                                                                               "value_bigger_than_max"}
    result = server.run(prompt)  # and the node refuses it too (API clients may skip validation)
    assert result.status == "error" and result.error_node == ENCODE
    assert isinstance(result.error, ValueError) and "32" in str(result.error)


def test_missing_model_folder(server):
    prompt = shipped_prompt(server, "text_to_image.json")
    prompt[LOADER]["inputs"]["model_folder"] = "GLM-Image-typo"
    assert [e["type"] for e in validate_prompt(prompt, server.info())] == ["value_not_in_list"]
    result = server.run(prompt)
    assert result.status == "error" and result.error_node == LOADER
    message = str(result.error)
    assert "GLM-Image-typo" in message and "models/glm_image" in message and "extra_model_paths.yaml" in message


def broken_model_folder(comfy) -> str:
    """A folder that passes the loader's listing (a GLM-Image model_index.json) but holds no components."""
    folder = Path(comfy.modules["folder_paths"].models_dir) / "glm_image" / "GLM-Image-incomplete"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "GlmImagePipeline"}))
    return folder.name


ERROR_CASES = {  # name -> (change to text_to_image, node that fails, type ComfyUI reports, words of the message)
    "model folder missing": (lambda prompt, comfy: prompt[LOADER]["inputs"].update(model_folder="GLM-Image-typo"),
                             LOADER, "ValueError", "GLM-Image-typo"),
    "checkpoint incomplete": (lambda prompt, comfy: prompt[LOADER]["inputs"].update(
        model_folder=broken_model_folder(comfy)), LOADER, "glm_core.CheckpointError", "component folder missing"),
    "tokens file missing": (lambda prompt, comfy: prompt.update(with_loaded_tokens(
        prompt, "tok/gone.glm_tokens.safetensors [output]")), AR, "ValueError", "tokens file not found"),
    "size not a multiple of 32": (lambda prompt, comfy: prompt[ENCODE]["inputs"].update(width=1000),
                                  ENCODE, "ValueError", "32"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_node_errors_report_a_short_type_and_the_next_prompt_runs(server, comfy, case):
    """What ComfyUI's error panel shows: the type as `execution_error` names it (module + class), never the
    pack's path-made module name; then the same "server" runs the next prompt."""
    change, node, reported_type, words = ERROR_CASES[case]
    prompt = shipped_prompt(server, "text_to_image.json")
    change(prompt, comfy)
    result = server.run(prompt)
    assert result.status == "error" and result.error_node == node, result.error
    assert result.exception_type == reported_type and words in str(result.error)
    assert reported_type not in str(result.error)  # the panel prints "type: message"; the type once

    after = server.run(shipped_prompt(server, "text_to_image.json"))
    assert after.status == "success", after.error


# --- ComfyUI's model management: our stages as loaded models it can evict ---------------------------------

STAGE_HOLDERS = {"ar": "GlmImageARStage", "glyph": "GlmImageGlyphStage", "dit": "GlmImageDiTStage",
                 "vae": "GlmImageVAEStage"}
DIT_STAGES = ("GlmImageGlyphStage", "GlmImageDiTStage", "GlmImageVAEStage")


def fresh_model_prompt(server, comfy, tiny_checkpoint, name):
    """text_to_image on a model folder of its own (a GlmImage with no stage loaded yet)."""
    folder = models_dir(comfy) / "glm_image" / name
    if not folder.exists():
        folder.symlink_to(tiny_checkpoint, target_is_directory=True)
    prompt = shipped_prompt(server, "text_to_image.json")
    prompt[LOADER]["inputs"]["model_folder"] = name
    return prompt


def without_dit(prompt):
    """Only the AR branch: Generate Tokens -> Preview Tokens -> PreviewImage."""
    prompt = copy.deepcopy(prompt)
    del prompt[DIT], prompt[SAVE]
    return prompt


def renamed(prompt, old, new):
    """The same graph with node `old` under id `new` (so the executor's cache does not answer it)."""
    prompt = copy.deepcopy(prompt)
    prompt[new] = prompt.pop(old)
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == old:
                node["inputs"][key] = [new, value[1]]
    return prompt


def ours(comfy, model):
    """The patchers of `model`'s stages on ComfyUI's loaded-model list, by stage."""
    found = {}
    for patcher in comfy.loaded_patchers():
        if type(patcher.model).__name__ in STAGE_HOLDERS.values():
            stage = patcher.model.stage_name
            if patcher.model.stage_module is model.stage_modules().get(stage):
                assert stage not in found, f"two patchers for the {stage} stage on the list"
                found[stage] = patcher
    return found


def weight_devices(module):
    return {p.device for p in module.parameters()} | {b.device for b in module.buffers()}


def test_dit_node_asks_comfyui_for_everything_when_the_device_is_still_short(server, comfy, tiny_checkpoint, pack,
                                                                            monkeypatch):
    """ComfyUI's dynamic-VRAM models give back less than its accounting promises (H200, 24 GB budget: 14.0 GB free
    after it had freed "enough" for 14.3 GB). When the device still falls short of the weights after the first
    request, ComfyUI is asked to unload everything it holds there, before any weight is read."""
    memory = importlib.import_module(pack.module_name + ".nodes.memory")
    headroom = importlib.import_module(pack.module_name + ".glm_core.pipeline").HEADROOM_BYTES
    prompt = fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-short")
    assert server.run(without_dit(prompt)).status == "success"
    asked = []

    def short_of_room(device, nbytes):
        asked.append(nbytes)
        return True  # whatever ComfyUI unloaded
    monkeypatch.setattr(memory, "falls_short", short_of_room)
    comfy.reset_records()
    result = server.run(prompt)  # only DiT Decode (and Save) run
    assert result.status == "success", result.error
    requests = [args[0] for _, name, args in comfy.calls if name == "free_memory"]
    assert len(requests) == 2 and requests[0] < memory.EVERYTHING and requests[1] == memory.EVERYTHING, requests
    assert asked == [requests[0] - headroom]  # the weights still to load
    names = [name for _, name, _ in comfy.calls]
    assert len(names) - names[::-1].index("free_memory") - 1 < names.index("load_models_gpu")


def test_ar_node_registers_the_ar_stage_with_model_management(server, comfy, tiny_checkpoint):
    prompt = without_dit(fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-ar"))
    result = server.run(prompt)
    assert result.status == "success", result.error
    model = result.outputs[LOADER][0]
    mm = comfy.modules["comfy.model_management"]

    loaded = ours(comfy, model)
    assert set(loaded) == {"ar"}
    patcher = loaded["ar"]
    assert patcher.model.stage_module is model.stage_modules()["ar"]  # the very module the pipeline runs
    assert patcher.load_device == model.device == mm.get_torch_device()
    assert patcher.offload_device == mm.unet_offload_device()
    assert patcher.loaded_size() == patcher.model_size() > 0
    assert comfy.called("load_models_gpu") == [(("GlmImageARStage",), True)]
    # ModelPatcher's bookkeeping lands on the holder, never on the stage module (read-only device property).
    assert not hasattr(model.stage_modules()["ar"], "model_loaded_weight_memory")
    # Order: room made, weights read, registered and loaded through ComfyUI, then the AR runs.
    names = [name for _, name, _ in comfy.calls]
    assert names.index("free_memory") < names.index("ModelPatcher") < names.index("load_models_gpu") \
        < names.index("ProgressBar")
    assert comfy.violations == []


def test_dit_node_loads_its_stages_through_model_management_without_the_ar(server, comfy, tiny_checkpoint, pack):
    headroom = importlib.import_module(pack.module_name + ".glm_core.pipeline").HEADROOM_BYTES
    prompt = fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-dit")
    assert server.run(without_dit(prompt)).status == "success"
    comfy.reset_records()
    result = server.run(prompt)  # the AR is cached; only DiT Decode (and Save) run
    assert result.status == "success", result.error
    assert AR in result.cached and DIT in result.executed
    model = result.outputs[LOADER][0]

    assert comfy.called("load_models_gpu") == [(DIT_STAGES, True)]  # the AR is not asked for
    # ComfyUI is asked for the room the new stages need, plus the core's headroom, before they are read (it
    # decides what leaves); once only, as the device then has the room.
    needed = sum(model.stage_nbytes(stage) for stage in ("glyph", "dit", "vae")) + headroom
    names = [(name, args[0] if args else None) for _, name, args in comfy.calls]
    assert [request for name, request in names if name == "free_memory"] == [needed]
    assert names.index(("free_memory", needed)) < names.index(("load_models_gpu", DIT_STAGES))
    loaded = ours(comfy, model)
    for stage in ("glyph", "dit", "vae"):
        assert loaded[stage].loaded_size() == loaded[stage].model_size()
        assert loaded[stage].model.stage_module is model.stage_modules()[stage]
        assert weight_devices(model.stage_modules()[stage]) == {model.device}
    assert comfy.violations == []
    # With its stages on the device, the node asks ComfyUI for no room (nothing of anyone's leaves for nothing).
    comfy.reset_records()
    with comfy.installed():
        importlib.import_module(pack.module_name + ".nodes.memory").make_room_for(model, "dit")
    assert [args[0] for _, name, args in comfy.calls if name == "free_memory"] == [0]


def test_sequential_placement_detaches_the_other_stage_through_its_patcher(server, comfy, tiny_checkpoint):
    """Placement "sequential" (ComfyUI's --lowvram / --novram, or the loader's option): before the DiT stages
    load, the AR leaves through its patcher, so ComfyUI's accounting says it is no longer loaded."""
    prompt = fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-seq")
    prompt[LOADER]["inputs"]["placement"] = "sequential"
    assert server.run(without_dit(prompt)).status == "success"
    comfy.reset_records()
    result = server.run(prompt)
    assert result.status == "success", result.error
    model = result.outputs[LOADER][0]
    assert model.placement == "sequential"
    names = [(name, args[0] if args else None) for _, name, args in comfy.calls]
    assert names.index(("detach", "GlmImageARStage")) < names.index(("load_models_gpu", DIT_STAGES))
    assert "ar" not in ours(comfy, model) or ours(comfy, model)["ar"].loaded_size() == 0
    assert comfy.violations == []


def test_eviction_by_another_node_and_the_next_run_brings_the_stages_back(server, comfy, tiny_checkpoint):
    prompt = fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-evict")
    before = server.run(prompt)
    assert before.status == "success", before.error
    model = before.outputs[LOADER][0]
    mm = comfy.modules["comfy.model_management"]
    offload = mm.unet_offload_device()
    assert set(ours(comfy, model)) >= {"glyph", "dit", "vae"}

    # Another node needs the whole GPU: ComfyUI unloads every model it knows, ours included.
    mm.unload_all_models()
    assert ours(comfy, model) == {}
    assert [args[0] for args in comfy.called("detach")] and \
        {args[0] for args in comfy.called("detach")} >= set(DIT_STAGES)
    for stage, module in model.stage_modules().items():
        assert weight_devices(module) == {offload}, stage

    # The next run (AR and DiT not cached: new node ids, same inputs) brings the stages back and gives the
    # same image as before the eviction.
    comfy.reset_records()
    again = server.run(renamed(renamed(prompt, AR, "40"), DIT, "70"))
    assert again.status == "success", again.error
    assert {"40", "70"} <= set(again.executed)
    assert comfy.called("load_models_gpu") == [(("GlmImageARStage",), True), (DIT_STAGES, True)]
    assert set(ours(comfy, model)) >= {"glyph", "dit", "vae"}
    for stage in ("glyph", "dit", "vae"):
        assert weight_devices(model.stage_modules()[stage]) == {model.device}
    assert torch.equal(before.outputs[DIT][0], again.outputs["70"][0])
    assert comfy.violations == []


def test_a_partial_eviction_unloads_a_stage_whole(server, comfy, tiny_checkpoint):
    """ComfyUI first tries to free only part of a model; our stages cannot run split between devices, so the
    patcher frees nothing partially and ComfyUI falls back to unloading the whole stage."""
    prompt = fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-partial")
    first = server.run(prompt)
    assert first.status == "success", first.error
    model = first.outputs[LOADER][0]
    dit = ours(comfy, model)["dit"]
    assert comfy.evict(dit, memory_to_free=1) is True  # one byte asked: the whole DiT goes
    assert comfy.called("partially_unload") == []  # the stub's partial unload never ran for our patcher
    assert dit.loaded_size() == 0 and "dit" not in ours(comfy, model)
    assert weight_devices(model.stage_modules()["dit"]) == {dit.offload_device}

    again = server.run(renamed(prompt, DIT, "71"))
    assert again.status == "success", again.error
    assert ours(comfy, model)["dit"] is dit and dit.loaded_size() == dit.model_size()
    assert torch.equal(first.outputs[DIT][0], again.outputs["71"][0])


def test_a_stage_reloaded_from_disk_gets_a_new_patcher(server, comfy, tiny_checkpoint):
    prompt = without_dit(fresh_model_prompt(server, comfy, tiny_checkpoint, "GLM-Image-managed-reload"))
    first = server.run(prompt)
    model = first.outputs[LOADER][0]
    old = weakref.ref(ours(comfy, model)["ar"])
    model.unload("ar")  # e.g. a future "free memory" node; the old weights must not stay alive in a patcher
    again = server.run(renamed(prompt, AR, "41"))
    assert again.status == "success", again.error
    gc.collect()
    assert old() is None  # the old patcher (and with it the old holder and weights) is gone
    new = ours(comfy, model)["ar"]
    assert new.model.stage_module is model.stage_modules()["ar"]
    assert torch.equal(first.outputs[AR][0].grid_ids, again.outputs["41"][0].grid_ids)


class _NoComfyUI:
    """A meta-path finder that makes `import comfy...` / `import folder_paths` fail, as outside ComfyUI."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("comfy", "folder_paths"):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def test_without_comfyui_the_nodes_keep_the_cores_own_offloading(server, pack, tiny_checkpoint):
    import importlib
    import sys

    memory = importlib.import_module(pack.module_name + ".nodes.memory")
    patchers = importlib.import_module(pack.module_name + ".nodes.model_patcher")
    pipeline = importlib.import_module(pack.module_name + ".glm_core.pipeline")
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name.split(".")[0] in ("comfy", "folder_paths")}
    blocker = _NoComfyUI()
    sys.meta_path.insert(0, blocker)
    try:
        assert not patchers.available()
        model = pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)
        memory.make_room_for(model, "ar")
        assert model.stage_modules() == {}  # stages still load lazily, when the pipeline first uses them
        model.stage("ar")
        memory.make_room_for(model, "dit")  # outside ComfyUI the core itself makes room when stages load
        assert patchers.registered_stages(model) == {}
        assert set(model.stage_modules()) == {"ar"}
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(saved)
