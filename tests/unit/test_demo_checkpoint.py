"""The random-weight demo checkpoint (`glm_core.demo_checkpoint`) is a real GLM-Image folder: written once,
then reused; the reference libraries load every component with no missing / unexpected / mismatched keys, and
`GlmImagePipeline.from_pretrained` loads the whole folder offline. (That our pipeline and diffusers' make the
same picture from it: tests/parity/test_demo_checkpoint.py.)
"""

from __future__ import annotations

from safetensors import safe_open

from glm_core.demo_checkpoint import DEMO_MARKER, write_demo_checkpoint
from tests.reference import assert_loaded_cleanly

COMPONENTS = ("vision_language_encoder", "text_encoder", "transformer", "vae")


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
    assert_loaded_cleanly(info, "GlmImageForConditionalGeneration")
    assert set(ar.state_dict()) == saved_keys(demo_folder / "vision_language_encoder")
    _, info = T5EncoderModel.from_pretrained(demo_folder / "text_encoder", local_files_only=True,
                                              output_loading_info=True)
    assert_loaded_cleanly(info, "T5EncoderModel")


def test_diffusers_loads_dit_vae_and_pipeline_cleanly(demo_folder):
    from diffusers import AutoencoderKL, GlmImagePipeline, GlmImageTransformer2DModel

    dit, info = GlmImageTransformer2DModel.from_pretrained(demo_folder, subfolder="transformer",
                                                           local_files_only=True, output_loading_info=True)
    assert_loaded_cleanly(info, "GlmImageTransformer2DModel")
    assert set(dit.state_dict()) == saved_keys(demo_folder / "transformer")
    vae, info = AutoencoderKL.from_pretrained(demo_folder, subfolder="vae", local_files_only=True,
                                              output_loading_info=True)
    assert_loaded_cleanly(info, "AutoencoderKL")
    assert set(vae.state_dict()) == saved_keys(demo_folder / "vae")

    pipe = GlmImagePipeline.from_pretrained(demo_folder, local_files_only=True)
    assert type(pipe.transformer).__name__ == "GlmImageTransformer2DModel"
    assert type(pipe.vision_language_encoder).__name__ == "GlmImageForConditionalGeneration"
    assert type(pipe.processor).__name__ == "GlmImageProcessor"
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
