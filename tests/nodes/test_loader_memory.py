"""Load GLM-Image's weights choice inside ComfyUI: "auto" counts the memory ComfyUI could make free (its free
memory plus the models it would unload), not only what is free while another model sits on the card."""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.nodes.comfy_files import models_dir
from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER

GB = 10**9
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


class LoadedEntry:
    """What ComfyUI's current_loaded_models holds: a LoadedModel with its device and loaded size."""

    def __init__(self, device, loaded_bytes, alive=True):
        self.device, self._loaded, self.model = device, loaded_bytes, object() if alive else None

    def model_loaded_memory(self):
        if self.model is None:
            raise AttributeError("the patcher is gone")
        return self._loaded


def _services(pack):
    return sys.modules[f"{pack.module_name}.nodes.comfy_services"]


@pytest.fixture
def comfy_with_another_model(pack, monkeypatch):
    """ComfyUI's model management as seen on a 24 GB card holding an 8 GB model of its own."""
    management = SimpleNamespace(
        current_loaded_models=[LoadedEntry(CUDA0, 8 * GB), LoadedEntry(CUDA1, 5 * GB), LoadedEntry(CUDA0, 3 * GB,
                                                                                                 alive=False)],
        get_free_memory=lambda device: 15 * GB,
        extra_reserved_memory=lambda: GB // 2)
    monkeypatch.setattr(_services(pack), "_model_management", lambda: management)
    return management


def test_memory_within_reach_adds_what_comfyui_would_unload_on_this_device(pack, comfy_with_another_model):
    services = _services(pack)
    # 15 free + the 8 GB model on cuda:0 - the 0.5 reserve; cuda:1's model and a dead entry count for nothing
    assert services.gpu_memory_within_reach(CUDA0) == 15 * GB + 8 * GB - GB // 2
    assert services.gpu_memory_within_reach(torch.device("cpu")) is None
    assert services.gpu_memory_within_reach(None) is None


def test_memory_within_reach_is_none_outside_comfyui(pack, monkeypatch):
    services = _services(pack)
    monkeypatch.setattr(services, "_model_management", lambda: None)
    assert services.gpu_memory_within_reach(CUDA0) is None


def test_loader_passes_the_memory_within_reach_to_the_weights_choice(pack, comfy, fake_model_folder,
                                                                    comfy_with_another_model, monkeypatch):
    services = _services(pack)
    pipeline = importlib.import_module(f"{pack.module_name}.glm_core.pipeline")
    calls = []

    class Opened:
        weights = "bf16"

        def check(self):
            calls.append("check")

    def from_folder(folder, **options):
        calls.append(options)
        return Opened()

    monkeypatch.setattr(services, "torch_device", lambda: CUDA0)
    monkeypatch.setattr(pipeline.GlmImage, "from_folder", from_folder)
    pack.node_class_mappings["GLMImageLoader"]().load(DEFAULT_MODEL_FOLDER, "bf16")
    assert calls[0]["gpu_memory"] == 15 * GB + 8 * GB - GB // 2 and calls[0]["device"] == CUDA0
    assert calls[0]["weights"] == "auto" and calls[1] == "check"


@pytest.fixture
def own_checkpoint(comfy, tiny_checkpoint):
    """A copy of the tiny checkpoint as models/glm_image/GLM-Image, free to touch and to break."""
    folder = models_dir(comfy) / "glm_image" / DEFAULT_MODEL_FOLDER
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def test_an_unchanged_folder_is_checked_once_per_process(pack, comfy, own_checkpoint, monkeypatch):
    """ComfyUI 0.33 re-runs the loader whenever its cache dropped the loader's output; the whole-folder check
    (seconds at the real size) runs again only when a file changed."""
    pipeline = importlib.import_module(f"{pack.module_name}.glm_core.pipeline")
    checks = []
    real_check = pipeline.GlmImage.check
    monkeypatch.setattr(pipeline.GlmImage, "check", lambda model, *a, **k: (checks.append(1), real_check(model))[1])
    loader = pack.node_class_mappings["GLMImageLoader"]()
    loader.load(DEFAULT_MODEL_FOLDER, "fp32")
    loader.load(DEFAULT_MODEL_FOLDER, "fp32")
    assert len(checks) == 1
    shard = next(own_checkpoint.rglob("*.safetensors"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a re-download
    loader.load(DEFAULT_MODEL_FOLDER, "fp32")
    assert len(checks) == 2
    loader.load(DEFAULT_MODEL_FOLDER, "bf16")  # other options build other stages: checked again
    assert len(checks) == 3


def test_a_failed_check_is_not_remembered(pack, comfy, own_checkpoint):
    loader = pack.node_class_mappings["GLMImageLoader"]()
    shard = next(own_checkpoint.glob("transformer/*.safetensors"))
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated: the folder opens, the check fails
    with pytest.raises(Exception, match="truncated or corrupt"):
        loader.load(DEFAULT_MODEL_FOLDER, "fp32")
    shard.write_bytes(good)
    loader.load(DEFAULT_MODEL_FOLDER, "fp32")  # checked and fine now
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(Exception, match="truncated or corrupt"):  # the file changed again: checked again
        loader.load(DEFAULT_MODEL_FOLDER, "fp32")
