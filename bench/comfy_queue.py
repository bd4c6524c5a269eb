"""Queue the shipped workflows through a real ComfyUI, API-only, and time every queue; then again with only
`--cap-gb` of the device usable and another model (the test-only memory pack's) used between our queues.

    python -m bench.comfy_queue --comfy /tmp/ComfyUI --model-folder /tmp/glm-image --out $OUT        # GPU
    python -m bench.comfy_queue --comfy DIR --model-folder TINY --out DIR --cpu \\
        --cap-gb 0.032 --second-model-gb 0.03                                                        # CPU smoke

Phases, each in its own fresh server (scratch folders, the pack and the memory test pack linked into a scratch
custom_nodes through extra_model_paths.yaml, the checkpoint as models/glm_image/GLM-Image):
- fresh: first queue of text_to_image in a new server (loading and compiling included), the same with a new AR
  seed, the same changing only the DiT seed, image_edit, multi_subject (three references).
- cap: a new server with `--cap-gb` usable; the memory pack's big model (`--second-model-gb`) is loaded and used
  before each of our queues (first, new AR seed, DiT seed only, edit, multi-subject), default VRAM mode.
- restart: a new server, text_to_image (compile caches now warm from the earlier servers), then token_reuse.
- cap_static: the same as cap with `--disable-dynamic-vram`.
- cap_keep: the same as cap with `--cache-ram 4 16`. ComfyUI 0.33's default cache (RAM pressure) releases the outputs
  of every node the running workflow does not use whenever free host RAM is below *all* host RAM, i.e. always:
  once another workflow ran, our loader runs again and the stages are read from disk (or the page cache). With
  `--cache-ram 4 16` those outputs stay while 16 GB of RAM are free, so our stages come back from host memory.
How the cap is made (`--cap-mode`): "ballast" (default) - before the server starts, a helper process takes all
but cap GB of the GPU, so ComfyUI (both its estimate-based loader and dynamic VRAM, which reads the device's
free memory through cuMemGetInfo) sees a card with cap GB left, and any overrun is a real out-of-memory error;
"reserve" - ComfyUI's `--reserve-vram (total - cap)`: its own accounting keeps cap GB, nothing enforces it. A
per-process PyTorch memory fraction is not offered: dynamic VRAM (comfy-aimdo) maps weights with cuMemCreate
outside PyTorch's allocator, and ComfyUI's free-memory estimates read cuMemGetInfo, so neither would see it.
On the CPU (`--cpu`) ComfyUI never frees memory for the CPU device, so the cap is emulated: the memory pack's
nodes ask ComfyUI's `free_memory` to keep everything loaded within `--cap-gb` (see tests/nodes/comfy_memory_pack).

Each queue is timed from POST /prompt to the server's `execution_success` timestamp (the end of the last node,
i.e. the output node's `executed` message), read back from /history. Recorded per queue: status, seconds, the
nodes ComfyUI served from its cache, the server-log lines about loading and unloading models, ComfyUI's
loaded-model list afterwards (the memory pack's report node, added to our prompt and run after its images: a
report queued as a prompt of its own would itself make ComfyUI drop our cached outputs), whether our stages came
back as the same modules (not read from disk again), the device's peak memory in use (NVML, GPU only);
per run: OOM count, whether dynamic VRAM was on, the start-up log's version lines. JSON + markdown are rewritten
after every queue (comfy_queue.json / .md in --out, with each server's log); a short table is printed last. Every
phase's failure is recorded and the next phase runs; the whole run stays within --budget-s.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/comfy_queue.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.harness import bytecode_warning, named_phases, python_bytecode  # noqa: E402
from tests.harness import copy_pack, shrink_for_cpu, ui_to_api, validate_prompt  # noqa: E402
from tests.nodes.comfy_files import write_reference_images  # noqa: E402
from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER, REPO_ROOT, WORKFLOWS_DIR  # noqa: E402
from tests.harness.real_server import RealServer as Server, free_port as _free_port  # noqa: E402

MEMORY_PACK = REPO_ROOT / "tests" / "nodes" / "comfy_memory_pack"
MEMORY_PACK_FOLDER = "memory-test-pack"
GB = 1e9
STARTUP_TIMEOUT_S = 240
# Server-log lines about model residency (ComfyUI 0.3.x and 0.33, estimate-based and dynamic VRAM).
RESIDENCY_LOG = re.compile(r"Requested to load|loaded completely|loaded partially|Unloaded partially|models unloaded|"
                           r"Unloading|unloaded|Model loaded|DynamicVRAM|aimdo|offload|out of memory|\bOOM\b|"
                           r"OutOfMemory|memory leak|weights \(|host copy|^\S*\s*(AR|DiT|VAE): |checked every file", re.IGNORECASE)
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # ComfyUI colours its log even into a file
OOM_LOG = re.compile(r"Got an OOM|out of memory|OutOfMemoryError", re.IGNORECASE)
PHASES = ("fresh", "cap", "restart", "cap_static", "cap_keep")
QUEUES = ("first", "new_ar_seed", "dit_only", "edit", "multi_subject", "token_reuse")  # the plan of `Bench.queues`
CAPPED = ("cap", "cap_static", "cap_keep")
# Rough seconds each phase needs on an H200 (start-up included), to skip one that cannot finish in time.
PHASE_MIN_S = {"fresh": 150, "restart": 45, "cap": 150, "cap_static": 150, "cap_keep": 150}
# cap_keep: ComfyUI's RAM cache keeps outputs of workflows not running now while 16 GB of host RAM are free
# (its default releases them whenever free RAM < all RAM, i.e. always).
KEEP_CACHE_ARGS = ["--cache-ram", "4", "16"]


def log(message: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# The server


@dataclass
class ComfyRun:
    """One ComfyUI server process with its scratch folders; `Server` (tests/harness/real_server.py) talks
    HTTP to it."""

    server: Server
    scratch: Path
    log_path: Path
    pack_name: str
    log_offset: int = 0

    def new_log_lines(self) -> list[str]:
        """Server-log lines written since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        self.log_offset += len(data)
        return ANSI_COLOUR.sub("", data.decode(errors="replace")).splitlines()


