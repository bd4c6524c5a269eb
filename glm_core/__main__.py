"""Command line: python -m glm_core --prompt "..." [--model DIR] [--ref IMAGE ...] --out image.png

Without --model it writes (once) and uses a tiny checkpoint with RANDOM weights, so the whole path can be
tried on any machine; its pictures are noise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GLM-Image folder (zai-org/GLM-Image layout); "
                        "omitted: a tiny random-weight demo checkpoint")
    parser.add_argument("--prompt", required=True, help='what to draw; quote text to render, e.g. a sign "OPEN"')
    parser.add_argument("--width", type=int, default=None, help="multiple of 32 in [512, 2048] (default 1024; 512 for the demo)")
    parser.add_argument("--height", type=int, default=None, help="multiple of 32 in [512, 2048] (default 1024; 512 for the demo)")
    parser.add_argument("--ref", type=Path, action="append", default=[], help="reference image (repeatable): editing / multi-subject")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DiT's initial noise")
    parser.add_argument("--ar-seed", type=int, default=None, help="seed of the AR token sampling (default: --seed)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0 disables top-k")
    parser.add_argument("--batch", type=int, default=1, help="images from one prompt (AR seeds ar-seed, ar-seed+1, ...)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile of the AR decode layer and DiT blocks (on by default on CUDA; "
                        "saves ~30 s of compiling for a single image)")
    parser.add_argument("--tokens-only", action="store_true", help="stop after the AR stage and print the token grid")
    parser.add_argument("--save-tokens", type=Path, help="also write the AR tokens to this .safetensors file")
    parser.add_argument("--out", type=Path, default=Path("glm_image.png"), help="output PNG (batch: name_0.png, ...)")
    return parser.parse_args(argv)


class ProgressLine:
    """One self-overwriting progress line on stderr per stage."""

    def __init__(self, label: str):
        self.label, self.start = label, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        end = "\n" if done >= total else ""
        print(f"\r{self.label}: {done}/{total} ({elapsed:.1f} s)", end=end, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from PIL import Image

    from .pipeline import GlmImage, decode, encode_prompt, generate_tokens, save_tokens

    demo = args.model is None
    if demo:
        from .demo_checkpoint import write_demo_checkpoint

        folder = write_demo_checkpoint()
        print(f"No --model given: using the tiny RANDOM-WEIGHT demo checkpoint at {folder}.\n"
              "Its images are noise. Pass --model /path/to/GLM-Image for real pictures.", file=sys.stderr)
    else:
        folder = args.model
    default_side = 512 if demo else 1024
    width, height = args.width or default_side, args.height or default_side

    try:
        model = GlmImage.from_folder(folder, device=args.device, dtype=DTYPES.get(args.dtype),
                                     compile=False if args.no_compile else None)
        references = [Image.open(path) for path in args.ref]
        cond = encode_prompt(model, args.prompt, width, height, references)
        ar_seed = args.seed if args.ar_seed is None else args.ar_seed
        tokens = generate_tokens(model, cond, seed=ar_seed, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, batch_size=args.batch, progress=ProgressLine("AR tokens"))
        if args.save_tokens:
            print(f"tokens written to {save_tokens(tokens, args.save_tokens)}", file=sys.stderr)
        if args.tokens_only:
            grid = tokens.grid_ids
            print(f"token grid {tuple(grid.shape[1:])} for {width}x{height}, batch {grid.shape[0]}:")
            for row in grid[0].tolist():
                print(" ".join(f"{t:5d}" for t in row))
            return 0
        model.unload("ar")  # the tokens exist: the DiT stage never needs the AR weights again
        images = decode(model, cond, tokens, steps=args.steps, guidance=args.guidance, seed=args.seed,
                        progress=ProgressLine("DiT steps"))
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = [args.out] if images.shape[0] == 1 else [args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}")
                                                      for i in range(images.shape[0])]
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().clamp(0, 255).to(torch.uint8).numpy()).save(path)
        print(f"wrote {path}" + (" (random-weight demo: noise)" if demo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
