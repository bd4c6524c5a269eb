"""Configuration of the autoregressive (AR) stage, read from `vision_language_encoder/config.json`
and `generation_config.json` (spec §1.2.1).

Every key the official config.json holds is required; the few it leaves out (head_dim, rope_theta,
spatial_merge_size) take the value the reference derives or defaults to, each marked where it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import CheckpointError, _read_json
from ..limits import check_sampling


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
class Sampling:
    """How the AR samples its tokens. Unless the caller says otherwise: the checkpoint's generation_config.json,
    with the model card's values where the file is silent (temperature 0.9, top-p 0.75; the file sets no top_k,
    and transformers then applies its global default 50, spec §6.21). The one home of these numbers.
    top_k 0 turns top-k off; top_p 1 turns top-p off."""

    temperature: float = 0.9
    top_p: float = 0.75
    top_k: int = 50

    @classmethod
    def from_generation_config(cls, generation_config: dict) -> Sampling:
        base = cls()
        top_k = generation_config.get("top_k")
        return cls(temperature=float(generation_config.get("temperature", base.temperature)),
                   top_p=float(generation_config.get("top_p", base.top_p)),
                   top_k=base.top_k if top_k is None else int(top_k))

    def validate(self) -> Sampling:
        """Itself, or ValueError naming every bad setting."""
        check_sampling(self.temperature, self.top_p, self.top_k)
        return self


MODEL_CARD_SAMPLING = Sampling()


@dataclass(frozen=True)
class ARConfig:
    text: TextConfig
    vision: VisionConfig
    vq: VQConfig
    image_token_id: int  # `<|image|>` placeholder, replaced by reference VQ ids (spec §1.2.7)
    image_start_token_id: int  # also the generation prompt's last token
    image_end_token_id: int
    sampling: Sampling = field(default_factory=Sampling)

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
    def from_dict(cls, config: dict, generation_config: dict | None = None,
                  source: str = "vision_language_encoder/config.json") -> ARConfig:
        top = _Section(config, source)
        return cls(
            text=_text_config(_Section(config.get("text_config"), f"{source}: text_config")),
            vision=_vision_config(_Section(config.get("vision_config"), f"{source}: vision_config")),
            vq=_vq_config(_Section(config.get("vq_config"), f"{source}: vq_config")),
            image_token_id=top.int("image_token_id"),
            image_start_token_id=top.int("image_start_token_id"),
            image_end_token_id=top.int("image_end_token_id"),
            sampling=Sampling.from_generation_config(generation_config or {}),
        )

    @classmethod
    def from_folder(cls, component_dir: str | Path) -> ARConfig:
        """`component_dir` is the checkpoint's `vision_language_encoder/` folder."""
        component_dir = Path(component_dir)
        config = _read_json(component_dir / "config.json", "AR config")
        gen_path = component_dir / "generation_config.json"
        generation = _read_json(gen_path, "AR generation config") if gen_path.is_file() else {}
        return cls.from_dict(config, generation, source=str(component_dir / "config.json"))


class _Section:
    """One object of config.json; a required key that is absent is a clear error naming the file and key."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: missing or not an object; a GLM-Image AR config has text_config, "
                             f"vision_config and vq_config objects")
        self.data, self.where = data, where

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def require(self, key: str):
        if self.data.get(key) is None:
            raise CheckpointError(f"{self.where}: missing {key!r} (the official GLM-Image config has it)")
        return self.data[key]

    def int(self, key: str) -> int:
        return _first_int(self.require(key))


def _first_int(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _text_config(d: _Section) -> TextConfig:
    hidden = d.int("hidden_size")
    heads = d.int("num_attention_heads")
    # transformers 5 writes `rope_parameters`; older files put rope_theta at the top and
    # mrope_section under `rope_scaling`
    rope = dict(d.get("rope_scaling") or {})
    rope.update(d.get("rope_parameters") or {})
    if "mrope_section" not in rope:
        raise CheckpointError(f"{d.where}: missing rope_parameters.mrope_section (the official config has [8, 12, 12])")
    pad = d.get("pad_token_id")
    return TextConfig(
        vocab_size=d.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=d.int("intermediate_size"),
        num_hidden_layers=d.int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=d.int("num_key_value_heads"),
        head_dim=int(d.get("head_dim") or hidden // heads),  # absent from the official file: derived, as the reference does
        rms_norm_eps=float(d.require("rms_norm_eps")),
        attention_bias=bool(d.require("attention_bias")),
        hidden_act=str(d.require("hidden_act")),
        vision_vocab_size=d.int("vision_vocab_size"),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),  # the reference's default
        partial_rotary_factor=float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))),
        mrope_section=tuple(int(s) for s in rope["mrope_section"]),
        pad_token_id=None if pad is None else int(pad),
        eos_token_id=d.int("eos_token_id"),
    )


def _vision_config(d: _Section) -> VisionConfig:
    return VisionConfig(
        depth=d.int("depth"),
        hidden_size=d.int("hidden_size"),
        num_heads=d.int("num_heads"),
        intermediate_size=d.int("intermediate_size"),
        image_size=d.int("image_size"),
        patch_size=d.int("patch_size"),
        in_channels=d.int("in_channels"),
        layer_norm_eps=float(d.require("layer_norm_eps")),
        attention_bias=bool(d.require("attention_bias")),
        hidden_act=str(d.require("hidden_act")),
        spatial_merge_size=int(d.get("spatial_merge_size", 1)),  # absent from the official file; the reference's default
    )


def _vq_config(d: _Section) -> VQConfig:
    return VQConfig(
        embed_dim=d.int("embed_dim"),
        num_embeddings=d.int("num_embeddings"),
        latent_channels=d.int("latent_channels"),
    )
