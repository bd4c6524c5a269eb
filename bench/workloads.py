"""Inputs for both implementations, and the work they imply (FLOPs, bytes).

The whole-image runs of bench/run.py take their sizes (`E2ESizes`), prompts and reference pictures from here.
For the full-size parity (bench/parity_fullsize.py), synthetic model inputs: the AR prompts are what the processor would produce (spec §1.3), with random ordinary text ids in
place of tokenized words: `[text…] <sop> h w <eop> <sop> h' w' <eop> <image-start>` for
text-to-image, `<image-start> <|image|>×(gh·gw) <image-end> [text…] <sop> h w <eop> <image-start>`
for editing. Only the image markers and the grids steer the model (positions, placeholders), so the
words themselves do not matter for speed or parity. Every draw is fresh and non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_TOKENS = 101  # the baseline's text-to-image prompt length (baseline-h100.md)


@dataclass
class Sizes:
    """Pixel sizes of the full-size parity inputs (bench/parity_fullsize.py); --tiny shrinks them so the same
    code runs on a CPU in seconds (the result names keep their full-size labels)."""

    ar_t2i: int = 1024  # the teacher-forced text-to-image generation (1281 tokens)
    ar_reference: int = 1024  # editing reference image (smart_resize halves it: a 32x32 grid)
    dit_1: int = 1024
    dit_reference: int = 1024
    vae_1: int = 1024
    guidance: float = 1.5
    preview: int | None = None  # None: the processor's preview grid (≈16×16); --tiny: a 2×2 one (fewer tokens)


TINY_SIZES = Sizes(ar_t2i=256, ar_reference=64, dit_1=64, dit_reference=64, vae_1=64, preview=2)


@dataclass(frozen=True)
class E2ESizes:
    """The whole-image workloads of bench/run.py, (width, height) in pixels. --tiny uses smaller ones on the CPU;
    the report's keys keep their full-size labels (e2e_s_t2i_1024, ...)."""

    t2i: tuple[int, int] = (1024, 1024)
    large: tuple[int, int] = (2048, 2048)
    edit_reference: tuple[int, int] = (1024, 1024)  # the one reference image of the edit; its target is `t2i`
    steps: int = 50
    guidance: float = 1.5
    warm_reps: int = 2  # warm whole runs (t2i, later edits) whose median is reported
    dit_steps_timed: int = 10  # denoise steps per timed run of the per-step figure at `t2i`
    dit_steps_timed_large: int = 4
    dit_reps: int = 3
    # The scripted run of the recompile count: after one t2i at `t2i` and one edit (one reference), text to
    # image at these sizes, edits with the first k references (k = 1..4), and these batch sizes (at `t2i`).
    recompile_sizes: tuple[tuple[int, int], ...] = ((1024, 1024), (1280, 1280), (1568, 1056))
    recompile_references: tuple[tuple[int, int], ...] = ((1024, 1024), (768, 1024), (1024, 768), (512, 512))
    recompile_batches: tuple[int, ...] = (1, 2, 3, 4)
    recompile_steps: int = 2


TINY_E2E_SIZES = E2ESizes(t2i=(512, 512), large=(640, 640), edit_reference=(512, 512), steps=2, dit_steps_timed=2,
                          dit_steps_timed_large=2, dit_reps=2, recompile_sizes=((512, 512), (544, 512), (512, 576)),
                          recompile_references=((512, 512), (512, 544), (544, 512), (512, 512)),
                          recompile_batches=(1, 2), recompile_steps=1)

# What both sides draw in the whole-image runs: quoted text, so the glyph encoder and its tokens take part.
T2I_PROMPT = 'a red wooden door with a shop sign that says "OPEN 24 HOURS", morning light, photo'
EDIT_PROMPT = 'the same door painted blue, the sign now says "CLOSED"'


def reference_image(width: int, height: int, seed: int):
    """A smooth random RGB picture (PIL), a fresh one per seed, for the edits' reference images."""
    from PIL import Image

    pixels = vae_images(height, width, torch.Generator().manual_seed(seed))[0]  # (3, H, W) in [-1, 1]
    array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


# --------------------------------------------------------------------------------------------
# AR


