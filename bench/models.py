"""Both implementations at a given configuration, with the same random bf16-valued weights.

The reference (transformers `GlmImageForConditionalGeneration`, diffusers `GlmImageTransformer2DModel`
and `AutoencoderKL`) is built on the meta device from a config.json dict, its parameters are
materialised directly on the device in the wanted dtype, and filled by a fast on-device random
init (never zeros; values always bf16-representable, so an fp32 copy holds exactly the bf16 weights).
Computed buffers (the AR's rotary `inv_freq`) are rebuilt in fp32, as `from_pretrained` leaves them.

glm_core's model is then built on the meta device and given the *same tensors*
(`load_state_dict(assign=True)`): no second copy, and both sides provably run the same weights (the q/k/v and
gate/up parts that our modules fuse are concatenated by their load pre-hook, as from a checkpoint).
With `--model DIR` the reference loads a real checkpoint folder instead and ours shares it the same way.
bench/fullsize_checkpoint.py writes a random-weight folder from the same builders.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glm_core import tiny

# --------------------------------------------------------------------------------------------
# Configurations (config.json contents)

# vision_language_encoder/config.json, spec §1.2.1
REAL_AR_CONFIG = {
    "architectures": ["GlmImageForConditionalGeneration"],
    "model_type": "glm_image",
    "image_token_id": 167855,
    "image_start_token_id": 16384,
    "image_end_token_id": 16385,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "text_config": {
        "model_type": "glm_image_text",
        "hidden_size": 4096,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "intermediate_size": 13696,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 131072,
        "vocab_size": 168064,
        "vision_vocab_size": 16512,
        "attention_bias": True,
        "eos_token_id": 16385,
        "pad_token_id": 167841,
        "rope_parameters": {"rope_theta": 10000, "rope_type": "default", "mrope_section": [8, 12, 12],
                            "partial_rotary_factor": 0.5},
        "dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "glm_image_vision",
        "depth": 40,
        "hidden_size": 1536,
        "num_heads": 16,
        "intermediate_size": 6144,
        "hidden_act": "gelu",
        "attention_bias": True,
        "image_size": 2048,
        "patch_size": 16,
        "in_channels": 3,
        "layer_norm_eps": 1e-06,
        "dtype": "bfloat16",
    },
    "vq_config": {"model_type": "glm_image_vqmodel", "embed_dim": 2048, "num_embeddings": 16384,
                  "latent_channels": 1536, "in_channels": 3, "dtype": "bfloat16"},
}

# transformer/config.json, spec §1.5
REAL_DIT_CONFIG = {
    "_class_name": "GlmImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 30,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "text_embed_dim": 1472,
    "time_embed_dim": 512,
    "condition_dim": 256,
    "prior_vq_quantizer_codebook_size": 16384,
}

# vae/config.json, spec §1.6
REAL_VAE_CONFIG = {
    **{k: v for k, v in tiny.TINY_VAE_CONFIG.items() if not k.startswith("_")},
    "_class_name": "AutoencoderKL",
    "block_out_channels": [128, 512, 1024, 1024],
    "layers_per_block": 3,
    "norm_num_groups": 32,
}


@dataclass
class Configs:
    ar: dict
    dit: dict
    vae: dict
    source: str  # "real (spec §1)", "tiny (glm_core.tiny)" or the checkpoint folder


def real_configs() -> Configs:
    return Configs(copy.deepcopy(REAL_AR_CONFIG), copy.deepcopy(REAL_DIT_CONFIG), copy.deepcopy(REAL_VAE_CONFIG),
                   "real configuration (spec §1)")


def tiny_configs() -> Configs:
    """The tiny test checkpoint's configs (glm_core/tiny.py), so --tiny runs what the tests run."""
    from glm_core import tiny

    return Configs(copy.deepcopy(tiny.TINY_AR_CONFIG), copy.deepcopy(tiny.TINY_DIT_CONFIG),
                   copy.deepcopy(tiny.TINY_VAE_CONFIG), "tiny configuration (glm_core.tiny)")


def folder_configs(folder: str | Path) -> Configs:
    root = Path(folder)

    def read(*parts):
        return json.loads(root.joinpath(*parts).read_text(encoding="utf-8"))

    return Configs(read("vision_language_encoder", "config.json"), read("transformer", "config.json"),
                   read("vae", "config.json"), f"checkpoint folder {root}")


# --------------------------------------------------------------------------------------------
# Materialisation and random weights


