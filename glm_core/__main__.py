"""Command line: python -m glm_core --prompt "..." [--model DIR] [--ref IMAGE ...] --out image.png

Without --model it writes (once) and uses a tiny checkpoint with RANDOM weights, so the whole path can be
tried on any machine in about a minute; its pictures are noise.

Reuse an AR result: --save-tokens FILE keeps the token grid; --load-tokens FILE decodes it again (same
prompt, size and references) without running the AR stage.

Everything about the request is checked before any weight is read; errors exit with code 2, Ctrl-C with 130.

--timings FILE writes how long each part of the run took (JSON), for the cold-start benchmark (bench/cold_start.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .limits import PLACEMENTS, WEIGHT_CHOICES

DTYPES = ("bf16", "fp16", "fp32")
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF"}
DEMO_SIDE, DEMO_STEPS = 512, 8


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help names its default once: written in the help where "default" needs words, else
    appended from the parser (on/off for flags)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.required or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glm_core", description=__doc__, formatter_class=_Help)
    p.add_argument("--model", type=Path, help="GLM-Image folder (zai-org/GLM-Image layout) (default: a tiny "
                   "random-weight demo checkpoint, written once)")
    p.add_argument("--prompt", required=True, help='what to draw, or how to change the references; quote text to '
                   'render, e.g. a sign that says "OPEN" (required)')
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 32 in [512, 2048] (default 1024; "
                   f"{DEMO_SIDE} for the demo)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 32 in [512, 2048] (default 1024; "
                   f"{DEMO_SIDE} for the demo)")
    p.add_argument("--ref", type=Path, action="append", default=[], help="reference image (repeatable): one to "
                   "edit it, several to combine subjects (default: none, text to image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the DiT's initial noise")
    p.add_argument("--ar-seed", type=int, default=None, help="seed of the AR token sampling (default: --seed)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default 50; {DEMO_STEPS} for the demo)")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (1 = off, twice as "
                   "fast)")
    p.add_argument("--temperature", type=float, default=None, help="AR sampling temperature: lower gives safer, "
                   "more uniform layouts (default: the checkpoint's generation_config.json, 0.9)")
    p.add_argument("--top-p", type=float, default=None, help="AR nucleus sampling: keep the most likely tokens "
                   "covering this probability mass; 1 turns it off (default: the checkpoint's, 0.75)")
    p.add_argument("--top-k", type=int, default=None, help="AR sampling: keep only the k most likely tokens; 0 "
                   "turns it off (default 50)")
    p.add_argument("--batch", type=int, default=1, help="images from one prompt (AR seeds ar-seed, ar-seed+1, ...)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                   help="how the AR's and DiT's linear layers are stored: bf16 as published, fp8 at half the memory "
                   "(slightly different images), auto = bf16 when the larger stage fits the free GPU memory")
    p.add_argument("--placement", choices=PLACEMENTS, default="auto",
                   help="where the stages' weights stay: auto = what fits the free GPU memory, gpu = all on the "
                   "GPU, sequential = one stage at a time")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the AR decode layer and DiT "
                   "blocks (on by default on CUDA; compiling costs time on the first image of a process)")
    p.add_argument("--tokens-only", action="store_true", help="stop after the AR stage and print the token grid")
    p.add_argument("--save-tokens", type=Path, help="also write the AR tokens to this .safetensors file (default: "
                   "not written)")
    p.add_argument("--load-tokens", type=Path, help="decode tokens saved with --save-tokens instead of running the "
                   "AR (give the same prompt, size and references) (default: run the AR)")
    p.add_argument("--out", type=Path, default=Path("glm_image.png"), help="output image (.png, .jpg, .webp, ...); "
                   "a batch writes name_0.png, name_1.png, ...")
    p.add_argument("--timings", type=Path, help="also write how long each part of the run took (JSON: seconds per "
                   "part, per stage load, and torch.compile's own total) (default: not written)")
    return p.parse_args(argv)


class UsageError(ValueError):
    """A bad command line, found before anything was loaded."""

    __module__ = "glm_core"


def writable_file(option: str, path: Path, example: str) -> None:
    """UsageError unless `path` can be created or replaced as a file (checked before a run that ends by writing it)."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name such as {path / example}")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write into {existing}; choose a writable folder")


def output_paths(out: Path, batch: int) -> list[Path]:
    writable_file("--out", out, "image.png")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {out}: unknown image extension {out.suffix or '(none)'}; use one of "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(batch)]


def read_reference(path: Path):
    """The image at `path`, read whole (PIL), or UsageError saying why it cannot be a reference."""
    from PIL import Image

    from .limits import reference_size

    if not path.is_file():
        raise UsageError(f"--ref {path}: file not found")
    try:
        with Image.open(path) as image:
            image.load()
            picture = image.copy()
    except (OSError, Image.DecompressionBombError) as error:
        raise UsageError(f"--ref {path}: not a readable image ({error})") from None
    try:
        reference_size(picture.height, picture.width)
    except ValueError as error:
        raise UsageError(f"--ref {path}: {error}") from None
    return picture


