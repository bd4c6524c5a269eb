"""Glyph parity: glm_core.glyph vs the diffusers GlmImagePipeline's own glyph code, from tiny_checkpoint.

Text extraction vs `get_glyph_texts`, ids vs transformers' ByT5Tokenizer, embeddings vs
`_get_glyph_embeds` / `encode_prompt` (fp32, <= 1e-5 relative), loading variants of the tied
T5 embedding, and half-precision dtypes (`wo` fp32 under fp16 only).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_core.glyph import (BYT5_EOS_ID, BYT5_PAD_ID, ByT5Tokenizer, GlyphEncoder, extract_glyph_texts,
                            glyph_token_ids, load_glyph_encoder)

TOL = 1e-5

PROMPTS = [
    "a poster that says 'HELLO'",                                 # single quotes
    "a sign reading \u201cOpen 24h\u201d above the door",         # curly double quotes
    'a cake with "Happy Birthday" written on it',                 # straight double quotes
    "\u4e00\u5f20\u6d77\u62a5\uff0c\u5199\u7740\u300c\u4f60\u597d\u4e16\u754c\u300d",  # corner brackets, CJK
    "a quiet forest at dawn, no text",                            # no quotes
    "it's a shop, don't miss it",                                 # apostrophes: single-quote regex quirk
    "'A' and 'B'",                                                # two texts: leading pad quirk (even)
    "'A', \"BB\" and \u300cCCC\u300d",                            # three texts, mixed styles (odd)
    "\"one\" \u201ctwo\u201d 'three' \u300cfour\u300d",           # four texts, all styles, out of regex order
    "an empty quote '' and \"\"",                                 # empty glyph texts
]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from tests.reference import reference_pipeline

    return reference_pipeline(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> GlyphEncoder:
    return load_glyph_encoder(tiny_checkpoint, "cpu", torch.float32)


def test_extract_glyph_texts_matches_reference(pipe):
    assert [extract_glyph_texts(p) for p in PROMPTS] == pipe.get_glyph_texts(PROMPTS)
    assert extract_glyph_texts("it's a shop, don't miss it") == ["s a shop, don"]
    # Regex order, not position order: single quotes first, corner brackets last.
    assert extract_glyph_texts(PROMPTS[8]) == ["three", "two", "one", "four"]


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


def test_pad_quirk_on_ids():
    tok = ByT5Tokenizer()
    one = glyph_token_ids(["A"], tok)
    two = glyph_token_ids(["A", "BB"], tok)
    three = glyph_token_ids(["A", "BB", "C"], tok)
    assert one == [[ord("A") + 3, BYT5_EOS_ID]]
    assert all(ids[0] == BYT5_PAD_ID for ids in two)  # even count: every text gets a leading pad
    assert all(ids[0] != BYT5_PAD_ID for ids in three)
    assert glyph_token_ids([], tok) == [[BYT5_EOS_ID]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_glyph_embeds_match_reference(pipe, encoder, prompt):
    with torch.no_grad():
        expected = pipe._get_glyph_embeds([prompt], max_sequence_length=2048, device=torch.device("cpu"),
                                          dtype=torch.float32)
    got = encoder.encode([prompt])
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL


def test_batch_of_prompts_left_zero_padding(pipe, encoder):
    prompts = ['a "short" one', "'A' and 'much longer second text' here"]
    with torch.no_grad():
        expected, expected_negative = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                         device=torch.device("cpu"), dtype=torch.float32)
    got = encoder.encode(prompts)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL
    short_len = encoder.encode([prompts[0]]).shape[1]
    assert torch.count_nonzero(got[0, : got.shape[1] - short_len]) == 0  # left padding, zeros

    negative = encoder.encode_negative(batch_size=2)
    assert negative.shape == expected_negative.shape == (2, 1, encoder.hidden_size)
    assert rel_err(negative, expected_negative) <= TOL


def _rewrite_t5_file(folder, keys: str):
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    shared = state.pop("shared.weight", None)
    if shared is None:
        shared = state.pop("encoder.embed_tokens.weight")
    state.pop("encoder.embed_tokens.weight", None)
    if keys in ("shared", "both"):
        state["shared.weight"] = shared
    if keys in ("embed_tokens", "both"):
        state["encoder.embed_tokens.weight"] = shared.clone()
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("keys", ["both", "embed_tokens"])
def test_tied_embedding_variants(tiny_checkpoint, encoder, tmp_path, keys):
    folder = tmp_path / "GLM-Image"
    shutil.copytree(tiny_checkpoint, folder)
    _rewrite_t5_file(folder, keys)
    variant = load_glyph_encoder(folder, "cpu", torch.float32)
    t5 = variant.text_encoder
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    prompt = PROMPTS[7]
    assert torch.equal(variant.encode([prompt]), encoder.encode([prompt]))


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
            expected = pipe._get_glyph_embeds([PROMPTS[8]], 2048, torch.device("cpu"), dtype)
    finally:
        pipe.text_encoder = original
    got = ours.encode([PROMPTS[8]], dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, expected)  # same transformers code, same weights and dtypes: bitwise
