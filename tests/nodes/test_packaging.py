"""Packaging for ComfyUI-Manager and the Comfy Registry: requirements.txt, .comfyignore, `comfy node validate`."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import zipfile

import pytest

from tests.nodes.pack_facts import REPO_ROOT, comfy_cli_executable

NOT_IN_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}  # ComfyUI's own builds; Manager rolls them back


def requirement_lines():
    return [line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_requirements_are_plain_registry_packages_without_torch():
    for line in requirement_lines():
        assert name_of(line) not in NOT_IN_REQUIREMENTS, line
        # ComfyUI-Manager passes each line to pip alone: no options, no URLs, no VCS checkouts.
        assert not line.startswith("-") and "://" not in line and "git+" not in line and " @ " not in line, line


def test_requirements_match_the_pyproject_dependencies():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {name_of(dep): dep.replace(" ", "") for dep in project["dependencies"]
                if name_of(dep) not in NOT_IN_REQUIREMENTS}
    listed = {name_of(line): line.replace(" ", "") for line in requirement_lines()}
    assert listed == declared


@pytest.fixture(scope="module")
def clean_clone(tmp_path_factory):
    if shutil.which("git") is None or comfy_cli_executable() is None:
        pytest.skip("needs git and comfy-cli (PyPI) on PATH")
    clone = tmp_path_factory.mktemp("registry") / "pack"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    return clone


def comfy_cli(folder, *args):
    return subprocess.run([comfy_cli_executable(), "--skip-prompt", "--no-enable-telemetry", "node", *args], cwd=folder,
                          capture_output=True, text=True, timeout=300)


def test_comfy_node_validate_passes_without_security_warnings(clean_clone):
    done = comfy_cli(clean_clone, "validate")
    output = done.stdout + done.stderr
    # validate still exits 0 on security findings ("will be an error soon"): look at what it says.
    assert done.returncode == 0 and "Security warnings found" not in output, output
    assert "validation checks passed" in output, output


def test_registry_zip_ships_the_pack_and_leaves_tests_out(clean_clone):
    done = comfy_cli(clean_clone, "pack")
    assert done.returncode == 0, done.stdout + done.stderr
    names = zipfile.ZipFile(clean_clone / "node.zip").namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"__init__.py", "nodes", "glm_core", "web", "workflows", "requirements.txt", "pyproject.toml"} <= tops
    assert not tops & {"tests", "bench", ".ci", ".github"}, sorted(tops)
    shipped = {name for name in names if name.startswith("workflows/")}
    assert {f"workflows/{stem}.{ext}" for stem in ("text_to_image", "image_edit", "multi_subject", "token_reuse")
            for ext in ("json", "jpg")} <= shipped