def target_grids(height: int, width: int, preview_side: int | None = None
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(large grid, preview grid) of a t2i target, the processor's `_get_target_shape` (spec §1.3);
    `preview_side` replaces the preview grid by a square one (only --tiny does, to keep CPU runs short)."""
    token_h, token_w = height // 32, width // 32
    ratio = token_h / token_w
    preview = (int(ratio ** 0.5 * 16), int((1 / ratio) ** 0.5 * 16))
    if preview_side is not None:
        preview = (preview_side, preview_side)
    return (token_h, token_w), preview


def reference_grid(height: int, width: int) -> tuple[int, int]:
    """AR grid of a reference image whose sides are multiples of 32 in [512, 2048] (smart_resize halves)."""
    return height // 32, width // 32


def text_id_range(ar_config: dict) -> tuple[int, int]:
    """Ordinary text ids: after the vision vocabulary, below the first GLM-4 special (<|endoftext|>)."""
    text = ar_config["text_config"]
    low = int(text.get("vision_vocab_size", 16512))
    high = int(text.get("pad_token_id") or ar_config["image_token_id"])
    if high <= low:
        raise ValueError(f"no ordinary text ids between {low} and {high}")
    return low, high


@dataclass
class ARPrompt:
    """One batch of AR inputs in both forms: the reference's `generate`/`forward` kwargs and the
    fields of glm_core's `processor.ARInputs`."""

    input_ids: torch.Tensor  # (B, P) long, with <|image|> placeholders for references
    attention_mask: torch.Tensor  # (B, P) long, all ones (no padding)
    image_grid_thw: torch.Tensor  # (B * grids, 3) long
    images_per_sample: torch.Tensor  # (B,) long
    pixel_values: torch.Tensor | None  # (B * Σ gh·gw, 768) float32 in [-1, 1]
    target_grid: tuple[int, int]
    preview_grid: tuple[int, int] | None
    reference_grids: list[tuple[int, int]]
    height: int
    width: int

    @property
    def num_new_tokens(self) -> int:
        th, tw = self.target_grid
        return th * tw + (self.preview_grid[0] * self.preview_grid[1] if self.preview_grid else 0) + 1

    def reference_kwargs(self, device) -> dict:
        kwargs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                  "image_grid_thw": self.image_grid_thw.to(device),
                  "images_per_sample": self.images_per_sample.to(device)}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values.to(device)
        return kwargs

    def ours_inputs(self, reference_ids: torch.Tensor | None = None):
        """glm_core's `processor.ARInputs`; an editing prompt needs its references' VQ ids (the vision stage's)."""
        from glm_core.processor import ARInputs

        return ARInputs(input_ids=self.input_ids, attention_mask=self.attention_mask,
                        image_grid_thw=self.image_grid_thw, images_per_sample=self.images_per_sample,
                        target_grid=self.target_grid, preview_grid=self.preview_grid,
                        reference_grids=list(self.reference_grids), height=self.height, width=self.width,
                        reference_ids=reference_ids)


def ar_prompt(ar_config: dict, height: int, width: int, *, reference: tuple[int, int] | None = None,
              batch: int = 1, prompt_tokens: int = PROMPT_TOKENS, generator: torch.Generator | None = None,
              preview_side: int | None = None) -> ARPrompt:
    """A text-to-image prompt (reference None) or an editing prompt with one reference image of
    `reference` = (H, W) pixels. The t2i prompt is `prompt_tokens` long in total; the editing prompt
    adds the reference block and drops the preview declaration."""
    low, high = text_id_range(ar_config)
    start, end = int(ar_config["image_start_token_id"]), int(ar_config["image_end_token_id"])
    image_token = int(ar_config["image_token_id"])
    target, preview = target_grids(height, width, preview_side)
    patch = int(ar_config["vision_config"].get("patch_size", 16))

    def text(n):  # (B, n) random ordinary text ids
        return torch.randint(low, high, (batch, n), generator=generator)

    # "<sop> h w <eop>" declarations: 4 text-vocabulary ids each (digits are text ids)
    declarations = 2 if reference is None else 1
    words = prompt_tokens - 4 * 2 - 1  # the t2i prompt's free words; editing keeps the same words
    parts, grids, pixel_values, ref_grids = [], [], None, []
    if reference is not None:
        gh, gw = reference_grid(*reference)
        ref_grids.append((gh, gw))
        block = torch.cat([torch.full((batch, 1), start), torch.full((batch, gh * gw), image_token),
                           torch.full((batch, 1), end)], dim=1)
        parts.append(block)
        grids.append([1, gh, gw])
        pixel_values = torch.rand(batch * gh * gw, 3 * patch * patch, generator=generator) * 2 - 1
    parts += [text(words), text(4 * declarations), torch.full((batch, 1), start)]
    grids.append([1, *target])
    if reference is None:
        grids.append([1, *preview])
    input_ids = torch.cat(parts, dim=1).long()
    return ARPrompt(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        image_grid_thw=torch.tensor(grids * batch, dtype=torch.long),
        images_per_sample=torch.full((batch,), len(grids), dtype=torch.long),
        pixel_values=pixel_values,
        target_grid=target,
        preview_grid=preview if reference is None else None,
        reference_grids=ref_grids * batch,
        height=height,
        width=width,
    )