def materialize_(model: nn.Module, device: torch.device, param_dtype: torch.dtype) -> nn.Module:
    """Replace every meta parameter by an empty tensor on `device` in `param_dtype` (shared
    parameters stay shared) and every meta buffer by an empty one in its own dtype."""
    new_params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new_params:
                new_params[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=param_dtype if param.is_floating_point() else param.dtype,
                                device=device), requires_grad=False)
            module._parameters[name] = new_params[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.full(buf.shape, float("nan"), dtype=buf.dtype, device=device) \
                    if buf.is_floating_point() else torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    return model


def init_reference_buffers_(model: nn.Module) -> None:
    """Rebuild the reference's computed buffers exactly as `from_pretrained` does (fp32 rotary
    inverse frequencies); any other buffer is unexpected and raises, so a new one cannot slip by."""
    handled = set()
    for prefix, module in model.named_modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "inv_freq"):
            if module.rope_type == "default":
                inv_freq, _ = module.compute_default_rope_parameters(module.config)
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
            device = module.inv_freq.device
            module.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            handled.add(f"{prefix}.inv_freq" if prefix else "inv_freq")
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = inv_freq.clone().to(device=device, dtype=torch.float32)
                handled.add(f"{prefix}.original_inv_freq" if prefix else "original_inv_freq")
    unexpected = [name for name, _ in model.named_buffers() if name not in handled]
    if unexpected:
        raise RuntimeError(f"{type(model).__name__} has buffers the bench does not know how to initialise: "
                           f"{unexpected[:5]}")


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or "Norm" in name


@torch.no_grad()
def random_init_(model: nn.Module, seed: int) -> None:
    """Fast on-device init with PyTorch-default-like scales, every value bf16-representable:
    Linear / Conv weight and bias U(±1/√fan_in); Embedding N(0, 1); norm weight 1 + U(±0.1) and
    norm bias U(±0.1). Nothing is zero (METHOD.md: zeros hide unwritten outputs and wrong indexing)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    done: set[int] = set()

    def fill(param: torch.Tensor, kind: str, scale: float) -> None:
        if id(param) in done or param is None:
            return
        done.add(id(param))
        tmp = param if param.dtype == torch.bfloat16 else torch.empty(param.shape, dtype=torch.bfloat16,
                                                                      device=param.device)
        if kind == "uniform":
            tmp.uniform_(-scale, scale, generator=gen)
        elif kind == "normal":
            tmp.normal_(0.0, scale, generator=gen)
        elif kind == "one_plus":
            tmp.uniform_(1.0 - scale, 1.0 + scale, generator=gen)
        if tmp is not param:
            param.copy_(tmp)
            del tmp

    for module in model.modules():
        own = {name: p for name, p in module._parameters.items() if p is not None}
        if not own:
            continue
        if isinstance(module, nn.Embedding):
            fill(own["weight"], "normal", 1.0)
        elif _is_norm(module):
            for name, p in own.items():
                fill(p, "one_plus" if name == "weight" else "uniform", 0.1)
        else:
            weight = own.get("weight")
            fan_in = weight[0].numel() if weight is not None and weight.dim() >= 2 else None
            for name, p in own.items():
                if p.dim() >= 2:
                    fill(p, "uniform", 1.0 / math.sqrt(p[0].numel()))
                elif fan_in is not None:
                    fill(p, "uniform", 1.0 / math.sqrt(fan_in))
                else:  # a stray 1-D parameter of an unknown module: treat as a scale
                    fill(p, "one_plus", 0.1)
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"random_init_ left parameters untouched: {missing[:5]}")


# --------------------------------------------------------------------------------------------
# Reference models


def reference_ar(config: dict, device, dtype: torch.dtype, seed: int, folder: Path | None = None):
    """transformers `GlmImageForConditionalGeneration` in eval mode, params in `dtype`, rotary in fp32."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    device = torch.device(device)
    if folder is not None:
        model = GlmImageForConditionalGeneration.from_pretrained(
            Path(folder) / "vision_language_encoder", dtype=dtype).to(device)
        return model.eval().requires_grad_(False)
    cfg = GlmImageConfig.from_dict(copy.deepcopy(config))
    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(cfg)
    materialize_(model, device, dtype)
    init_reference_buffers_(model)
    random_init_(model, seed)
    return model.eval().requires_grad_(False)