def server_command(python: str, comfy: Path, scratch: Path, port: int, pack_name: str, extra: list[str]) -> list[str]:
    return [python, str(comfy / "main.py"), "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
            "--extra-model-paths-config", str(scratch / "extra_model_paths.yaml"),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", pack_name, MEMORY_PACK_FOLDER,
            "--input-directory", str(scratch / "input"), "--output-directory", str(scratch / "output"),
            "--temp-directory", str(scratch / "temp"), "--user-directory", str(scratch / "user"),
            "--database-url", f"sqlite:///{scratch / 'comfyui.db'}",
            # API-only: no frontend package needed (an empty web root), no cloud API nodes.
            "--front-end-root", str(scratch / "web"), "--disable-api-nodes", *extra]


@contextlib.contextmanager
def comfy_server(comfy: Path, model_folder: Path, scratch: Path, *, python: str = sys.executable,
                 extra_args: list[str] = (), env: dict | None = None):
    """Start ComfyUI API-only with our pack and the memory test pack, wait until it answers, yield a ComfyRun;
    the server is stopped on exit (its log stays in `scratch`)."""
    comfy, model_folder, scratch = Path(comfy).resolve(), Path(model_folder).resolve(), Path(scratch)
    if not (comfy / "main.py").is_file():
        raise FileNotFoundError(f"--comfy {comfy}: no main.py; pass a ComfyUI source folder (bench/comfy_gpu_bundle.sh "
                                f"writes one as .comfy/ComfyUI.tar.xz: tar -xJf it first)")
    scratch.mkdir(parents=True, exist_ok=True)
    pack = copy_pack(scratch / "custom_nodes")
    shutil.copytree(MEMORY_PACK, scratch / "custom_nodes" / MEMORY_PACK_FOLDER,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (scratch / "models" / "glm_image").mkdir(parents=True)
    (scratch / "models" / "glm_image" / DEFAULT_MODEL_FOLDER).symlink_to(model_folder, target_is_directory=True)
    for name in ("input", "output", "temp", "user", "web"):
        (scratch / name).mkdir()
    (scratch / "web" / "index.html").write_text("<p>API-only ComfyUI (bench/comfy_queue.py)</p>\n")
    write_reference_images(scratch / "input")
    (scratch / "extra_model_paths.yaml").write_text(
        f"glm_image_bench:\n    base_path: {scratch}\n    custom_nodes: custom_nodes\n"
        f"    glm_image: models/glm_image\n")
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONUNBUFFERED"] = "1"
    port = _free_port()
    log_path = scratch / "comfyui.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(server_command(python, comfy, scratch, port, pack.name, list(extra_args)),
                                   cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, scratch, pack)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(OSError):
                if server.request("/system_stats")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield ComfyRun(server, scratch, log_path, pack.name)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------
