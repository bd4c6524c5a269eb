"""glm_core.vae on its own: reference sizes, non-finite output, and the config read from the checkpoint."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from glm_core.vae import VAEConfig, VaeNumericsError, load_vae
from tests.inputs import raw_config


@torch.no_grad()
def test_non_finite_output_raises(tiny_checkpoint):
    vae = load_vae(tiny_checkpoint, "cpu", torch.float32)
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    vae.decode_latents(latents)  # finite before the fault
    vae.decoder.up_blocks[1].resnets[0].conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(VaeNumericsError, match="float32 or bfloat16"):
        vae.decode_latents(latents)
    vae.encoder.conv_in.bias[0] = float("nan")
    with pytest.raises(VaeNumericsError, match="NaN"):
        vae.encode_latents(torch.zeros(1, 3, 16, 16))


def test_config_reads_checkpoint_values(tiny_checkpoint, our_vae):
    raw = raw_config(tiny_checkpoint, "vae")
    config = our_vae.config
    assert list(config.block_out_channels) == raw["block_out_channels"]
    assert config.latents_mean == tuple(raw["latents_mean"]) and config.latents_std == tuple(raw["latents_std"])
    assert config.scale_factor == 8
    assert our_vae.quant_conv is None and our_vae.post_quant_conv is None


@pytest.mark.parametrize("change, message", [
    ({"mid_block_add_attention": True}, "mid_block_add_attention"),
    ({"mid_block_add_attention": None}, "mid_block_add_attention"),
    ({"latents_mean": None}, "latents_mean"),
    ({"latents_std": [1.0] * 4}, "latent_channels"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D",
                           "DownEncoderBlock2D"]}, "down_block_types"),
    ({"norm_num_groups": 3}, "norm_num_groups"),
])
def test_config_rejects_unsupported_values(tiny_checkpoint, change, message):
    raw = raw_config(tiny_checkpoint, "vae")
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict(raw)

