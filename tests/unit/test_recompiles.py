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
