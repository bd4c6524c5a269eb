"""glm_core.processor vs transformers' GlmImageProcessor (PIL backend).

The reference is called exactly as diffusers' `generate_prior_tokens` calls it (references first,
then the text; target size in processor_kwargs). Parity: input_ids / attention_mask /
image_grid_thw / images_per_sample identical, pixel_values within 1e-6.
"""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from glm_core.processor import (
    ARInputs,
    PromptProcessor,
    adjust_reference_size,
    get_target_shape,
    smart_resize,
    to_rgb_image,
)
from tests.inputs import copy_processor, noise_image, our_processor_inputs
from tests.reference import reference_ar_inputs, reference_processor


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return reference_processor(tiny_checkpoint)


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
def test_t2i_matches_reference(ref, prompt_processor, height, width):
    prompt = 'A poster that says "GLM Image" in bold, 8 8 numbers'
    expected = reference_ar_inputs(ref, prompt, height, width)
    got = our_processor_inputs(prompt_processor, [prompt], height, width)
    assert_same(expected, got)
    token_h, token_w, prev_h, prev_w = get_target_shape(height, width)
    assert got.target_grid == (height // 32, width // 32) == (token_h, token_w)
    assert got.preview_grid == (prev_h, prev_w)
    assert got.reference_grids == []
    assert got.is_text_to_image
    assert (got.height, got.width) == (height, width)
    # The prefill ends with the image-start marker; the text is followed by both grid declarations.
    assert got.input_ids[0, -1].item() == prompt_processor.bos_token_id
    assert got.input_ids[0].tolist().count(prompt_processor.grid_bos_token_id) == 2


def test_t2i_batch_left_padding_matches_reference(ref, prompt_processor):
    prompts = ["a cat", "a much longer prompt about a dog running on a beach at sunset"]
    expected = reference_batch(ref, prompts, 512, 768)
    got = our_processor_inputs(prompt_processor, prompts, 512, 768)
    assert_same(expected, got)
    assert got.attention_mask[0, 0].item() == 0 and got.input_ids[0, 0].item() == prompt_processor.pad_token_id


# ---------------------------------------------------------------------------- editing


def test_i2i_one_reference_matches_reference(ref, prompt_processor):
    image = noise_image(512, 768, seed=1)  # already a valid size: both sides see the same pixels
    expected = reference_ar_inputs(ref, "make the sky green", 1024, 1024, [image])
    got = our_processor_inputs(prompt_processor, ["make the sky green"], 1024, 1024, [[image]])
    assert_same(expected, got)
    assert got.reference_grids == [(16, 24)]
    assert got.preview_grid is None and not got.is_text_to_image
    ids = got.input_ids[0].tolist()
    assert ids[0] == prompt_processor.bos_token_id and ids[1 + 16 * 24] == prompt_processor.eos_token_id
    assert ids.count(prompt_processor.image_token_id) == 16 * 24


def test_i2i_two_references_of_different_sizes(ref, prompt_processor):
    images = [noise_image(1024, 640, seed=2), noise_image(512, 1536, seed=3)]
    expected = reference_ar_inputs(ref, "put both subjects in one room", 768, 1344, images)
    got = our_processor_inputs(prompt_processor, ["put both subjects in one room"], 768, 1344, [images])
    assert_same(expected, got)
    assert got.reference_grids == [(32, 20), (16, 48)]
    assert got.image_grid_thw.tolist() == [[1, 32, 20], [1, 16, 48], [1, 24, 42]]


def test_i2i_batch_matches_reference(ref, prompt_processor):
    images = [[noise_image(512, 512, seed=4)], [noise_image(768, 512, seed=5)]]
    prompts = ["edit one", "edit the second image with a longer instruction"]
    expected = reference_batch(ref, prompts, 512, 512, images)
    got = our_processor_inputs(prompt_processor, prompts, 512, 512, images)
    assert_same(expected, got)
    assert got.reference_grids == [(16, 16), (24, 16)]


def test_input_types_give_identical_pixels(ref, prompt_processor):
    image = noise_image(512, 640, seed=6)
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy()).float() / 255.0  # ComfyUI IMAGE (H, W, 3) in [0, 1]
    expected = reference_ar_inputs(ref, "x", 512, 512, [image])
    for variant in (array, tensor, tensor[None]):
        assert_same(expected, our_processor_inputs(prompt_processor, ["x"], 512, 512, [[variant]]))


