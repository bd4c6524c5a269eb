"""Glyph parity: glm_core.glyph vs the diffusers GlmImagePipeline's own glyph code, from tiny_checkpoint.

Text extraction vs `get_glyph_texts`, ids vs transformers' ByT5Tokenizer, embeddings vs
`_get_glyph_embeds` / `encode_prompt` (fp32, <= 1e-5 relative), and half-precision dtypes (`wo` fp32
under fp16 only).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from glm_core.glyph import ByT5Tokenizer, extract_glyph_texts, load_glyph_encoder
from tests.compare import rel_err
from tests.inputs import GLYPH_PROMPTS

TOL = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from tests.reference import reference_pipeline

    return reference_pipeline(tiny_checkpoint, torch.float32)


def test_extract_glyph_texts_matches_reference(pipe):
    assert [extract_glyph_texts(p) for p in GLYPH_PROMPTS] == pipe.get_glyph_texts(GLYPH_PROMPTS)
    assert extract_glyph_texts("it's a shop, don't miss it") == ["s a shop, don"]
    # Regex order, not position order: single quotes first, corner brackets last.
    assert extract_glyph_texts(GLYPH_PROMPTS[8]) == ["three", "two", "one", "four"]


@pytest.mark.parametrize("text", [
    "", "ab", "HELLO world", "\u00e9\u4f60\U0001F600", "a </s> b", "x<pad>y", " <unk> ", "<extra_id_0>",
    "a<extra_id_124>b", "<extra_id_125>", "<extra_id_01>", "\n</s>\n", "ends with eos</s>", "tab\t<pad>\tx",
    "a" * 3000,
])
def test_byt5_ids_match_transformers(tiny_checkpoint, text):
    from tests.reference import reference_byt5_tokenizer

    ref = reference_byt5_tokenizer(tiny_checkpoint)
    ours = ByT5Tokenizer.from_folder(tiny_checkpoint / "tokenizer")
    with warnings.catch_warnings():  # "This sequence already has </s>" for texts ending in EOS
        warnings.simplefilter("ignore")
        expected = ref([text], max_length=2048, truncation=True).input_ids[0]
    assert ours(text) == expected


@pytest.mark.parametrize("prompt", GLYPH_PROMPTS)
def test_glyph_embeds_match_reference(pipe, glyph_encoder, prompt):
    with torch.no_grad():
        expected = pipe._get_glyph_embeds([prompt], max_sequence_length=2048, device=torch.device("cpu"),
                                          dtype=torch.float32)
    got = glyph_encoder.encode([prompt])
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL


def test_batch_of_prompts_left_zero_padding(pipe, glyph_encoder):
    prompts = ['a "short" one', "'A' and 'much longer second text' here"]
    with torch.no_grad():
        expected, expected_negative = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                         device=torch.device("cpu"), dtype=torch.float32)
    got = glyph_encoder.encode(prompts)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL
    short_len = glyph_encoder.encode([prompts[0]]).shape[1]
    assert torch.count_nonzero(got[0, : got.shape[1] - short_len]) == 0  # left padding, zeros

    negative = glyph_encoder.encode_negative(batch_size=2)
    assert negative.shape == expected_negative.shape == (2, 1, glyph_encoder.hidden_size)
    assert rel_err(negative, expected_negative) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtypes_and_embeds_like_transformers(pipe, tiny_checkpoint, dtype):
    """`wo` stays fp32 under fp16 only (transformers 5.23; spec §6.23 says bf16 too, it does not)."""
    from tests.reference import reference_t5

    ours = load_glyph_encoder(tiny_checkpoint, "cpu", dtype)
    ref_t5 = reference_t5(tiny_checkpoint, dtype)
    ref_dtypes = {k: v.dtype for k, v in ref_t5.state_dict().items()}
    our_dtypes = {k: v.dtype for k, v in ours.text_encoder.state_dict().items()}
    assert our_dtypes == ref_dtypes
    wo_dtype = our_dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    assert wo_dtype == (torch.float32 if dtype == torch.float16 else dtype)

    original = pipe.text_encoder
    pipe.text_encoder = ref_t5
    try:
        with torch.no_grad():  # as inside the pipeline's __call__ (grad mode changes CPU SDPA kernels)
            expected = pipe._get_glyph_embeds([GLYPH_PROMPTS[8]], 2048, torch.device("cpu"), dtype)
    finally:
        pipe.text_encoder = original
    got = ours.encode([GLYPH_PROMPTS[8]], dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, expected)  # same transformers code, same weights and dtypes: bitwise
