"""glm_core/decode_attention.py: one decode token's attention over the KV cache (rotary on q, GQA rows, the boolean
mask, split over the cache) against a float64 reference, and the AR decoder taking it.

On the CPU the kernels run in Triton's interpreter, in a child process that sets TRITON_INTERPRET=1 before triton
defines a kernel; the parent checks what the child reports. On a GPU (skipped without one, saying so): the compiled
kernels at the real model's shapes against PyTorch's SDPA, and inside a compiled decode layer.
"""

from __future__ import annotations

import json

import pytest
import torch

from glm_core.decode_attention import decode_attention_available, takes_decode_attention
from tests.child_runs import run_child

# (batch, heads, kv_heads, head_dim, rotary_dim, slots): the tiny AR's heads (4 over 2, rotary 16 of 32), the real
# model's (32 over 2, rotary 64 of 128) at batch 2, no grouping nor rotary, and a cache of more splits than one
# combine step takes (67 > 64); slots off the 32-slot tiles.
CASES = [(1, 4, 2, 32, 16, 70), (2, 32, 2, 128, 64, 300), (1, 8, 8, 16, 0, 45), (1, 4, 2, 16, 8, 2130)]

CHILD = r"""
import json, math, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from glm_core.ar.model import apply_rotary
from glm_core.decode_attention import attend

def reference(q, cos, sin, k, v, allowed, rotary=True, mask=True):
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    q = q.double()
    if rotary:
        q = apply_rotary(q[:, :, None], cos[:, None, None].double(), sin[:, None, None].double())[:, :, 0]
    q = q.to(torch.bfloat16).double()  # rounded once after the rotary, as the compiled layer does
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
    if mask:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)

torch.manual_seed(0)
results = []
for batch, heads, kv_heads, head_dim, rotary_dim, slots in json.loads(sys.argv[1]):
    q = torch.randn(batch, heads, head_dim).to(torch.bfloat16)
    angles = torch.rand(batch, rotary_dim // 2) * 6.0
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    k = torch.randn(batch, kv_heads, slots, head_dim).to(torch.bfloat16)
    v = torch.randn(batch, kv_heads, slots, head_dim).to(torch.bfloat16)
    # left padding (item 0), the prompt, a hole of future slots spanning whole tiles, the current token's slot
    allowed = torch.zeros(batch, slots, dtype=torch.bool)
    allowed[:, 3 : slots // 2] = True
    allowed[0, :7] = False
    allowed[:, slots - 2] = True
    out = attend(q, cos, sin, k, v, allowed)
    ref = reference(q, cos, sin, k, v, allowed)
    scale = ref.abs().max().item()
    results.append({"case": [batch, heads, kv_heads, head_dim, rotary_dim, slots], "dtype": str(out.dtype),
                    "shape": list(out.shape), "error": (out.double() - ref).abs().max().item() / scale,
                    "error_without_mask": (out.double() - reference(q, cos, sin, k, v, allowed, mask=False))
                    .abs().max().item() / scale,
                    "error_without_rotary": (out.double() - reference(q, cos, sin, k, v, allowed, rotary=False))
                    .abs().max().item() / scale})
print("RESULTS " + json.dumps(results), flush=True)
"""


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton", reason="the decode-attention kernel tests need the triton package (its CPU interpreter)")
    return run_child(CHILD, json.dumps(CASES), tag="RESULTS", env={"TRITON_INTERPRET": "1"})


def test_decode_attention_matches_a_float64_reference(interpreted_results):
    """Within bf16 roundings (the probabilities for P·V and the output: 2^-8 each when rounding to nearest, 2^-7 in
    the interpreter, which truncates) of max |out|; without the mask or without q's rotary the reference is far off,
    so the tolerance tells them apart."""
    assert [r["case"] for r in interpreted_results] == [list(case) for case in CASES]
    for result in interpreted_results:
        batch, heads, _, head_dim, rotary_dim, _ = result["case"]
        assert result["dtype"] == "torch.bfloat16" and result["shape"] == [batch, heads, head_dim], result
        assert result["error"] < 2e-2, result
        assert result["error_without_mask"] > 0.1, result
        if rotary_dim:
            assert result["error_without_rotary"] > 0.1, result


def test_no_kernel_constant_depends_on_the_cache_length():
    """The cache length is a dynamic size of the compiled decode layer: a compile-time constant derived from it would
    recompile the layer for every prompt length and image size."""
    pytest.importorskip("triton")
    from glm_core import decode_attention

    for name in ("split_kernel", "combine_kernel"):
        kernel = getattr(decode_attention, name)
        constants = [p.name for p in kernel.params if p.is_constexpr]
        assert "slots" not in constants and "splits" not in constants, (name, constants)
    assert "slots" in [p.name for p in decode_attention.split_kernel.params]
    assert "splits" in [p.name for p in decode_attention.combine_kernel.params]


