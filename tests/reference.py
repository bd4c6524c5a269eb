"""Load the reference implementations (transformers 5.23 / diffusers 0.42.1) from a GLM-Image folder.

For tests only: glm_core never imports these classes. Everything loads offline from the
local folder (`local_files_only=True`, HF offline env vars set before the libraries are imported).

Usage:
    from tests.reference import reference_ar, reference_processor, reference_ar_inputs
    ar = reference_ar(tiny_checkpoint)                     # fp32, eval
    inputs = reference_ar_inputs(reference_processor(tiny_checkpoint), "a cat", 64, 64)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def _eval(loaded):
    """`model.eval()`; with `output_loading_info=True` the loaders return `(model, info)`: keep that shape."""
    if isinstance(loaded, tuple):
        loaded[0].eval()
        return loaded
    return loaded.eval()


def reference_processor(path):
    """transformers `GlmImageProcessor` from `<path>/processor` (PIL image backend without torchvision)."""
    from transformers import AutoProcessor, GlmImageProcessor

    processor = AutoProcessor.from_pretrained(Path(path) / "processor", local_files_only=True)
    if not isinstance(processor, GlmImageProcessor):
        raise TypeError(f"AutoProcessor returned {type(processor).__name__}, expected GlmImageProcessor")
    return processor


def reference_ar_inputs(processor, prompt: str, height: int, width: int, images=()):
    """AR inputs exactly as diffusers' `generate_prior_tokens` builds them: references first, then text.

    Returns the processor's BatchFeature: input_ids, attention_mask, image_grid_thw, images_per_sample
    and, with references, pixel_values. `processor_kwargs` keeps transformers from warning.
    """
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"target_h": height, "target_w": width, "padding": False},
    )


def reference_ar(path, dtype: torch.dtype = torch.float32, **kwargs):
    """transformers `GlmImageForConditionalGeneration` from `<path>/vision_language_encoder`, eval mode."""
    from transformers import GlmImageForConditionalGeneration

    return _eval(GlmImageForConditionalGeneration.from_pretrained(
        Path(path) / "vision_language_encoder", dtype=dtype, local_files_only=True, **kwargs
    ))


def reference_t5(path, dtype: torch.dtype = torch.float32, **kwargs):
    """transformers `T5EncoderModel` (glyph encoder) from `<path>/text_encoder`; `wo` stays fp32 under bf16."""
    from transformers import T5EncoderModel

    return _eval(T5EncoderModel.from_pretrained(Path(path) / "text_encoder", dtype=dtype, local_files_only=True,
                                                **kwargs))


def reference_byt5_tokenizer(path):
    """transformers `ByT5Tokenizer` from `<path>/tokenizer`."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer.from_pretrained(Path(path) / "tokenizer", local_files_only=True)


def reference_dit(path, dtype: torch.dtype = torch.float32, **kwargs):
    """diffusers `GlmImageTransformer2DModel` from `<path>/transformer`, eval mode."""
    from diffusers import GlmImageTransformer2DModel

    return _eval(GlmImageTransformer2DModel.from_pretrained(
        path, subfolder="transformer", dtype=dtype, local_files_only=True, **kwargs
    ))


def reference_vae(path, dtype: torch.dtype = torch.float32, **kwargs):
    """diffusers `AutoencoderKL` from `<path>/vae`, eval mode."""
    from diffusers import AutoencoderKL

    return _eval(AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, local_files_only=True, **kwargs))


def reference_scheduler(path):
    """diffusers `FlowMatchEulerDiscreteScheduler` from `<path>/scheduler`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)


def reference_pipeline(path, dtype: torch.dtype = torch.float32, **kwargs):
    """diffusers `GlmImagePipeline` from the whole folder (all components in `dtype`, CPU).

    Text-to-image runs as-is. Editing is broken inside the pipeline's own prior generation
    (spec §6.26): supply `prior_token_ids`, `prior_token_image_ids` (see `reference_image_tokens`)
    and `source_image_grid_thw` to run it unpatched (fixture-notes §7).
    """
    from diffusers import GlmImagePipeline

    return GlmImagePipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)


@torch.no_grad()
def reference_image_tokens(ar_model, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """VQ codebook ids of reference images, the correct transformers-5.23 way (fixture-notes §7).

    pixel_values: (ΣN_patch, 768) from the processor; grids: (N_img, 3) rows (1, gh, gw) for the
    *reference images only* (not the target grids). Returns (Σ gh·gw,) long: each image's ids in
    row-major order, images concatenated in order. Split with `ids.split((grids.prod(-1)).tolist())`.
    """
    features = ar_model.get_image_features(pixel_values, grids, return_dict=True).pooler_output  # [(C, gh, gw)]
    return ar_model.get_image_tokens(features)


def assert_loaded_cleanly(info: dict, what: str) -> None:
    """`info` from a loader called with `output_loading_info=True` lists nothing missing, unexpected or mismatched."""
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], f"{what}: {key} = {info[key]}"


__all__ = [
    "assert_loaded_cleanly", "reference_ar", "reference_ar_inputs", "reference_byt5_tokenizer", "reference_dit",
    "reference_image_tokens", "reference_pipeline", "reference_processor", "reference_scheduler", "reference_t5",
    "reference_vae",
]
