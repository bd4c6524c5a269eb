"""DiT parity: glm_core.dit vs diffusers GlmImageTransformer2DModel, both loaded from tiny_checkpoint.

fp32 on CPU; relative error (Frobenius) <= 1e-5 (docs/ARCHITECTURE.md). Covers text-to-image
conditional / unconditional (prior drop), timestep and size conditioning, per-row drop in one
batch, the guided velocity (glm_core.dit.sampling), and editing with one and two references through the KV cache
(the reference driven with its own GlmImageKVCache in write / read / skip modes, as its pipeline does).
"""

from __future__ import annotations

import pytest
import torch

from glm_core.checkpoint import official_state_dict
from glm_core.dit import DiTConfig, ReferenceKV, load_dit
from glm_core.dit.sampling import DiTConditioning, predict_velocity
from tests.compare import rel_err
from tests.inputs import REFERENCE_GRIDS, dit_references

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    from tests.reference import reference_dit

    ref = reference_dit(tiny_checkpoint, torch.float32)
    ours = load_dit(tiny_checkpoint, "cpu", torch.float32)
    return ours, ref


@pytest.fixture(scope="module")
def text_dim(models) -> int:
    return models[0].config.text_embed_dim


def _inputs(seed: int, batch: int, h: int, w: int, glyph_len: int, text_dim: int):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, h, w, generator=g)
    glyph = torch.randn(batch, glyph_len, text_dim, generator=g)
    prior_ids = torch.randint(0, 16384, (batch, (h // 2) * (w // 2)), generator=g)
    return latents, glyph, prior_ids


def _ref_forward(ref, latents, glyph, prior_ids, drop, timestep, target_size, crop=(0.0, 0.0), kv_caches=None):
    batch = latents.shape[0]
    if isinstance(drop, bool):
        drop = torch.full_like(prior_ids, drop, dtype=torch.bool)
    with torch.no_grad():
        return ref(hidden_states=latents, encoder_hidden_states=glyph, prior_token_id=prior_ids,
                   prior_token_drop=drop, timestep=torch.full((batch,), float(timestep)),
                   target_size=torch.tensor([list(target_size)] * batch, dtype=torch.float32),
                   crop_coords=torch.tensor([list(crop)] * batch, dtype=torch.float32),
                   kv_caches=kv_caches, return_dict=False)[0]


def test_config_from_checkpoint(tiny_checkpoint, models):
    ours, ref = models
    config = ours.config
    assert isinstance(config, DiTConfig)
    for key in DiTConfig._REQUIRED:
        assert getattr(config, key) == ref.config[key], key
    with pytest.raises(ValueError, match="num_attention_heads"):
        DiTConfig.from_dict({k: v for k, v in ref.config.items() if k != "num_attention_heads"})


def test_state_dict_keys_match_reference(models):
    """Under the checkpoint's names (q/k/v split back from the fused `to_qkv`), the same keys and values."""
    ours, ref = models
    official, reference = official_state_dict(ours), ref.state_dict()
    assert set(official) == set(reference)
    for key, value in reference.items():
        assert torch.equal(official[key].float(), value.float()), key


@pytest.mark.parametrize("drop", [False, True], ids=["cond", "uncond_prior_drop"])
@pytest.mark.parametrize("timestep,target_size,crop", [
    (999.0, (1024, 768), (0, 0)),
    (500.0, (768, 1024), (0, 0)),
    (0.0, (64, 96), (32, 64)),
])
def test_t2i_velocity(models, text_dim, drop, timestep, target_size, crop):
    ours, ref = models
    latents, glyph, prior_ids = _inputs(1, 1, 8, 12, 7, text_dim)
    expected = _ref_forward(ref, latents, glyph, prior_ids, drop, timestep, target_size, crop)
    with torch.no_grad():
        got = ours(latents, glyph, prior_ids, timestep, target_size, crop,
                   prior_drop=torch.tensor([drop]))
    assert got.shape == expected.shape == latents.shape
    assert rel_err(got, expected) <= TOL


def test_conditioning_is_not_ignored(models, text_dim):
    """The inputs compared above matter: changing each one changes the reference output a lot."""
    ours, ref = models
    latents, glyph, prior_ids = _inputs(2, 1, 8, 8, 3, text_dim)
    base = _ref_forward(ref, latents, glyph, prior_ids, False, 500.0, (1024, 768))
    for changed in (_ref_forward(ref, latents, glyph, prior_ids, True, 500.0, (1024, 768)),
                    _ref_forward(ref, latents, glyph, prior_ids, False, 999.0, (1024, 768)),
                    _ref_forward(ref, latents, glyph, prior_ids, False, 500.0, (768, 1024)),
                    _ref_forward(ref, latents, glyph, prior_ids, False, 500.0, (1024, 768), (16, 0)),
                    _ref_forward(ref, latents, glyph[:, :2], prior_ids, False, 500.0, (1024, 768))):
        assert rel_err(changed, base) > 1e-3


def test_batch_with_per_row_prior_drop(models, text_dim):
    ours, ref = models
    latents, glyph, prior_ids = _inputs(3, 2, 8, 8, 4, text_dim)
    drop_rows = torch.tensor([False, True])
    expected = _ref_forward(ref, latents, glyph, prior_ids, drop_rows[:, None].expand_as(prior_ids).clone(),
                            979.0, (64, 64))
    with torch.no_grad():
        got = ours(latents, glyph, prior_ids, torch.tensor([979.0, 979.0]), (64, 64), prior_drop=drop_rows)
    assert rel_err(got, expected) <= TOL


def test_empty_glyph_stream(models, text_dim):
    ours, ref = models
    latents, glyph, prior_ids = _inputs(4, 1, 8, 8, 0, text_dim)
    expected = _ref_forward(ref, latents, glyph, prior_ids, False, 0.0, (64, 64))
    with torch.no_grad():
        got = ours(latents, glyph, prior_ids, 0.0, (64, 64))
    assert rel_err(got, expected) <= TOL


def reference_cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """The reference pipeline's classifier-free guidance on its two velocities (fp32)."""
    return uncond.float() + guidance * (cond.float() - uncond.float())


@pytest.mark.parametrize("batch", [1, 2])
def test_guided_velocity_matches_reference(models, text_dim, batch):
    ours, ref = models
    latents, glyph, prior_ids = _inputs(5, batch, 8, 12, 9, text_dim)
    negative = torch.randn(1, 1, text_dim, generator=torch.Generator().manual_seed(6)).expand(batch, -1, -1)
    guidance = 1.5
    cond = _ref_forward(ref, latents, glyph, prior_ids, False, 979.0, (1024, 768))
    uncond = _ref_forward(ref, latents, negative, prior_ids, True, 979.0, (1024, 768))
    expected = reference_cfg(cond, uncond, guidance)
    got = predict_velocity(ours, latents, DiTConditioning(glyph, prior_ids, (1024, 768), negative), 979.0, guidance)
    assert rel_err(got, expected) <= TOL


def test_guidance_one_is_conditional_only(models, text_dim):
    ours, ref = models
    latents, glyph, prior_ids = _inputs(7, 1, 8, 8, 2, text_dim)
    expected = _ref_forward(ref, latents, glyph, prior_ids, False, 333.0, (64, 64))
    got = predict_velocity(ours, latents, DiTConditioning(glyph, prior_ids, (64, 64)), 333.0, 1.0)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) <= TOL


# ---- editing: reference-image KV cache ---------------------------------------------------------


def _reference_kv_cache(ref, refs):
    """The reference pipeline's write pass (pipeline_glm_image.py, step 6): each reference alone, t=0."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    kv_caches = GlmImageKVCache(num_layers=ref.config.num_layers)
    kv_caches.set_mode("write")
    with torch.no_grad():
        for latent, ids, size in refs:
            ref(hidden_states=latent, encoder_hidden_states=torch.zeros(1, 0, ref.config.text_embed_dim),
                prior_token_id=ids, prior_token_drop=torch.full_like(ids, False, dtype=torch.bool),
                timestep=torch.zeros((1,)), target_size=torch.tensor([size]), crop_coords=torch.zeros((1, 2)),
                kv_caches=kv_caches)
    kv_caches.next_sample()
    return kv_caches


@pytest.mark.parametrize("num_refs", [1, 2])
def test_reference_kv_matches_reference_cache(models, num_refs):
    ours, ref = models
    refs = dit_references(num_refs)
    kv_caches = _reference_kv_cache(ref, refs)
    reference_kv = ours.encode_references([r[0] for r in refs], [r[1] for r in refs], [r[2] for r in refs])
    assert isinstance(reference_kv, ReferenceKV)
    assert reference_kv.num_layers == ref.config.num_layers
    assert reference_kv.num_tokens == sum(h * w // 4 for h, w in REFERENCE_GRIDS[:num_refs])
    for layer in range(reference_kv.num_layers):
        expected_k = kv_caches[layer].k_caches[0].transpose(1, 2)  # (1, S, heads, D) -> (1, heads, S, D)
        expected_v = kv_caches[layer].v_caches[0].transpose(1, 2)
        keys, values = reference_kv.layer(layer)
        assert rel_err(keys, expected_k) <= TOL
        assert rel_err(values, expected_v) <= TOL


@pytest.mark.parametrize("num_refs", [1, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_editing_velocity(models, text_dim, num_refs, batch):
    ours, ref = models
    refs = dit_references(num_refs)
    kv_caches = _reference_kv_cache(ref, refs)
    latents, glyph, prior_ids = _inputs(12, batch, 8, 12, 5, text_dim)
    negative = torch.randn(1, 1, text_dim, generator=torch.Generator().manual_seed(13)).expand(batch, -1, -1)
    kv_caches.set_mode("read")
    cond = _ref_forward(ref, latents, glyph, prior_ids, False, 966.0, (64, 96), kv_caches=kv_caches)
    kv_caches.set_mode("skip")
    uncond = _ref_forward(ref, latents, negative, prior_ids, True, 966.0, (64, 96), kv_caches=kv_caches)
    no_refs = _ref_forward(ref, latents, glyph, prior_ids, False, 966.0, (64, 96))
    assert rel_err(no_refs, cond) > 1e-3  # the references really change the conditional pass

    reference_kv = ours.encode_references([r[0] for r in refs], [r[1] for r in refs], [r[2] for r in refs])
    with torch.no_grad():
        got_cond = ours(latents, glyph, prior_ids, 966.0, (64, 96), reference_kv=reference_kv)
    assert rel_err(got_cond, cond) <= TOL

    expected = reference_cfg(cond, uncond, 1.5)
    got = predict_velocity(ours, latents, DiTConditioning(glyph, prior_ids, (64, 96), negative, reference_kv),
                           966.0, 1.5)
    assert rel_err(got, expected) <= TOL


def test_bf16_close_to_reference_bf16(tiny_checkpoint, text_dim):
    """Same dtype flow as the reference under bf16 (loose: bf16 rounding, CPU kernels)."""
    from tests.reference import reference_dit

    ref = reference_dit(tiny_checkpoint, torch.bfloat16)
    ours = load_dit(tiny_checkpoint, "cpu", torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    latents, glyph, prior_ids = _inputs(14, 1, 8, 8, 4, text_dim)
    latents, glyph = latents.bfloat16(), glyph.bfloat16()
    expected = _ref_forward(ref, latents, glyph, prior_ids, False, 500.0, (1024, 768))
    with torch.no_grad():
        got = ours(latents, glyph, prior_ids, 500.0, (1024, 768))
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) <= 1e-2
