"""The tiny checkpoint has the official layout, loads cleanly into the reference, and is sensitive.

"Sensitive": AR logits are O(1) (so rope / position / GQA mistakes change them visibly), the default
variant samples only codebook ids, and the "ooc" variant makes the unmasked reference leave the
codebook inside a grid (fixture-notes §7).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm_core import tiny
from tests.paths import REPO_ROOT
from tests.reference import (
    assert_loaded_cleanly,
    reference_ar,
    reference_ar_inputs,
    reference_byt5_tokenizer,
    reference_dit,
    reference_image_tokens,
    reference_pipeline,
    reference_processor,
    reference_scheduler,
    reference_t5,
    reference_vae,
)

EXPECTED_FILES = {
    "model_index.json",
    "processor/chat_template.jinja",
    "processor/preprocessor_config.json",
    "processor/tokenizer.json",
    "processor/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vision_language_encoder/config.json",
    "vision_language_encoder/generation_config.json",
    "vision_language_encoder/model-00001-of-00003.safetensors",
    "vision_language_encoder/model-00002-of-00003.safetensors",
    "vision_language_encoder/model-00003-of-00003.safetensors",
    "vision_language_encoder/model.safetensors.index.json",
}

PROMPT = 'A red cat holding a sign that says "GLM"'


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _safetensors_dtypes(files) -> dict[str, str]:
    dtypes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                dtypes[key] = handle.get_slice(key).get_dtype()
    return dtypes


# ------------------------------------------------------------------------------------------------
# Layout (spec §3)
# ------------------------------------------------------------------------------------------------


def test_layout_has_exactly_the_official_files(tiny_checkpoint):
    files = {p.relative_to(tiny_checkpoint).as_posix() for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES


def test_model_index_is_the_official_one(tiny_checkpoint):
    index = _read_json(tiny_checkpoint / "model_index.json")
    assert index["_class_name"] == "GlmImagePipeline"
    assert index["_diffusers_version"] == "0.37.0.dev0"
    assert {k: tuple(v) for k, v in index.items() if not k.startswith("_")} == {
        "text_encoder": ("transformers", "T5EncoderModel"),
        "vision_language_encoder": ("transformers", "GlmImageForConditionalGeneration"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "tokenizer": ("transformers", "ByT5Tokenizer"),
        "processor": ("transformers", "GlmImageProcessor"),
        "transformer": ("diffusers", "GlmImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    }


@pytest.mark.parametrize(
    "component, index_name",
    [("vision_language_encoder", "model.safetensors.index.json"),
     ("transformer", "diffusion_pytorch_model.safetensors.index.json")],
)
def test_shard_index_matches_the_shards(tiny_checkpoint, component, index_name):
    folder = tiny_checkpoint / component
    index = _read_json(folder / index_name)
    shard_files = sorted(set(index["weight_map"].values()))
    dtypes = _safetensors_dtypes(folder / f for f in shard_files)
    assert set(dtypes) == set(index["weight_map"])
    sizes = 0
    for file in shard_files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for key in handle.keys():
                assert index["weight_map"][key] == file
                tensor = handle.get_tensor(key)
                sizes += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == sizes


def test_dtypes_on_disk_are_the_real_ones(tiny_checkpoint):
    def dtypes_of(component):
        return set(_safetensors_dtypes(sorted((tiny_checkpoint / component).glob("*.safetensors"))).values())

    assert dtypes_of("vision_language_encoder") == {"BF16"}
    assert dtypes_of("transformer") == {"BF16"}
    assert dtypes_of("vae") == {"BF16"}
    assert dtypes_of("text_encoder") == {"F32"}


def test_ar_key_names_follow_spec(tiny_checkpoint):
    folder = tiny_checkpoint / "vision_language_encoder"
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    text, vision = tiny.TINY_AR_TEXT_CONFIG, tiny.TINY_AR_VISION_CONFIG
    visual = [k for k in shapes if k.startswith("model.visual.")]
    language = [k for k in shapes if k.startswith("model.language_model.")]
    vq = [k for k in shapes if k.startswith("model.vqmodel.")]
    assert len(visual) == 12 * vision["depth"] + 3
    assert len(language) == 13 * text["num_hidden_layers"] + 2
    assert len(vq) == 5
    assert len(shapes) == len(visual) + len(language) + len(vq) + 1
    hidden = text["hidden_size"]
    head_dim = hidden // text["num_attention_heads"]
    assert shapes["lm_head.weight"] == (16512, hidden)  # the real lm_head row count
    assert shapes["model.language_model.embed_tokens.weight"] == (tiny.TEXT_VOCAB_SIZE, hidden)
    assert shapes["model.language_model.layers.0.self_attn.k_proj.weight"] == (
        text["num_key_value_heads"] * head_dim, hidden)
    assert shapes["model.language_model.layers.1.mlp.gate_up_proj.weight"] == (2 * text["intermediate_size"], hidden)
    assert shapes["model.vqmodel.quantize.embedding.weight"] == (16384, tiny.TINY_AR_VQ_CONFIG["embed_dim"])
    assert "model.language_model.layers.0.self_attn.o_proj.bias" not in shapes


def test_t5_saves_shared_embedding_only(tiny_checkpoint):
    keys = set(_safetensors_dtypes([tiny_checkpoint / "text_encoder" / "model.safetensors"]))
    assert "shared.weight" in keys
    assert "encoder.embed_tokens.weight" not in keys
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keys


# ------------------------------------------------------------------------------------------------
# Every component loads into the reference with nothing missing, unexpected or mismatched
# ------------------------------------------------------------------------------------------------


def test_ar_loads_cleanly(tiny_checkpoint):
    model, info = reference_ar(tiny_checkpoint, output_loading_info=True)
    assert_loaded_cleanly(info, "GlmImageForConditionalGeneration")
    assert model.config.image_token_id == tiny.IMAGE_TOKEN_ID
    assert model.config.text_config.vision_vocab_size == 16512
    assert model.generation_config.pad_token_id == tiny.IMAGE_TOKEN_ID
    assert model.generation_config.top_p == 0.75 and model.generation_config.temperature == 0.9


def test_t5_loads_cleanly(tiny_checkpoint):
    model, info = reference_t5(tiny_checkpoint, torch.bfloat16, output_loading_info=True)
    assert_loaded_cleanly(info, "T5EncoderModel")
    # transformers 5.23 keeps `wo` in fp32 only for fp16 loading (`_keep_in_fp32_modules`); under
    # bf16 it is bf16 like the rest (spec §6.23 says otherwise). Flag it if the library changes.
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()


def test_dit_and_vae_load_cleanly(tiny_checkpoint):
    _, info = reference_dit(tiny_checkpoint, output_loading_info=True)
    assert_loaded_cleanly(info, "GlmImageTransformer2DModel")
    vae, info = reference_vae(tiny_checkpoint, output_loading_info=True)
    assert_loaded_cleanly(info, "AutoencoderKL")
    assert vae.config.latents_mean == tiny.LATENTS_MEAN and vae.config.latents_std == tiny.LATENTS_STD


def test_scheduler_and_byt5_tokenizer_load(tiny_checkpoint):
    scheduler = reference_scheduler(tiny_checkpoint)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.time_shift_type == "linear"
    byt5 = reference_byt5_tokenizer(tiny_checkpoint)
    assert byt5("ab").input_ids == [ord("a") + 3, ord("b") + 3, 1]  # bytes + 3, then EOS


# ------------------------------------------------------------------------------------------------
# Processor (spec §1.3)
# ------------------------------------------------------------------------------------------------


def test_special_token_ids_keep_the_real_offsets(tiny_checkpoint):
    tokenizer = reference_processor(tiny_checkpoint).tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<sop>", "<eop>", "<|image|>"])
    assert ids == [tiny.ENDOFTEXT_ID, tiny.ENDOFTEXT_ID + 4, tiny.ENDOFTEXT_ID + 5, tiny.ENDOFTEXT_ID + 14]
    assert ids[1:] == [tiny.SOP_ID, tiny.EOP_ID, tiny.IMAGE_TOKEN_ID]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (16384, 16385, 16385)
    assert tokenizer.convert_tokens_to_ids("<|dit_token_1234|>") == 1234
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) <= tiny.TEXT_VOCAB_SIZE  # no silently appended ids (fixture-notes §2)


def test_processor_t2i_layout(tiny_checkpoint):
    processor = reference_processor(tiny_checkpoint)
    inputs = reference_ar_inputs(processor, PROMPT, 256, 256)
    ids = inputs["input_ids"][0].tolist()
    text_ids = processor.tokenizer(PROMPT, add_special_tokens=False).input_ids
    tail = processor.tokenizer("8 8", add_special_tokens=False).input_ids
    preview = processor.tokenizer("16 16", add_special_tokens=False).input_ids
    # {text}<sop>8 8<eop><sop>16 16<eop><|dit_token_16384|>, no prefix tokens (spec §1.3)
    assert ids == text_ids + [tiny.SOP_ID, *tail, tiny.EOP_ID, tiny.SOP_ID, *preview, tiny.EOP_ID, 16384]
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 16, 16]]
    assert inputs["images_per_sample"].tolist() == [2]
    assert "pixel_values" not in inputs
    assert inputs["attention_mask"].all()


def test_processor_i2i_layout(tiny_checkpoint):
    from PIL import Image

    processor = reference_processor(tiny_checkpoint)
    reference = Image.new("RGB", (768, 512), (200, 30, 10))  # W768 x H512 -> grid 16 x 24
    inputs = reference_ar_inputs(processor, "make it blue", 512, 512, images=[reference])
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == 16384 and ids[1 : 1 + 16 * 24] == [tiny.IMAGE_TOKEN_ID] * (16 * 24)
    assert ids[1 + 16 * 24] == 16385
    assert ids[-1] == 16384 and tiny.SOP_ID in ids and ids.count(tiny.SOP_ID) == 1
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 24], [1, 16, 16]]
    assert tuple(inputs["pixel_values"].shape) == (16 * 24, 768)


# ------------------------------------------------------------------------------------------------
# Sensitivity (fixture-notes §7)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ar_default(tiny_checkpoint):
    return reference_ar(tiny_checkpoint)


def test_ar_logits_are_order_one(tiny_checkpoint, ar_default):
    inputs = reference_ar_inputs(reference_processor(tiny_checkpoint), PROMPT, 64, 64)
    with torch.no_grad():
        logits = ar_default(**inputs).logits[0]  # (P, 16512)
    codebook = logits[:, : tiny.CODEBOOK_SIZE]
    assert codebook.std(dim=-1).min() > 1.0
    # default variant: all out-of-codebook rows (markers, EOS, unused) together have probability
    # < e^-10 even with plain sampling (temperature 1, no top-k / top-p)
    log_probs = logits.log_softmax(dim=-1)
    assert torch.logsumexp(log_probs[:, tiny.CODEBOOK_SIZE :], dim=-1).max() < -10.0


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["temporal", "height", "width"])
def test_ar_logits_depend_on_each_mrope_axis(tiny_checkpoint, ar_default, axis):
    """Moving one axis of the later tokens by one position changes the logits far above fp32 noise.

    (A constant shift of a whole axis changes nothing: RoPE scores depend on differences only.)"""
    inputs = reference_ar_inputs(reference_processor(tiny_checkpoint), PROMPT, 64, 64)
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length).view(1, 1, length).expand(3, 1, length).clone()  # text: t = h = w
    shifted = positions.clone()
    shifted[axis, :, length // 2 :] += 1
    with torch.no_grad():
        base = ar_default(input_ids=inputs["input_ids"], position_ids=positions).logits
        moved = ar_default(input_ids=inputs["input_ids"], position_ids=shifted).logits
    assert (base - moved).abs().max() > 0.1  # >= 1000x the 1e-4 AR parity tolerance


def _generate(model, inputs, seed: int, new_tokens: int | None = None) -> torch.Tensor:
    if new_tokens is None:  # t2i: large + preview grid + end slot (spec §2.1)
        new_tokens = int(inputs["image_grid_thw"].prod(-1).sum()) + 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True)
    return out[0, inputs["input_ids"].shape[1] :]


def test_default_variant_samples_only_codebook_ids(tiny_checkpoint, ar_default):
    inputs = reference_ar_inputs(reference_processor(tiny_checkpoint), PROMPT, 64, 64)
    generated = _generate(ar_default, inputs, seed=0)
    assert generated.numel() == 2 * 2 + 16 * 16 + 1  # no early EOS
    assert int(generated.max()) < tiny.CODEBOOK_SIZE
    assert len(set(generated.tolist())) > 100  # not a degenerate repeat


def test_ooc_variant_makes_reference_leave_the_codebook(tiny_checkpoint_ooc):
    model = reference_ar(tiny_checkpoint_ooc)
    inputs = reference_ar_inputs(reference_processor(tiny_checkpoint_ooc), PROMPT, 64, 64)
    generated = _generate(model, inputs, seed=0, new_tokens=24)  # the first 24 cells of the preview grid
    assert generated.numel() == 24  # EOS is not among the boosted rows: no early stop
    assert int((generated >= tiny.CODEBOOK_SIZE).sum()) > 12


def test_reference_image_tokens_are_codebook_ids(tiny_checkpoint, ar_default):
    from PIL import Image

    processor = reference_processor(tiny_checkpoint)
    gradient = torch.linspace(0, 255, 512).to(torch.uint8)
    pixels = torch.stack([gradient.view(1, -1).expand(512, 512), gradient.view(-1, 1).expand(512, 512),
                          torch.full((512, 512), 90, dtype=torch.uint8)], dim=-1)
    reference = Image.fromarray(pixels.numpy())
    inputs = reference_ar_inputs(processor, "edit", 512, 512, images=[reference])
    grids = inputs["image_grid_thw"][:1]
    ids = reference_image_tokens(ar_default, inputs["pixel_values"], grids)
    assert ids.shape == (16 * 16,) and ids.dtype == torch.long
    assert int(ids.max()) < tiny.CODEBOOK_SIZE
    assert len(set(ids.tolist())) > 8  # the tiny VQ separates different patches


def test_pipeline_t2i_with_supplied_prior_gives_a_nontrivial_image(tiny_checkpoint):
    pipe = reference_pipeline(tiny_checkpoint, torch.float32)
    prior = torch.randint(0, tiny.CODEBOOK_SIZE, (1, 2, 2), generator=torch.Generator().manual_seed(0))
    prior = prior.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 16)  # (64/16)² DiT patches
    image = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, prior_token_ids=prior,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert image.std() > 0.05
    saturated = ((image <= 0.0) | (image >= 1.0)).float().mean()
    assert saturated < 0.5


# ------------------------------------------------------------------------------------------------
# Hygiene
# ------------------------------------------------------------------------------------------------


def test_tiny_module_imports_no_reference_library():
    import subprocess
    import sys

    code = ("import sys, glm_core.tiny; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generation_is_deterministic_and_keeps_the_global_rng(tiny_checkpoint, tmp_path):
    import hashlib

    from tests.fixtures.tiny_checkpoint import make_tiny_checkpoint

    torch.manual_seed(1234)
    state_before = torch.get_rng_state()
    again = make_tiny_checkpoint(tmp_path / "again", seed=0, variant="default")
    assert torch.equal(torch.get_rng_state(), state_before)

    def digest(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(again) == digest(tiny_checkpoint)
