"""The GPU benchmarks, run on the CPU at the tiny configuration, so that they cannot rot between GPU runs.

`bench.run` (whole images, both sides, cold start, recompiles) and `bench.parity_fullsize` each run as their own
process (as on the device) on the tiny checkpoint, through every phase, and must write a complete report with no
phase errors. The FLOP / byte formulas behind the floors are checked against counts made another way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.paths import REPO_ROOT


def _run(module: str, stem: str, out: Path, *args: str, timeout: int = 900) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", module, "--tiny", "--out", str(out), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((out / f"{stem}.json").read_text())
    assert (out / f"{stem}.md").read_text().startswith("# GLM-Image")
    assert data["errors"] == [], data["errors"]
    assert all(v["status"] == "ok" for v in data["phases"].values()), data["phases"]
    return data


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def e2e(tiny_checkpoint, tmp_path_factory):
    """One tiny run of every phase of bench.run (about a minute and a half on two cores)."""
    out = tmp_path_factory.mktemp("bench_e2e")
    return _run("bench.run", "bench", out, "--model", str(tiny_checkpoint)), out


def test_e2e_runs_every_phase_and_writes_the_keys_performance_json_takes(e2e):
    data, out = e2e
    from bench.run import PHASES

    assert set(data["phases"]) == {"ceilings", *PHASES}
    for side in ("ours", "reference"):
        for key in ("e2e_s_t2i_1024", "e2e_s_edit_1024", "ar_ms_per_token", "dit_s_per_step_1024"):
            assert _positive(data[side][key]), (side, key, data[side].get(key))
    for key in ("cold_cli_s_t2i_1024", "first_run_s_t2i_1024", "first_call_s_t2i_1024", "e2e_s_t2i_2048",
                "dit_s_per_step_2048", "first_edit_ratio"):
        assert _positive(data["ours"][key]), (key, data["ours"].get(key))
    assert isinstance(data["ours"]["recompiles_in_normal_use"], int)
    assert data["floors"]["ar_ms_per_token"] > 0 and data["floors"]["dit_s_per_step_1024"] > 0
    text = (out / "bench.md").read_text()
    assert "| End to end t2i 1024², 50 steps [s] |" in text and "## Cold start, part by part" in text


def test_e2e_figures_are_whole_runs_of_the_expected_size(e2e):
    """The AR halves are whole generations (t2i 512²: 16·16 grid + 16·16 preview + end = 513 tokens, the edit no
    preview), the parts fit inside their whole, and the reference's generate was not cut short."""
    data, _ = e2e
    details = data["details"]
    reference_t2i = details["reference"]["e2e_s_t2i_1024"]
    assert reference_t2i["ar_tokens"] == 16 * 16 + 16 * 16 + 1
    assert details["reference"]["e2e_s_edit_1024"]["ar_tokens"] == 16 * 16 + 1
    assert 0 < reference_t2i["ar_s"] < reference_t2i["total_s"]
    for run in details["ours"]["e2e_s_t2i_1024"]["runs"]:
        assert run["ar_tokens"] == 513
        assert run["ar_s"] + run["decode_s"] <= run["total_s"] * (1 + 1e-9)
    assert len(details["ours"]["e2e_s_t2i_1024"]["runs"]) == data["sizes"]["warm_reps"]
    steps = details["ours"]["dit_s_per_step_1024"]
    assert steps["median_s"] / steps["steps_per_run"] == pytest.approx(data["ours"]["dit_s_per_step_1024"])


def test_e2e_cold_start_runs_fresh_processes_with_their_split(e2e):
    data, _ = e2e
    for key in ("first_run_s_t2i_1024", "cold_cli_s_t2i_1024"):
        run = data["details"]["ours"][key]
        assert run["wall_s"] == data["ours"][key] and run["wall_s"] > run["total_s"] > 0
        assert {"generate_tokens", "decode", "save"} <= set(run["parts_s"]) and set(run["loads_s"]) >= {"ar", "dit"}
        assert sum(run["parts_s"].values()) <= run["total_s"]
        assert run["cache_files_after"] == 0  # the CPU compiles nothing; on the GPU this folder fills