# Prompts


def workflow_prompt(run: ComfyRun, name: str, *, cpu: bool, size: int, steps: int) -> dict:
    """A shipped workflow converted to API format against the server's /object_info; on the CPU shrunk like the
    real-server test does (size², `steps` steps, fp32)."""
    _, info = run.server.request("/object_info")
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / name).read_text()), info)
    if cpu:
        shrink_for_cpu(prompt, size=size, steps=steps)
    problems = validate_prompt(prompt, info)
    if problems:
        raise ValueError(f"{name} does not validate against this server's /object_info: {problems}")
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def big_model_prompt(size_gb: float, width: int, seed: int, budget_gb: float) -> dict:
    """The memory pack's big model, loaded (cached by ComfyUI after the first queue) and used."""
    return {"1": {"class_type": "MemoryTestBigModel", "inputs": {"size_gb": size_gb, "width": width, "seed": 0}},
            "2": {"class_type": "MemoryTestUseBigModel",
                  "inputs": {"model": ["1", 0], "seed": seed, "budget_gb": budget_gb}}}


def free_memory_prompt(incoming_gb: float, budget_gb: float) -> dict:
    return {"1": {"class_type": "MemoryTestFreeMemory", "inputs": {"incoming_gb": incoming_gb, "budget_gb": budget_gb}}}


REPORT_NODE = "memtest_report"


def with_report(prompt: dict, reset_peak: bool = True) -> dict:
    """The prompt plus the memory pack's report node, run after every image the workflow decodes. Inside the same
    prompt: a separate prompt in between would make ComfyUI 0.33's default cache drop our outputs (see the module
    docstring)."""
    decodes = [node_id for node_id, node in prompt.items() if node["class_type"] == "GLMImageDiTDecode"]
    inputs = {"reset_peak": reset_peak, **{f"after_{i + 1}": [node_id, 0] for i, node_id in enumerate(decodes[:4])}}
    return {**prompt, REPORT_NODE: {"class_type": "MemoryTestReport", "inputs": inputs}}


def report_of(result: "QueueResult", node_id: str = REPORT_NODE) -> dict | None:
    report = result.outputs.get(node_id, {}).get("memory_report")
    return report[0] if report else None


@dataclass
class QueueResult:
    name: str
    status: str
    queue_s: float | None = None   # POST /prompt -> execution_success (the last node's `executed`)
    exec_s: float | None = None    # execution_start -> execution_success
    cached: list = field(default_factory=list)
    error: str | None = None
    log: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    peak_gpu_used_gb: float | None = None


