"""GLM-Image VAE (an AutoencoderKL without mid-block attention), latent (de)normalisation, image pre/post.

Spec §1.6, §2.1 step 11, §2.2 steps 5-6, §6.3-6.4. Module attribute names mirror the diffusers checkpoint
keys (`encoder.down_blocks.0.resnets.1.norm1.weight`, `decoder.up_blocks.2.upsamplers.0.conv.bias`, ...),
so `checkpoint.load_weights` needs no key mapping.

Latents leave `encode_latents` and enter `decode_latents` *normalised* per channel with the config's
`latents_mean` / `latents_std`: GLM-Image does not use `scaling_factor` (0.18215) at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .images import to_rgb_image

# diffusers' Encoder/Decoder hard-code eps 1e-6 for every GroupNorm; config.json does not carry it.
GROUP_NORM_EPS = 1e-6
VAE_COMPONENT = "vae"


class VaeNumericsError(ValueError):
    """The VAE produced NaN/inf, typically fp16 overflow in the decoder's large activations."""

    __module__ = "glm_core"  # a short name in ComfyUI's error report (see CheckpointError)


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    latent_channels: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell: one ×2 down/upsample between consecutive blocks (8 for GLM-Image)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict, source: str = "vae/config.json") -> "VAEConfig":
        def fail(message: str) -> ValueError:
            return ValueError(f"{source}: {message}")

        required = ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels",
                    "latents_mean", "latents_std")
        missing = [key for key in required if config.get(key) is None]
        if missing:
            raise fail(f"missing {', '.join(missing)}; GLM-Image's VAE config defines all of {', '.join(required)} "
                       "(latents_mean/std normalise the latents; the pipeline does not use scaling_factor).")
        channels = tuple(int(c) for c in config["block_out_channels"])
        num_blocks = len(channels)
        # Missing keys take diffusers' AutoencoderKL defaults, so unsupported defaults are rejected below too.
        down_types = list(config.get("down_block_types", ["DownEncoderBlock2D"]))
        up_types = list(config.get("up_block_types", ["UpDecoderBlock2D"]))
        if down_types != ["DownEncoderBlock2D"] * num_blocks:
            raise fail(f"down_block_types {down_types} not supported; expected {num_blocks}× DownEncoderBlock2D "
                       "(one per block_out_channels entry).")
        if up_types != ["UpDecoderBlock2D"] * num_blocks:
            raise fail(f"up_block_types {up_types} not supported; expected {num_blocks}× UpDecoderBlock2D.")
        act_fn = config.get("act_fn", "silu")
        if act_fn not in ("silu", "swish"):
            raise fail(f"act_fn {act_fn!r} not supported; only silu.")
        if config.get("mid_block_add_attention", True):
            raise fail("mid_block_add_attention is true (or absent, which diffusers treats as true); this "
                       "implementation has no mid-block attention, which GLM-Image's VAE does not use.")
        if config.get("norm_type", "group") != "group":
            raise fail(f"norm_type {config.get('norm_type')!r} not supported; only group norm.")
        groups = int(config["norm_num_groups"])
        if any(c % groups for c in channels):
            raise fail(f"norm_num_groups {groups} does not divide every block_out_channels entry {list(channels)}.")
        latent_channels = int(config["latent_channels"])
        mean = tuple(float(v) for v in config["latents_mean"])
        std = tuple(float(v) for v in config["latents_std"])
        if len(mean) != latent_channels or len(std) != latent_channels:
            raise fail(f"latents_mean ({len(mean)}) and latents_std ({len(std)}) need latent_channels "
                       f"({latent_channels}) entries.")
        if any(s == 0 for s in std):
            raise fail("latents_std contains 0.")
        return cls(
            block_out_channels=channels,
            layers_per_block=int(config["layers_per_block"]),
            norm_num_groups=groups,
            latent_channels=latent_channels,
            latents_mean=mean,
            latents_std=std,
            in_channels=int(config.get("in_channels", 3)),
            out_channels=int(config.get("out_channels", 3)),
            # diffusers defaults both to true when absent.
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        )


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv, twice, plus a (1×1-projected when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _group_norm(groups, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU / add on fresh intermediates only: at 2048² one activation is up to 2 GiB in bf16,
        # so each avoided temporary matters. Numerically identical to the out-of-place form.
        hidden = self.conv1(F.silu(self.norm1(x), inplace=True))
        hidden = self.conv2(F.silu(self.norm2(hidden), inplace=True))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return hidden.add_(shortcut)


class Downsample(nn.Module):
    """Asymmetric zero pad (right/bottom by one) then a stride-2 3×3 conv, as diffusers' VAE encoder does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers))
        # A list of one, to keep the checkpoint key `downsamplers.0.conv`.
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Two resnets at the lowest resolution (no attention: mid_block_add_attention is false)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] → (B, 2·latent, H/8, W/8) posterior moments (mean, logvar)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv3x3(config.in_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                      downsample=i < len(channels) - 1)
            for i in range(len(channels)))
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = _group_norm(groups, channels[-1])
        self.conv_out = _conv3x3(channels[-1], 2 * config.latent_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """(B, latent, h, w) raw latents → (B, 3, 8h, 8w) images in roughly [-1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        reversed_channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = _conv3x3(config.latent_channels, reversed_channels[0])
        self.mid_block = MidBlock(reversed_channels[0], groups)
        # The decoder's up blocks have one resnet more than the encoder's down blocks.
        self.up_blocks = nn.ModuleList(
            UpBlock(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1, groups,
                    upsample=i < len(reversed_channels) - 1)
            for i in range(len(reversed_channels)))
        self.conv_norm_out = _group_norm(groups, reversed_channels[-1])
        self.conv_out = _conv3x3(reversed_channels[-1], config.out_channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(latents)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


# ---------------------------------------------------------------------------------------------------------------
# The model


class GlmImageVAE(nn.Module):
    """AutoencoderKL as GLM-Image configures it, with the pipeline's per-channel latent normalisation."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = (nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def _latent_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 first, then the run dtype: the reference builds them with torch.tensor(list).to(dtype).
        shape = (1, self.config.latent_channels, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(self.device, dtype)
        std = torch.tensor(self.config.latents_std).view(shape).to(self.device, dtype)
        return mean, std

    @torch.inference_mode()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → normalised latents (mode − mean)/std, (B, latent, H/8, W/8), in the VAE dtype.

        Uses the posterior mode (its mean), not a sample, as the pipeline does for references (spec §2.2 step 6).
        """
        _check_image_batch(images, self.config.in_channels, self.config.scale_factor)
        moments = self.encoder(images.to(self.device, self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        latent_mode = moments[:, : self.config.latent_channels]  # (B, latent, h, w); logvar half unused
        mean, std = self._latent_stats(latent_mode.dtype)
        latents = (latent_mode - mean) / std
        _raise_if_not_finite(latents, "encoding", self.dtype)
        return latents

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, latent, h, w) → images (B, 3, 8h, 8w) in the VAE dtype, roughly in [-1, 1].

        De-normalises with z·std + mean first (spec §6.3), after casting to the VAE dtype as the pipeline does.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode_latents expects (B, {self.config.latent_channels}, h, w) latents, "
                             f"got {tuple(latents.shape)}.")
        latents = latents.to(self.device, self.dtype)
        mean, std = self._latent_stats(latents.dtype)
        latents = latents * std + mean
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        images = self.decoder(latents)
        _raise_if_not_finite(images, "decoding", self.dtype)
        return images


def _check_image_batch(images: torch.Tensor, channels: int, multiple: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"encode_latents expects (B, {channels}, H, W) images in [-1, 1], got {tuple(images.shape)}.")
    if images.shape[-2] % multiple or images.shape[-1] % multiple:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {multiple} "
                         "(the VAE downsamples by that factor).")


def _raise_if_not_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(tensor).all():
        raise VaeNumericsError(
            f"VAE {what} produced NaN or inf values in {dtype} (usually fp16 overflow). "
            "Load the VAE in float32 or bfloat16 instead.")


def load_vae(checkpoint_folder, device, dtype: torch.dtype, *, dry_run: bool = False) -> GlmImageVAE:
    """Build the VAE from `<folder>/vae/config.json` on the meta device and load its weights strictly (dry_run:
    checks only)."""
    from .checkpoint import CheckpointFolder, load_weights, open_checkpoint

    folder = checkpoint_folder if isinstance(checkpoint_folder, CheckpointFolder) else open_checkpoint(checkpoint_folder)
    config = VAEConfig.from_dict(folder.read_config(VAE_COMPONENT),
                                 source=str(Path(folder.component_dir(VAE_COMPONENT)) / "config.json"))
    with torch.device("meta"):
        vae = GlmImageVAE(config)
    load_weights(vae, folder.component_dir(VAE_COMPONENT), device=device, dtype=dtype, dry_run=dry_run)
    return vae.eval()


# ---------------------------------------------------------------------------------------------------------------
# Image pre/post-processing (diffusers VaeImageProcessor as the GLM pipeline uses it)


def preprocess_reference(image, height: int, width: int) -> torch.Tensor:
    """Reference image → (1, 3, height, width) float32 in [-1, 1] for `encode_latents`.

    Lanczos resize of the 8-bit RGB image (PIL, reducing_gap None), /255, then 2x − 1 — VaeImageProcessor's steps.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"reference size must be positive, got {height}×{width}.")
    pil = to_rgb_image(image).resize((width, height), resample=PIL.Image.Resampling.LANCZOS, reducing_gap=None)
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return (2.0 * pixels - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def postprocess(images: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] → ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1] on the CPU.

    Denormalises in the VAE dtype before the float32 cast, as VaeImageProcessor.postprocess does.
    """
    images = (images * 0.5 + 0.5).clamp(0, 1)
    return images.cpu().permute(0, 2, 3, 1).float().contiguous()
