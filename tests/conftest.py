"""Fixtures every kind of test uses (unit/, parity/, nodes/), and the offline setup for the HF libraries.

Checkpoints, written once per test session (treat them as read-only; `shutil.copytree` one before modifying it):
- `tiny_checkpoint`: variant "default" (O(1) AR logits, lm_head rows >= 16384 zero, so sampling stays inside
  the codebook), weights written by the reference classes in the official layout;
- `tiny_checkpoint_ooc`: same configs, variant "ooc": the unmasked reference samples ids >= 16384 inside the
  grids (for testing our grid mask);
- `demo_folder`: the random-weight demo checkpoint that glm_core writes with its own modules.

Our components loaded from `tiny_checkpoint` in fp32 on the CPU, once per test module: `model` (the pipeline's
GlmImage), `prompt_processor`, `glyph_encoder`, `our_vae`, `scheduler_config`. `edit_runs`: the editing cases
of `tests/inputs.py` sampled once per session through the pipeline. `one_thread`: for token-by-token loops.

Helpers: `tests/reference.py` loads the reference (transformers / diffusers) from these folders,
`tests/inputs.py` holds inputs that unit and parity tests share, `tests/compare.py` the error measures.
Fixtures of one kind live in that folder's conftest.py; a fixture only one module uses stays in that module.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Before transformers / diffusers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Repository root on sys.path: `glm_core` and `tests.*` import under plain `pytest` too (tests/paths.py cannot
# be imported before this line, hence the root computed here again).
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


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo folder (`python -m glm_core` with no --model), random weights written by glm_core itself."""
    from glm_core.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "GLM-Image-demo")


@pytest.fixture(scope="module")
def one_thread():
    """Token-by-token loops on a shared 2-core machine: OpenMP threads spinning against other
    processes make each small op 100x slower; one thread is faster and gives the same numbers.
    A module of such tests says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from glm_core import pipeline

    return pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt_processor(tiny_checkpoint):
    from glm_core.processor import PromptProcessor

    return PromptProcessor.from_folder(tiny_checkpoint)


@pytest.fixture(scope="module")
def glyph_encoder(tiny_checkpoint):
    from glm_core.glyph import load_glyph_encoder

    return load_glyph_encoder(tiny_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def our_vae(tiny_checkpoint):
    from glm_core.vae import load_vae

    return load_vae(tiny_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def scheduler_config(tiny_checkpoint):
    from glm_core.schedule import SchedulerConfig

    raw = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    return SchedulerConfig.from_dict(raw)


@pytest.fixture(scope="session")
def edit_runs(tiny_checkpoint):
    """name -> (cond, tokens, progress calls) for each of `tests.inputs.EDIT_CASES`, tokens sampled once per
    session through glm_core.pipeline.generate_tokens (the AR is the slow part; unit and parity tests read them)."""
    from glm_core import pipeline
    from tests.inputs import EDIT_CASES, EDIT_PROMPT, make_picture

    model = pipeline.GlmImage.from_folder(tiny_checkpoint, device="cpu", dtype=torch.float32)
    runs = {}
    for name, (height, width, sizes, seed) in EDIT_CASES.items():
        references = [make_picture(h, w, seed=10 * seed + i) for i, (h, w) in enumerate(sizes)]
        cond = pipeline.encode_prompt(model, EDIT_PROMPT, width, height, references)
        progress: list[tuple[int, int]] = []
        tokens = pipeline.generate_tokens(model, cond, seed=seed, progress=lambda done, total, calls=progress:
                                          calls.append((done, total)))
        runs[name] = (cond, tokens, progress)
    return runs
