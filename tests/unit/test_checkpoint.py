"""glm_core.checkpoint: folder checks, strict sharded loading, meta-device assign, dtypes, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from glm_core.checkpoint import (
    CheckpointError,
    CheckpointFolder,
    is_glm_image_folder,
    load_weights,
    open_checkpoint,
    weight_map,
)

COMPONENTS = ["vision_language_encoder", "transformer", "vae", "text_encoder", "processor",
              "tokenizer", "scheduler"]


class Tiny(nn.Module):
    """Linear + embedding + int buffer + computed (non-persistent) buffer, like the real models."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.embed = nn.Embedding(5, 4)
        self.register_buffer("step_ids", torch.zeros(3, dtype=torch.long))
        self.register_buffer("inv_freq", torch.empty(2), persistent=False)

    def init_computed_buffers(self, device):
        self.inv_freq = torch.arange(2, dtype=torch.float32, device=device) + 1.0


class TiedTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.shared.weight


def tiny_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "proj.weight": torch.randn(3, 4, generator=g, dtype=torch.float32).to(torch.bfloat16),
        "proj.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "embed.weight": torch.randn(5, 4, generator=g).to(torch.bfloat16),
        "step_ids": torch.tensor([7, 8, 9], dtype=torch.long),
    }


def write_single(folder: Path, state, name="model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / name))
    (folder / "config.json").write_text("{}")
    return folder


def write_sharded(folder: Path, state, n_shards=2, index_name="model.safetensors.index.json"):
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    mapping = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        mapping.update({k: name for k in part})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": mapping}))
    (folder / "config.json").write_text("{}")
    return folder


def make_meta(cls=Tiny):
    with torch.device("meta"):
        return cls()


def write_glm_folder(root: Path, class_name="GlmImagePipeline"):
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": class_name, "_diffusers_version": "0.37.0.dev0"}
    for c in COMPONENTS:
        index[c] = ["transformers", "X"]
        (root / c).mkdir()
        (root / c / "config.json").write_text(json.dumps({"component": c}))
    (root / "model_index.json").write_text(json.dumps(index))
    return root


# ---------------------------------------------------------------------------- folder


def test_open_checkpoint_reads_configs(tmp_path):
    root = write_glm_folder(tmp_path / "glm")
    ckpt = open_checkpoint(root)
    assert isinstance(ckpt, CheckpointFolder)
    assert ckpt.root == root.resolve()
    assert ckpt.component_dir("transformer") == root.resolve() / "transformer"
    assert ckpt.read_config("vae") == {"component": "vae"}
    assert is_glm_image_folder(root)


def test_wrong_pipeline_class_names_found_and_expected(tmp_path):
    root = write_glm_folder(tmp_path / "flux", class_name="FluxPipeline")
    with pytest.raises(CheckpointError, match=r"FluxPipeline.*GlmImagePipeline"):
        open_checkpoint(root)
    assert not is_glm_image_folder(root)


def test_not_a_folder_and_missing_index(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="must be a folder"):
        open_checkpoint(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="model_index.json not found"):
        open_checkpoint(empty)
    for p in (tmp_path / "nope", f, empty):
        assert is_glm_image_folder(p) is False
    assert is_glm_image_folder(12345) is False  # never raises, whatever it gets


def test_component_subfolder_gets_a_hint(tmp_path):
    root = write_glm_folder(tmp_path / "glm")
    with pytest.raises(CheckpointError, match="parent"):
        open_checkpoint(root / "transformer")


def test_bad_model_index_json(tmp_path):
    root = tmp_path / "glm"
    root.mkdir()
    (root / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse JSON.*model_index.json"):
        open_checkpoint(root)


def test_missing_component_folder_and_config(tmp_path):
    root = write_glm_folder(tmp_path / "glm")
    ckpt = open_checkpoint(root)
    (root / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"vae.*config.json"):
        ckpt.read_config("vae")
    (root / "vae").rmdir()
    with pytest.raises(CheckpointError, match=r"component folder missing: .*vae"):
        ckpt.component_dir("vae")
    with pytest.raises(CheckpointError, match="component folder missing"):
        ckpt.read_config("vae")


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["single", "single_diffusers", "sharded"])
def test_meta_load_assigns_values_and_dtype(tmp_path, layout):
    state = tiny_state()
    if layout == "single":
        folder = write_single(tmp_path / "c", state)
    elif layout == "single_diffusers":
        folder = write_single(tmp_path / "c", state, name="diffusion_pytorch_model.safetensors")
    else:
        folder = write_sharded(tmp_path / "c", state, n_shards=3)
    module = make_meta()
    load_weights(module, folder, device="cpu", dtype=torch.float32)
    for key, ref in state.items():
        got = module.state_dict()[key]
        assert got.device.type == "cpu"
        if ref.is_floating_point():
            assert got.dtype == torch.float32
            assert torch.equal(got, ref.float())
        else:
            assert got.dtype == torch.long  # integer buffers keep their dtype
            assert torch.equal(got, ref)
    assert isinstance(module.proj.weight, nn.Parameter)
    # Computed non-persistent buffer rebuilt by the module's hook, not read from the file.
    assert torch.equal(module.inv_freq, torch.tensor([1.0, 2.0]))
    assert not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    out = module.proj(torch.ones(1, 4))
    assert out.shape == (1, 3)


def test_dtype_keep_fp32_and_none(tmp_path):
    folder = write_single(tmp_path / "c", tiny_state())
    module = make_meta()
    load_weights(module, folder, device="cpu", dtype=torch.float16,
                 keep_fp32=lambda k: k.startswith("proj."))
    assert module.proj.weight.dtype == torch.float32
    assert module.proj.bias.dtype == torch.float32
    assert module.embed.weight.dtype == torch.float16
    assert module.step_ids.dtype == torch.long
    module = make_meta()
    load_weights(module, folder, device="cpu", dtype=None)
    assert module.embed.weight.dtype == torch.bfloat16  # stored dtype kept


def test_loads_into_a_real_module_too(tmp_path):
    folder = write_single(tmp_path / "c", tiny_state())
    module = Tiny()  # built on CPU, not meta
    load_weights(module, folder, device="cpu", dtype=torch.bfloat16)
    assert torch.equal(module.embed.weight, tiny_state()["embed.weight"])


def test_tied_weights_stay_tied_and_accept_either_name(tmp_path):
    w = torch.randn(5, 4)
    for key in ("shared.weight", "head.weight"):
        folder = write_single(tmp_path / key, {key: w})
        module = make_meta(TiedTiny)
        load_weights(module, folder, device="cpu", dtype=torch.float32)
        assert module.head.weight is module.shared.weight
        assert torch.equal(module.shared.weight, w)
    folder = write_single(tmp_path / "both", {"shared.weight": w, "head.weight": w.clone()})
    module = make_meta(TiedTiny)
    load_weights(module, folder, device="cpu", dtype=torch.float32)
    assert module.head.weight is module.shared.weight


def test_missing_key(tmp_path):
    state = tiny_state()
    del state["proj.bias"]
    folder = write_single(tmp_path / "c", state)
    with pytest.raises(CheckpointError, match=r"missing key.*'proj\.bias'"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)


def test_unexpected_key_and_ignore_keys(tmp_path):
    state = tiny_state()
    state["extra.weight"] = torch.zeros(2)
    folder = write_sharded(tmp_path / "c", state, n_shards=2)
    with pytest.raises(CheckpointError, match=r"unexpected key.*'extra\.weight'.*safetensors"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)
    module = make_meta()
    load_weights(module, folder, device="cpu", dtype=torch.float32,
                 ignore_keys=lambda k: k.startswith("extra."))
    assert "extra.weight" not in module.state_dict()


def test_shape_mismatch_names_file_key_and_shapes(tmp_path):
    state = tiny_state()
    state["proj.weight"] = torch.zeros(3, 5)
    folder = write_single(tmp_path / "c", state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'proj\.weight'.*\[3, 5\].*\[3, 4\]"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)


def test_shard_missing_on_disk(tmp_path):
    folder = write_sharded(tmp_path / "c", tiny_state(), n_shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing on disk"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)


def test_key_in_index_but_not_in_shard(tmp_path):
    folder = write_sharded(tmp_path / "c", tiny_state(), n_shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["proj.bias"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"listed in the shard index but is not in this shard"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)


def test_bad_index_json(tmp_path):
    folder = write_sharded(tmp_path / "c", tiny_state())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_file(tmp_path, damage):
    folder = write_sharded(tmp_path / "c", tiny_state(), n_shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 7] if damage == "truncate" else b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors.*truncated or corrupt"):
        load_weights(make_meta(), folder, device="cpu", dtype=torch.float32)


def test_no_weights_or_two_layouts(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        weight_map(folder)
    save_file(tiny_state(), str(folder / "model.safetensors"))
    save_file(tiny_state(), str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="expected one weight file"):
        weight_map(folder)
    with pytest.raises(CheckpointError, match="component folder not found"):
        weight_map(tmp_path / "missing")


def test_failed_load_leaves_module_untouched(tmp_path):
    state = tiny_state()
    state["proj.weight"] = torch.zeros(9, 9)
    folder = write_single(tmp_path / "c", state)
    module = make_meta()
    with pytest.raises(CheckpointError):
        load_weights(module, folder, device="cpu", dtype=torch.float32)
    assert all(p.is_meta for p in module.parameters())


def test_meta_computed_buffer_without_hook_is_an_error(tmp_path):
    class NoHook(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)
            self.register_buffer("table", torch.empty(2), persistent=False)

    folder = write_single(tmp_path / "c", {k: v for k, v in tiny_state().items() if k.startswith("proj.")})
    with pytest.raises(RuntimeError, match=r"table.*init_computed_buffers"):
        load_weights(make_meta(NoHook), folder, device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------- tiny fixture


def test_tiny_fixture_opens_and_reads_all_configs(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    assert is_glm_image_folder(tiny_checkpoint)
    assert set(COMPONENTS) <= set(ckpt.component_names)
    for name in ("vision_language_encoder", "transformer", "vae", "text_encoder"):
        assert isinstance(ckpt.read_config(name), dict)
        assert weight_map(ckpt.component_dir(name))  # weights are found
    assert ckpt.read_config("scheduler", "scheduler_config.json")
    assert ckpt.read_config("processor", "preprocessor_config.json")
    assert ckpt.read_config("processor", "tokenizer_config.json")
    assert ckpt.read_config("vision_language_encoder")["text_config"]["vision_vocab_size"] > 0
