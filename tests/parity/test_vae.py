"""glm_core.vae vs diffusers AutoencoderKL + VaeImageProcessor, driven as GlmImagePipeline drives them.

The reference side reproduces the pipeline's own lines: reference encode (L913-934: posterior mode via
`retrieve_latents(..., sample_mode="argmax")`, then (z − mean)/std) and final decode (L1056-1069:
z·std + mean, `vae.decode`, `image_processor.postprocess`).
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from glm_core.images import to_rgb_image
from glm_core.vae import GlmImageVAE, VAEConfig, load_vae, postprocess, preprocess_reference
from tests.inputs import raw_config
from tests.reference import reference_vae

VAE_TOL = 1e-5
PIXEL_TOL = 1e-6


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def ref_vae(tiny_checkpoint):
    return reference_vae(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def pipeline_image_processor(ref_vae):
    from diffusers.image_processor import VaeImageProcessor

    # GlmImagePipeline.__init__ (L210-211)
    return VaeImageProcessor(vae_scale_factor=2 ** (len(ref_vae.config.block_out_channels) - 1))


@pytest.fixture(scope="module")
def dit_patch_size(tiny_checkpoint):
    return json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())["patch_size"]


def smooth_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    """Random but smooth RGB content, so Lanczos resizing and the VAE see structure, not just noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 6, generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    fine = fine + 0.1 * torch.rand(fine.shape, generator=generator)
    pixels = (fine[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return PIL.Image.fromarray(pixels, mode="RGB")


def pipeline_latent_stats(ref_vae, dtype):
    shape = (1, ref_vae.config.latent_channels, 1, 1)
    return (torch.tensor(ref_vae.config.latents_mean).view(shape).to(dtype=dtype),
            torch.tensor(ref_vae.config.latents_std).view(shape).to(dtype=dtype))


def test_key_names_match_reference(ref_vae, our_vae):
    ours = {k: tuple(v.shape) for k, v in our_vae.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in ref_vae.state_dict().items()}
    assert ours == ref


@torch.no_grad()
def test_encode_matches_pipeline(ref_vae, our_vae, pipeline_image_processor, dit_patch_size):
    from diffusers.pipelines.glm_image.pipeline_glm_image import retrieve_latents

    image = smooth_image(83, 70, seed=1)
    # Pipeline step 4 (L870-881): the reference is resized to its own size floored to vae_scale·patch.
    multiple_of = pipeline_image_processor.config.vae_scale_factor * dit_patch_size
    height, width = (image.height // multiple_of) * multiple_of, (image.width // multiple_of) * multiple_of
    ref_pixels = pipeline_image_processor.preprocess(image, height=height, width=width)
    # Pipeline step 6 (L911-934).
    mean, std = pipeline_latent_stats(ref_vae, torch.float32)
    ref_latents = retrieve_latents(ref_vae.encode(ref_pixels), sample_mode="argmax")
    ref_latents = (ref_latents - mean) / std

    pixels = preprocess_reference(image, height, width)
    latents = our_vae.encode_latents(pixels)
    assert latents.shape == ref_latents.shape == (1, 16, height // 8, width // 8)
    assert latents.dtype == torch.float32
    assert relative_error(latents, ref_latents) <= VAE_TOL
    # The normalisation is there: the raw mode differs from the normalised latents by far more than the tolerance.
    raw_mode = retrieve_latents(ref_vae.encode(ref_pixels), sample_mode="argmax")
    assert relative_error(latents, raw_mode) > 1e-2


@torch.no_grad()
def test_encode_batch_matches_reference(ref_vae, our_vae):
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = pipeline_latent_stats(ref_vae, torch.float32)
    ref_latents = (ref_vae.encode(images).latent_dist.mode() - mean) / std
    assert relative_error(our_vae.encode_latents(images), ref_latents) <= VAE_TOL


@torch.no_grad()
def test_decode_matches_pipeline(ref_vae, our_vae, pipeline_image_processor):
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(3))  # normalised, as the DiT ends
    # Pipeline L1056-1069.
    ref_in = latents.to(ref_vae.dtype)
    mean, std = pipeline_latent_stats(ref_vae, ref_in.dtype)
    ref_images = ref_vae.decode(ref_in * std + mean, return_dict=False)[0]
    ref_pixels = pipeline_image_processor.postprocess(ref_images, output_type="pt").permute(0, 2, 3, 1)

    images = our_vae.decode_latents(latents)
    assert images.shape == ref_images.shape == (2, 3, 64, 96)
    assert relative_error(images, ref_images) <= VAE_TOL
    pixels = postprocess(images)
    assert pixels.shape == (2, 64, 96, 3) and pixels.dtype == torch.float32
    assert (pixels - ref_pixels).abs().max().item() <= PIXEL_TOL


@torch.no_grad()
def test_bf16_runs_in_bf16_and_matches_reference(tiny_checkpoint):
    ref = reference_vae(tiny_checkpoint, torch.bfloat16)
    ours = load_vae(tiny_checkpoint, "cpu", torch.bfloat16)
    mean, std = pipeline_latent_stats(ref, torch.bfloat16)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ref_latents = (ref.encode(images.to(torch.bfloat16)).latent_dist.mode() - mean) / std
    latents = ours.encode_latents(images)
    assert latents.dtype == torch.bfloat16  # no silent upcast (spec §6.4)
    # Same ops in the same dtype, so bit-identical (checked on CPU with torch 2.13).
    assert torch.equal(latents, ref_latents)
    ref_images = ref.decode(ref_latents * std + mean, return_dict=False)[0]
    decoded = ours.decode_latents(ref_latents)
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded, ref_images)


def test_preprocess_matches_vae_image_processor(pipeline_image_processor):
    image = smooth_image(101, 67, seed=5)
    for height, width in [(64, 96), (48, 48), (72, 104)]:  # down, down, up
        ref = pipeline_image_processor.preprocess(image, height=height, width=width)
        ours = preprocess_reference(image, height, width)
        assert ours.shape == ref.shape == (1, 3, height, width) and ours.dtype == ref.dtype == torch.float32
        assert (ours - ref).abs().max().item() <= PIXEL_TOL


def test_preprocess_accepts_comfy_tensor(pipeline_image_processor):
    image = smooth_image(80, 48, seed=6)
    comfy = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3), as LoadImage builds it
    ref = pipeline_image_processor.preprocess(image, height=32, width=64)
    for tensor in (comfy, comfy[None]):
        assert to_rgb_image(tensor).tobytes() == image.tobytes()
        assert (preprocess_reference(tensor, 32, 64) - ref).abs().max().item() <= PIXEL_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_postprocess_matches_vae_image_processor(pipeline_image_processor, dtype):
    images = (torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(7)) * 1.5).to(dtype)  # past ±1
    ref = torch.from_numpy(pipeline_image_processor.postprocess(images, output_type="np"))
    ours = postprocess(images)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (2, 8, 6, 3)
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    assert ours.min() == 0 and ours.max() == 1


