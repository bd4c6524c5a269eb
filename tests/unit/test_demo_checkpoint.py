"""The random-weight demo checkpoint (`glm_core.demo_checkpoint`) is a real GLM-Image folder.

(a) The reference libraries load every component with no missing / unexpected / mismatched keys, and
    `GlmImagePipeline.from_pretrained` loads the whole folder offline.
(b) glm_core runs end to end on it, and its decoded image equals the diffusers pipeline's for the same
    prior tokens and latents (so the folder means the same thing to both).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from glm_core import pipeline
from glm_core.demo_checkpoint import DEMO_MARKER, write_demo_checkpoint
from tests.reference import reference_pipeline

COMPONENTS = ("vision_language_encoder", "text_encoder", "transformer", "vae")


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "GLM-Image-demo")


def assert_clean(info: dict, what: str) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{what}: {key} = {info.get(key)}"


def saved_keys(folder) -> set[str]:
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def test_layout_and_rewrite(demo_folder):
    assert (demo_folder / "model_index.json").is_file()
    assert (demo_folder / DEMO_MARKER).is_file(), "the demo folder must say its weights are random"
    for name in COMPONENTS:
        assert saved_keys(demo_folder / name), f"{name}: no weights written"
    weights = sorted((demo_folder / "transformer").glob("*.safetensors"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    assert write_demo_checkpoint(demo_folder) == demo_folder  # written once, then reused
    assert [w.stat().st_mtime_ns for w in weights] == stamps


def test_transformers_loads_ar_and_t5_cleanly(demo_folder):
    from transformers import GlmImageForConditionalGeneration, T5EncoderModel

    ar, info = GlmImageForConditionalGeneration.from_pretrained(
        demo_folder / "vision_language_encoder", local_files_only=True, output_loading_info=True)
    assert_clean(info, "GlmImageForConditionalGeneration")
    assert set(ar.state_dict()) == saved_keys(demo_folder / "vision_language_encoder")
    _, info = T5EncoderModel.from_pretrained(demo_folder / "text_encoder", local_files_only=True,
                                              output_loading_info=True)
    assert_clean(info, "T5EncoderModel")


def test_diffusers_loads_dit_vae_and_pipeline_cleanly(demo_folder):
    from diffusers import AutoencoderKL, GlmImagePipeline, GlmImageTransformer2DModel

    dit, info = GlmImageTransformer2DModel.from_pretrained(demo_folder, subfolder="transformer",
                                                           local_files_only=True, output_loading_info=True)
    assert_clean(info, "GlmImageTransformer2DModel")
    assert set(dit.state_dict()) == saved_keys(demo_folder / "transformer")
    vae, info = AutoencoderKL.from_pretrained(demo_folder, subfolder="vae", local_files_only=True,
                                              output_loading_info=True)
    assert_clean(info, "AutoencoderKL")
    assert set(vae.state_dict()) == saved_keys(demo_folder / "vae")

    pipe = GlmImagePipeline.from_pretrained(demo_folder, local_files_only=True)
    assert type(pipe.transformer).__name__ == "GlmImageTransformer2DModel"
    assert type(pipe.vision_language_encoder).__name__ == "GlmImageForConditionalGeneration"
    assert type(pipe.processor).__name__ == "GlmImageProcessor"
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"


def test_our_pipeline_runs_and_matches_diffusers(demo_folder):
    model = pipeline.GlmImage.from_folder(demo_folder, device="cpu", dtype=torch.float32)
    prompt, width, height = 'a shop sign that says "OPEN"', 512, 512
    cond = pipeline.encode_prompt(model, prompt, width, height)
    tokens = pipeline.generate_tokens(model, cond, seed=1)
    assert tokens.grid_ids.shape == (1, 16, 16)
    assert 0 <= int(tokens.grid_ids.min()) and int(tokens.grid_ids.max()) < 16384
    latents = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = pipeline.decode(model, cond, tokens, steps=2, guidance=1.5, latents=latents)
    assert ours.shape == (1, 512, 512, 3) and torch.isfinite(ours).all()
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1

    pipe = reference_pipeline(demo_folder, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompt, height=height, width=width, prior_token_ids=tokens.prior_ids, latents=latents.clone(),
               num_inference_steps=2, guidance_scale=1.5, output_type="pt").images.permute(0, 2, 3, 1)
    mse = ((ours.double() - ref.double()) ** 2).mean().item()
    value = float("inf") if mse == 0 else 10 * np.log10(1 / mse)
    print(f"demo checkpoint t2i 512x512: PSNR {value:.1f} dB")
    assert value >= 60.0, f"demo checkpoint: PSNR {value:.2f} dB vs diffusers"
