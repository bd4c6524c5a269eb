"""Configuration of the autoregressive (AR) stage, read from `vision_language_encoder/config.json`
and `generation_config.json` (spec §1.2.1).

Missing fields fall back to the defaults of the reference config classes (transformers'
`GlmImage*Config`), which are the values the reference itself would use for that file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool
    hidden_act: str
    vision_vocab_size: int  # rows of lm_head: the AR can only emit ids below this
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...]  # frequency slots taken from the (t, h, w) axes, spec §1.2.3
    pad_token_id: int | None
    eos_token_id: int

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    in_channels: int
    layer_norm_eps: float
    attention_bias: bool
    hidden_act: str
    spatial_merge_size: int


@dataclass(frozen=True)
class VQConfig:
    embed_dim: int
    num_embeddings: int  # codebook size: ids [0, num_embeddings) are image tokens
    latent_channels: int


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 0.9
    top_p: float = 0.75
    # generation_config.json does not set top_k; transformers 5.x then applies its global default 50 (spec §6.21)
    top_k: int = 50
    do_sample: bool = True


@dataclass(frozen=True)
class ARConfig:
    text: TextConfig
    vision: VisionConfig
    vq: VQConfig
    image_token_id: int  # `<|image|>` placeholder, replaced by reference VQ ids (spec §1.2.7)
    image_start_token_id: int  # also the generation prompt's last token
    image_end_token_id: int
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def eos_token_id(self) -> int:
        return self.text.eos_token_id

    @property
    def codebook_size(self) -> int:
        return self.vq.num_embeddings

    @property
    def vision_vocab_size(self) -> int:
        return self.text.vision_vocab_size

    @classmethod
    def from_dict(cls, config: dict, generation_config: dict | None = None) -> ARConfig:
        return cls(
            text=_text_config(config.get("text_config") or {}),
            vision=_vision_config(config.get("vision_config") or {}),
            vq=_vq_config(config.get("vq_config") or {}),
            image_token_id=int(config.get("image_token_id", 167855)),
            image_start_token_id=int(config.get("image_start_token_id", 16384)),
            image_end_token_id=int(config.get("image_end_token_id", 16385)),
            generation=_generation_defaults(generation_config or {}),
        )

    @classmethod
    def from_folder(cls, component_dir: str | Path) -> ARConfig:
        """`component_dir` is the checkpoint's `vision_language_encoder/` folder."""
        component_dir = Path(component_dir)
        config = json.loads((component_dir / "config.json").read_text(encoding="utf-8"))
        gen_path = component_dir / "generation_config.json"
        generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
        return cls.from_dict(config, generation)


def _first_int(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _text_config(d: dict) -> TextConfig:
    hidden = int(d.get("hidden_size", 4096))
    heads = int(d.get("num_attention_heads", 32))
    kv_heads = d.get("num_key_value_heads", 2)
    # transformers 5 writes `rope_parameters`; older files put rope_theta at the top and
    # mrope_section under `rope_scaling`
    rope = dict(d.get("rope_scaling") or {})
    rope.update(d.get("rope_parameters") or {})
    pad = d.get("pad_token_id", 167841)
    return TextConfig(
        vocab_size=int(d.get("vocab_size", 168064)),
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size", 13696)),
        num_hidden_layers=int(d.get("num_hidden_layers", 40)),
        num_attention_heads=heads,
        num_key_value_heads=int(heads if kv_heads is None else kv_heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(d.get("attention_bias", True)),
        hidden_act=str(d.get("hidden_act", "silu")),
        vision_vocab_size=int(d.get("vision_vocab_size", 16512)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))),
        mrope_section=tuple(int(s) for s in rope.get("mrope_section", (8, 12, 12))),
        pad_token_id=None if pad is None else int(pad),
        eos_token_id=_first_int(d.get("eos_token_id", 16385)),
    )


def _vision_config(d: dict) -> VisionConfig:
    return VisionConfig(
        depth=int(d.get("depth", 40)),
        hidden_size=int(d.get("hidden_size", 1536)),
        num_heads=int(d.get("num_heads", 16)),
        intermediate_size=int(d.get("intermediate_size", 6144)),
        image_size=_first_int(d.get("image_size", 2048)),
        patch_size=_first_int(d.get("patch_size", 16)),
        in_channels=int(d.get("in_channels", 3)),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        attention_bias=bool(d.get("attention_bias", True)),
        hidden_act=str(d.get("hidden_act", "gelu")),
        spatial_merge_size=int(d.get("spatial_merge_size", 1)),
    )


def _vq_config(d: dict) -> VQConfig:
    return VQConfig(
        embed_dim=int(d.get("embed_dim", 2048)),
        num_embeddings=int(d.get("num_embeddings", 16384)),
        latent_channels=int(d.get("latent_channels", 1536)),
    )


def _generation_defaults(d: dict) -> GenerationDefaults:
    base = GenerationDefaults()
    top_k = d.get("top_k")
    return GenerationDefaults(
        temperature=float(d.get("temperature", base.temperature)),
        top_p=float(d.get("top_p", base.top_p)),
        top_k=base.top_k if top_k is None else int(top_k),
        do_sample=bool(d.get("do_sample", base.do_sample)),
    )
