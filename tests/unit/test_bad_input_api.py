"""glm_core.pipeline given bad input (issue 11): the error class, the key words of its message, and that nothing ran
or loaded first (no stage's weights in memory, the AR's progress callback never called).

Complements tests/unit/test_pipeline_inputs.py (one stage at a time); here the whole-path call `generate`, the
loader's errors (out of memory, a device that is not there), and the messages' audience.
"""
from __future__ import annotations

import logging
import threading

import PIL.Image
import pytest
import torch

from glm_core import pipeline
from glm_core.checkpoint import CheckpointError
from glm_core.memory import NotEnoughGpuMemory
from glm_core.tensor_reader import TensorReader
from glm_core.tokens import PriorTokens
from tests.fixtures.damaged_checkpoint import damaged_copy

pytestmark = pytest.mark.usefixtures("one_thread")
CODEBOOK = 16384
COMFYUI_WORDS = ("node", "Encode", "DiT Decode", "Load Tokens", "ComfyUI")


@pytest.fixture
def fresh_model(tiny_checkpoint):
    """A GlmImage with no stage loaded (opening it reads only configs and the tokenizer)."""
    return pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)


class Calls(list):
    def __call__(self, done, total):
        self.append((done, total))


def random_tokens(height=512, width=512, batch=1, reference_sizes=(), seed=0) -> PriorTokens:
    ids = torch.randint(0, CODEBOOK, (batch, height // 32, width // 32), generator=torch.Generator().manual_seed(seed))
    return PriorTokens(grid_ids=ids, height=height, width=width, reference_sizes=list(reference_sizes),
                       seeds=[seed + i for i in range(batch)])


# -- the request, through the whole path -----------------------------------------------------------------

def test_generate_names_both_bad_sides(fresh_model):
    """Issue 11 §5 (and §1: 0 is an error, not "the default")."""
    ar_progress = Calls()
    with pytest.raises(ValueError) as info:
        pipeline.generate(fresh_model, "a cat", 0, 100, steps=1, ar_progress=ar_progress)
    message = str(info.value)
    assert "width 0 is below the minimum 512" in message and "height 100" in message, message
    assert ar_progress == [] and fresh_model.stage_modules() == {}


def test_generate_names_bad_steps_and_guidance_before_the_ar(fresh_model):
    """Issue 11 §3: steps and guidance were first looked at after the AR stage."""
    ar_progress = Calls()
    with pytest.raises(ValueError) as info:
        pipeline.generate(fresh_model, "a cat", 512, 512, steps=0, guidance=0.5, ar_progress=ar_progress)
    assert "steps must be an integer >= 1, got 0" in str(info.value)
    assert "guidance must be >= 1.0" in str(info.value) and "0.5" in str(info.value)
    assert ar_progress == [] and fresh_model.stage_modules() == {}


def test_generate_tokens_refuses_bad_sampling_before_loading(fresh_model):
    cond = pipeline.encode_prompt(fresh_model, "a cat", 512, 512)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\].*top_k must be an integer >= 0"):
        pipeline.generate_tokens(fresh_model, cond, seed=0, top_p=0.0, top_k=-1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        pipeline.generate_tokens(fresh_model, cond, seed=0, batch_size=0)
    assert fresh_model.stage_modules() == {}


@pytest.mark.parametrize("damage", ["missing_dit_shard", "dit_shape_mismatch", "bad_dit_index", "broken_vae_config"])
def test_generate_finds_a_damaged_checkpoint_before_the_ar(tiny_checkpoint, tmp_path, damage):
    """Issue 11 §3 through the API: `generate` checks every file of every stage it will run first."""
    folder, what = damaged_copy(tiny_checkpoint, tmp_path / "GLM-Image", damage)
    ar_progress, opened = Calls(), []
    with pytest.raises(CheckpointError) as info:  # opening the folder may find it already (the DiT's index is read)
        opened.append(pipeline.GlmImage.from_folder(folder, device="cpu", dtype=torch.float32))
        pipeline.generate(opened[0], "a cat", 512, 512, steps=1, guidance=1.0, ar_progress=ar_progress)
    assert what in str(info.value)
    assert ar_progress == [], "the AR ran before the damaged files were found"
    assert all(model.stage_modules() == {} for model in opened)


def test_unknown_placement_and_weights(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"placement must be one of \('auto', 'gpu', 'sequential'\), got 'fast'"):
        pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", placement="fast")
    with pytest.raises(ValueError, match="weights must be 'auto', 'bf16' or 'fp8', got 'int4'"):
        pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", weights="int4")


# -- load errors that are not corruption (issue 11 §4) -----------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (this one has a GPU)")
def test_cuda_without_cuda_is_a_device_error(tiny_checkpoint):
    with pytest.raises(ValueError) as info:
        pipeline.GlmImage.from_folder(tiny_checkpoint, device="cuda")
    message = str(info.value)
    assert "no CUDA GPU" in message and "use device 'cpu'" in message
    assert "corrupt" not in message and "re-download" not in message


def test_out_of_memory_while_loading(tiny_checkpoint, monkeypatch):
    """A CUDA out-of-memory error in the middle of reading the DiT's weights (simulated: reading a tensor onto the
    device raises what PyTorch raises) becomes NotEnoughGpuMemory with the memory needed, the memory free and
    what to change; the model stays usable, and the next call gives what a fresh model gives."""
    model = pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)
    cond = pipeline.encode_prompt(model, "a cat", 512, 512)
    tokens = random_tokens()
    real_read = TensorReader.read
    moves = []
    lock = threading.Lock()

    def read_out_of_memory(reader, path, key, *args, **kwargs):
        with lock:  # reads run on a thread pool
            moves.append(key)
            third = len(moves) == 3
        if third:  # a few tensors in: a half-loaded stage must not stay behind
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 23.57 GiB of which 1.10 GiB is free.")
        return real_read(reader, path, key, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(TensorReader, "read", read_out_of_memory)
        patch.setattr("glm_core.memory.gpu_memory", lambda device: (int(1.1e9), int(23.6e9)))
        with pytest.raises(NotEnoughGpuMemory) as info:
            pipeline.decode(model, cond, tokens, steps=1, guidance=1.0)
    message = str(info.value)
    assert isinstance(info.value, torch.OutOfMemoryError)  # hosts that treat OOMs specially still see one
    assert "not enough GPU memory for loading" in message
    assert "it needs about" in message and "GB" in message.split("it needs about", 1)[1][:12], message
    assert "1.1 GB free of 23.6 GB" in message
    assert "weights='fp8'" in message and "placement='sequential'" in message and "smaller image size" in message
    assert "corrupt" not in message and "re-download" not in message
    assert len(moves) >= 3

    again = pipeline.decode(model, cond, tokens, steps=1, guidance=1.0, seed=5)
    fresh = pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)
    assert torch.equal(again, pipeline.decode(fresh, cond, tokens, steps=1, guidance=1.0, seed=5))


# -- references, tokens, files ------------------------------------------------------------------------------

def test_tiny_reference_is_upscaled_with_a_warning(fresh_model, caplog):
    """Issue 11 §6: an 8x8 reference becomes 512x512; the "glm_core" logger says so. A reference within 4x of
    the minimum is resized without a word."""
    with caplog.at_level(logging.WARNING, logger="glm_core"):
        cond = pipeline.encode_prompt(fresh_model, "make it blue", 512, 512, [PIL.Image.new("RGB", (8, 8), "red")])
    assert cond.reference_sizes == [(512, 512)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "glm_core"]
    assert len(warnings) == 1 and "reference image 8x8 is upscaled to 512x512" in warnings[0], warnings
    assert "more than 4x per side" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glm_core"):
        pipeline.encode_prompt(fresh_model, "make it blue", 512, 512, [PIL.Image.new("RGB", (200, 160), "red")])
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_tokens_of_another_size_message_names_no_comfyui_node(fresh_model):
    """Issue 11 §8: the core's messages fit any caller."""
    cond = pipeline.encode_prompt(fresh_model, "a cat", 512, 512)
    for tokens, words in ((random_tokens(576, 512), ["generated for 512x576", "asks for 512x512"]),
                          (random_tokens(reference_sizes=[(512, 512)]), ["1 reference image(s)", "has 0"])):
        with pytest.raises(ValueError) as info:
            pipeline.decode(fresh_model, cond, tokens, steps=1)
        for word in words:
            assert word in str(info.value), str(info.value)
        for comfy_word in COMFYUI_WORDS:
            assert comfy_word not in str(info.value), str(info.value)
    assert fresh_model.stage_modules() == {}


def test_save_tokens_to_a_folder(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    (folder / "earlier.safetensors").write_bytes(b"kept")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        pipeline.save_tokens(random_tokens(), folder)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["earlier.safetensors", "tokens"]
    assert (folder / "earlier.safetensors").read_bytes() == b"kept"

