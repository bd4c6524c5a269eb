"""glm_core.dit on its own: reference K/V concatenate in order, and the real model's size built on meta."""

from __future__ import annotations

import torch

from glm_core.dit import DiTConfig, GlmImageDiT, ReferenceKV
from tests.inputs import dit_references


def test_reference_kv_concat_order(dit):
    """Two references encoded together == each alone, concatenated in order (no cross-talk)."""
    refs = dit_references(2)
    both = dit.encode_references([r[0] for r in refs], [r[1] for r in refs], [r[2] for r in refs])
    first = dit.encode_references([refs[0][0]], [refs[0][1]], [refs[0][2]])
    second = dit.encode_references([refs[1][0]], [refs[1][1]], [refs[1][2]])
    joined = ReferenceKV.concat([first, second])
    for a, b in zip(both.keys + both.values, joined.keys + joined.values):
        assert torch.equal(a, b)
    swapped = ReferenceKV.concat([second, first])
    assert not torch.equal(swapped.keys[0], both.keys[0])


def test_meta_build_has_no_real_tensors():
    config = DiTConfig(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
                       num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
                       prior_vq_quantizer_codebook_size=16384)
    with torch.device("meta"):
        model = GlmImageDiT(config)
    # The real model's parameter count (spec §3): 6,926,882,880.
    assert sum(p.numel() for p in model.parameters()) == 6_926_882_880

