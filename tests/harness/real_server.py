"""A real ComfyUI server with this pack, in a scratch folder (local integration checks, never CI).

The checkout is not modified: the pack is copied into scratch/custom_nodes under a random folder name and
reached through an extra_model_paths.yaml, the checkpoint is linked as models/glm_image/GLM-Image, and the
input / output / temp / user folders and the database live in the scratch folder too.

Used by tests/nodes/test_real_comfyui.py; also runnable by hand, to look at the pack in a browser:

    python -m tests.harness.real_server COMFYUI_PATH [--python VENV/bin/python] [--port 8199] [--scratch DIR]

(with the tiny random-weight checkpoint and the reference images the shipped workflows load).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .loader import copy_pack

DEFAULT_MODEL_FOLDER = "GLM-Image"
STARTUP_TIMEOUT_S = 180
# A fresh user folder would open the "get started" template dialog over the canvas; the minimap and the canvas
# info overlay cover corners of the graph that the frontend check measures.
USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


class ServerError(RuntimeError):
    """The server exited or did not answer; the message carries the end of its log."""


class RealServer:
    def __init__(self, base_url: str, process: subprocess.Popen, log: Path, scratch: Path, pack_folder: Path):
        self.base_url, self.process, self.log, self.scratch, self.pack_folder = (
            base_url, process, log, scratch, pack_folder)

    def request(self, path: str, payload: dict | None = None, timeout: float = 60):
        """(HTTP status, decoded JSON body) of a GET, or of a POST when `payload` is given."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_scratch(scratch: Path, checkpoint: Path) -> Path:
    """ComfyUI's folders under `scratch`, the pack in scratch/custom_nodes; returns the pack's folder."""
    pack_folder = copy_pack(scratch / "custom_nodes")
    (scratch / "models" / "glm_image").mkdir(parents=True)
    (scratch / "models" / "glm_image" / DEFAULT_MODEL_FOLDER).symlink_to(checkpoint, target_is_directory=True)
    for name in ("input", "output", "temp", "user/default"):
        (scratch / name).mkdir(parents=True)
    (scratch / "user" / "default" / "comfy.settings.json").write_text(json.dumps(USER_SETTINGS))
    (scratch / "extra_model_paths.yaml").write_text(
        f"glm_image_integration_test:\n    base_path: {scratch}\n    custom_nodes: custom_nodes\n"
        f"    glm_image: models/glm_image\n")
    return pack_folder


def start(comfyui_path: str | Path, python: str, scratch: Path, pack_folder: Path, port: int | None = None,
          timeout_s: float = STARTUP_TIMEOUT_S) -> RealServer:
    """`main.py --cpu` on the prepared scratch folder; returns once /system_stats answers."""
    port = port or free_port()
    log = scratch / "comfyui.log"
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--extra-model-paths-config", str(scratch / "extra_model_paths.yaml"),
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", pack_folder.name,
               "--input-directory", str(scratch / "input"), "--output-directory", str(scratch / "output"),
               "--temp-directory", str(scratch / "temp"), "--user-directory", str(scratch / "user"),
               "--database-url", f"sqlite:///{scratch / 'comfyui.db'}"]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfyui_path, stdout=log_file, stderr=subprocess.STDOUT)
    server = RealServer(f"http://127.0.0.1:{port}", process, log, scratch, pack_folder)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerError(f"ComfyUI exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if server.request("/system_stats", timeout=5)[0] == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"ComfyUI did not answer within {timeout_s} s:\n{server.log_tail()}")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comfyui_path")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of ComfyUI's environment")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--scratch", type=Path, help="an empty or absent folder (default: a new temporary one)")
    args = parser.parse_args()
    from tests.fixtures.tiny_checkpoint import make_tiny_checkpoint
    from tests.nodes.comfy_files import write_reference_images

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="real-comfyui-"))
    scratch.mkdir(parents=True, exist_ok=True)
    checkpoint = make_tiny_checkpoint(scratch / "tiny" / DEFAULT_MODEL_FOLDER, seed=0, variant="default")
    pack_folder = prepare_scratch(scratch, checkpoint)
    write_reference_images(scratch / "input")
    server = start(args.comfyui_path, args.python, scratch, pack_folder, args.port)
    print(f"ComfyUI at {server.base_url} (pack in {pack_folder}, log {server.log}); Ctrl-C or kill "
          f"{os.getpid()} stops it", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a background job ignores Ctrl-C; `kill` stops it the same way
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
