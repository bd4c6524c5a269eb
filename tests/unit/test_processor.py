"""glm_core.processor on its own: target and reference sizes, token ids from the files, and every bad-input path."""

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from glm_core.checkpoint import CheckpointError
from glm_core.processor import (
    PromptProcessor,
    adjust_reference_size,
    get_target_shape,
    reference_size,
    smart_resize,
    to_rgb_image,
    validate_target_size,
)
from tests.inputs import copy_processor, noise_image, our_processor_inputs


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("height,width,grids", [
    (512, 512, (16, 16, 16, 16)), (1024, 1024, (32, 32, 16, 16)), (1152, 768, (36, 24, 19, 13)),
    (1568, 1056, (49, 33, 19, 13)), (1472, 1088, (46, 34, 18, 13)), (1728, 960, (54, 30, 21, 11)),
    (2048, 2048, (64, 64, 16, 16)),
])
def test_target_shape_table(height, width, grids):
    """spec §1.3 table."""
    assert get_target_shape(height, width) == grids


def test_small_and_large_references_are_adjusted(prompt_processor):
    got = our_processor_inputs(prompt_processor, ["x"], 512, 512, [[noise_image(64, 96), noise_image(3000, 2000)]])
    assert got.reference_grids == [(16, 24), (64, 43)]  # 512x768 and 2048x1376 pixels (1365.3 rounded)


@pytest.mark.parametrize("size", [(600, 600), (64, 64), (100, 400), (4000, 1000), (512, 2048), (1023, 767),
                                  (2500, 2500), (513, 2047), (720, 1280), (1080, 1920), (3024, 4032)])
def test_reference_size_is_valid_and_keeps_aspect(size):
    height, width = size
    new_h, new_w = reference_size(height, width)
    assert new_h % 32 == 0 and new_w % 32 == 0
    assert min(new_h, new_w) >= 512 and max(new_h, new_w) <= 2048
    assert max(new_h, new_w) / min(new_h, new_w) <= 4
    # aspect within what rounding each side to 32 allows
    assert abs(math.log((new_h / new_w) / (height / width))) < 0.08
    # the AR grid (reference smart_resize, halving) and the DiT grid (pixels / 16) agree (spec §4)
    half_h, half_w = smart_resize(new_h, new_w)
    assert (2 * half_h // 16, 2 * half_w // 16) == (new_h // 16, new_w // 16)


def test_valid_reference_is_unchanged():
    image = noise_image(544, 1024, seed=10)
    out = adjust_reference_size(image)
    assert out.size == image.size and np.array_equal(np.asarray(out), np.asarray(image))



# ---------------------------------------------------------------------------- ids from the files


def test_ids_come_from_the_files(prompt_processor, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "vision_language_encoder" / "config.json").read_text())
    assert prompt_processor.image_token_id == config["image_token_id"]
    assert prompt_processor.bos_token_id == config["image_start_token_id"]
    assert prompt_processor.eos_token_id == config["image_end_token_id"]
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "processor" / "tokenizer.json"))
    assert prompt_processor.grid_bos_token_id == tokenizer.token_to_id("<sop>")
    assert prompt_processor.pad_token_id == tokenizer.token_to_id("<|dit_token_16385|>")



# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("height,width,pattern", [
    (1000, 1024, r"height 1000 is not a multiple of 32.*992 or 1024"),
    (1024, 500, r"width 500 is not a multiple of 32 and is below the minimum 512.*width: 512"),
    (256, 1024, r"height 256 is below the minimum 512.*height: 512"),
    (1024, 4096, r"width 4096 is above the maximum 2048.*width: 2048"),
    (2080, 1024, r"height 2080 is above the maximum 2048.*2048"),
])
def test_validate_target_size_errors(height, width, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_target_size(height, width)


def test_validate_target_size_ok_and_types():
    for height, width in [(512, 512), (2048, 2048), (1568, 1056), (np.int64(1024), 768)]:
        validate_target_size(height, width)
    validate_target_size(64, 64, min_side=32)  # tiny test models
    for bad in (1024.0, "1024", None, True):
        with pytest.raises(TypeError, match="integer"):
            validate_target_size(bad, 1024)


def test_build_inputs_rejects_bad_prompts_and_sizes(prompt_processor):
    with pytest.raises(ValueError, match="empty"):
        our_processor_inputs(prompt_processor, [""], 512, 512)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        our_processor_inputs(prompt_processor, ["ok", "  \n\t"], 512, 512)
    with pytest.raises(ValueError, match="no prompt"):
        our_processor_inputs(prompt_processor, [], 512, 512)
    with pytest.raises(TypeError, match="string"):
        our_processor_inputs(prompt_processor, [None], 512, 512)
    with pytest.raises(ValueError, match="control token"):
        our_processor_inputs(prompt_processor, [f"a {prompt_processor.image_token} cat"], 512, 512)
    with pytest.raises(ValueError, match="multiple of 32"):
        our_processor_inputs(prompt_processor, ["a cat"], 500, 512)
    assert our_processor_inputs(prompt_processor, "a cat", 64, 64, min_side=32).target_grid == (2, 2)


def test_build_inputs_rejects_bad_reference_batches(prompt_processor):
    image = noise_image(512, 512)
    with pytest.raises(ValueError, match=r"same number of reference images, got \[1, 2\]"):
        our_processor_inputs(prompt_processor, ["a", "b"], 512, 512, [[image], [image, image]])
    with pytest.raises(ValueError, match=r"same number of reference images, got \[1, 0\]"):
        our_processor_inputs(prompt_processor, ["a", "b"], 512, 512, [[image], []])
    with pytest.raises(ValueError, match="1 reference lists for 2 prompts"):
        our_processor_inputs(prompt_processor, ["a", "b"], 512, 512, [[image]])


def test_aspect_ratio_above_4_is_rejected(prompt_processor):
    with pytest.raises(ValueError, match=r"aspect ratio 4\.500.*limit 4"):
        adjust_reference_size(noise_image(512, 2304))
    with pytest.raises(ValueError, match="aspect ratio"):
        our_processor_inputs(prompt_processor, ["x"], 512, 512, [[noise_image(2400, 512)]])
    adjust_reference_size(noise_image(512, 2048))  # exactly 4 is allowed


def test_bad_image_types(prompt_processor):
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb_image("cat.png")
    with pytest.raises(TypeError, match="PIL image"):
        our_processor_inputs(prompt_processor, ["x"], 512, 512, [[[1, 2, 3]]])
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_image(np.zeros((512, 512, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="channels last"):
        to_rgb_image(np.zeros((3, 512, 512), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_image(torch.full((64, 64, 3), 255.0))
    with pytest.raises(ValueError, match="float"):
        to_rgb_image(torch.zeros((64, 64, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels last"):
        to_rgb_image(torch.zeros((3, 64, 64)))
    with pytest.raises(ValueError, match="channels last"):
        to_rgb_image(torch.zeros((2, 64, 64, 3)))  # a batch of two is two references, not one


def test_from_folder_errors(tiny_checkpoint, tmp_path):
    folder = copy_processor(tiny_checkpoint, tmp_path)
    processor_dir = folder / "processor"
    PromptProcessor.from_folder(processor_dir)  # the processor folder itself also works

    config_path = processor_dir / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    broken = {k: v for k, v in config.items() if k not in ("min_pixels", "max_pixels", "size")}
    config_path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json.*min_pixels"):
        PromptProcessor.from_folder(folder)
    config_path.write_text(json.dumps(config))

    tok_config_path = processor_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config_path.write_text(json.dumps({**tok_config, "image_token": "<|not_in_vocab|>"}))
    with pytest.raises(CheckpointError, match=r"image_token '<\|not_in_vocab\|>' is not in tokenizer\.json"):
        PromptProcessor.from_folder(folder)
    tok_config_path.write_text(json.dumps({k: v for k, v in tok_config.items() if k != "grid_bos_token"}))
    with pytest.raises(CheckpointError, match="missing 'grid_bos_token'"):
        PromptProcessor.from_folder(folder)

    (processor_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json not found"):
        PromptProcessor.from_folder(folder)
    with pytest.raises(CheckpointError, match="not a GLM-Image folder|tokenizer.json not found"):
        PromptProcessor.from_folder(tmp_path / "elsewhere")

