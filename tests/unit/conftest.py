"""Fixtures of the unit tests: our own code on its own, nothing compared with the reference's numbers.

A test belongs here when it compares nothing against transformers / diffusers: input validation, loaders and
their errors, the CLI, the demo and tiny checkpoints, import rules, the benchmark's tiny mode, and properties
of our modules (determinism, batching, compiled == eager). It may still use the reference to build its inputs
(the transformers processor's AR inputs) or to check that a checkpoint we write loads there.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ar_models(tiny_checkpoint):
    """Our AR in fp32, no reference AR (unit tests never run it), the reference processor (it builds the
    inputs), our vision stage."""
    from glm_core.ar.model import load_ar
    from glm_core.ar.vision import load_vision
    from tests.inputs import ARModels
    from tests.reference import reference_processor

    return ARModels(load_ar(tiny_checkpoint, "cpu", torch.float32), None, reference_processor(tiny_checkpoint),
                    load_vision(tiny_checkpoint, "cpu", torch.float32))


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    from glm_core.dit import load_dit

    return load_dit(tiny_checkpoint, "cpu", torch.float32)
