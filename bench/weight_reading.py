"""Reading a component's weights onto the GPU: safetensors' own `get_tensor` on the device (what the loader did
before), against `glm_core.tensor_reader` with 1, READ_THREADS and 2 * READ_THREADS threads. Every tensor of the
component's files is read (no model built); the files are read once first so that every variant finds them in the
page cache, and the variants are timed in turn, twice, on bench.harness's clock (host clock between
synchronisations: a whole read is seconds long). Each variant's tensors are checked against the first's.

    python3 -m bench.weight_reading --model /tmp/glm-image --component vision_language_encoder --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from safetensors import safe_open

from bench.cold_start import read_into_page_cache
from bench.harness import time_once
from glm_core.checkpoint import open_checkpoint, read_headers
from glm_core.tensor_reader import READ_THREADS, TensorReader, read_in_order


def read_with_safetensors(entries, device) -> dict[str, torch.Tensor]:
    handles, out = {}, {}
    try:
        for key, (_, _, path) in entries:
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt", device=str(device)).__enter__()
            out[key] = handles[path].get_tensor(key)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return out


def read_with_reader(entries, device, threads: int) -> dict[str, torch.Tensor]:
    reader = TensorReader(device)
    return {key: tensor for (key, _), tensor in read_in_order(
        entries, lambda item: reader.read(item[1][2], item[0], item[1][1], item[1][0]), threads=threads)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--component", default="vision_language_encoder")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args(argv)
    device = torch.device("cuda", 0)
    component = open_checkpoint(args.model).component_dir(args.component)
    headers = read_headers(component)
    entries = sorted(headers.items(), key=lambda item: (str(item[1][2]), item[0]))
    nbytes, seconds = read_into_page_cache(component)
    print(f"{component}: {len(entries)} tensors, {nbytes / 1e9:.2f} GB of files read into the page cache in "
          f"{seconds:.1f} s", flush=True)
    variants = {"safetensors get_tensor(device=cuda), one at a time": lambda: read_with_safetensors(entries, device)}
    for threads in (1, READ_THREADS, 2 * READ_THREADS):
        variants[f"tensor_reader, {threads} thread(s)"] = lambda threads=threads: read_with_reader(entries, device,
                                                                                                   threads)
    results, first = {}, None
    for repeat in range(args.repeats):
        for name, read in variants.items():
            result = []
            elapsed = time_once(lambda: result.append(read()), device, wall=True)
            tensors = result.pop()
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            if first is None:
                first = {key: t.reshape(-1).view(torch.uint8)[:4096].clone() for key, t in tensors.items()}
            same = all(torch.equal(first[key], t.reshape(-1).view(torch.uint8)[:4096]) for key, t in tensors.items())
            results.setdefault(name, {"seconds": [], "gb": round(total / 1e9, 3), "same_bytes": True})
            results[name]["seconds"].append(round(elapsed, 3))
            results[name]["same_bytes"] &= same
            del tensors
            torch.cuda.empty_cache()
            print(f"[{repeat}] {name}: {total / 1e9:.2f} GB in {elapsed:.2f} s = {total / 1e9 / elapsed:.1f} GB/s"
                  f"{'' if same else ' (BYTES DIFFER)'}", flush=True)
    for entry in results.values():
        entry["median_s"] = statistics.median(entry["seconds"])
        entry["gb_per_s"] = round(entry["gb"] / entry["median_s"], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight_reading.json").write_text(json.dumps({"component": str(component), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
