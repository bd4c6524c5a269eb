"""bench/fullsize_checkpoint.py: the folder it writes is the official layout, both glm_core and the reference
load it, and its tokenizer gives the markers the ids the AR configuration names.

The real-size run needs a GPU and ~36 GB of disk; here `--tiny` runs the same code at the tiny configuration,
and the real configuration's non-weight files (tokenizer included) are written and read without any weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bench import fullsize_checkpoint, models
from glm_core import tiny
from glm_core.pipeline import GlmImage
from glm_core.processor import PromptProcessor
from tests.inputs import our_processor_inputs
from tests.reference import reference_ar_inputs, reference_pipeline, reference_processor


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fullsize") / "GLM-Image"
    assert fullsize_checkpoint.main(["--out", str(out), "--tiny", "--seed", "3"]) == 0
    return out


def _header_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_official_layout(written):
    model_index = json.loads((written / "model_index.json").read_text())
    assert model_index["_class_name"] == "GlmImagePipeline"
    for component in ("vision_language_encoder", "transformer"):  # sharded + index, as spec §3 lists
        folder = written / component
        stem = "model" if component == "vision_language_encoder" else "diffusion_pytorch_model"
        index = json.loads((folder / f"{stem}.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and shards == sorted(p.name for p in folder.glob(f"{stem}-*-of-*.safetensors"))
        assert all(_header_dtypes(folder / s) == {"BF16"} for s in shards)
        assert (folder / "config.json").is_file()
    assert (written / "vision_language_encoder" / "generation_config.json").is_file()
    assert _header_dtypes(written / "vae" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    assert _header_dtypes(written / "text_encoder" / "model.safetensors") == {"F32"}  # fp32 on disk (spec §3)
    for name in ("processor/tokenizer.json", "processor/tokenizer_config.json", "processor/preprocessor_config.json",
                 "processor/chat_template.jinja", "tokenizer/tokenizer_config.json",
                 "scheduler/scheduler_config.json"):
        assert (written / name).is_file(), name


def test_generation_config_is_the_official_one(written):
    saved = json.loads((written / "vision_language_encoder" / "generation_config.json").read_text())
    # spec §1.2.1: sampling, EOS = image-end marker 16385, pad = <|image|>, top_p 0.75, temperature 0.9
    assert (saved["do_sample"], saved["eos_token_id"], saved["pad_token_id"], saved["top_p"],
            saved["temperature"]) == (True, 16385, tiny.IMAGE_TOKEN_ID, 0.75, 0.9)


def test_the_reference_pipeline_and_glm_core_load_the_same_weights(written):
    from glm_core.checkpoint import official_state_dict

    pipe = reference_pipeline(written)
    model = GlmImage.from_folder(written, device="cpu", dtype=torch.float32)
    pairs = {("ar", "vision"): pipe.vision_language_encoder, ("glyph",): pipe.text_encoder, ("dit",): pipe.transformer,
             ("vae",): pipe.vae}
    for stages, reference in pairs.items():
        stage = "+".join(stages)
        theirs = reference.state_dict()
        # our glyph encoder holds the T5 under `text_encoder.`; the AR and vision stages share the AR's files, under
        # the file's names once q/k/v are split back (official_state_dict)
        ours = {k.removeprefix("text_encoder."): v for name in stages
                for k, v in official_state_dict(model.stage(name)).items()}
        assert set(ours) <= set(theirs), (stage, sorted(set(ours) - set(theirs))[:5])
        assert len(ours) >= 0.9 * len(theirs), (stage, sorted(set(theirs) - set(ours))[:5])
        for key, tensor in ours.items():
            assert torch.equal(tensor, theirs[key].float()), (stage, key)
        # random_init_ leaves nothing at zero: the loaders did not read an empty file
        assert all(t.abs().sum() > 0 for t in ours.values() if t.is_floating_point()), stage


def test_real_configuration_tokenizer_gives_the_real_marker_ids(tmp_path):
    """Both processors read the real-configuration processor/ folder and lay a reference image out with the
    real ids: <|image|> 167855, <sop> 167845, <eop> 167846, image start 16384 (spec §1.2.2)."""
    ar_config = models.real_configs().ar
    fullsize_checkpoint.write_layout(tmp_path, ar_config)
    ours = PromptProcessor.from_folder(tmp_path / "processor")
    reference = reference_processor(tmp_path)
    image = Image.new("RGB", (512, 512), (30, 90, 160))
    expected = reference_ar_inputs(reference, "a red 'sign'", 1024, 1024, images=[image])
    got = our_processor_inputs(ours, ["a red 'sign'"], 1024, 1024, [[image]])
    assert torch.equal(got.input_ids, expected["input_ids"])
    ids = got.input_ids[0].tolist()
    assert ids.count(167855) == 16 * 16  # one placeholder per patch of the 512² reference at /32 (spec §1.3)
    assert ids[0] == 16384 and 167845 in ids and 167846 in ids and ids[-1] == 16384
    assert max(ids) < ar_config["text_config"]["vocab_size"]
    assert (ours.image_token_id, ours.bos_token_id, ours.eos_token_id) == (167855, 16384, 16385)


def test_a_tokenizer_that_does_not_fit_the_config_is_refused():
    ar_config = models.real_configs().ar
    tokenizer_json = fullsize_checkpoint.tokenizer_json_for(ar_config)
    fullsize_checkpoint.check_tokenizer_fits(tokenizer_json, ar_config)
    wrong = json.loads(json.dumps(ar_config))
    wrong["image_token_id"] = 167856
    with pytest.raises(ValueError, match="<\\|image\\|>"):
        fullsize_checkpoint.check_tokenizer_fits(tokenizer_json, wrong)
    small = json.loads(json.dumps(ar_config))
    small["text_config"]["vocab_size"] = 100000
    with pytest.raises(ValueError, match="vocab_size"):
        fullsize_checkpoint.check_tokenizer_fits(tokenizer_json, small)


def test_an_existing_checkpoint_is_not_overwritten_but_can_be_reused(written, capsys):
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        fullsize_checkpoint.write_checkpoint(written, use_tiny=True)
    marker = json.loads((written / fullsize_checkpoint.COMPLETE_MARKER).read_text())
    assert marker["seed"] == 3 and marker["bytes"]["transformer"] > 0
    assert fullsize_checkpoint.main(["--out", str(written), "--tiny", "--reuse"]) == 0
    assert "reusing the complete folder" in capsys.readouterr().out


def test_real_t5_config_has_the_spec_size():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{k: v for k, v in fullsize_checkpoint.REAL_T5_CONFIG.items() if k != "architectures"})
    with torch.device("meta"):
        model = T5EncoderModel(config)
    assert sum(p.numel() for p in model.parameters()) == 217_657_472  # spec §1.4
    assert model.config.d_model == models.real_configs().dit["text_embed_dim"]


def test_real_size_configs_as_saved_give_the_reference_tensors_and_the_spec_sizes(tmp_path):
    """The real-size config.json files, written the way the GPU run writes them (save_pretrained / save_config),
    build glm_core modules whose tensor names and shapes are the reference's, with spec §3's parameter counts
    (checked on the meta device: no weights needed)."""
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration, T5Config

    from glm_core.ar.config import ARConfig
    from glm_core.ar.model import GlmImageAR
    from glm_core.ar.vision import VisionTokenizer
    from glm_core.checkpoint import official_state_dict
    from glm_core.dit.config import DiTConfig
    from glm_core.dit.model import GlmImageDiT
    from glm_core.vae import GlmImageVAE, VAEConfig

    configs = models.real_configs()
    with torch.device("meta"):
        reference = {"ar": GlmImageForConditionalGeneration(GlmImageConfig.from_dict(configs.ar)),
                     "dit": GlmImageTransformer2DModel.from_config(configs.dit),
                     "vae": AutoencoderKL.from_config(configs.vae)}
    reference["ar"].config.save_pretrained(tmp_path / "ar")
    reference["dit"].save_config(tmp_path / "dit")
    reference["vae"].save_config(tmp_path / "vae")
    T5Config(**{k: v for k, v in fullsize_checkpoint.REAL_T5_CONFIG.items() if k != "architectures"}) \
        .save_pretrained(tmp_path / "t5")
    with torch.device("meta"):
        ar_config = ARConfig.from_folder(tmp_path / "ar")
        ours = {"ar": (GlmImageAR(ar_config), VisionTokenizer(ar_config)),
                "dit": (GlmImageDiT(DiTConfig.from_dict(json.loads((tmp_path / "dit" / "config.json").read_text()))),),
                "vae": (GlmImageVAE(VAEConfig.from_dict(json.loads((tmp_path / "vae" / "config.json").read_text()))),)}
    for name, modules in ours.items():
        theirs_shapes = {k: tuple(v.shape) for k, v in reference[name].state_dict().items()}
        ours_shapes = {k: tuple(v.shape) for module in modules for k, v in official_state_dict(module).items()}
        assert ours_shapes == theirs_shapes, name
    counts = {name: sum(p.numel() for module in modules for p in module.parameters()) for name, modules in ours.items()}
    assert counts == {"ar": 10_114_245_632, "dit": 6_926_882_880, "vae": 406_100_643}  # spec §3