def check_args(args, width: int, height: int, steps: int) -> list:
    """Every problem with the command line, named together, before torch is imported or the model opened.
    Returns the reference images, read."""
    from .limits import check_decode_settings, check_prompt, check_sampling, validate_target_size

    problems, references = [], []
    # Unset sampling values come from the checkpoint; stand-ins that pass stop them being reported.
    sampling = [value if value is not None else neutral
                for value, neutral in zip((args.temperature, args.top_p, args.top_k), (1.0, 1.0, 0))]
    checks = [lambda: check_prompt(args.prompt),
              lambda: validate_target_size(height, width),
              lambda: check_decode_settings(steps, args.guidance),
              lambda: check_sampling(*sampling),
              lambda: output_paths(args.out, max(args.batch, 1))]
    if args.save_tokens is not None:
        checks.append(lambda: writable_file("--save-tokens", args.save_tokens, "tokens.safetensors"))
    if args.timings is not None:
        checks.append(lambda: writable_file("--timings", args.timings, "timings.json"))
    checks += [lambda path=path: references.append(read_reference(path)) for path in args.ref]
    for check in checks:
        try:
            check()
        except ValueError as error:
            problems.append(str(error))
    if args.batch < 1:
        problems.append(f"--batch must be >= 1, got {args.batch}")
    if args.load_tokens is not None and not args.load_tokens.is_file():
        problems.append(f"--load-tokens {args.load_tokens}: file not found")
    if args.load_tokens is not None and args.tokens_only:
        problems.append("--load-tokens and --tokens-only together do nothing; drop one")
    if problems:
        raise UsageError("\n".join(problems))
    return references