def test_e2e_recompile_script_covers_sizes_references_and_batches(e2e):
    from bench.recompiles import scripted_runs
    from bench.workloads import TINY_E2E_SIZES

    data, _ = e2e
    result = data["details"]["ours"]["recompiles_in_normal_use"]
    script = scripted_runs(TINY_E2E_SIZES)
    assert result["complete"] and [r["run"] for r in result["runs"]] == [r.label for r in script]
    assert {len(r.references) for r in script} == {0, 1, 2, 3, 4} and {r.batch for r in script} == {1, 2}
    assert len({r.size for r in script if r.kind == "t2i"}) == 3
    assert any("compiled nothing" in note for note in data["notes"])  # compiling is off on the CPU


def test_reference_out_of_codebook_ids_are_folded_and_counted(tiny_checkpoint_ooc, tmp_path):
    """A random AR head samples ids the DiT's codebook lacks; unfolded, the reference pipeline dies on them."""
    data = _run("bench.run", "bench", tmp_path, "--model", str(tiny_checkpoint_ooc), "--phases", "reference")
    assert data["reference"]["ids_outside_codebook"] > 0
    assert _positive(data["reference"]["e2e_s_t2i_1024"]) and _positive(data["reference"]["e2e_s_edit_1024"])


def test_bench_keeps_measuring_the_reference_when_ours_fails(tiny_checkpoint, tmp_path, monkeypatch):
    """A glm_core failure is recorded (with its traceback) and the reference's figures still come."""
    from bench import ours_runs, run

    def broken(*args, **kwargs):
        raise RuntimeError("simulated glm_core failure")

    monkeypatch.setattr(ours_runs.OursSession, "image", broken)
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        data = run.main(["--tiny", "--model", str(tiny_checkpoint), "--phases", "reference,ours",
                         "--out", str(tmp_path)])
    finally:  # the bench's start-up sets both for its own process
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    assert [e["phase"] for e in data["errors"]] == ["ours"]
    assert "simulated glm_core failure" in data["errors"][0]["traceback"]
    assert data["phases"]["reference"]["status"] == "ok" and _positive(data["reference"]["e2e_s_t2i_1024"])
    assert "e2e_s_t2i_1024" not in data.get("ours", {})
    assert json.loads((tmp_path / "bench.json").read_text())["errors"] == data["errors"]


def test_bench_needs_a_glm_image_folder(tmp_path):
    for args, message in ((["--model", str(tmp_path)], "not a GLM-Image checkpoint folder"),
                          ([], "--model FOLDER is required")):
        proc = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_parity_tiny_ours_within_the_reference_bf16_error(tmp_path):
    data = _run("bench.parity_fullsize", "parity", tmp_path)
    ar, dit, vae = data["ar"], data["dit"], data["vae"]
    assert ar["positions_equal_reference"] == {"t2i_prefill_and_decode": True, "edit_prefill": True}
    rows = ar["inputs"]["logit_rows"]
    assert ar["teacher_forced"]["ours"]["rows"] == rows == ar["teacher_forced_cached"]["ours"]["rows"]
    checks = [(ar, k) for k in ("teacher_forced", "prefill", "edit_prefill")]
    checks += [(dit, k) for k in ("cond", "uncond", "guided", "cond_ref", "guided_ref")]
    checks += [(vae, k) for k in ("decode", "encode")]
    checks += [(data["glyph"], k) for k in ("embeds", "negative")]  # random weights in a temporary folder
    for block, key in checks:
        ours, yardstick = block[key]["ours"], block[key]["reference_bf16"]
        assert ours["finite"] and 0 < yardstick["rel"] < 0.05, (key, yardstick)
        assert ours["rel"] <= 1.5 * yardstick["rel"], (key, ours["rel"], yardstick["rel"])
    assert ar["teacher_forced_cached"]["ours"]["rel"] <= 1.5 * ar["teacher_forced"]["reference_bf16"]["rel"]
    assert ar["vq_agreement"]["ours"] >= ar["vq_agreement"]["reference_bf16"] - 0.05
    assert vae["decode"]["ours"]["psnr_db"] > 35


def test_parity_with_a_checkpoint_folder(tmp_path, tiny_checkpoint):
    data = _run("bench.parity_fullsize", "parity", tmp_path, "--model", str(tiny_checkpoint), "--only", "ar")
    assert set(data["phases"]) == {"ar"}
    assert data["ar"]["teacher_forced"]["ours"]["rel"] <= 1.5 * data["ar"]["teacher_forced"]["reference_bf16"]["rel"]


