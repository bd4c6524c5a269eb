"""The GPU benchmark and the full-size parity script, run on the CPU at the tiny configuration.

Each script runs as its own process (as on the device), through every phase, and must write a
complete report with no phase errors: the same code paths as the H100 run, so they cannot rot.
The FLOP / byte formulas behind the "fraction of the floor" column are checked here too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.paths import REPO_ROOT


def _run(module: str, out: Path, *args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", module, "--tiny", "--out", str(out), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    stem = "bench" if module == "bench.run" else "parity"
    data = json.loads((out / f"{stem}.json").read_text())
    assert (out / f"{stem}.md").read_text().startswith("# GLM-Image")
    assert data["errors"] == [], data["errors"]
    assert all(v["status"] == "ok" for v in data["phases"].values()), data["phases"]
    return data


def test_bench_tiny_writes_every_required_key(tmp_path):
    from bench.run import REQUIRED_KEYS

    data = _run("bench.run", tmp_path)
    for key in ("gpu", "date", "command", "reference_versions", "ours", "reference", "ceilings"):
        assert key in data, key
    assert set(data["ceilings"]) == {"matmul_tflops", "copy_gbps"}
    assert all(data["ceilings"][k] > 0 for k in data["ceilings"])
    assert data["reference_versions"]["transformers"] and data["reference_versions"]["diffusers"]
    for side in ("ours", "reference"):
        for key in REQUIRED_KEYS:
            assert key in data[side], (side, key)
            if not key.startswith("peak_gb"):  # peak memory is only tracked on CUDA
                value = data[side][key]
                assert isinstance(value, float) and math.isfinite(value), (side, key, value)
        assert data[side]["ar_s_t2i_1024"] > 0 and data[side]["dit_s_per_step_2048"] > 0
    assert data["details"]["reference"]["ar_s_t2i_1024"]["extrapolated"] is True
    assert data["floors"]["ar_ms_per_token"] > 0 and data["floors"]["dit_s_per_step_1024"] > 0
    text = (tmp_path / "bench.md").read_text()
    assert "extrapolated" in text and "ref/ours" in text


def test_bench_phase_selection_and_checkpoint_folder(tmp_path, tiny_checkpoint):
    data = _run("bench.run", tmp_path, "--model", str(tiny_checkpoint), "--only", "dit,vae")
    assert set(data["phases"]) == {"ceilings", "dit.build", "dit.ours", "dit.reference", "vae.build", "vae.ours",
                                   "vae.reference"}
    assert data["floors"]["dit_s_per_step_2048"] > 0
    assert data["ours"]["dit_s_per_step_edit_1024"] > 0 and data["reference"]["vae_decode_s_2048"] > 0
    assert data["ours"]["ar_ms_per_token"] is None  # not selected: present, but empty


def test_bench_rejects_a_folder_that_is_not_glm_image(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--model", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not a GLM-Image checkpoint folder" in proc.stderr


def test_parity_tiny_ours_within_the_reference_bf16_error(tmp_path):
    data = _run("bench.parity_fullsize", tmp_path)
    ar, dit, vae = data["ar"], data["dit"], data["vae"]
    assert ar["positions_equal_reference"] == {"t2i_prefill_and_decode": True, "edit_prefill": True}
    rows = ar["inputs"]["logit_rows"]
    assert ar["teacher_forced"]["ours"]["rows"] == rows == ar["teacher_forced_cached"]["ours"]["rows"]
    checks = [(ar, k) for k in ("teacher_forced", "prefill", "edit_prefill")]
    checks += [(dit, k) for k in ("cond", "uncond", "guided", "cond_ref", "guided_ref")]
    checks += [(vae, k) for k in ("decode", "encode")]
    for block, key in checks:
        ours, yardstick = block[key]["ours"], block[key]["reference_bf16"]
        assert ours["finite"] and 0 < yardstick["rel"] < 0.05, (key, yardstick)
        assert ours["rel"] <= 1.5 * yardstick["rel"], (key, ours["rel"], yardstick["rel"])
    assert ar["teacher_forced_cached"]["ours"]["rel"] <= 1.5 * ar["teacher_forced"]["reference_bf16"]["rel"]
    assert vae["decode"]["ours"]["psnr_db"] > 35


def test_parity_with_a_checkpoint_folder(tmp_path, tiny_checkpoint):
    data = _run("bench.parity_fullsize", tmp_path, "--model", str(tiny_checkpoint), "--only", "ar")
    assert set(data["phases"]) == {"ar"}
    assert data["ar"]["teacher_forced"]["ours"]["rel"] <= 1.5 * data["ar"]["teacher_forced"]["reference_bf16"]["rel"]


def test_ar_decode_bytes_is_the_decoder_and_head_of_the_real_model():
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    from bench.models import REAL_AR_CONFIG
    from bench.workloads import ar_decode_bytes

    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(dict(REAL_AR_CONFIG)))
    lm = model.model.language_model
    params = sum(p.numel() for p in lm.layers.parameters()) + lm.norm.weight.numel() + model.lm_head.weight.numel()
    assert ar_decode_bytes(REAL_AR_CONFIG) == 2 * params
    assert abs(ar_decode_bytes(REAL_AR_CONFIG) / 1e9 - 16.45) < 0.01  # spec §5.1


def test_dit_flop_formula_matches_the_flop_counter_and_the_spec():
    from torch.utils.flop_counter import FlopCounterMode

    from bench import models, workloads

    cfg = models.tiny_configs().dit
    dit = models.reference_dit(cfg, "cpu", torch.float32, seed=0)
    x = workloads.dit_inputs(cfg, 128, 128, glyph_tokens=8, timestep=10.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dit(hidden_states=x.latents, encoder_hidden_states=x.glyph, prior_token_id=x.prior_ids,
            prior_token_drop=torch.zeros_like(x.prior_ids, dtype=torch.bool), timestep=torch.full((1,), 10.0),
            target_size=torch.tensor([[128.0, 128.0]]), crop_coords=torch.zeros(1, 2))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    n, d = 64 + 8, cfg["num_attention_heads"] * cfg["attention_head_dim"]
    attention = cfg["num_layers"] * 4 * n * n * d  # the CPU attention kernel is not counted by FlopCounterMode
    linear = workloads.dit_forward_flops(cfg, 64, 8) - attention
    matmuls = sum(v for k, v in counts.items() if "attention" not in k)
    assert abs(matmuls - linear) / linear < 0.01, (counts, linear)
    real = models.REAL_DIT_CONFIG  # spec §5.2, counted with FlopCounterMode on the real classes
    assert abs(workloads.dit_forward_flops(real, 4096, 1) / 1e12 - 58.02) < 0.05
    assert abs(workloads.dit_forward_flops(real, 16384, 1) / 1e12 - 331.0) < 0.3
    assert abs(workloads.dit_forward_flops(real, 4096, 128) / 1e12 - 60.08) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_random_init_is_bf16_valued_nonzero_and_buffers_are_fp32(seed):
    from bench import models

    cfg = models.tiny_configs()
    ref = models.reference_ar(cfg.ar, "cpu", torch.float32, seed)
    for name, p in ref.named_parameters():
        assert torch.equal(p, p.to(torch.bfloat16).float()), name
        assert (p != 0).float().mean() > 0.99, name
    inv_freq = ref.model.language_model.rotary_emb.inv_freq
    models.cast_parameters_(ref, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    assert inv_freq.dtype == torch.float32 and torch.isfinite(inv_freq).all()
    ours = models.ours_ar(cfg.ar, ref, "cpu")
    assert ours.lm_head.weight.data_ptr() == ref.lm_head.weight.data_ptr()  # shared, not copied


def test_bench_keeps_measuring_the_reference_when_ours_fails(tmp_path, monkeypatch):
    """A glm_core failure is recorded (with its traceback) and the reference is still timed."""
    from bench import models, run

    def broken(*args, **kwargs):
        raise RuntimeError("simulated glm_core failure")

    monkeypatch.setattr(models, "ours_vae", broken)
    threads = torch.get_num_threads()
    try:
        data = run.main(["--tiny", "--only", "vae", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    phases = {e["phase"] for e in data["errors"]}
    assert phases == {"vae.build (ours)", "vae.ours"}, data["errors"]
    assert "simulated glm_core failure" in data["errors"][0]["traceback"]
    assert data["phases"]["vae.reference"]["status"] == "ok"
    assert data["reference"]["vae_decode_s_1024"] > 0 and data["ours"]["vae_decode_s_1024"] is None
    assert json.loads((tmp_path / "bench.json").read_text())["errors"] == data["errors"]


def test_real_configuration_builds_both_sides_with_identical_keys_and_shapes():
    """The full-size run's configs load into the reference and into glm_core (on the meta device, no
    memory) with the same parameter names and shapes, and the real-size prompts have the spec's lengths."""
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    from bench import models, workloads
    from glm_core.ar.config import ARConfig
    from glm_core.ar.model import GlmImageAR
    from glm_core.dit.config import DiTConfig
    from glm_core.dit.model import GlmImageDiT
    from glm_core.vae import GlmImageVAE, VAEConfig

    cfg = models.real_configs()
    with torch.device("meta"):
        pairs = [
            (GlmImageForConditionalGeneration(GlmImageConfig.from_dict(dict(cfg.ar))),
             GlmImageAR(ARConfig.from_dict(cfg.ar))),
            (GlmImageTransformer2DModel.from_config(cfg.dit), GlmImageDiT(DiTConfig.from_dict(cfg.dit))),
            (AutoencoderKL.from_config(cfg.vae), GlmImageVAE(VAEConfig.from_dict(cfg.vae))),
        ]
    expected_params = [10_114_245_632, 6_926_882_880, 406_100_643]  # spec §3 / §1.6
    for (ref, ours), count in zip(pairs, expected_params):
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert ref_shapes == ours_shapes, type(ours).__name__
        assert sum(p.numel() for p in ref.parameters()) == count

    ar_ref = pairs[0][0]
    prompt = workloads.ar_prompt(cfg.ar, 1024, 1024)
    edit = workloads.ar_prompt(cfg.ar, 1024, 1024, reference=(1024, 1024))
    assert prompt.input_ids.shape == (1, 101) and prompt.num_new_tokens == 1281
    assert edit.input_ids.shape == (1, 1 + 1024 + 1 + 92 + 4 + 1) and edit.num_new_tokens == 1025
    assert edit.pixel_values.shape == (1024, 768) and edit.image_grid_thw.tolist() == [[1, 32, 32], [1, 32, 32]]
    assert workloads.ar_prompt(cfg.ar, 512, 512).num_new_tokens == 513
    assert workloads.ar_prompt(cfg.ar, 256, 256, batch=4).input_ids.shape == (4, 101)
    from bench.parity_fullsize import ours_positions, reference_positions

    for p, n in ((prompt, 1280), (edit, 0)):
        assert torch.equal(ours_positions(cfg.ar, p, n), reference_positions(ar_ref, p, "cpu", n))
