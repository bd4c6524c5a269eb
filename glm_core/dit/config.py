"""DiTConfig: the GLM-Image diffusion transformer's shape, read from `transformer/config.json`.

Never fall back to `GlmImageTransformer2DModel.__init__` defaults: those are CogView4 leftovers
(64 heads x 40) and not GLM-Image's 32 x 128 (spec §6.24). Every shape field is required.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiTConfig:
    patch_size: int
    in_channels: int
    out_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    text_embed_dim: int  # width of the glyph (T5) embeddings
    time_embed_dim: int
    condition_dim: int  # sinusoid width per size / crop scalar
    prior_vq_quantizer_codebook_size: int
    # Fixed by the reference code, not stored in config.json (spec §1.5).
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sinusoid_max_period: float = 10000.0

    _REQUIRED = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "text_embed_dim", "time_embed_dim", "condition_dim",
                 "prior_vq_quantizer_codebook_size")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def size_condition_dim(self) -> int:
        """Width of the [crop (y, x) | target (h, w)] sinusoids: 2 pairs x 2 scalars x condition_dim."""
        return 2 * 2 * self.condition_dim

    @classmethod
    def from_dict(cls, config: dict, source: str = "transformer/config.json") -> "DiTConfig":
        missing = [key for key in cls._REQUIRED if config.get(key) is None]
        if missing:
            raise ValueError(
                f"{source}: missing {', '.join(missing)}; a GLM-Image transformer config has all of "
                f"{', '.join(cls._REQUIRED)} (the class defaults are CogView4's, never use them).")
        values = {key: int(config[key]) for key in cls._REQUIRED}
        config_obj = cls(**values)
        config_obj.validate(source)
        return config_obj

    def validate(self, source: str = "transformer/config.json") -> None:
        # Rotary embedding splits head_dim into h/w halves, each rotated by halves again (spec §1.5 step 1).
        if self.attention_head_dim % 4:
            raise ValueError(f"{source}: attention_head_dim={self.attention_head_dim} must be divisible by 4 "
                             "(2-D rotary embedding over head_dim).")
        if self.in_channels < 1 or self.out_channels < 1 or self.patch_size < 1 or self.num_layers < 1:
            raise ValueError(f"{source}: patch_size, in/out_channels and num_layers must be positive.")