def test_parity_glyph_phase_on_the_tiny_checkpoint(tmp_path, tiny_checkpoint):
    """`--only glyph` loads ours (glm_core's loader and T5) and the reference (`T5EncoderModel` + the pipeline's
    `encode_prompt`) from the folder; on the CPU our bf16 embeddings are the reference's bf16 ones (bitwise in
    tests/parity/test_glyph.py, so a T5 bug shows here as a large error), and both are as far from fp32."""
    data = _run("bench.parity_fullsize", "parity", tmp_path, "--model", str(tiny_checkpoint), "--only", "glyph")
    assert set(data["phases"]) == {"glyph"}
    glyph = data["glyph"]
    assert glyph["weights_equal_reference_bf16"] is True
    assert all(60 <= n <= 120 for n in glyph["inputs"]["glyph_tokens"]), glyph["inputs"]
    for key in ("embeds", "negative"):
        ours, yardstick, direct = (glyph[key][side] for side in ("ours", "reference_bf16", "ours_vs_reference_bf16"))
        for result in (ours, yardstick, direct):
            assert result["finite"] and math.isfinite(result["rel"]) and math.isfinite(result["max_abs"]), (key, result)
        assert 0 < yardstick["rel"] < 0.05, (key, yardstick)
        assert direct["rel"] <= 1e-3, (key, direct)
        assert ours["rel"] <= 1.2 * yardstick["rel"], (key, ours["rel"], yardstick["rel"])
    text = (tmp_path / "parity.md").read_text()
    assert "## GLYPH" in text and "| glyph embeddings, two quoted-text prompts | ours |" in text
    assert "glyph tokens per prompt: [81, 61]" in text


def test_parity_only_names_known_phases():
    from bench.parity_fullsize import PHASES, parse_args

    assert list(PHASES) == ["ar", "dit", "vae", "glyph"]
    assert parse_args(["--only", "glyph,vae"]).only == "glyph,vae"
    with pytest.raises(SystemExit):
        parse_args(["--only", "glyf"])


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
def test_random_init_is_bf16_valued_nonzero_and_ours_shares_the_tensors(seed):
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
    attn, ref_attn = ours.model.language_model.layers[0].self_attn, ref.model.language_model.layers[0].self_attn
    assert torch.equal(attn.qkv_proj.weight, torch.cat([ref_attn.q_proj.weight, ref_attn.k_proj.weight,
                                                        ref_attn.v_proj.weight]))  # fused by the load pre-hook
    vision = models.ours_vision(cfg.ar, ref, "cpu")
    assert vision.model.visual.embeddings.position_embedding.weight.data_ptr() == \
        ref.model.visual.embeddings.position_embedding.weight.data_ptr()


def test_real_configuration_builds_both_sides_with_identical_keys_and_shapes():
    """The full-size configs load into the reference and into glm_core (on the meta device, no memory) with the
    same checkpoint names and shapes (ours written back with its fused tensors split), and the real-size prompts
    have the spec's lengths."""
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    from bench import models, workloads
    from glm_core.ar.config import ARConfig
    from glm_core.ar.model import GlmImageAR
    from glm_core.ar.vision import VisionTokenizer
    from glm_core.checkpoint import official_state_dict
    from glm_core.dit.config import DiTConfig
    from glm_core.dit.model import GlmImageDiT
    from glm_core.vae import GlmImageVAE, VAEConfig

    cfg = models.real_configs()
    with torch.device("meta"):
        pairs = [
            (GlmImageForConditionalGeneration(GlmImageConfig.from_dict(dict(cfg.ar))),
             [GlmImageAR(ARConfig.from_dict(cfg.ar)), VisionTokenizer(ARConfig.from_dict(cfg.ar))]),
            (GlmImageTransformer2DModel.from_config(cfg.dit), [GlmImageDiT(DiTConfig.from_dict(cfg.dit))]),
            (AutoencoderKL.from_config(cfg.vae), [GlmImageVAE(VAEConfig.from_dict(cfg.vae))]),
        ]
    expected_params = [10_114_245_632, 6_926_882_880, 406_100_643]  # spec §3 / §1.6
    for (ref, ours), count in zip(pairs, expected_params):
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        ours_shapes = {k: tuple(v.shape) for part in ours for k, v in official_state_dict(part).items()}
        assert ref_shapes == ours_shapes, type(ours[0]).__name__
        assert sum(p.numel() for p in ref.parameters()) == count

    ar_ref = pairs[0][0]
    prompt = workloads.ar_prompt(cfg.ar, 1024, 1024)
    edit = workloads.ar_prompt(cfg.ar, 1024, 1024, reference=(1024, 1024))
    assert prompt.input_ids.shape == (1, 101) and prompt.num_new_tokens == 1281
    assert edit.input_ids.shape == (1, 1 + 1024 + 1 + 92 + 4 + 1) and edit.num_new_tokens == 1025
    assert edit.pixel_values.shape == (1024, 768) and edit.image_grid_thw.tolist() == [[1, 32, 32], [1, 32, 32]]
    assert workloads.ar_prompt(cfg.ar, 512, 512).num_new_tokens == 513
    from bench.parity_fullsize import ours_positions, reference_positions

    for p, n in ((prompt, 1280), (edit, 0)):
        assert torch.equal(ours_positions(cfg.ar, p, n), reference_positions(ar_ref, p, "cpu", n))