def queue_and_wait(run: ComfyRun, prompt: dict, name: str, timeout_s: float) -> QueueResult:
    """Queue one prompt and wait for it; never raises for a failed prompt (the result says what happened)."""
    run.new_log_lines()
    submitted = time.time()
    status, answer = run.server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    if status != 200:
        return QueueResult(name, "refused", error=json.dumps(answer)[:2000], log=run.new_log_lines())
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + timeout_s
    entry = None
    while time.monotonic() < deadline:
        if run.server.process.poll() is not None:
            return QueueResult(name, "server exited", error=run.server.log_tail(), log=run.new_log_lines())
        status, history = run.server.request(f"/history/{prompt_id}")
        entry = history.get(prompt_id) if status == 200 and history else None
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
            break
        entry = None
        time.sleep(0.05)
    if entry is None:
        run.server.request("/interrupt", {})
        return QueueResult(name, f"timed out after {timeout_s:.0f}s (interrupted)", log=run.new_log_lines())
    messages = {kind: data for kind, data in entry["status"]["messages"]}
    result = QueueResult(name, entry["status"].get("status_str", "?"), log=run.new_log_lines(),
                         outputs=entry.get("outputs", {}))
    result.cached = messages.get("execution_cached", {}).get("nodes", [])
    end = messages.get("execution_success", {}).get("timestamp")
    start = messages.get("execution_start", {}).get("timestamp")
    if end is not None:
        result.queue_s = round(end / 1000 - submitted, 3)
        if start is not None:
            result.exec_s = round((end - start) / 1000, 3)
    if "execution_error" in messages:
        error = messages["execution_error"]
        result.error = f"{error.get('node_type')}: {error.get('exception_type')}: {error.get('exception_message')}"
    return result


# --------------------------------------------------------------------------------------------
# GPU memory: the cap and the peak


def gpu_memory_mb() -> tuple[int, int] | None:
    """(used, total) MiB of GPU 0, all processes, from nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=10).stdout
        used, total = (int(v) for v in out.strip().split(","))
        return used, total
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class PeakSampler:
    """Samples the device's memory in use (all processes) while a queue runs; `peak_gb()` since `reset()`."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.peak_mb, self._stop = interval_s, 0, threading.Event()
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception:  # noqa: BLE001 - no NVML here: nvidia-smi or nothing
            self._nvml = None
        self.available = self._nvml is not None or gpu_memory_mb() is not None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if self.available:
            self._thread.start()

    def _used_mb(self) -> int | None:
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return pynvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20
        sample = gpu_memory_mb()
        return sample[0] if sample else None

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            used = self._used_mb()
            if used is not None:
                self.peak_mb = max(self.peak_mb, used)

    def reset(self) -> None:
        self.peak_mb = self._used_mb() or 0

    def peak_gb(self) -> float | None:
        return round(self.peak_mb * 2**20 / GB, 2) if self.available else None

    def stop(self) -> None:
        self._stop.set()


BALLAST_CODE = """
import sys, time, torch
cap = int(float(sys.argv[1]) * 1e9)
free, total = torch.cuda.mem_get_info(0)
hold = free - cap
ballast = torch.empty(max(hold, 0), dtype=torch.uint8, device="cuda:0") if hold > 0 else None
free_after, _ = torch.cuda.mem_get_info(0)
print(f"ballast {max(hold, 0) / 1e9:.2f} GB held; {free_after / 1e9:.2f} GB of {total / 1e9:.2f} GB free", flush=True)
sys.stdin.read()  # hold until the parent closes our stdin
"""