def test_outside_compiled_code_and_on_the_cpu_the_layers_keep_sdpa():
    q = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    assert decode_attention_available("cpu") is False
    assert takes_decode_attention(q) is False


CHILD_LAYER = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import glm_core.ar.model as ar_model
from glm_core import decode_attention
from glm_core.ar.decode import LayerKVCache
from glm_core.ar.model import load_ar

model = load_ar(sys.argv[1], "cpu", torch.bfloat16)
layer = model.model.language_model.layers[0]
text = model.config.text
batch, slots, index = 2, 80, 50
torch.manual_seed(0)
hidden = torch.randn(batch, 1, text.hidden_size).to(torch.bfloat16)
positions = torch.randint(0, 40, (3, batch, 1))
cos, sin = model.rotary_cos_sin(positions, torch.bfloat16)  # (B, 1, 1, rotary_dim), one position per item
allowed = torch.zeros(batch, slots, dtype=torch.bool)
allowed[:, 4:index + 1] = True
allowed[0, :11] = False  # item 0 left-padded
cache_index = torch.tensor([index])

def run(kernels):
    cache = LayerKVCache(batch, text.num_key_value_heads, slots, text.head_dim, torch.bfloat16, "cpu")
    torch.manual_seed(1)
    cache.k.normal_(); cache.v.normal_()
    ar_model.takes_decode_attention = lambda q: kernels  # as inside the compiled decode layer on a GPU
    out = layer(hidden, cos, sin, allowed[:, None, None, :], cache, cache_index)
    return out, cache

calls = []
def counted(*args):
    calls.append(args[0].shape)
    return decode_attention.attend(*args)
ar_model.attend_one_token = counted
plain, plain_cache = run(False)
routed, routed_cache = run(True)
print("RESULT " + json.dumps({
    "calls": [list(shape) for shape in calls],
    "same_cache": torch.equal(plain_cache.k, routed_cache.k) and torch.equal(plain_cache.v, routed_cache.v),
    "error": ((routed.double() - plain.double()).abs().max() / plain.double().abs().max()).item(),
    "heads": text.num_attention_heads, "head_dim": text.head_dim}), flush=True)
"""


def test_a_decoder_layer_takes_the_kernels_for_a_padded_batch_of_two(tiny_checkpoint):
    """One decode step of the tiny AR's first layer, two items (one left-padded, each at its own rotary position):
    with the kernels (interpreted) the layer writes the same K/V slot and returns what SDPA gives, within bf16."""
    pytest.importorskip("triton", reason="the decode-attention kernel tests need the triton package (its CPU interpreter)")
    result = run_child(CHILD_LAYER, str(tiny_checkpoint), env={"TRITON_INTERPRET": "1"})
    assert result["calls"] == [[2, result["heads"], result["head_dim"]]], result
    assert result["same_cache"] and result["error"] < 2e-2, result


# --------------------------------------------------------------------------------------------
# On the GPU

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and decode_attention_available("cuda")),
                         reason="needs a CUDA GPU of compute capability >= 8.0 with triton (the decode-attention kernels)")


@gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_on_the_gpu_compiled_decode_attention_matches_sdpa_at_the_real_shapes(batch):
    """The real AR's heads (32 over 2 kv heads, head_dim 128, rotary 64) over a 1400-slot cache with left padding and
    future slots, compiled (inductor launches the kernels): against SDPA on the same rotated q."""
    from glm_core.ar.model import apply_rotary
    from glm_core.decode_attention import attend

    torch.manual_seed(0)
    heads, kv_heads, head_dim, rotary_dim, slots = 32, 2, 128, 64, 1400
    q = torch.randn(batch, heads, head_dim, device="cuda").to(torch.bfloat16)
    angles = torch.rand(batch, rotary_dim // 2, device="cuda") * 6.0
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    k = torch.randn(batch, kv_heads, slots, head_dim, device="cuda").to(torch.bfloat16)
    v = torch.randn(batch, kv_heads, slots, head_dim, device="cuda").to(torch.bfloat16)
    allowed = torch.zeros(batch, slots, dtype=torch.bool, device="cuda")
    allowed[:, 5:900] = True
    allowed[0, :20] = False
    allowed[:, 1300] = True
    out = torch.compile(attend, fullgraph=True)(q, cos, sin, k, v, allowed)
    rotated = apply_rotary(q[:, :, None], cos[:, None, None], sin[:, None, None])  # (B, heads, 1, d)
    ref = torch.nn.functional.scaled_dot_product_attention(rotated, k, v, attn_mask=allowed[:, None, None],
                                                           enable_gqa=True)[:, :, 0]
    error = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert out.shape == ref.shape and error < 2e-2, error