def ar_decode_bytes(ar_config: dict, bytes_per_param: int = 2) -> int:
    """Weight bytes one decode step must read: 40 decoder layers + final norm + lm_head (the
    embedding reads one row; the vision tower is not used). Spec §5.1: 16.45 GB at bf16."""
    t = ar_config["text_config"]
    h, inter = int(t["hidden_size"]), int(t["intermediate_size"])
    heads, kv_heads = int(t["num_attention_heads"]), int(t.get("num_key_value_heads") or t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or h // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = 1 if t.get("attention_bias", True) else 0
    per_layer = (h * q + bias * q) + 2 * (h * kv + bias * kv) + q * h + h * 2 * inter + inter * h + 4 * h
    params = int(t["num_hidden_layers"]) * per_layer + h + h * int(t["vision_vocab_size"])
    return params * bytes_per_param


# --------------------------------------------------------------------------------------------
# DiT


@dataclass
class DiTInputs:
    latents: torch.Tensor  # (1, C, H/8, W/8) fp32, bf16-representable
    glyph: torch.Tensor  # (1, L, text_embed_dim)
    negative_glyph: torch.Tensor  # (1, 1, text_embed_dim)
    prior_ids: torch.Tensor  # (1, (H/16)(W/16)) long, a 2x nearest upsample of an (H/32, W/32) grid
    timestep: float  # what the DiT sees (schedule t - 1)
    height: int
    width: int


def upsampled_prior(grid_h: int, grid_w: int, codebook: int, generator=None) -> torch.Tensor:
    """(1, 4·gh·gw) long: random codebook ids on the AR grid, each repeated over a 2x2 block (spec §2.1)."""
    grid = torch.randint(0, codebook, (1, grid_h, grid_w), generator=generator)
    return grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1)


def dit_inputs(dit_config: dict, height: int, width: int, *, glyph_tokens: int, generator=None,
               timestep: float | None = None) -> DiTInputs:
    channels, text_dim = int(dit_config["in_channels"]), int(dit_config["text_embed_dim"])
    codebook = int(dit_config["prior_vq_quantizer_codebook_size"])

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16).float()

    if timestep is None:
        timestep = float(torch.randint(1, 999, (1,), generator=generator).item())
    return DiTInputs(
        latents=randn(1, channels, height // 8, width // 8),
        glyph=randn(1, glyph_tokens, text_dim),
        negative_glyph=randn(1, 1, text_dim),
        prior_ids=upsampled_prior(height // 32, width // 32, codebook, generator),
        timestep=timestep,
        height=height,
        width=width,
    )


def dit_forward_flops(dit_config: dict, n_img: int, n_text: int, n_ref_keys: int = 0) -> float:
    """FLOPs (2·MAC) of one DiT forward (spec §5.2): per block, QKV + out + FF linears on every
    current token and attention over (current + reference) keys; plus the prior projector (two
    d×d linears per image token), the glyph projector, the patch projections and the AdaLN linears."""
    d = int(dit_config["num_attention_heads"]) * int(dit_config["attention_head_dim"])
    layers = int(dit_config["num_layers"])
    ff = 4 * d
    text_dim = int(dit_config["text_embed_dim"])
    patch_dim = int(dit_config["in_channels"]) * int(dit_config["patch_size"]) ** 2
    temb = int(dit_config["time_embed_dim"])
    n = n_img + n_text
    per_block = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * (n + n_ref_keys) * d + 2 * temb * 12 * d
    projectors = 2 * n_img * (2 * d * d) + 2 * n_text * (text_dim * d + d * d) + 2 * n_img * 2 * patch_dim * d
    return layers * per_block + projectors + 2 * temb * 2 * d


def dit_step_flops(dit_config: dict, height: int, width: int, glyph_tokens: int, ref_tokens: int = 0) -> float:
    """One guided step: conditional forward (glyph, references) + unconditional (1 glyph token)."""
    n_img = (height // 16) * (width // 16)
    return (dit_forward_flops(dit_config, n_img, glyph_tokens, ref_tokens)
            + dit_forward_flops(dit_config, n_img, 1, 0))


# --------------------------------------------------------------------------------------------
# VAE


def vae_latents(vae_config: dict, height: int, width: int, generator=None) -> torch.Tensor:
    """Normalised latents (1, C, H/8, W/8), randn like the yardstick (de-normalised by the decoder call)."""
    channels = int(vae_config["latent_channels"])
    return torch.randn(1, channels, height // 8, width // 8, generator=generator).to(torch.bfloat16).float()


def vae_images(height: int, width: int, generator=None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]: a smooth random image (low-frequency noise), not white noise."""
    coarse = torch.rand(1, 3, max(height // 64, 2), max(width // 64, 2), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    image = image + 0.05 * torch.randn(1, 3, height, width, generator=generator)
    return (image.clamp(0, 1) * 2 - 1).to(torch.bfloat16).float()


def latent_stats(vae_config: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std (1, C, 1, 1), built as the pipeline does: fp32 list -> tensor -> dtype."""
    c = int(vae_config["latent_channels"])
    mean = torch.tensor(vae_config["latents_mean"]).view(1, c, 1, 1).to(device=device, dtype=dtype)
    std = torch.tensor(vae_config["latents_std"]).view(1, c, 1, 1).to(device=device, dtype=dtype)
    return mean, std