@torch.no_grad()
def test_quant_convs_follow_config(tiny_checkpoint):
    """use_quant_conv / use_post_quant_conv true (diffusers' default): built and applied like the reference."""
    from diffusers import AutoencoderKL

    raw = raw_config(tiny_checkpoint, "vae")
    raw.update(use_quant_conv=True, use_post_quant_conv=True)
    torch.manual_seed(9)
    ref = AutoencoderKL(**{k: v for k, v in raw.items() if not k.startswith("_")}).eval()
    ours = GlmImageVAE(VAEConfig.from_dict(raw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(10)) * 2 - 1
    mean, std = pipeline_latent_stats(ref, torch.float32)
    assert relative_error(ours.encode_latents(images), (ref.encode(images).latent_dist.mode() - mean) / std) <= VAE_TOL
    latents = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(11))
    assert relative_error(ours.decode_latents(latents), ref.decode(latents * std + mean).sample) <= VAE_TOL


@torch.no_grad()
def test_decode_matches_whole_pipeline_output(tiny_checkpoint, our_vae):
    """End to end through GlmImagePipeline itself: its output_type="latent" latents, decoded by us, equal its
    output_type="pt" image (same seed, supplied prior so the AR does not run)."""
    from tests.reference import reference_pipeline

    pipe = reference_pipeline(tiny_checkpoint, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prior = torch.randint(0, 16384, (1, 2 * 2), generator=torch.Generator().manual_seed(12))  # 32² target

    def run(output_type):
        return pipe(prompt="a cat", height=32, width=32, num_inference_steps=1, prior_token_ids=prior,
                    output_type=output_type, generator=torch.Generator().manual_seed(0)).images

    latents, ref_pixels = run("latent"), run("pt")
    pixels = postprocess(our_vae.decode_latents(latents))
    assert pixels.shape == (1, 32, 32, 3)
    assert (pixels - ref_pixels.permute(0, 2, 3, 1)).abs().max().item() <= PIXEL_TOL