def test_reports_say_when_fresh_processes_compile_torch_from_source(tmp_path):
    """The device image writes no .pyc files (PYTHONDONTWRITEBYTECODE, none shipped): a fresh process there compiles
    torch from source, seconds that a user's pip install never pays. The reports must say so, and stop saying so
    once the packages are byte-compiled into PYTHONPYCACHEPREFIX."""
    probe = ("import json; from bench.harness import bytecode_warning, python_bytecode; state = python_bytecode(); "
             "print(json.dumps({'state': state, 'warning': bytecode_warning(state)}))")

    def state_in(env_update: dict) -> dict:
        env = dict(os.environ, **env_update)
        proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    empty_prefix = str(tmp_path / "pycache")
    without = state_in({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": empty_prefix})
    assert without["state"] == {"torch_byte_compiled": False, "writes_pyc": False, "pycache_prefix": empty_prefix}
    assert "PYTHONDONTWRITEBYTECODE" in without["warning"] and "compileall" in without["warning"]

    torch_init = Path(torch.__file__)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(torch_init)], env=dict(
        os.environ, PYTHONPYCACHEPREFIX=empty_prefix), check=True, timeout=300)
    compiled = state_in({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": empty_prefix})
    assert compiled["state"]["torch_byte_compiled"] and compiled["warning"] is None


def test_ar_profile_reports_a_decode_step_op_by_op(tmp_path, tiny_checkpoint):
    """bench.ar_profile on the CPU: a whole generation timed, a window of steps profiled, the profile's times per
    token adding up (grouped = listed = busy on one thread), for bf16 and FP8 alike."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench.ar_profile", "--tiny", "--model", str(tiny_checkpoint),
                           "--window", "16", "--out", str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "ar_profile.json").read_text())
    assert set(data["results"]) == {"bf16", "fp8"}
    for weights, result in data["results"].items():
        prof = result["profile"]
        assert _positive(result["ms_per_token"]) and result["tokens"] == 513, weights
        assert prof["steps"] >= 16 and prof["launches_per_token"] > 10, weights
        total = sum(prof["groups_us_per_token"].values())
        assert math.isclose(total, prof["kernel_us_per_token"], rel_tol=0.01), weights
        assert prof["busy_us_per_token"] <= prof["kernel_us_per_token"] * 1.01, weights
        assert prof["groups_us_per_token"]["linear: cuBLAS GEMV / GEMM"] > 0, weights
    assert (tmp_path / "ar_profile.md").read_text().startswith("# GLM-Image AR decode step")


def test_ar_profile_groups_our_kernels_apart_from_inductors_and_the_libraries():
    from bench.ar_profile import kernel_group

    assert kernel_group("gemv_kernel") == "linear: GEMV (ours, glm_core/gemv.py)"
    assert kernel_group("split_kernel") == kernel_group("combine_kernel") == "attention (ours, glm_core/decode_attention.py)"
    assert kernel_group("triton_poi_fused_add_cat_index_copy_mul_neg_slice_1").startswith("inductor-fused")
    assert kernel_group("cudnn_generated_fort_native_sdpa_sm80_flash_fprop") == "attention"
    assert kernel_group("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT") == "linear: cuBLAS GEMV / GEMM"


def test_dit_profile_reports_a_guided_step_op_by_op_per_variant(tmp_path, tiny_checkpoint):
    """bench.dit_profile on the CPU: each variant timed through the denoise loop and profiled, the profile's times
    per step adding up, matmuls and attention found and rated against the ceiling, the velocity compared with the
    first variant's (zero for itself, small but not zero for FP8)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench.dit_profile", "--tiny", "--model", str(tiny_checkpoint),
                           "--variants", "bf16,fp8,fp8+unfolded,fp8+padded+torchgelu", "--steps", "2", "--reps", "1",
                           "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "dit_profile.json").read_text())
    assert list(data["results"]) == ["bf16", "fp8", "fp8+unfolded", "fp8+padded+torchgelu"]
    assert data["ceilings"]["bf16_matmul_tflops"] > 0
    for name, result in data["results"].items():
        prof = result["profile"]
        assert _positive(result["s_per_step"]) and prof["steps"] == 2, name
        total = sum(prof["groups_us_per_step"].values())
        assert math.isclose(total, prof["kernel_us_per_step"], rel_tol=0.01), name
        assert prof["groups_us_per_step"]["matmul"] > 0 and prof["groups_us_per_step"]["attention"] > 0, name
        assert result["rates"]["matmul_tflops_achieved"] > 0 and result["rates"]["floor_s_per_step"] > 0, name
    errors = {name: result["velocity_relative_error"] for name, result in data["results"].items()}
    assert errors["bf16"] == 0.0 and 0 < errors["fp8"] < 0.1
    # on the CPU the FP8 linears take the weight-only path, where the MLP is not folded: the same numbers
    assert errors["fp8+unfolded"] == errors["fp8"] == errors["fp8+padded+torchgelu"]
    assert (tmp_path / "dit_profile.md").read_text().startswith("# GLM-Image DiT guided step")


def test_dit_profile_variants_are_parsed_and_bad_ones_refused():
    from bench.dit_profile import guided_step_flops, parse_variant
    from glm_core.dit.config import DiTConfig

    assert parse_variant("fp8+fast@cudnn") == {"name": "fp8+fast@cudnn", "weights": "fp8", "fast_accum": True,
                                               "fold_gelu": True, "pad_all_rows": False, "gelu_kernel": True,
                                               "inductor_options": {}, "attention": "cudnn"}
    assert parse_variant("bf16") == {"name": "bf16", "weights": "bf16", "fast_accum": False, "fold_gelu": True,
                                     "pad_all_rows": False, "gelu_kernel": True, "inductor_options": {},
                                     "attention": None}
    assert parse_variant("fp8+fast+unfolded")["fold_gelu"] is False
    assert parse_variant("fp8+fast+padded")["pad_all_rows"] is True
    assert parse_variant("bf16+tuned+mk")["inductor_options"] == {"coordinate_descent_tuning": True,
                                                                  "triton.multi_kernel": 1}
    assert parse_variant("fp8+torchgelu")["gelu_kernel"] is False
    for bad in ("bf16+fast", "bf16+unfolded", "bf16+padded", "bf16+torchgelu", "fp16", "fp8+slow", "bf16@fa3", "fp8+rowmax"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)
    # the real DiT at 1024² (spec: 30 blocks of dim 4096; 4096 image tokens): ~117 TFLOP per guided step with 64
    # glyph tokens, as counted in ../shared/reference/baseline-h100.md (116 TFLOP)
    config = type("Config", (), {"inner_dim": 4096, "num_layers": 30})()
    flops = guided_step_flops(config, 64, 4096, 1.5)
    assert flops["sequence_lengths"] == [4160, 4097]
    assert 115 < flops["matmul_tflop"] + flops["attention_tflop"] < 118
    assert guided_step_flops(config, 64, 4096, 1.0)["sequence_lengths"] == [4160]
    # the fields counted exist on the real config class
    assert "num_layers" in {field.name for field in dataclasses.fields(DiTConfig)}
    assert isinstance(DiTConfig.inner_dim, property)


def test_decode_attention_bench_times_every_variant_and_checks_it_against_sdpa(tmp_path):
    """bench.decode_attention on the CPU (Triton's interpreter, tiny shapes): every case and variant timed, each
    output compared with fp32 SDPA; the kernels' errors within bf16, and the report written."""
    pytest.importorskip("triton", reason="the decode-attention kernels need the triton package (its CPU interpreter)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.decode_attention", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "decode_attention.json").read_text())
    from bench.decode_attention import TINY_SHAPES

    expected = [(slots, batch, name) for slots, batch in TINY_SHAPES.cases
                for name in ["sdpa_eager"] + [f"ours s{s} w{w}" for s in TINY_SHAPES.split_slots
                                              for w in TINY_SHAPES.warps]]
    assert [(r["slots"], r["batch"], r["variant"]) for r in data["results"]] == expected
    for result in data["results"]:
        assert result["us_per_layer"] > 0 and result["relative_error"] < 2e-2, result
    assert "| 70 | 2 | ours s64 w4 |" in (tmp_path / "decode_attention.md").read_text()
