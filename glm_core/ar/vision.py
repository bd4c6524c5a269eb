"""Reference-image tokenizer: vision encoder + VQ (spec §1.2.5, §1.2.6), the "vision" stage.

The AR never sees vision features: the encoder output of each reference image is quantised to
codebook ids, and those ids replace the `<|image|>` placeholders in the prompt (spec §1.2.7).
Attribute names mirror the checkpoint keys under `model.visual.` and `model.vqmodel.`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ARConfig, VisionConfig, VQConfig

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as the reference's ACT2FN["gelu"]
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r} in config.json (known: {sorted(_ACTIVATIONS)})") from None


class VisionPatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.in_channels = config.in_channels
        self.patch_size = config.patch_size
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values (N_patches, C*p*p), each row one channel-major patch
        patches = pixel_values.view(-1, self.in_channels, self.patch_size, self.patch_size)
        return self.proj(patches.to(self.proj.weight.dtype)).flatten(1)  # (N_patches, hidden)


class VisionEmbeddings(nn.Module):
    """Learned square position table, resampled to each image's patch grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(side * side, config.hidden_size)

    def forward(self, grids: Sequence[tuple[int, int]], device) -> torch.Tensor:
        table = self.position_embedding.weight
        side = round(table.shape[0] ** 0.5)
        # (1, hidden, side, side) in fp32: the resampling runs in fp32 and is cast back (spec §1.2.5)
        table_2d = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()
        rows, cols, heights, widths = [], [], [], []
        for h, w in grids:
            rows.append(torch.arange(h, device=device).repeat_interleave(w))  # row-major patches
            cols.append(torch.arange(w, device=device).repeat(h))
            heights.append(torch.full((h * w,), float(h), device=device))
            widths.append(torch.full((h * w,), float(w), device=device))
        row, col = torch.cat(rows), torch.cat(cols)
        height, width = torch.cat(heights), torch.cat(widths)
        # sample at patch centres in normalised [-1, 1] coordinates; the reference comment says bicubic,
        # the mode is bilinear (spec §6.10)
        x = ((col + 0.5) / width) * 2 - 1
        y = ((row + 0.5) / height) * 2 - 1
        sample_grid = torch.stack((x, y), dim=-1).view(1, -1, 1, 2)  # (1, N, 1, 2)
        sampled = F.grid_sample(table_2d, sample_grid, mode="bilinear", align_corners=False, padding_mode="border")
        return sampled[0, :, :, 0].t().to(table.dtype)  # (N, hidden)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)  # (heads, N, d)
        outputs = []
        start = 0
        for length in lengths:  # bidirectional attention inside each image only
            span = slice(start, start + length)
            outputs.append(F.scaled_dot_product_attention(q[None, :, span], k[None, :, span], v[None, :, span])[0])
            start += length
        out = torch.cat(outputs, dim=1).transpose(0, 1).reshape(n, -1)  # (N, hidden)
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lengths)
        return x + self.mlp(self.norm2(x))


class VisionModel(nn.Module):
    """Pre-LN ViT without final norm or merger (spec §1.2.5). Output: (N_patches, hidden)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.spatial_merge_size != 1:
            raise ValueError(f"vision_config.spatial_merge_size {config.spatial_merge_size} is not supported (expected 1)")
        self.embeddings = VisionEmbeddings(config)
        self.patch_embed = VisionPatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        x = x + self.embeddings(grids, x.device)
        lengths = [h * w for h, w in grids]
        for block in self.blocks:
            x = block(x, lengths)
        return x


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.num_embeddings, config.embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, embed_dim) -> nearest code ids (N,) on L2-normalised vectors, in the input dtype."""
        z = F.normalize(z, p=2, dim=-1)
        codes = F.normalize(self.embedding.weight, p=2, dim=-1)
        # same expression as the reference (|z|^2 + |e|^2 - 2 z.e) so that near-ties round alike
        distances = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * (z @ codes.t())
        return distances.argmin(dim=1)


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        # in the checkpoint, unused at inference (spec §1.2.6); kept so that loading stays strict
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)

    def encode(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """features (h*w, latent_channels) of one image -> (h*w,) row-major code ids."""
        h, w = grid
        fmap = features.t().reshape(1, -1, h, w)  # (1, C, h, w)
        z = self.quant_conv(fmap)[0].permute(1, 2, 0).reshape(h * w, -1)  # (h*w, embed_dim)
        return self.quantize(z)


class VisionBackbone(nn.Module):
    """The vision tower and the VQ under the checkpoint's `model.` prefix."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.visual = VisionModel(config.vision)
        self.vqmodel = VQModel(config.vq)


class VisionTokenizer(nn.Module):
    """Reference images -> codebook ids: the "vision" stage, read from vision_language_encoder/ beside the AR's
    text decoder but loaded on its own (1.2 B parameters that the token sampling never needs)."""

    def __init__(self, config: ARConfig):
        super().__init__()
        if config.vq.latent_channels != config.vision.hidden_size:
            raise ValueError(
                f"config.json: vq_config.latent_channels {config.vq.latent_channels} must equal "
                f"vision_config.hidden_size {config.vision.hidden_size}")
        self.config = config
        self.model = VisionBackbone(config)

    @property
    def device(self) -> torch.device:
        return self.model.vqmodel.quantize.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vqmodel.quantize.embedding.weight.dtype

    @torch.no_grad()
    def image_token_ids(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Reference pixels (Σ h*w, 3·16·16) -> codebook ids (Σ h*w,) long, row-major per image, images in order."""
        features = self.model.visual(pixel_values.to(self.device), grids)
        ids, start = [], 0
        for h, w in grids:
            ids.append(self.model.vqmodel.encode(features[start : start + h * w], (h, w)))
            start += h * w
        return torch.cat(ids)


def load_vision(checkpoint_folder, device, dtype, *, dry_run: bool = False) -> VisionTokenizer:
    """The vision tower + VQ from a GLM-Image folder's vision_language_encoder/ (the text decoder's keys skipped)."""
    from ..checkpoint import load_weights, open_checkpoint
    from .model import is_vision_key

    folder = open_checkpoint(checkpoint_folder)
    component = folder.component_dir("vision_language_encoder")
    config = ARConfig.from_folder(component)
    with torch.device("meta"):
        model = VisionTokenizer(config)
    load_weights(model, component, device=device, dtype=dtype, ignore_keys=lambda key: not is_vision_key(key),
                 dry_run=dry_run)
    return model.eval().requires_grad_(False)
