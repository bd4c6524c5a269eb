"""Photograph the shipped workflows in the real ComfyUI frontend: workflows/<name>.jpg (README pictures and
template thumbnails), each the graph cut out of a 1600x1000 window at the workflow's saved view.

    python -m tests.harness.workflow_pictures COMFYUI_PATH --python VENV/bin/python --chromium /usr/bin/chromium

Starts a real server on a scratch folder (tests/harness/real_server.py) with the tiny checkpoint and the
reference images, and runs tests/harness/frontend_check.py under ComfyUI's interpreter (it needs playwright).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from .loader import REPO_ROOT
from .real_server import DEFAULT_MODEL_FOLDER, prepare_scratch, start

WORKFLOWS_DIR = REPO_ROOT / "workflows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comfyui_path")
    parser.add_argument("--python", required=True, help="ComfyUI's interpreter, with playwright installed")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from tests.fixtures.tiny_checkpoint import make_tiny_checkpoint
    from tests.nodes.comfy_files import write_reference_images

    with tempfile.TemporaryDirectory(prefix="workflow-pictures-") as scratch_name:
        scratch = Path(scratch_name)
        checkpoint = make_tiny_checkpoint(scratch / "tiny" / DEFAULT_MODEL_FOLDER, seed=0, variant="default")
        pack_folder = prepare_scratch(scratch / "comfyui", checkpoint)
        write_reference_images(scratch / "comfyui" / "input")
        server = start(args.comfyui_path, args.python, scratch / "comfyui", pack_folder)
        try:
            workflows = sorted(WORKFLOWS_DIR.glob("*.json"))
            plan = scratch / "plan.json"
            plan.write_text(json.dumps({"workflows": [str(path) for path in workflows], "pictures": True}))
            out = scratch / "frontend"
            subprocess.run([args.python, str(Path(__file__).with_name("frontend_check.py")), server.base_url,
                            args.chromium, str(out), str(plan)], check=True, timeout=600)
        finally:
            server.stop()
        report = json.loads((out / "report.json").read_text())
        for path in workflows:
            shutil.copyfile(out / f"{path.stem}.jpg", path.with_suffix(".jpg"))
            print("wrote", path.with_suffix(".jpg").relative_to(REPO_ROOT))
        print("frontend", report["frontend_version"])


if __name__ == "__main__":
    main()
