"""No recompiles in normal use (issue 9): the counter the benchmark uses, and, on a GPU, glm_core's own count.

`bench.recompiles.CompileCounter` counts dynamo's recompilations (its "recompiles" log) and compiled frames; the
first test shows that it sees a recompile when one happens. The GPU test runs the benchmark's scripted run
(after one text-to-image and one edit: three sizes, 1-4 references, batches 1-4) on the tiny checkpoint with
glm_core's default compile (inductor on CUDA) and asserts that nothing compiles again.
"""
from __future__ import annotations

import pytest
import torch


def test_compile_counter_sees_a_recompile_and_its_reason():
    from bench.recompiles import CompileCounter

    def scaled(x):
        return x * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(scaled, backend="eager", dynamic=False)
    compiled(torch.ones(3))
    with CompileCounter() as same_shape:
        compiled(torch.ones(3))
    with CompileCounter() as new_shape:
        compiled(torch.ones(5))
    assert (same_shape.recompiles, same_shape.compiled_frames) == (0, 0)
    assert (new_shape.recompiles, new_shape.compiled_frames) == (1, 1)
    assert "scaled" in new_shape.reasons[0] and "size" in new_shape.reasons[0], new_shape.reasons
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: glm_core compiles (inductor) only on CUDA, so on the CPU there is "
                           "nothing to recompile")
def test_no_recompiles_in_normal_use_on_the_gpu(tiny_checkpoint):
    from bench.ours_runs import OursSession
    from bench.recompiles import count_recompiles
    from bench.workloads import E2ESizes

    session = OursSession(tiny_checkpoint, torch.device("cuda"), None)
    result = count_recompiles(session, E2ESizes(), seed=0)
    assert session.model.stage("dit").compile_backend is not None, "glm_core did not compile on CUDA"
    assert result["complete"]
    assert result["recompiles"] == 0, "recompiled in normal use:\n" + "\n".join(result["reasons"])
    assert result["compiled_frames"] == 0, f"{result['compiled_frames']} frames compiled after the warm-up"
    session.close()


def test_more_references_do_not_recompile_the_dit_block(tiny_checkpoint):
    """Dynamo's guards do not depend on the backend, so the eager backend shows on the CPU what inductor would
    recompile on the GPU: after an edit with one reference, edits with 2-4 must reuse the compiled DiT block
    (one reference's K/V used to be transposed views, several a concatenation: a stride guard failed)."""
    from bench.ours_runs import OursSession
    from bench.recompiles import CompileCounter, ScriptedRun, make
    from bench.workloads import TINY_E2E_SIZES

    torch._dynamo.reset()
    session = OursSession(tiny_checkpoint, torch.device("cpu"), None, compile_backend="eager")
    sizes = TINY_E2E_SIZES
    make(session, ScriptedRun("edit", sizes.t2i, sizes.recompile_references[:1]), sizes, seed=0)
    with CompileCounter() as counter:
        for count in range(2, len(sizes.recompile_references) + 1):
            make(session, ScriptedRun("edit", sizes.t2i, sizes.recompile_references[:count]), sizes, seed=0)
    session.close()
    torch._dynamo.reset()
    assert len(sizes.recompile_references) >= 3
    assert counter.recompiles == 0, "\n".join(counter.reasons)


def test_one_dit_block_graph_for_every_text_length(dit):
    """The conditional pass (the glyph's L tokens), the unconditional one (one negative glyph token) and a
    reference's pass (no text) compile the DiT block once between them, and editing adds one graph (the reference
    K/V): each graph costs a trace and a cache load on every cold start. Text lengths 0 and 1 are sizes dynamo
    specialises; the block used to take the text length and compiled three graphs for one edit's inputs."""
    import copy

    from bench.recompiles import CompileCounter
    from glm_core.dit.sampling import DiTConditioning, predict_velocity

    g = torch.Generator().manual_seed(3)
    text_dim = dit.config.text_embed_dim
    latents = torch.randn(1, 16, 8, 12, generator=g)
    cond = DiTConditioning(torch.randn(1, 5, text_dim, generator=g), torch.randint(0, 16384, (1, 24), generator=g),
                           (64, 96), negative_glyph_embeds=torch.randn(1, 1, text_dim, generator=g))
    torch._dynamo.reset()
    model = copy.deepcopy(dit)
    model.compile_backend = "eager"
    with torch.no_grad(), CompileCounter() as text_to_image:  # no_grad as in `denoise`
        predict_velocity(model, latents, cond, 966.0, 1.5)
        cond.glyph_embeds = cond.glyph_embeds[:, :3]  # another prompt's glyph length
        predict_velocity(model, latents, cond, 500.0, 1.5)
        cond.reference_kv = model.encode_references([torch.randn(1, 16, 8, 8, generator=g)],
                                                    [torch.randint(0, 16384, (16,), generator=g)], [(64, 64)])
    with torch.no_grad(), CompileCounter() as edit:
        predict_velocity(model, latents, cond, 966.0, 1.5)
    torch._dynamo.reset()
    assert text_to_image.compiled_frames == 1, text_to_image.reasons
    assert edit.compiled_frames == 1, edit.reasons
