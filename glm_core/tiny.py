"""Tiny GLM-Image configurations and the non-weight files of the official folder layout.

The tiny checkpoint keeps the real structure (spec §1, §3) at toy widths: the same sub-folders,
the same config keys, the same special-token arithmetic (GLM-4 specials shifted behind the
16512-entry vision vocabulary, so `<sop>` = endoftext+4, `<eop>` = +5, `<|image|>` = +14), the real
16512-row lm_head, the real VQ codebook size (16384) and the real 16-entry latent mean/std.

`write_tiny_layout(folder)` writes every file of the layout except the weights; the test fixture
(`tests/fixtures/tiny_checkpoint.py`) adds random weights produced by the reference classes.
Runtime code (demo checkpoint): only stdlib + `tokenizers` may be imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# ---------------------------------------------------------------------------------------------
# Vocabulary (spec §1.2.2)
# ---------------------------------------------------------------------------------------------

VISION_VOCAB_SIZE = 16512  # lm_head rows: 16384 codebook ids + markers + unused ids (spec §1.2.2)
CODEBOOK_SIZE = 16384  # VQ codebook and DiT prior embedding size
IMAGE_START_ID = 16384  # <|dit_token_16384|>: image-start marker and tokenizer bos
IMAGE_END_ID = 16385  # <|dit_token_16385|>: image-end marker, EOS, tokenizer pad

# GLM-4 special tokens in GLM-4 order; their offsets from <|endoftext|> match the real vocabulary.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>",
)

# Byte-level BPE: the 256 byte symbols follow the vision vocabulary, then a few merges
# ("Ġ" + digit, so "8 8" tokenizes like a vocabulary with Ġ-prefixed digits: `8`, `Ġ8`).
_MERGES = tuple(("Ġ", digit) for digit in "0123456789")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 table), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    symbol_of_byte = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbol_of_byte:
            symbol_of_byte[b] = chr(256 + extra)
            extra += 1
    return [symbol_of_byte[b] for b in range(256)]


BYTE_TOKENS_START = VISION_VOCAB_SIZE  # 16512
MERGES_START = BYTE_TOKENS_START + 256  # 16768
ENDOFTEXT_ID = MERGES_START + len(_MERGES)  # 16778
SOP_ID = ENDOFTEXT_ID + 4  # grid_bos_token  (real 167845)
EOP_ID = ENDOFTEXT_ID + 5  # grid_eos_token  (real 167846)
IMAGE_TOKEN_ID = ENDOFTEXT_ID + 14  # <|image|> placeholder (real 167855)
_TOKENS_END = ENDOFTEXT_ID + len(GLM4_SPECIAL_TOKENS)
TEXT_VOCAB_SIZE = -(-_TOKENS_END // 64) * 64  # embed_tokens rows, padded like the real 168064

# ---------------------------------------------------------------------------------------------
# Component configurations (values: fixture-notes §1; structure: spec §1)
# ---------------------------------------------------------------------------------------------

_DIFFUSERS_VERSION = "0.37.0.dev0"  # what the official model_index.json claims

MODEL_INDEX = {
    "_class_name": "GlmImagePipeline",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "_name_or_path": "zai-org/GLM-Image-Decoder",
    "processor": ["transformers", "GlmImageProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "GlmImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
}

# AR text decoder. 4 query heads over 2 KV heads (the real model has 2 KV heads too, so GQA
# head grouping is exercised); head_dim 32 -> rotary dim 16 -> 8 frequencies split [2,3,3]
# over (t, h, w), the same uneven shape as the real [8,12,12] over 32.
TINY_AR_TEXT_CONFIG = {
    "model_type": "glm_image_text",
    "vocab_size": TEXT_VOCAB_SIZE,
    "vision_vocab_size": VISION_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "max_position_embeddings": 131072,
    "attention_bias": True,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "eos_token_id": IMAGE_END_ID,
    "pad_token_id": ENDOFTEXT_ID,  # real: 167841 = <|endoftext|> (spec §6.27)
    "rope_parameters": {
        "rope_theta": 10000,
        "rope_type": "default",
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 3, 3],
    },
    "dtype": "bfloat16",
}

TINY_AR_VISION_CONFIG = {
    "model_type": "glm_image_vision",
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "image_size": 64,  # a 4x4 learned position table, resampled to every grid (spec §1.2.5)
    "patch_size": 16,  # must equal the preprocessor's patch_size
    "in_channels": 3,
    "spatial_merge_size": 1,
    "layer_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "dtype": "bfloat16",
}

TINY_AR_VQ_CONFIG = {
    "model_type": "glm_image_vqmodel",
    "embed_dim": 16,
    "num_embeddings": CODEBOOK_SIZE,
    "latent_channels": 32,  # must equal the vision hidden size
    "in_channels": 3,
    "initializer_range": 0.02,
    "dtype": "bfloat16",
}

TINY_AR_CONFIG = {
    "architectures": ["GlmImageForConditionalGeneration"],
    "model_type": "glm_image",
    "image_token_id": IMAGE_TOKEN_ID,
    "image_start_token_id": IMAGE_START_ID,
    "image_end_token_id": IMAGE_END_ID,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "text_config": TINY_AR_TEXT_CONFIG,
    "vision_config": TINY_AR_VISION_CONFIG,
    "vq_config": TINY_AR_VQ_CONFIG,
}

# The official generation_config.json, with pad = <|image|> as in the real file (spec §1.2.1).
TINY_AR_GENERATION_CONFIG = {
    "do_sample": True,
    "eos_token_id": IMAGE_END_ID,
    "pad_token_id": IMAGE_TOKEN_ID,
    "top_p": 0.75,
    "temperature": 0.9,
}

# ByT5-style glyph encoder (spec §1.4); d_model must equal the DiT's text_embed_dim.
TINY_T5_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "vocab_size": 384,
    "d_model": 32,
    "d_ff": 64,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "dtype": "float32",
}

TINY_DIT_CONFIG = {
    "_class_name": "GlmImageTransformer2DModel",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,  # divisible by 4: the DiT RoPE splits it over h and w
    "num_attention_heads": 2,
    "text_embed_dim": TINY_T5_CONFIG["d_model"],
    "time_embed_dim": 32,
    "condition_dim": 16,
    "prior_vq_quantizer_codebook_size": CODEBOOK_SIZE,
}

# Real latent statistics (spec §1.6); exactly bf16-representable.
LATENTS_MEAN = [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875, -0.9453125,
                0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125, -1.59375, -0.81640625,
                -0.255859375]
LATENTS_STD = [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125,
               2.1875, 2.046875, 2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625]

# 4 blocks like the real VAE (vae_scale_factor 8); channel steps so that both conv_shortcut
# cases (encoder block 1, decoder last blocks) exist as in the real [128, 512, 1024, 1024].
TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "act_fn": "silu",
    "block_out_channels": [8, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": LATENTS_MEAN,
    "latents_std": LATENTS_STD,
}

TINY_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "use_dynamic_shifting": True,
    "time_shift_type": "linear",
    "shift": 1.0,
    "shift_terminal": None,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}

# ---------------------------------------------------------------------------------------------
# processor/ and tokenizer/ files (spec §1.3, §1.4)
# ---------------------------------------------------------------------------------------------

TINY_TOKENIZER_CONFIG = {
    "bos_token": f"<|dit_token_{IMAGE_START_ID}|>",
    "eos_token": f"<|dit_token_{IMAGE_END_ID}|>",
    "pad_token": f"<|dit_token_{IMAGE_END_ID}|>",
    "padding_side": "left",
    "grid_bos_token": "<sop>",
    "grid_eos_token": "<eop>",
    "image_token": "<|image|>",
    "model_max_length": 65536,
    "clean_up_tokenization_spaces": False,
    "tokenizer_class": "TokenizersBackend",
    "processor_class": "GlmImageProcessor",
}

TINY_PREPROCESSOR_CONFIG = {
    "image_processor_type": "GlmImageImageProcessor",
    "processor_class": "GlmImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "min_pixels": 262144,  # 512²: without these the class defaults give wrong grids
    "max_pixels": 4194304,  # 2048²
    "patch_size": 16,
    "temporal_patch_size": 1,
    "merge_size": 1,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

# Equivalent to the official chat_template.jinja (spec §1.3): no roles, no system prompt;
# string content verbatim; image items become start-marker, <|image|>, end-marker.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}"
    f"<|dit_token_{IMAGE_START_ID}|><|image|><|dit_token_{IMAGE_END_ID}|>"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

TINY_BYT5_TOKENIZER_CONFIG = {
    "tokenizer_class": "ByT5Tokenizer",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "extra_ids": 125,  # 3 specials + 256 bytes + 125 extra ids = T5 vocab 384
    "model_max_length": 1000000000000000019884624838656,
}


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE with the GLM-Image id layout (spec §1.2.2), compact text part."""
    vocab: dict[str, int] = {f"<|dit_token_{i}|>": i for i in range(VISION_VOCAB_SIZE)}
    for offset, symbol in enumerate(_byte_symbols()):
        vocab[symbol] = BYTE_TOKENS_START + offset
    for offset, (left, right) in enumerate(_MERGES):
        vocab[left + right] = MERGES_START + offset
    for offset, token in enumerate(GLM4_SPECIAL_TOKENS):
        vocab[token] = ENDOFTEXT_ID + offset
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Only the markers and the GLM specials are registered (registering all 16512 dit tokens
    # works too but makes processor loading ~15x slower; fixture-notes §2).
    specials = [f"<|dit_token_{IMAGE_START_ID}|>", f"<|dit_token_{IMAGE_END_ID}|>", *GLM4_SPECIAL_TOKENS]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == _TOKENS_END
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_tiny_layout(folder) -> None:
    """Write every non-weight file of the official GLM-Image layout (spec §3) into `folder`."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "model_index.json", MODEL_INDEX)

    _write_json(root / "vision_language_encoder" / "config.json", TINY_AR_CONFIG)
    _write_json(root / "vision_language_encoder" / "generation_config.json", TINY_AR_GENERATION_CONFIG)

    processor = root / "processor"
    processor.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(processor / "tokenizer.json"))
    _write_json(processor / "tokenizer_config.json", TINY_TOKENIZER_CONFIG)
    _write_json(processor / "preprocessor_config.json", TINY_PREPROCESSOR_CONFIG)
    (processor / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")

    _write_json(root / "tokenizer" / "tokenizer_config.json", TINY_BYT5_TOKENIZER_CONFIG)
    _write_json(root / "text_encoder" / "config.json", TINY_T5_CONFIG)
    _write_json(root / "transformer" / "config.json", TINY_DIT_CONFIG)
    _write_json(root / "vae" / "config.json", TINY_VAE_CONFIG)
    _write_json(root / "scheduler" / "scheduler_config.json", TINY_SCHEDULER_CONFIG)


__all__ = [
    "CODEBOOK_SIZE", "ENDOFTEXT_ID", "EOP_ID", "IMAGE_END_ID", "IMAGE_START_ID", "IMAGE_TOKEN_ID",
    "MODEL_INDEX", "SOP_ID", "TEXT_VOCAB_SIZE", "TINY_AR_CONFIG", "TINY_AR_GENERATION_CONFIG",
    "TINY_AR_TEXT_CONFIG", "TINY_AR_VISION_CONFIG", "TINY_AR_VQ_CONFIG", "TINY_BYT5_TOKENIZER_CONFIG",
    "TINY_CHAT_TEMPLATE", "TINY_DIT_CONFIG", "TINY_PREPROCESSOR_CONFIG", "TINY_SCHEDULER_CONFIG",
    "TINY_T5_CONFIG", "TINY_TOKENIZER_CONFIG", "TINY_VAE_CONFIG", "VISION_VOCAB_SIZE",
    "build_tokenizer", "write_tiny_layout",
]
