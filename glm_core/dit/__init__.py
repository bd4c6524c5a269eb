
from .config import DiTConfig, load_dit_config
from .model import GlmImageDiT, load_dit, pad_glyph_rows
from .reference_kv import ReferenceKV

__all__ = ["DiTConfig", "GlmImageDiT", "ReferenceKV", "load_dit", "load_dit_config", "pad_glyph_rows"]
