"""A pre-quantised copy of a GLM-Image folder: the AR decoder's and the DiT blocks' linears stored in FP8.

    python -m glm_core.quantize --model /models/GLM-Image --out /models/GLM-Image-fp8

The copy keeps the official layout and key names (`q_proj.weight` in e4m3 beside `q_proj.weight_scale` in fp32,
spec §3.1 otherwise unchanged), so glm_core opens it like the original and loads it without quantising (less to
read, about half the disk); `weights="auto"` recognises it. The small components are hard-linked when the
target is on the same file system, else copied. The reference libraries cannot read the FP8 shards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import open_checkpoint, official_state_dict, save_sharded

# The components written anew, and the shard stem each uses (the official names, spec §3).
_REWRITTEN = {"vision_language_encoder": "model", "transformer": "diffusion_pytorch_model"}
_SHARD_BYTES = 5 * 10**9


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_fp8_copy(source, target, *, device=None) -> Path:
    """Write the FP8 copy of the GLM-Image folder `source` to `target` (which must not exist yet)."""
    from .ar.model import load_ar
    from .ar.vision import load_vision
    from .dit.model import load_dit

    checkpoint = open_checkpoint(source)
    target = Path(target)
    if target.exists():
        raise ValueError(f"{target} already exists; choose a new folder for the FP8 copy")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for path in sorted(checkpoint.root.rglob("*")):
        relative = path.relative_to(checkpoint.root)
        if path.is_file() and not (relative.parts[0] in _REWRITTEN and path.name.endswith(".safetensors")
                                   or relative.parts[0] in _REWRITTEN and path.name.endswith(".index.json")):
            _link_or_copy(path, partial / relative)
    ar_state = official_state_dict(load_ar(checkpoint.root, device, torch.bfloat16, weights="fp8", compile=False))
    ar_state.update(official_state_dict(load_vision(checkpoint.root, device, torch.bfloat16)))
    _write_shards(ar_state, partial / "vision_language_encoder", _REWRITTEN["vision_language_encoder"])
    ar_state = None
    dit_state = official_state_dict(load_dit(checkpoint.root, device, torch.bfloat16, weights="fp8", compile=False))
    _write_shards(dit_state, partial / "transformer", _REWRITTEN["transformer"])
    os.replace(partial, target)
    return target


def _write_shards(state: dict[str, torch.Tensor], folder: Path, stem: str) -> None:
    total = sum(t.numel() * t.element_size() for t in state.values())
    save_sharded({k: v.cpu() for k, v in state.items()}, folder, stem, max(1, -(-total // _SHARD_BYTES)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_core.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the GLM-Image folder (bf16, official layout)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the FP8 copy")
    parser.add_argument("--device", default=None, help="where to quantise (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {write_fp8_copy(args.model, args.out, device=args.device)}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
