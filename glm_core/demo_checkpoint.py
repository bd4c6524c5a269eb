"""A tiny GLM-Image folder with random weights, for the demo and for trying the pack without the real model.

Laid out exactly like zai-org/GLM-Image (spec §3), so every loader path is the real one; the weights come
from glm_core's own modules (random init), which is why the pictures it makes are noise.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from . import tiny
from .ar.config import ARConfig
from .ar.model import GlmImageAR
from .ar.vision import VisionTokenizer
from .checkpoint import is_glm_image_folder, official_state_dict, save_sharded
from .dit.config import DiTConfig
from .dit.model import GlmImageDiT
from .t5 import T5Encoder, T5EncoderConfig
from .vae import GlmImageVAE, VAEConfig

DEMO_MARKER = "RANDOM_WEIGHTS_DEMO.txt"


def default_demo_folder() -> Path:
    return Path.home() / ".cache" / "glm_core" / "tiny-random-demo"


def _bf16_state(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The modules' weights under the official key names, in bf16 (the checkpoint's dtype)."""
    return {name: t.detach().to(torch.bfloat16).contiguous()
            for module in modules for name, t in official_state_dict(module).items()}


def write_demo_checkpoint(folder=None, *, seed: int = 0) -> Path:
    """Write (once) and return a tiny random-weight GLM-Image folder."""
    root = Path(folder) if folder is not None else default_demo_folder()
    if is_glm_image_folder(root) and (root / DEMO_MARKER).is_file():
        return root
    tiny.write_tiny_layout(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ar_config = ARConfig.from_dict(tiny.TINY_AR_CONFIG, tiny.TINY_AR_GENERATION_CONFIG)
        ar_state = _bf16_state(GlmImageAR(ar_config), VisionTokenizer(ar_config))
        save_sharded(ar_state, root / "vision_language_encoder", "model", 3)
        dit = GlmImageDiT(DiTConfig.from_dict(tiny.TINY_DIT_CONFIG))
        save_sharded(_bf16_state(dit), root / "transformer", "diffusion_pytorch_model", 2)
        vae = GlmImageVAE(VAEConfig.from_dict(tiny.TINY_VAE_CONFIG))
        save_file(_bf16_state(vae), str(root / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        t5 = T5Encoder(T5EncoderConfig.from_dict(tiny.TINY_T5_CONFIG))
        t5_state = {k: v.contiguous() for k, v in t5.state_dict().items()
                    if k != "encoder.embed_tokens.weight"}  # tied to `shared.weight`, as save_pretrained writes it
        save_file(t5_state, str(root / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    (root / DEMO_MARKER).write_text("Tiny GLM-Image with RANDOM weights, written by glm_core for the demo. "
                                    "Its images are noise; use the real zai-org/GLM-Image folder for pictures.\n")
    return root
