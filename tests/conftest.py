"""Shared pytest fixtures: the tiny GLM-Image checkpoint (official layout, reference-written weights).

- `tiny_checkpoint`: Path of a folder written once per test session (variant "default":
  O(1) AR logits, lm_head rows >= 16384 zero, so sampling stays inside the codebook).
- `tiny_checkpoint_ooc`: same configs, variant "ooc": the unmasked reference samples ids >= 16384
  inside the grids (for testing our grid mask).

Treat both folders as read-only; copy one (`shutil.copytree`) before modifying files in it.
Helpers that load the reference from these folders live in `tests/reference.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before transformers / diffusers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Repository root on sys.path: `glm_core` and `tests.reference` import under plain `pytest` too.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402


def _make(tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    from tests.fixtures.tiny_checkpoint import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp(f"tiny_glm_image_{variant}") / "GLM-Image"
    return make_tiny_checkpoint(folder, seed=0, variant=variant)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GLM-Image folder, default variant (read-only by convention)."""
    return _make(tmp_path_factory, "default")


@pytest.fixture(scope="session")
def tiny_checkpoint_ooc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GLM-Image folder whose lm_head makes the unmasked reference sample ids >= 16384."""
    return _make(tmp_path_factory, "ooc")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state (the reference AR samples from it)."""
    torch.manual_seed(0)
    yield