@contextlib.contextmanager
def gpu_ballast(cap_gb: float, python: str):
    """A helper process holding all but `cap_gb` of GPU 0 until the block ends."""
    process = subprocess.Popen([python, "-c", BALLAST_CODE, str(cap_gb)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    if process.poll() is not None or not line.startswith("ballast"):
        raise RuntimeError(f"GPU ballast process failed to start: {line!r}")
    try:
        yield line
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


# --------------------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="comfy-queue-"))
        self.sampler = PeakSampler() if not args.cpu else None
        self.data = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "command": " ".join(["python -m bench.comfy_queue"] + sys.argv[1:]),
                     "comfyui_version": comfyui_version(Path(args.comfy)), "device": "cpu" if args.cpu else "cuda",
                     "cap_gb": args.cap_gb, "cap_mode": "emulated (CPU)" if args.cpu else args.cap_mode,
                     "second_model_gb": args.second_model_gb, "phases": {}, "ooms": 0, "errors": [],
                     "python_bytecode": python_bytecode(), "notes": []}
        # The server runs under --python: this process's finding holds for it only when it is the same Python.
        warning = bytecode_warning(self.data["python_bytecode"]) if Path(args.python) == Path(sys.executable) else None
        if warning:
            log(f"WARNING: {warning}", self.t0)
            self.data["notes"].append(warning)
        self.write()

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def write(self) -> None:
        self.data["comfy"] = summary(self.data)
        (self.out / "comfy_queue.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "comfy_queue.md").write_text(render_markdown(self.data))

    # -- one phase

    def phase(self, name: str) -> None:
        args = self.args
        if self.remaining() < (PHASE_MIN_S[name] if not args.cpu else 20):
            self.data["phases"][name] = {"status": f"skipped: {self.remaining():.0f}s left of the budget"}
            log(f"phase {name}: skipped ({self.remaining():.0f}s left)", self.t0)
            self.write()
            return
        capped = name in CAPPED
        entry = self.data["phases"][name] = {"status": "running", "server_args": [], "queues": []}
        log(f"phase {name}: start", self.t0)
        try:
            with contextlib.ExitStack() as stack:
                extra = (["--cpu"] if args.cpu else []) + shlex.split(args.server_args)
                if name == "cap_static":
                    extra.append("--disable-dynamic-vram")
                if name == "cap_keep":
                    extra += KEEP_CACHE_ARGS
                if capped and not args.cpu:
                    if args.cap_mode == "ballast":
                        entry["ballast"] = stack.enter_context(gpu_ballast(args.cap_gb, args.python))
                    else:
                        total_mb = (gpu_memory_mb() or (0, 0))[1]
                        extra += ["--reserve-vram", f"{max(total_mb * 2**20 / 2**30 - args.cap_gb, 0):.2f}"]
                entry["server_args"] = extra
                used = gpu_memory_mb() if not args.cpu else None
                entry["gpu_used_gb_before_server"] = round(used[0] * 2**20 / GB, 2) if used else None
                scratch = self.work / name
                run = stack.enter_context(comfy_server(Path(args.comfy), Path(args.model_folder), scratch,
                                                       python=args.python, extra_args=extra))
                entry["startup_log"] = [line for line in run.new_log_lines() if RESIDENCY_LOG.search(line)
                                        or "version" in line.lower() or "IMPORT FAILED" in line]
                entry["dynamic_vram_log"] = any("DynamicVRAM support detected and enabled" in line
                                                for line in entry["startup_log"])
                try:
                    self.queues(name, run, entry, capped)
                finally:
                    shutil.copy(run.log_path, self.out / f"server-{name}.log")
            entry["status"] = "ok" if all(q["status"] == "success" for q in entry["queues"]) else "queue failures"
        except Exception as exc:  # noqa: BLE001 - a failed phase is recorded; the next one runs
            traceback.print_exc()
            entry["status"] = f"failed: {type(exc).__name__}: {exc}"[:3000]
            self.data["errors"].append({"phase": name, "error": entry["status"]})
        log(f"phase {name}: {entry['status']}", self.t0)
        self.write()

    def queues(self, phase: str, run: ComfyRun, entry: dict, capped: bool) -> None:
        args = self.args
        size, steps = args.size, args.steps
        t2i = workflow_prompt(run, "text_to_image.json", cpu=args.cpu, size=size, steps=steps)
        ar, dit = node_of(t2i, "GLMImageGenerateTokens"), node_of(t2i, "GLMImageDiTDecode")
        new_ar = json.loads(json.dumps(t2i))
        new_ar[ar]["inputs"]["seed"] += 1
        dit_only = json.loads(json.dumps(new_ar))
        dit_only[dit]["inputs"]["seed"] += 1
        plan = [("first", t2i), ("new_ar_seed", new_ar), ("dit_only", dit_only),
                ("edit", lambda: workflow_prompt(run, "image_edit.json", cpu=args.cpu, size=size, steps=steps)),
                ("multi_subject", lambda: workflow_prompt(run, "multi_subject.json", cpu=args.cpu, size=size,
                                                          steps=steps))]
        if phase == "restart":  # the fourth shipped workflow goes here, to leave the cap phase its time
            plan = plan[:1] + [("token_reuse", lambda: workflow_prompt(run, "token_reuse.json", cpu=args.cpu,
                                                                       size=size, steps=steps))]
        if args.queues:
            plan = [step for step in plan if step[0] in args.queues]
        emulate = args.cap_gb if args.cpu and capped else 0.0
        previous_ids: dict | None = None
        for index, (name, prompt) in enumerate(plan):
            if self.remaining() < 10:
                entry["queues"].append({"name": name, "status": "skipped: time budget"})
                continue
            if capped:
                theirs = queue_and_wait(run, big_model_prompt(args.second_model_gb, args.second_model_width, index,
                                                              emulate), f"second_model_before_{name}",
                                        self.remaining())
                self.record(entry, theirs, kind="second_model")
                if emulate:  # the request our load makes on a GPU, which ComfyUI skips for a CPU device
                    self.record(entry, queue_and_wait(run, free_memory_prompt(args.our_model_gb, emulate),
                                                      f"make_room_before_{name}", 60), kind="make_room")
            if self.sampler:
                self.sampler.reset()
            ours = queue_and_wait(run, with_report(prompt() if callable(prompt) else prompt), name, self.remaining())
            if self.sampler:
                ours.peak_gpu_used_gb = self.sampler.peak_gb()
            record = self.record(entry, ours)
            ids = {m["model"]: m["module_id"] for m in (record.get("after") or {}).get("loaded_models", [])
                   if m["model"].startswith("GlmImage")}
            if previous_ids is not None and capped:
                # An evicted stage that comes back with the same module id was not read from disk again.
                record["stages_back_from_memory"] = {k: ids.get(k) == v for k, v in previous_ids.items() if k in ids}
            previous_ids = ids or previous_ids
            log(f"  {phase}/{name}: {ours.status} in {ours.queue_s} s", self.t0)

    def record(self, entry: dict, result: QueueResult, kind: str = "ours") -> dict:
        """kind: "ours" (a GLM-Image workflow), "second_model" (the memory pack's model used) or "make_room"
        (the CPU's emulated load request)."""
        ooms = sum(bool(OOM_LOG.search(line)) for line in result.log) + bool(result.error and OOM_LOG.search(result.error))
        self.data["ooms"] += ooms
        record = {"name": result.name, "status": result.status, "queue_s": result.queue_s, "exec_s": result.exec_s,
                  "cached": result.cached, "error": result.error, "ooms": ooms,
                  "log": [line for line in result.log if RESIDENCY_LOG.search(line)][-40:],
                  "peak_gpu_used_gb": result.peak_gpu_used_gb, "kind": kind}
        if result.peak_gpu_used_gb is not None and entry.get("gpu_used_gb_before_server") is not None:
            record["peak_gpu_server_gb"] = round(result.peak_gpu_used_gb - entry["gpu_used_gb_before_server"], 2)
        record["after"] = report_of(result, {"ours": REPORT_NODE, "second_model": "2", "make_room": "1"}[kind])
        entry["queues"].append(record)
        self.write()
        return record

    def run(self) -> None:
        try:
            for name in self.args.phases:
                self.phase(name)
        finally:
            if self.sampler:
                self.sampler.stop()
            self.write()
        print(render_table(self.data), flush=True)


def comfyui_version(comfy: Path) -> str | None:
    match = re.search(r'"([0-9][^"]*)"', (comfy / "comfyui_version.py").read_text()) \
        if (comfy / "comfyui_version.py").is_file() else None
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------
# Summary and reports


def _queue(data: dict, phase: str, name: str) -> dict | None:
    for q in data["phases"].get(phase, {}).get("queues", []):
        if q["name"] == name:
            return q
    return None


def _seconds(data: dict, phase: str, name: str) -> float | None:
    q = _queue(data, phase, name)
    return q["queue_s"] if q and q["status"] == "success" else None


def _ours_loaded(report: dict | None) -> int:
    return sum(m["loaded_bytes"] for m in (report or {}).get("loaded_models", []) if m["model"].startswith("GlmImage"))


def _theirs_loaded(report: dict | None) -> int:
    return sum(m["loaded_bytes"] for m in (report or {}).get("loaded_models", [])
               if m["model"] == "MemoryTestWeights")


def eviction_summary(phase: dict) -> dict:
    """From the reports after each queue: did loading their model push ours out (and our queue theirs), did our
    stages come back without a disk read, and did every queue complete."""
    ours_out, theirs_out, last_ours, last_use = [], [], None, None
    for q in phase.get("queues", []):
        report = q.get("after") if isinstance(q.get("after"), dict) and "loaded_models" in q["after"] else None
        if report is None:
            continue
        if q["kind"] == "second_model":
            if last_ours is not None:
                ours_out.append(_ours_loaded(report) < _ours_loaded(last_ours))
            last_use = report
        elif q["kind"] == "ours":
            if last_use is not None:
                theirs_out.append(_theirs_loaded(report) < _theirs_loaded(last_use))
            last_ours = report
    back = [all(q["stages_back_from_memory"].values()) for q in phase.get("queues", [])
            if q.get("stages_back_from_memory")]
    return {"ours_evicted_by_theirs": f"{sum(ours_out)}/{len(ours_out)}",
            "theirs_evicted_by_ours": f"{sum(theirs_out)}/{len(theirs_out)}",
            "ours_back_without_disk": f"{sum(back)}/{len(back)}",
            "all_queues_completed": all(q["status"] == "success" for q in phase.get("queues", []))}


def summary(data: dict) -> dict:
    """The `comfy` object of docs/performance.json (issue 10)."""
    cap = f"cap{data['cap_gb']:g}".replace(".", "_")
    out = {"comfyui_version": data["comfyui_version"],
           "queue_s_first": _seconds(data, "fresh", "first"),
           "queue_s_first_warm_caches": _seconds(data, "restart", "first"),
           "queue_s_new_ar_seed": _seconds(data, "fresh", "new_ar_seed"),
           "queue_s_dit_only": _seconds(data, "fresh", "dit_only"),
           "queue_s_edit": _seconds(data, "fresh", "edit"),
           "queue_s_multi_subject": _seconds(data, "fresh", "multi_subject"),
           f"queue_s_new_ar_seed_{cap}": _seconds(data, "cap", "new_ar_seed"),
           f"queue_s_edit_{cap}": _seconds(data, "cap", "edit"),
           f"queue_s_new_ar_seed_{cap}_static": _seconds(data, "cap_static", "new_ar_seed"),
           f"queue_s_edit_{cap}_static": _seconds(data, "cap_static", "edit"),
           f"queue_s_new_ar_seed_{cap}_keep": _seconds(data, "cap_keep", "new_ar_seed"),
           "ooms": data["ooms"]}
    for phase in CAPPED:
        if data["phases"].get(phase, {}).get("queues"):
            out[f"eviction_{phase}"] = eviction_summary(data["phases"][phase])
    dynamic = {name: phase.get("dynamic_vram_log") for name, phase in data["phases"].items() if "dynamic_vram_log" in phase}
    out["dynamic_vram_by_phase"] = dynamic
    return out


def _gb(value) -> str:
    return "–" if value is None else f"{value / GB:.3g}"


def render_table(data: dict) -> str:
    rows = ["| phase | queue | status | queue s | exec s | cached nodes | peak GPU GB (server) | ours loaded GB | "
            "theirs loaded GB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for phase, entry in data["phases"].items():
        if not entry.get("queues"):
            rows.append(f"| {phase} | – | {entry.get('status')} | | | | | | |")
        for q in entry.get("queues", []):
            after = q.get("after") if isinstance(q.get("after"), dict) else None
            rows.append(f"| {phase} | {q['name']} | {q['status']} | {q.get('queue_s') or '–'} | "
                        f"{q.get('exec_s') or '–'} | {len(q.get('cached', []))} | {q.get('peak_gpu_server_gb') or '–'} | "
                        f"{_gb(_ours_loaded(after)) if after else '–'} | {_gb(_theirs_loaded(after)) if after else '–'} |")
    return "\n".join(rows)


def render_markdown(data: dict) -> str:
    lines = [f"# ComfyUI {data['comfyui_version']} queue times ({data['device']})", "",
             f"- date: {data['date']}", f"- command: `{data['command']}`",
             f"- cap: {data['cap_gb']} GB ({data['cap_mode']}), second model {data['second_model_gb']} GB",
             f"- OOMs: {data['ooms']}", ""]
    for name, phase in data["phases"].items():
        lines.append(f"- phase {name}: {phase.get('status')}; server flags `{' '.join(phase.get('server_args', []))}`"
                     f"; dynamic VRAM on: {phase.get('dynamic_vram_log')}"
                     + (f"; {phase['ballast']}" if phase.get("ballast") else ""))
    lines += ["", render_table(data), "", "## Summary (`comfy` object)", "", "```json",
              json.dumps(data.get("comfy", {}), indent=2), "```", "", "## Model residency log per queue", ""]
    for name, phase in data["phases"].items():
        for q in phase.get("queues", []):
            lines.append(f"### {name} / {q['name']}")
            if q.get("error"):
                lines.append(f"- error: `{q['error'][:500]}`")
            lines += [f"    {line}" for line in q.get("log", [])] or ["    (no residency lines)"]
            lines.append("")
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in data["notes"]] + [""]
    if data["errors"]:
        lines += ["## Errors", ""] + [f"- {e['phase']}: {e['error'][:1000]}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", required=True, help="ComfyUI source folder (bench/comfy_gpu_bundle.sh's "
                                                  ".comfy/ComfyUI.tar.xz, unpacked)")
    p.add_argument("--model-folder", required=True, help="GLM-Image folder (bench/fullsize_checkpoint.py)")
    p.add_argument("--out", default=os.environ.get("OUT") or "comfy-queue-out")
    p.add_argument("--cpu", action="store_true", help="ComfyUI --cpu, workflows at --size² / --steps steps, fp32")
    p.add_argument("--cap-gb", type=float, default=24.0, help="usable device memory in the cap phases")
    p.add_argument("--cap-mode", choices=("ballast", "reserve"), default="ballast")
    p.add_argument("--second-model-gb", type=float, default=8.0, help="size of the memory pack's model")
    p.add_argument("--second-model-width", type=int, default=None, help="its layers' width (8192; 256 on the CPU)")
    p.add_argument("--our-model-gb", type=float, default=None,
                   help="CPU only: what our stages need, for the emulated request (default: the folder's size)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--queues", default="", help="comma-separated subset of each phase's queues (default: all), "
                                                "e.g. first,new_ar_seed")
    p.add_argument("--size", type=int, default=512, help="CPU only: target size")
    p.add_argument("--steps", type=int, default=2, help="CPU only: DiT steps")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    p.add_argument("--python", default=sys.executable, help="the interpreter ComfyUI runs with")
    p.add_argument("--server-args", default="",
                   help="more ComfyUI flags for every phase, e.g. \"--cache-ram 4 16\" (see the module docstring)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = p.parse_args(argv)
    args.phases = named_phases(p, "--phases", args.phases, PHASES)
    args.queues = named_phases(p, "--queues", args.queues, QUEUES)
    if args.second_model_width is None:
        args.second_model_width = 256 if args.cpu else 8192
    if args.our_model_gb is None:  # bf16 on disk; the CPU run loads fp32
        on_disk = sum(f.stat().st_size for f in Path(args.model_folder).rglob("*.safetensors")) / GB
        args.our_model_gb = on_disk * (2 if args.cpu else 1)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