def _reference_diffusers_model(model_class, subfolder: str, config: dict, device, dtype: torch.dtype, seed: int,
                                folder: Path | None):
    """A diffusers model in eval mode: from `folder/subfolder`, or built from `config` with random weights."""
    device = torch.device(device)
    if folder is not None:
        model = model_class.from_pretrained(Path(folder), subfolder=subfolder, torch_dtype=dtype)
        return model.to(device).eval().requires_grad_(False)
    with torch.device("meta"):
        model = model_class.from_config(copy.deepcopy(config))
    materialize_(model, device, dtype)
    init_reference_buffers_(model)
    random_init_(model, seed)
    return model.eval().requires_grad_(False)


def reference_dit(config: dict, device, dtype: torch.dtype, seed: int, folder: Path | None = None):
    from diffusers import GlmImageTransformer2DModel

    return _reference_diffusers_model(GlmImageTransformer2DModel, "transformer", config, device, dtype, seed, folder)


def reference_vae(config: dict, device, dtype: torch.dtype, seed: int, folder: Path | None = None):
    from diffusers import AutoencoderKL

    return _reference_diffusers_model(AutoencoderKL, "vae", config, device, dtype, seed, folder)


@torch.no_grad()
def cast_parameters_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters (not buffers) in place, one at a time, as `from_pretrained(dtype=)`
    would have loaded them; the old storage is released as we go (peak = model + one tensor)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


# --------------------------------------------------------------------------------------------
# glm_core models sharing the reference's tensors


def _share(ours: nn.Module, reference: nn.Module, device, keep: Callable[[str], bool] = lambda key: True
           ) -> nn.Module:
    """Give `ours` (built on the meta device) the reference's tensors under the checkpoint's key names, `keep`
    choosing which of the reference's keys belong to it. The parts that our modules fuse at load time (q/k/v,
    gate/up) are concatenated by their `load_state_dict` pre-hook, as from a checkpoint; every other tensor is
    the reference's own (no copy)."""
    from glm_core.checkpoint import checkpoint_fusions, init_computed_buffers

    state = {key: value for key, value in reference.state_dict().items() if keep(key)}
    expected = set(ours.state_dict())
    for fused, parts in checkpoint_fusions(ours).items():
        if fused in expected:
            expected = (expected - {fused}) | set(parts)
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise RuntimeError(f"{type(ours).__name__} and {type(reference).__name__} key names differ: "
                           f"missing in reference {missing[:5]}, extra in reference {unexpected[:5]}")
    ours.load_state_dict(state, strict=True, assign=True)
    init_computed_buffers(ours, torch.device(device))
    return ours.eval().requires_grad_(False)


def ours_ar(config: dict, reference: nn.Module, device):
    """Our text decoder + head on the reference's tensors (its vision tower is `ours_vision`); the decode layer
    compiled as `load_ar` would (on CUDA)."""
    from glm_core.ar.config import ARConfig
    from glm_core.ar.model import GlmImageAR, is_vision_key
    from glm_core.compiling import compile_backend

    with torch.device("meta"):
        model = GlmImageAR(ARConfig.from_dict(copy.deepcopy(config)))
    model = _share(model, reference, device, keep=lambda key: not is_vision_key(key))
    model.compile_backend = compile_backend(device)
    return model


def ours_vision(config: dict, reference: nn.Module, device):
    """Our vision stage (vision tower + VQ: reference images -> codebook ids) on the reference AR's tensors."""
    from glm_core.ar.config import ARConfig
    from glm_core.ar.model import is_vision_key
    from glm_core.ar.vision import VisionTokenizer

    with torch.device("meta"):
        model = VisionTokenizer(ARConfig.from_dict(copy.deepcopy(config)))
    return _share(model, reference, device, keep=is_vision_key)


def ours_dit(config: dict, reference: nn.Module, device):
    """Our DiT on the reference's tensors; its blocks compiled as `load_dit` would (on CUDA)."""
    from glm_core.compiling import compile_backend
    from glm_core.dit.config import DiTConfig
    from glm_core.dit.model import GlmImageDiT

    with torch.device("meta"):
        model = GlmImageDiT(DiTConfig.from_dict(copy.deepcopy(config)))
    model = _share(model, reference, device)
    model.compile_backend = compile_backend(device)
    return model


def ours_vae(config: dict, reference: nn.Module, device):
    from glm_core.vae import GlmImageVAE, VAEConfig

    with torch.device("meta"):
        model = GlmImageVAE(VAEConfig.from_dict(copy.deepcopy(config)))
    return _share(model, reference, device)


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def configs_for(args):
    """The configuration a bench run uses: a real folder's (--model), the tiny one (--tiny), or the real sizes."""
    if args.model:
        return folder_configs(args.model)
    return tiny_configs() if args.tiny else real_configs()
