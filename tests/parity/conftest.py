"""Fixtures of the parity tests: our numbers against the reference's (transformers 5.23 / diffusers 0.42.1).

A test belongs here when it compares what glm_core computes with what the reference computes from the same
inputs (or guards such a comparison: the inputs compared really matter). Tolerances: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ar_models(tiny_checkpoint):
    """Our AR, the reference AR (both fp32, from the tiny checkpoint), the reference processor, our vision stage."""
    from glm_core.ar.model import load_ar
    from glm_core.ar.vision import load_vision
    from tests.inputs import ARModels
    from tests.reference import reference_ar, reference_processor

    return ARModels(load_ar(tiny_checkpoint, "cpu", torch.float32), reference_ar(tiny_checkpoint, torch.float32),
                    reference_processor(tiny_checkpoint), load_vision(tiny_checkpoint, "cpu", torch.float32))