def test_rgba_and_grayscale_convert_like_the_reference(ref, prompt_processor):
    rgba = noise_image(512, 512, seed=7, mode="RGBA")
    gray = noise_image(512, 512, seed=8).convert("L")
    for image in (rgba, gray):
        expected = reference_ar_inputs(ref, "x", 512, 512, [image])
        assert_same(expected, our_processor_inputs(prompt_processor, ["x"], 512, 512, [[image]]))
    assert to_rgb_image(rgba).mode == "RGB"


def test_600px_reference_is_adjusted_not_crashing(ref, prompt_processor):
    image = noise_image(600, 600, seed=9)
    adjusted = adjust_reference_size(image)
    assert adjusted.size == (608, 608)
    got = our_processor_inputs(prompt_processor, ["x"], 512, 512, [[image]])
    # Same as the reference given our adjusted image; the AR grid is half the DiT grid.
    assert_same(reference_ar_inputs(ref, "x", 512, 512, [adjusted]), got)
    assert got.reference_grids == [(19, 19)] and 2 * 19 == 608 // 16
    # The reference alone rounds 600 to a 19x19 grid too, but its DiT sees 600/16 = 37.5 patches:
    # the mismatch spec §4 describes. Ours hands the DiT 608 px = 38 patches = 2 x 19.
    unadjusted = reference_ar_inputs(ref, "x", 512, 512, [image])
    assert unadjusted["image_grid_thw"][0].tolist() == [1, 19, 19]


# ---------------------------------------------------------------------------- reference sizes


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


def _both_layouts(ref, prompt_processor):
    image = noise_image(512, 512, seed=11)
    assert_same(reference_ar_inputs(ref, "a cat", 768, 512), our_processor_inputs(prompt_processor, ["a cat"], 768, 512))
    assert_same(reference_ar_inputs(ref, "a cat", 768, 512, [image]),
                our_processor_inputs(prompt_processor, ["a cat"], 768, 512, [[image]]))


def test_post_processor_prefix_follows_reference(tiny_checkpoint, tmp_path):
    """A `[gMASK]<sop>` post-processor (spec §7 open item): t2i gains it, i2i (starts with bos) not."""
    folder = copy_processor(tiny_checkpoint, tmp_path)
    path = folder / "processor" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    specials = [(t, tokenizer.token_to_id(t)) for t in ("[gMASK]", "<sop>")]
    tokenizer.post_processor = TemplateProcessing(single="[gMASK]:0 <sop>:0 $A:0",
                                                  pair="[gMASK]:0 <sop>:0 $A:0 $B:1", special_tokens=specials)
    tokenizer.save(str(path))
    ref, prompt_processor = reference_processor(folder), PromptProcessor.from_folder(folder)
    _both_layouts(ref, prompt_processor)
    t2i = our_processor_inputs(prompt_processor, ["a cat"], 768, 512).input_ids[0].tolist()
    assert t2i[:2] == [specials[0][1], specials[1][1]]


def test_add_bos_token_in_config_is_ignored_like_the_reference(tiny_checkpoint, tmp_path):
    folder = copy_processor(tiny_checkpoint, tmp_path)
    path = folder / "processor" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["add_bos_token"] = True
    path.write_text(json.dumps(config))
    ref, prompt_processor = reference_processor(folder), PromptProcessor.from_folder(folder)
    _both_layouts(ref, prompt_processor)
    # transformers drops add_bos_token / add_eos_token whenever tokenizer.json exists
    assert our_processor_inputs(prompt_processor, ["a cat"], 768, 512).input_ids[0, 0].item() != prompt_processor.bos_token_id
