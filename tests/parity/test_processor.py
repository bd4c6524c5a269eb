"""glm_core.processor vs transformers' GlmImageProcessor (PIL backend), plus every bad-input path.

The reference is called exactly as diffusers' `generate_prior_tokens` calls it (references first,
then the text; target size in processor_kwargs). Parity: input_ids / attention_mask /
image_grid_thw / images_per_sample identical, pixel_values within 1e-6.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from glm_core.checkpoint import CheckpointError
from glm_core.processor import (
    ARInputs,
    PromptProcessor,
    adjust_reference_size,
    get_target_shape,
    reference_size,
    smart_resize,
    to_rgb_image,
    validate_target_size,
)
from tests.reference import reference_ar_inputs, reference_processor


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return reference_processor(tiny_checkpoint)


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    return PromptProcessor.from_folder(tiny_checkpoint)


def noise_image(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    # Smooth-ish content (not pure noise) so bicubic resampling differences would show.
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, channels), dtype=np.uint8)
    image = Image.fromarray(base, mode=mode).resize((width, height), Image.BILINEAR)
    return image


def reference_batch(ref, prompts, height, width, images=None):
    messages = []
    for i, prompt in enumerate(prompts):
        content = [{"type": "image", "image": im} for im in (images[i] if images else [])]
        content.append({"type": "text", "text": prompt})
        messages.append([{"role": "user", "content": content}])
    return ref.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"target_h": height, "target_w": width, "padding": len(prompts) > 1})


def assert_same(expected, got: ARInputs):
    assert torch.equal(got.input_ids, expected["input_ids"]), (got.input_ids, expected["input_ids"])
    assert torch.equal(got.attention_mask, expected["attention_mask"])
    assert torch.equal(got.image_grid_thw, expected["image_grid_thw"])
    assert torch.equal(got.images_per_sample, expected["images_per_sample"])
    assert got.input_ids.dtype == torch.long and got.attention_mask.dtype == torch.long
    if "pixel_values" in expected:
        assert got.pixel_values is not None
        assert got.pixel_values.dtype == torch.float32
        assert got.pixel_values.shape == expected["pixel_values"].shape
        assert (got.pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-6
    else:
        assert got.pixel_values is None


# ---------------------------------------------------------------------------- text-to-image


@pytest.mark.parametrize("height,width", [(1024, 1024), (1152, 768), (768, 1344), (512, 512), (1568, 1056)])
def test_t2i_matches_reference(ref, ours, height, width):
    prompt = 'A poster that says "GLM Image" in bold, 8 8 numbers'
    expected = reference_ar_inputs(ref, prompt, height, width)
    got = ours.build_inputs([prompt], height, width)
    assert_same(expected, got)
    token_h, token_w, prev_h, prev_w = get_target_shape(height, width)
    assert got.target_grid == (height // 32, width // 32) == (token_h, token_w)
    assert got.preview_grid == (prev_h, prev_w)
    assert got.reference_grids == []
    assert got.is_text_to_image
    assert (got.height, got.width) == (height, width)
    # The prefill ends with the image-start marker; the text is followed by both grid declarations.
    assert got.input_ids[0, -1].item() == ours.bos_token_id
    assert got.input_ids[0].tolist().count(ours.grid_bos_token_id) == 2


def test_t2i_batch_left_padding_matches_reference(ref, ours):
    prompts = ["a cat", "a much longer prompt about a dog running on a beach at sunset"]
    expected = reference_batch(ref, prompts, 512, 768)
    got = ours.build_inputs(prompts, 512, 768)
    assert_same(expected, got)
    assert got.attention_mask[0, 0].item() == 0 and got.input_ids[0, 0].item() == ours.pad_token_id


@pytest.mark.parametrize("height,width,grids", [
    (512, 512, (16, 16, 16, 16)), (1024, 1024, (32, 32, 16, 16)), (1152, 768, (36, 24, 19, 13)),
    (1568, 1056, (49, 33, 19, 13)), (1472, 1088, (46, 34, 18, 13)), (1728, 960, (54, 30, 21, 11)),
    (2048, 2048, (64, 64, 16, 16)),
])
def test_target_shape_table(height, width, grids):
    """spec §1.3 table."""
    assert get_target_shape(height, width) == grids


# ---------------------------------------------------------------------------- editing


def test_i2i_one_reference_matches_reference(ref, ours):
    image = noise_image(512, 768, seed=1)  # already a valid size: both sides see the same pixels
    expected = reference_ar_inputs(ref, "make the sky green", 1024, 1024, [image])
    got = ours.build_inputs(["make the sky green"], 1024, 1024, [[image]])
    assert_same(expected, got)
    assert got.reference_grids == [(16, 24)]
    assert got.preview_grid is None and not got.is_text_to_image
    moved = got.to("cpu")
    assert torch.equal(moved.pixel_values, got.pixel_values) and moved.target_grid == got.target_grid
    ids = got.input_ids[0].tolist()
    assert ids[0] == ours.bos_token_id and ids[1 + 16 * 24] == ours.eos_token_id
    assert ids.count(ours.image_token_id) == 16 * 24


def test_i2i_two_references_of_different_sizes(ref, ours):
    images = [noise_image(1024, 640, seed=2), noise_image(512, 1536, seed=3)]
    expected = reference_ar_inputs(ref, "put both subjects in one room", 768, 1344, images)
    got = ours.build_inputs(["put both subjects in one room"], 768, 1344, [images])
    assert_same(expected, got)
    assert got.reference_grids == [(32, 20), (16, 48)]
    assert got.image_grid_thw.tolist() == [[1, 32, 20], [1, 16, 48], [1, 24, 42]]


def test_i2i_batch_matches_reference(ref, ours):
    images = [[noise_image(512, 512, seed=4)], [noise_image(768, 512, seed=5)]]
    prompts = ["edit one", "edit the second image with a longer instruction"]
    expected = reference_batch(ref, prompts, 512, 512, images)
    got = ours.build_inputs(prompts, 512, 512, images)
    assert_same(expected, got)
    assert got.reference_grids == [(16, 16), (24, 16)]


def test_input_types_give_identical_pixels(ref, ours):
    image = noise_image(512, 640, seed=6)
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy()).float() / 255.0  # ComfyUI IMAGE (H, W, 3) in [0, 1]
    expected = reference_ar_inputs(ref, "x", 512, 512, [image])
    for variant in (array, tensor, tensor[None]):
        assert_same(expected, ours.build_inputs(["x"], 512, 512, [[variant]]))


def test_rgba_and_grayscale_convert_like_the_reference(ref, ours):
    rgba = noise_image(512, 512, seed=7, mode="RGBA")
    gray = noise_image(512, 512, seed=8).convert("L")
    for image in (rgba, gray):
        expected = reference_ar_inputs(ref, "x", 512, 512, [image])
        assert_same(expected, ours.build_inputs(["x"], 512, 512, [[image]]))
    assert to_rgb_image(rgba).mode == "RGB"


def test_600px_reference_is_adjusted_not_crashing(ref, ours):
    image = noise_image(600, 600, seed=9)
    adjusted = adjust_reference_size(image)
    assert adjusted.size == (608, 608)
    got = ours.build_inputs(["x"], 512, 512, [[image]])
    # Same as the reference given our adjusted image; the AR grid is half the DiT grid.
    assert_same(reference_ar_inputs(ref, "x", 512, 512, [adjusted]), got)
    assert got.reference_grids == [(19, 19)] and 2 * 19 == 608 // 16
    # The reference alone rounds 600 to a 19x19 grid too, but its DiT sees 600/16 = 37.5 patches:
    # the mismatch spec §4 describes. Ours hands the DiT 608 px = 38 patches = 2 x 19.
    unadjusted = reference_ar_inputs(ref, "x", 512, 512, [image])
    assert unadjusted["image_grid_thw"][0].tolist() == [1, 19, 19]


def test_small_and_large_references_are_adjusted(ours):
    got = ours.build_inputs(["x"], 512, 512, [[noise_image(64, 96), noise_image(3000, 2000)]])
    assert got.reference_grids == [(16, 24), (64, 43)]  # 512x768 and 2048x1376 pixels (1365.3 rounded)


# ---------------------------------------------------------------------------- reference sizes


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


def test_smart_resize_matches_reference_function():
    from transformers.models.glm_image.image_processing_pil_glm_image import smart_resize as reference

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 5000, (300, 2))]
    sizes += [(1024, 1024), (300, 300), (600, 600), (2048, 512), (16, 64), (5000, 4999)]
    for height, width in sizes:
        if max(height, width) / min(height, width) > 4:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(height, width)
            continue
        assert smart_resize(height, width) == reference(height, width), (height, width)


# ---------------------------------------------------------------------------- tokenizer variants


def _copy_processor(tiny_checkpoint, tmp_path):
    folder = tmp_path / "GLM-Image"
    shutil.copytree(tiny_checkpoint / "processor", folder / "processor")
    shutil.copy(tiny_checkpoint / "model_index.json", folder / "model_index.json")
    return folder


def _both_layouts(ref, ours):
    image = noise_image(512, 512, seed=11)
    assert_same(reference_ar_inputs(ref, "a cat", 768, 512), ours.build_inputs(["a cat"], 768, 512))
    assert_same(reference_ar_inputs(ref, "a cat", 768, 512, [image]),
                ours.build_inputs(["a cat"], 768, 512, [[image]]))


def test_post_processor_prefix_follows_reference(tiny_checkpoint, tmp_path):
    """A `[gMASK]<sop>` post-processor (spec §7 open item): t2i gains it, i2i (starts with bos) not."""
    folder = _copy_processor(tiny_checkpoint, tmp_path)
    path = folder / "processor" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    specials = [(t, tokenizer.token_to_id(t)) for t in ("[gMASK]", "<sop>")]
    tokenizer.post_processor = TemplateProcessing(single="[gMASK]:0 <sop>:0 $A:0",
                                                  pair="[gMASK]:0 <sop>:0 $A:0 $B:1", special_tokens=specials)
    tokenizer.save(str(path))
    ref, ours = reference_processor(folder), PromptProcessor.from_folder(folder)
    _both_layouts(ref, ours)
    t2i = ours.build_inputs(["a cat"], 768, 512).input_ids[0].tolist()
    assert t2i[:2] == [specials[0][1], specials[1][1]]


def test_add_bos_token_in_config_is_ignored_like_the_reference(tiny_checkpoint, tmp_path):
    folder = _copy_processor(tiny_checkpoint, tmp_path)
    path = folder / "processor" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["add_bos_token"] = True
    path.write_text(json.dumps(config))
    ref, ours = reference_processor(folder), PromptProcessor.from_folder(folder)
    _both_layouts(ref, ours)
    # transformers drops add_bos_token / add_eos_token whenever tokenizer.json exists
    assert ours.build_inputs(["a cat"], 768, 512).input_ids[0, 0].item() != ours.bos_token_id


def test_ids_come_from_the_files(ours, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "vision_language_encoder" / "config.json").read_text())
    assert ours.image_token_id == config["image_token_id"]
    assert ours.bos_token_id == config["image_start_token_id"]
    assert ours.eos_token_id == config["image_end_token_id"]
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "processor" / "tokenizer.json"))
    assert ours.grid_bos_token_id == tokenizer.token_to_id("<sop>")
    assert ours.pad_token_id == tokenizer.token_to_id("<|dit_token_16385|>")


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


def test_build_inputs_rejects_bad_prompts_and_sizes(ours):
    with pytest.raises(ValueError, match="empty"):
        ours.build_inputs([""], 512, 512)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ours.build_inputs(["ok", "  \n\t"], 512, 512)
    with pytest.raises(ValueError, match="no prompt"):
        ours.build_inputs([], 512, 512)
    with pytest.raises(TypeError, match="string"):
        ours.build_inputs([None], 512, 512)
    with pytest.raises(ValueError, match="control token"):
        ours.build_inputs([f"a {ours.image_token} cat"], 512, 512)
    with pytest.raises(ValueError, match="multiple of 32"):
        ours.build_inputs(["a cat"], 500, 512)
    assert ours.build_inputs("a cat", 64, 64, min_side=32).target_grid == (2, 2)


def test_build_inputs_rejects_bad_reference_batches(ours):
    image = noise_image(512, 512)
    with pytest.raises(ValueError, match=r"same number of reference images, got \[1, 2\]"):
        ours.build_inputs(["a", "b"], 512, 512, [[image], [image, image]])
    with pytest.raises(ValueError, match=r"same number of reference images, got \[1, 0\]"):
        ours.build_inputs(["a", "b"], 512, 512, [[image], []])
    with pytest.raises(ValueError, match="1 reference lists for 2 prompts"):
        ours.build_inputs(["a", "b"], 512, 512, [[image]])


def test_aspect_ratio_above_4_is_rejected(ours):
    with pytest.raises(ValueError, match=r"aspect ratio 4\.500.*limit 4"):
        adjust_reference_size(noise_image(512, 2304))
    with pytest.raises(ValueError, match="aspect ratio"):
        ours.build_inputs(["x"], 512, 512, [[noise_image(2400, 512)]])
    adjust_reference_size(noise_image(512, 2048))  # exactly 4 is allowed


def test_bad_image_types(ours):
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb_image("cat.png")
    with pytest.raises(TypeError, match="PIL image"):
        ours.build_inputs(["x"], 512, 512, [[[1, 2, 3]]])
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
    folder = _copy_processor(tiny_checkpoint, tmp_path)
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
