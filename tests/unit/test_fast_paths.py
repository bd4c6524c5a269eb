"""The fast paths used on CUDA compute the same function as the plain modules, and compiling never silently
degrades: q/k/v fused at load time, the torch.compile'd AR decode layer and DiT block (checked here on the CPU
with the `aot_eager` backend and, for the AR, once with inductor; every compiled test asserts that no fallback
to eager happened), the compiler-error-only fallback, and the one-sort top-k/top-p filter used on CUDA."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from glm_core import compiling
from glm_core.ar.decode import _decode_layer, generate_sequences, prepare_prompt
from glm_core.checkpoint import official_state_dict, read_headers
from tests.compare import rel_err
from tests.forcing import cached_forced_logits
from tests.inputs import build, make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def assert_no_fallback(fn, backend):
    wrapper = compiling.compiled(fn, "", backend)
    assert wrapper.fallback_reason is None, f"compiled {fn.__qualname__} fell back to eager: {wrapper.fallback_reason}"


def test_compile_switch(monkeypatch):
    monkeypatch.delenv(compiling.NO_COMPILE_ENV, raising=False)
    assert not compiling.compile_wanted("cpu")
    assert compiling.compile_wanted("cuda")
    assert compiling.compile_wanted("cpu", True) and not compiling.compile_wanted("cuda", False)
    assert compiling.compile_backend("cuda") == "inductor" and compiling.compile_backend("cpu") is None
    monkeypatch.setenv(compiling.NO_COMPILE_ENV, "1")
    assert not compiling.compile_wanted("cuda")
    assert compiling.compile_wanted("cuda", True)


def assert_split_parts_are_the_stored_tensors(official, headers, prefix, parts):
    """Each part split back from a fused projection equals the tensor the checkpoint stores under its key."""
    from safetensors import safe_open

    for part in parts:
        for leaf in ("weight", "bias"):
            key = f"{prefix}{part}.{leaf}"
            with safe_open(str(headers[key][2]), framework="pt") as handle:
                assert torch.equal(official[key], handle.get_tensor(key).float()), key


def test_qkv_fused_once_at_load(tiny_checkpoint, ar_models):
    """The checkpoint's q/k/v rows are concatenated when the weights load: one (q+2kv, hidden) projection, no
    separate copies, and the official key names come back when the model is written out."""
    ours, _, _ = ar_models
    attn = ours.model.language_model.layers[0].self_attn
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.weight.shape[0] == attn.q_size + 2 * attn.kv_size
    headers = read_headers(tiny_checkpoint / "vision_language_encoder")
    official = official_state_dict(ours)
    assert {k for k in headers if not k.startswith(("model.visual.", "model.vqmodel."))} == set(official)
    assert_split_parts_are_the_stored_tensors(official, headers, "model.language_model.layers.0.self_attn.",
                                              ("q_proj", "k_proj", "v_proj"))
    # a reference-style state dict (separate q/k/v) loads through the pre-hook
    copy_model = copy.deepcopy(ours)
    copy_model.load_state_dict(official, strict=True)
    assert torch.equal(copy_model.model.language_model.layers[0].self_attn.qkv_proj.weight, attn.qkv_proj.weight)


def test_dit_qkv_fused_once_at_load(tiny_checkpoint):
    """The DiT's to_q / to_k / to_v load as one `to_qkv` (rows q | k | v), the official keys come back when it is
    written out, and a reference-style state dict loads through the pre-hook."""
    from glm_core.dit.model import load_dit

    dit = load_dit(tiny_checkpoint, "cpu", torch.float32, compile=False)
    attn = dit.transformer_blocks[0].attn1
    assert not hasattr(attn, "to_q") and attn.to_qkv.weight.shape == (3 * attn.dim, attn.dim)
    headers = read_headers(tiny_checkpoint / "transformer")
    official = official_state_dict(dit)
    assert set(headers) == set(official)
    assert_split_parts_are_the_stored_tensors(official, headers, "transformer_blocks.0.attn1.", ("to_q", "to_k", "to_v"))
    copy_model = copy.deepcopy(dit)
    for leaf in ("weight", "bias"):
        getattr(copy_model.transformer_blocks[0].attn1.to_qkv, leaf).data.zero_()
    copy_model.load_state_dict(official, strict=True)
    assert torch.equal(copy_model.transformer_blocks[0].attn1.to_qkv.weight, attn.to_qkv.weight)
    assert torch.equal(copy_model.transformer_blocks[0].attn1.to_qkv.bias, attn.to_qkv.bias)


@pytest.mark.parametrize("case", ["t2i", "edit_2ref", "t2i_batch_padded"])
def test_compiled_decode_layer_same_logits(ar_models, case):
    ours, _, _ = ar_models
    inputs = build(ar_models, case)
    plan = prepare_prompt(ours, inputs)
    forced = torch.randint(0, ours.config.codebook_size, (plan.input_ids.shape[0], plan.num_new_tokens - 1),
                           generator=torch.Generator().manual_seed(3))
    eager = cached_forced_logits(ours, inputs, forced)
    model = copy.deepcopy(ours)
    model.compile_backend = "aot_eager"
    fast = cached_forced_logits(model, inputs, forced)
    assert_no_fallback(_decode_layer, "aot_eager")
    err = rel_err(fast, eager)
    assert err <= TOL, f"{case}: compiled decode logits rel err {err:.2e}"


def test_compiled_decode_layer_inductor(ar_models):
    """The real backend once (C++ code on the CPU): same logits within fp32 rounding, and no fallback."""
    ours, _, _ = ar_models
    inputs = build(ar_models, "t2i")
    plan = prepare_prompt(ours, inputs)
    forced = torch.randint(0, ours.config.codebook_size, (1, plan.num_new_tokens - 1),
                           generator=torch.Generator().manual_seed(4))
    eager = cached_forced_logits(ours, inputs, forced)
    model = copy.deepcopy(ours)
    model.compile_backend = "inductor"
    fast = cached_forced_logits(model, inputs, forced)
    assert_no_fallback(_decode_layer, "inductor")
    err = rel_err(fast, eager)
    assert err <= 1e-4, f"inductor decode logits rel err {err:.2e}"


def test_generate_with_compile_same_tokens(ar_models):
    ours, _, processor = ar_models
    inputs = make_inputs(processor, ["a castle"], 64, 64)
    plain = generate_sequences(ours, inputs, seeds=[10, 11], sampling_settings=ours.config.sampling)
    model = copy.deepcopy(ours)
    model.compile_backend = "aot_eager"
    fast = generate_sequences(model, inputs, seeds=[10, 11], sampling_settings=ours.config.sampling)
    assert_no_fallback(_decode_layer, "aot_eager")
    assert torch.equal(plain, fast)


def test_compiled_dit_blocks_same_velocity(dit):
    """Compiled blocks (aot_eager) vs plain blocks: a guided step, and editing with reference K/V."""
    from glm_core.dit.layers import DiTBlock
    from glm_core.dit.sampling import DiTConditioning, predict_velocity

    g = torch.Generator().manual_seed(21)
    text_dim = dit.config.text_embed_dim
    latents = torch.randn(1, 16, 8, 12, generator=g)
    glyph, negative = torch.randn(1, 5, text_dim, generator=g), torch.randn(1, 1, text_dim, generator=g)
    prior_ids = torch.randint(0, 16384, (1, 24), generator=g)
    ref_latent = torch.randn(1, 16, 8, 8, generator=g)
    ref_prior = torch.randint(0, 16384, (16,), generator=g)

    def run(model):
        reference_kv = model.encode_references([ref_latent], [ref_prior], [(64, 64)])
        cond = DiTConditioning(glyph, prior_ids, (64, 96), negative_glyph_embeds=negative)
        plain = predict_velocity(model, latents, cond, 966.0, 1.5)
        cond.reference_kv = reference_kv
        edit = predict_velocity(model, latents, cond, 966.0, 1.5)
        return reference_kv, plain, edit

    expected = run(dit)
    compiled_dit = copy.deepcopy(dit)
    compiled_dit.compile_backend = "aot_eager"
    got = run(compiled_dit)
    assert_no_fallback(DiTBlock.forward, "aot_eager")
    for k_got, k_exp in zip(got[0].keys, expected[0].keys):
        assert rel_err(k_got, k_exp) <= TOL
    assert rel_err(got[1], expected[1]) <= TOL
    assert rel_err(got[2], expected[2]) <= TOL


def _raising(exc: BaseException):
    def compiled_stand_in(*args, **kwargs):
        raise exc
    return compiled_stand_in


def test_only_compiler_errors_fall_back_and_are_logged_once(caplog):
    from torch._dynamo.exc import Unsupported

    wrapper = compiling.CompiledOrEager(lambda x: x + 1, "test fn", backend="aot_eager")
    wrapper.compiled = _raising(Unsupported("a graph break the compiler cannot handle"))
    with caplog.at_level(logging.WARNING, logger="glm_core"):
        assert wrapper(torch.ones(1)).item() == 2
        assert wrapper(torch.ones(1)).item() == 2
    assert wrapper.failed and "Unsupported" in wrapper.fallback_reason
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "test fn" in caplog.records[0].message and "eagerly" in caplog.records[0].message


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("shape mismatch in the user's input"), KeyboardInterrupt()])
def test_out_of_memory_and_other_errors_never_fall_back(error):
    wrapper = compiling.CompiledOrEager(lambda x: x + 1, "test fn", backend="aot_eager")
    wrapper.compiled = _raising(error)
    with pytest.raises(type(error)):
        wrapper(torch.ones(1))
    assert not wrapper.failed, "the next call must try the compiled path again"


def test_a_backend_failure_is_logged_with_the_error_the_backend_raised(caplog):
    """A backend failure's own first line is only "backend='inductor' raised:": the fallback's reason names the error
    under it (seen on the H200, 2026-11-30, where the reason logged was that first line alone)."""
    from torch._dynamo.exc import BackendCompilerFailed

    wrapper = compiling.CompiledOrEager(lambda x: x + 1, "test fn", backend="aot_eager")
    wrapper.compiled = _raising(BackendCompilerFailed(lambda: None, KeyError("triton_per_fused_3 not in cache"),
                                                      None))
    with caplog.at_level(logging.WARNING, logger="glm_core"):
        assert wrapper(torch.ones(1)).item() == 2
    assert wrapper.fallback_reason == "BackendCompilerFailed: KeyError: 'triton_per_fused_3 not in cache'"
    assert wrapper.fallback_reason in caplog.records[0].message


def test_oom_inside_a_compiler_error_is_an_oom():
    from torch._dynamo.exc import BackendCompilerFailed

    oom = torch.OutOfMemoryError("CUDA out of memory while autotuning")
    assert not compiling.is_compiler_error(BackendCompilerFailed(lambda: None, oom, None))
    assert compiling.is_compiler_error(BackendCompilerFailed(lambda: None, RuntimeError("codegen"), None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: run on the device (bench/README.md); the CPU "
                    "compile paths are checked above with aot_eager and inductor")
def test_gpu_compiled_paths_do_not_fall_back(tiny_checkpoint):
    """On a GPU the default (inductor) paths of both stages run compiled, with no fallback to eager."""
    from glm_core.dit.layers import DiTBlock
    from glm_core.pipeline import GlmImage, decode, encode_prompt, generate_tokens

    model = GlmImage.from_folder(tiny_checkpoint, device="cuda")
    cond = encode_prompt(model, "a cat", 512, 512)
    decode(model, cond, generate_tokens(model, cond, seed=0), steps=2)
    assert model.stage("ar").compile_backend == "inductor" and model.stage("dit").compile_backend == "inductor"
    assert_no_fallback(_decode_layer, "inductor")
    assert_no_fallback(DiTBlock.forward, "inductor")


@pytest.mark.parametrize("seed", range(6))
def test_one_sort_top_k_top_p_equals_two_steps(seed):
    """The one-sort top-k + top-p filter (used on CUDA) keeps the same number of ids with the same
    values as the two separate filters (used on the CPU), also with many ties (bf16-rounded logits) and
    grid-masked (-inf) ids. Which of exactly tied ids is kept follows the sort's tie order; the CPU sort is
    not stable, so only values are compared here (bench checks ids on the GPU)."""
    from glm_core.ar import sampling

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 16512, generator=g) * (1 + seed)).to(torch.bfloat16).float()
    logits[:, 16384:] = float("-inf")
    for top_k, top_p in ((50, 0.75), (1, 0.9), (300, 0.3), (50, 0.999)):
        two_step = sampling.filter_logits(logits, temperature=0.9, top_k=top_k, top_p=top_p)
        one_sort = sampling.top_k_top_p(logits / 0.9, top_k, top_p, 1)
        for a, b in zip(one_sort, two_step):
            kept_a, kept_b = a[~torch.isinf(a)], b[~torch.isinf(b)]
            assert torch.equal(kept_a.sort().values, kept_b.sort().values), (top_k, top_p)
    # fp32 logits without ties: the very same ids
    logits = torch.randn(3, 16512, generator=g) * (1 + seed)
    for top_k, top_p in ((50, 0.75), (300, 0.3)):
        assert torch.equal(sampling.top_k_top_p(logits / 0.9, top_k, top_p, 1),
                           sampling.filter_logits(logits, temperature=0.9, top_k=top_k, top_p=top_p))
