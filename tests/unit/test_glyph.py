"""glm_core.glyph on its own: the ByT5 pad quirk on ids, and the tied T5 embedding saved under either name."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_core.glyph import BYT5_EOS_ID, BYT5_PAD_ID, ByT5Tokenizer, glyph_token_ids, load_glyph_encoder
from tests.inputs import GLYPH_PROMPTS


def test_pad_quirk_on_ids():
    tok = ByT5Tokenizer()
    one = glyph_token_ids(["A"], tok)
    two = glyph_token_ids(["A", "BB"], tok)
    three = glyph_token_ids(["A", "BB", "C"], tok)
    assert one == [[ord("A") + 3, BYT5_EOS_ID]]
    assert all(ids[0] == BYT5_PAD_ID for ids in two)  # even count: every text gets a leading pad
    assert all(ids[0] != BYT5_PAD_ID for ids in three)
    assert glyph_token_ids([], tok) == [[BYT5_EOS_ID]]


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
def test_tied_embedding_variants(tiny_checkpoint, glyph_encoder, tmp_path, keys):
    folder = tmp_path / "GLM-Image"
    shutil.copytree(tiny_checkpoint, folder)
    _rewrite_t5_file(folder, keys)
    variant = load_glyph_encoder(folder, "cpu", torch.float32)
    t5 = variant.text_encoder
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    prompt = GLYPH_PROMPTS[7]
    assert torch.equal(variant.encode([prompt]), glyph_encoder.encode([prompt]))



def test_t5_config_refuses_what_glm_image_does_not_use():
    from glm_core.t5 import T5EncoderConfig
    from glm_core.tiny import TINY_T5_CONFIG

    assert T5EncoderConfig.from_dict(TINY_T5_CONFIG).d_model == TINY_T5_CONFIG["d_model"]
    with pytest.raises(ValueError, match="feed_forward_proj 'relu' is not supported"):
        T5EncoderConfig.from_dict({**TINY_T5_CONFIG, "feed_forward_proj": "relu"})
    without_heads = {k: v for k, v in TINY_T5_CONFIG.items() if k != "num_heads"}
    with pytest.raises(ValueError, match="lacks num_heads"):
        T5EncoderConfig.from_dict(without_heads)
