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



class _HostToDeviceCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that take a tensor from the host and give back one on another device: on a GPU each such copy
    (from pageable memory) waits for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type != "cpu" for t in outputs):
            self.copies.append(str(func))
        return out


def test_denoising_loop_copies_nothing_from_the_host_per_step(tiny_checkpoint, monkeypatch):
    """The DiT loop must be able to run ahead of the GPU: nothing in a step (timestep, size conditioning, the
    unconditional pass's prior mask) may come from host memory, or every pass waits for the previous one to finish
    (the loop used to copy four small tensors per step). The model runs on the meta device, where a host copy
    shows as an op with a CPU input and a meta output (or, for Python numbers, which torch turns into a tensor out
    of sight of the dispatcher, as a device tensor made from them); the schedule is given on the host, as the
    pipeline does."""
    from glm_core.checkpoint import open_checkpoint
    from glm_core.dit.sampling import DiTConditioning, denoise

    config = DiTConfig.from_dict(open_checkpoint(tiny_checkpoint).read_config("transformer"))
    with torch.device("meta"):
        model = GlmImageDiT(config).eval()
        cond = DiTConditioning(glyph_embeds=torch.empty(1, 5, config.text_embed_dim),
                               prior_ids=torch.zeros(1, 24, dtype=torch.long), target_size=(64, 96),
                               negative_glyph_embeds=torch.empty(1, 1, config.text_embed_dim))
        latents = torch.empty(1, 16, 8, 12)

    as_tensor = torch.as_tensor

    def copies_over(steps: int) -> list[str]:
        timesteps = torch.linspace(999, 0, steps)
        sigmas = torch.linspace(1, 0, steps + 1)
        with _HostToDeviceCopies() as counter:
            def spied_as_tensor(data, *args, **kwargs):
                out = as_tensor(data, *args, **kwargs)
                if not isinstance(data, torch.Tensor) and out.device.type != "cpu":
                    counter.copies.append(f"as_tensor({data!r})")
                return out

            monkeypatch.setattr(torch, "as_tensor", spied_as_tensor)
            denoise(model, latents, cond, timesteps, sigmas, guidance=1.5)
            monkeypatch.setattr(torch, "as_tensor", as_tensor)
        return counter.copies

    assert len(copies_over(2)) <= 2, copies_over(2)  # the schedule itself, once
    assert copies_over(5) == copies_over(2), "host copies grow with the step count"
