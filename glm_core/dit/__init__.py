
from glm_core.dit.config import DiTConfig, load_dit_config
from glm_core.dit.model import GlmImageDiT, load_dit, pad_glyph_rows
from glm_core.dit.reference_kv import ReferenceKV

__all__ = ["DiTConfig", "GlmImageDiT", "ReferenceKV", "load_dit", "load_dit_config", "pad_glyph_rows"]
