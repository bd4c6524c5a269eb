"""Facts about the pack that the node tests check against."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.paths import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / "workflows"
SHIPPED_WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
DEFAULT_MODEL_FOLDER = "GLM-Image"  # the name the shipped workflows use (models/glm_image/GLM-Image)
EXPECTED_NODES = {
    "GLMImageLoader", "GLMImageEncode", "GLMImageGenerateTokens", "GLMImageDiTDecode",
    "GLMImageSaveTokens", "GLMImageLoadTokens", "GLMImagePreviewTokens",
}


def comfy_cli_executable() -> str | None:
    """comfy-cli's `comfy`, installed beside this interpreter (the README's venv) or on PATH."""
    beside = Path(sys.executable).parent / "comfy"
    return str(beside) if beside.is_file() else shutil.which("comfy")