class ProgressLines:
    """Progress of one stage on stderr with elapsed time and ETA: one self-overwriting line on a terminal, plain
    lines (about every 10%) when stderr goes to a file or a log."""

    def __init__(self, label: str):
        self.label, self.start, self.tty = label, time.perf_counter(), sys.stderr.isatty()
        self.next_report = 0.0

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        text = f"{self.label}: {done}/{total} ({elapsed:.1f} s, ETA {eta:.1f} s)"
        if self.tty:
            print(f"\r{text}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif done >= total or done / total >= self.next_report:
            print(text, file=sys.stderr, flush=True)
            self.next_report = done / total + 0.1


class RunTimings:
    """Seconds spent in each part of one run (--timings). Parts are consecutive; the stage loads and torch.compile
    happen inside them (the first image's AR and DiT calls load and compile), so they are listed on their own."""

    def __init__(self):
        self.start = time.perf_counter()
        self.parts: dict[str, float] = {}
        self.loads: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def write(self, path: Path) -> None:
        from .compiling import compile_seconds, compile_seconds_by_kind

        data = {"total_s": time.perf_counter() - self.start, "parts_s": self.parts, "loads_s": self.loads,
                "compile_s": compile_seconds(), "compile_by_kind_s": compile_seconds_by_kind()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def print_load(stage: str, nbytes: int, seconds: float | None) -> None:
    """'loading AR weights (17.8 GB)…' before a stage loads (the core logs 'loaded AR weights (17.8 GB) in 4.6 s')."""
    if seconds is None:
        from .pipeline import STAGE_TITLES

        print(f"loading {STAGE_TITLES.get(stage, stage)} weights ({nbytes / 1e9:.1f} GB)…", file=sys.stderr, flush=True)


def _new_file_mode() -> int:
    """The permissions a plain open() would give a new file here: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_images(images, paths: list[Path], demo: bool) -> None:
    """Each image to a temporary file beside its target, then renamed over it: an existing file is replaced
    whole or not at all. If a target cannot be written, the image goes to a fallback file in the temporary
    folder, and the message says where."""
    from .images import to_rgb_image

    for image, path in zip(images, paths):
        picture = to_rgb_image(image)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial",
                                             delete=False) as handle:
                partial = Path(handle.name)
            try:
                picture.save(partial, format=IMAGE_SUFFIXES[path.suffix.lower()])
                os.chmod(partial, _new_file_mode())  # the temporary file is private (0600); a picture is not
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            print(f"wrote {path}" + (" (random-weight demo: noise)" if demo else ""))
        except OSError as error:
            fallback = Path(tempfile.gettempdir()) / f"glm_image_{int(time.time())}_{path.stem}.png"
            picture.save(fallback, format="PNG")
            print(f"error: could not write {path} ({error}); the image was saved to {fallback} instead",
                  file=sys.stderr)
            raise SystemExit(2) from None


def run(args, timings: RunTimings | None = None) -> int:
    timings = timings or RunTimings()
    part = timings.part
    demo = args.model is None
    width = args.width if args.width is not None else (DEMO_SIDE if demo else 1024)
    height = args.height if args.height is not None else (DEMO_SIDE if demo else 1024)
    steps = args.steps if args.steps is not None else (DEMO_STEPS if demo else 50)
    with part("check_request"):
        references = check_args(args, width, height, steps)
        paths = output_paths(args.out, args.batch)

    with part("import"):
        import torch

        from .limits import reference_size
        from .pipeline import GlmImage, decode, encode_prompt, generate_tokens, load_tokens, save_tokens
        from .tokens import check_token_ids, check_tokens_match

    if demo:
        from .demo_checkpoint import write_demo_checkpoint

        folder = write_demo_checkpoint()
        print(f"No --model given: using the tiny RANDOM-WEIGHT demo checkpoint at {folder} ({steps} steps unless "
              "--steps is given).\nIts images are noise. Pass --model /path/to/GLM-Image for real pictures.",
              file=sys.stderr)
    else:
        folder = args.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    with part("open_model"):
        model = GlmImage.from_folder(folder, device=args.device, dtype=dtype, placement=args.placement,
                                     weights=args.weights, compile=False if args.no_compile else None)

    def on_load(stage: str, nbytes: int, seconds: float | None) -> None:
        print_load(stage, nbytes, seconds)
        if seconds is not None:
            timings.loads[stage] = timings.loads.get(stage, 0.0) + seconds

    model.on_load = on_load
    stages = ["glyph", "dit", "vae"] if not args.tokens_only else []
    if args.load_tokens is None:
        stages.append("ar")
    if references:
        stages.append("vision")
    with part("check_files"):
        model.check(stages)  # every file the run will read, before the first weight is
    tokens = None
    if args.load_tokens is not None:
        tokens = load_tokens(args.load_tokens)
        # Before the references are encoded: a mismatch must not cost the vision stage's load.
        check_tokens_match(tokens, height, width, [reference_size(image.height, image.width) for image in references])
        check_token_ids(tokens, model.codebook_size)
    with part("encode_prompt"):
        cond = encode_prompt(model, args.prompt, width, height, references)
    if tokens is None:
        ar_seed = args.seed if args.ar_seed is None else args.ar_seed
        with part("generate_tokens"):
            tokens = generate_tokens(model, cond, seed=ar_seed, temperature=args.temperature, top_p=args.top_p,
                                     top_k=args.top_k, batch_size=args.batch, progress=ProgressLines("AR tokens"),
                                     prefetch_decode=not args.tokens_only)
        if args.save_tokens:
            print(f"tokens written to {save_tokens(tokens, args.save_tokens)}", file=sys.stderr)
        if args.tokens_only:
            grid = tokens.grid_ids
            print(f"token grid {tuple(grid.shape[1:])} for {width}x{height}, batch {grid.shape[0]}:")
            for row in grid[0].tolist():
                print(" ".join(f"{t:5d}" for t in row))
            return 0
        with part("unload_ar"):
            model.unload("ar")  # the tokens exist: this run never needs the AR weights again
    with part("decode"):
        images = decode(model, cond, tokens, steps=steps, guidance=args.guidance, seed=args.seed,
                        progress=ProgressLines("DiT steps"))
    with part("save"):
        save_images(images, paths if len(images) == len(paths) else output_paths(args.out, len(images)), demo)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    timings = RunTimings()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("glm_core").addHandler(handler)
    logging.getLogger("glm_core").setLevel(logging.INFO)
    try:
        code = run(args, timings)
        if args.timings is not None:
            timings.write(args.timings)
        return code
    except KeyboardInterrupt:
        # On a terminal the progress line may still be open (it ends in "\r"): end it first.
        print(("\n" if sys.stderr.isatty() else "") + "interrupted; no image was written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # bad input, bad files, GPU memory (NotEnoughGpuMemory is a RuntimeError)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from .memory import NotEnoughGpuMemory

        if isinstance(error, NotEnoughGpuMemory):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise


def exit_now(code: int) -> None:
    """End the process with `code` once the output is flushed, without Python's finalisation: tearing down torch's
    modules, threads and GPU allocations took about a second after the image was written (CPU; measured with
    `time` against the CLI's own clock), and nothing is left to save by then (images and tokens are written
    whole before `main` returns; torch writes its compile caches as it compiles). Under a profiler, a tracer or
    a `sys.monitoring` tool the normal exit runs, so that they write their results."""
    monitored = hasattr(sys, "monitoring") and any(
        sys.monitoring.get_tool(tool) is not None for tool in range(6))
    if sys.getprofile() is not None or sys.gettrace() is not None or monitored:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
