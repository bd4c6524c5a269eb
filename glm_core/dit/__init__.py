from .config import DiTConfig
from .model import GlmImageDiT, load_dit
from .reference_kv import ReferenceKV

__all__ = ["DiTConfig", "GlmImageDiT", "ReferenceKV", "load_dit"]
