"""The fast paths used on CUDA (fused q/k/v, torch.compile'd AR decode layer and DiT block) compute
the same function as the plain modules. Run here on the CPU with torch.compile's `aot_eager` backend
(dynamo tracing + AOT autograd, no code generation: fast and exact in fp32) and, for the AR, once
with inductor; on the GPU `bench/fast_paths.py` checks the inductor code against eager in bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from glm_core import compiling
from glm_core.ar.decode import cached_forced_logits, generate_sequences, prepare_prompt
from tests.compare import rel_err
from tests.inputs import build, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def test_compile_switch(monkeypatch):
    monkeypatch.delenv(compiling.NO_COMPILE_ENV, raising=False)
    assert not compiling.compile_wanted("cpu")
    assert compiling.compile_wanted("cuda")
    assert compiling.compile_wanted("cpu", True) and not compiling.compile_wanted("cuda", False)
    monkeypatch.setenv(compiling.NO_COMPILE_ENV, "1")
    assert not compiling.compile_wanted("cuda")
    assert compiling.compile_wanted("cuda", True)


def test_fused_qkv_views_keep_keys_and_memory(ar_models):
    ours, _, _ = ar_models
    model = copy.deepcopy(ours)
    keys = set(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    attn = model.model.language_model.layers[0].self_attn
    assert attn.qkv_fused()
    assert set(model.state_dict()) == keys  # the fused tensors are not in the state dict
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    model.fuse_projections()  # idempotent
    assert attn.qkv_fused()
    # replacing a projection's weight makes the fused copy stale: it is no longer used, then re-fused
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone() * 2, requires_grad=False)
    assert not attn.qkv_fused()
    x = torch.randn(1, 3, attn.q_proj.in_features)
    q, k, v = attn._project_qkv(x)
    torch.testing.assert_close(k, attn.k_proj(x))
    model.fuse_projections()
    assert attn.qkv_fused()
    torch.testing.assert_close(attn._project_qkv(x)[1], attn.k_proj(x))
    # moving / converting the model drops the fused copy (no second copy of q/k/v after an offload)
    model.to(torch.float64)
    assert attn.qkv_weight is None and not attn.qkv_fused()
    assert attn.q_proj.weight.dtype == torch.float64
    torch.testing.assert_close(attn._project_qkv(x.double())[0], attn.q_proj(x.double()))
    model.fuse_projections()
    assert attn.qkv_fused() and attn.qkv_weight.dtype == torch.float64


@pytest.mark.parametrize("attention", ["sdpa", "gqa", "reduce"])
@pytest.mark.parametrize("case", ["t2i", "edit_2ref", "t2i_batch_padded"])
def test_compiled_decode_layer_same_logits(ar_models, case, attention, monkeypatch):
    from glm_core.ar import model as ar_model

    monkeypatch.setattr(ar_model, "DECODE_ATTENTION", attention)
    ours, _, _ = ar_models
    inputs = build(ar_models, case)
    plan = prepare_prompt(ours, inputs)
    forced = torch.randint(0, ours.config.codebook_size, (plan.input_ids.shape[0], plan.num_new_tokens - 1),
                           generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(ours)
    eager = cached_forced_logits(model, inputs, forced)
    fast = cached_forced_logits(model, inputs, forced, compile=True, backend="aot_eager")
    assert model.model.language_model.layers[0].self_attn.qkv_fused()
    err = rel_err(fast, eager)
    assert err <= TOL, f"{case}: compiled decode logits rel err {err:.2e}"
    assert not compiling.compiled(compiling_target(), "", "aot_eager").failed


def compiling_target():
    from glm_core.ar.decode import _decode_layer

    return _decode_layer


def test_compiled_decode_layer_inductor(ar_models):
    """The real backend once (C++ code on the CPU): same logits within fp32 rounding."""
    ours, _, _ = ar_models
    inputs = build(ar_models, "t2i")
    plan = prepare_prompt(ours, inputs)
    forced = torch.randint(0, ours.config.codebook_size, (1, plan.num_new_tokens - 1),
                           generator=torch.Generator().manual_seed(4))
    model = copy.deepcopy(ours)
    eager = cached_forced_logits(model, inputs, forced)
    try:
        fast = cached_forced_logits(model, inputs, forced, compile=True)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"inductor unavailable here: {exc}")
    if compiling.compiled(compiling_target(), "").failed:
        pytest.skip("inductor could not compile on this machine (fell back to eager)")
    err = rel_err(fast, eager)
    assert err <= 1e-4, f"inductor decode logits rel err {err:.2e}"


def test_generate_with_compile_same_tokens(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a castle"], 64, 64)
    model = copy.deepcopy(ours)
    plain = generate_sequences(model, inputs, seeds=[10, 11])
    fast = generate_sequences(model, inputs, seeds=[10, 11], compile=True)
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("batched_cfg", [False, True])
def test_compiled_dit_blocks_same_velocity(dit, batched_cfg):
    """Compiled blocks (aot_eager) vs plain blocks: guided step, and editing with reference K/V."""
    from glm_core.dit.model import DiTBlock

    g = torch.Generator().manual_seed(21)
    text_dim = dit.config.text_embed_dim
    latents = torch.randn(1, 16, 8, 12, generator=g)
    glyph, negative = torch.randn(1, 5, text_dim, generator=g), torch.randn(1, 1, text_dim, generator=g)
    prior_ids = torch.randint(0, 16384, (1, 24), generator=g)
    ref_latent = torch.randn(1, 16, 8, 8, generator=g)
    ref_prior = torch.randint(0, 16384, (16,), generator=g)

    def run():
        reference_kv = dit.encode_references([ref_latent], [ref_prior], [(64, 64)])
        plain = dit.predict_velocity(latents, glyph, negative, prior_ids, 966.0, (64, 96), guidance=1.5,
                                     batched_cfg=batched_cfg)
        edit = dit.predict_velocity(latents, glyph, negative, prior_ids, 966.0, (64, 96), guidance=1.5,
                                    reference_kv=reference_kv, batched_cfg=batched_cfg)
        return reference_kv, plain, edit

    dit.compile_blocks = False
    expected = run()
    dit.compile_blocks, dit.compile_backend = True, "aot_eager"
    try:
        got = run()
    finally:
        dit.compile_blocks, dit.compile_backend = None, "inductor"
    assert not compiling.compiled(DiTBlock.forward, "", "aot_eager").failed
    for k_got, k_exp in zip(got[0].keys, expected[0].keys):
        assert rel_err(k_got, k_exp) <= TOL
    assert rel_err(got[1], expected[1]) <= TOL
    assert rel_err(got[2], expected[2]) <= TOL


def test_compile_failure_falls_back_to_eager():
    def broken(x):
        return x + 1

    wrapper = compiling.CompiledOrEager(broken, "test", backend="aot_eager")
    wrapper.compiled = lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler"))
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        assert wrapper(torch.ones(1)).item() == 2
    assert wrapper.failed and wrapper(torch.ones(1)).item() == 2


@pytest.mark.parametrize("seed", range(6))
def test_one_sort_top_k_top_p_equals_two_steps(seed):
    """The one-sort top-k + top-p filter (used on CUDA) keeps the same number of ids with the same
    values as the two separate filters, also with many ties (bf16-rounded logits) and grid-masked
    (-inf) ids. Which of exactly tied ids is kept follows the sort's tie order; the CPU sort is not
    stable, so only values are compared here (bench/fast_paths.py checks ids on the GPU)."""
    from glm_core.ar import sampling

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 16512, generator=g) * (1 + seed)).to(torch.bfloat16).float()
    logits[:, 16384:] = float("-inf")
    for top_k, top_p in ((50, 0.75), (1, 0.9), (300, 0.3), (50, 0.999)):
        two_step = sampling.filter_logits(logits, temperature=0.9, top_k=top_k, top_p=top_p, one_sort=False)
        one_sort = sampling.filter_logits(logits, temperature=0.9, top_k=top_k, top_p=top_p, one_sort=True)
        for a, b in zip(one_sort, two_step):
            kept_a, kept_b = a[~torch.isinf(a)], b[~torch.isinf(b)]
            assert torch.equal(kept_a.sort().values, kept_b.sort().values), (top_k, top_p)
    # fp32 logits without ties: the very same ids
    logits = torch.randn(3, 16512, generator=g) * (1 + seed)
    for top_k, top_p in ((50, 0.75), (300, 0.3)):
        assert torch.equal(sampling.filter_logits(logits, temperature=0.9, top_k=top_k, top_p=top_p, one_sort=True),
                           sampling.filter_logits(logits, temperature=0.9, top_k=top_k, top_p=top_p, one_sort=False))
