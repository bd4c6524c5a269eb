"""Write a random-weight GLM-Image folder in the official layout (spec §3), at the real configuration.

    python -m bench.fullsize_checkpoint --out DIR            # real sizes, built on the GPU (~35 GB on disk)
    python -m bench.fullsize_checkpoint --out DIR --tiny     # tiny configuration, CPU, seconds

Every weight file is written by the reference classes' own `save_pretrained` (transformers
`GlmImageForConditionalGeneration` and `T5EncoderModel`, diffusers `GlmImageTransformer2DModel` and
`AutoencoderKL`), so file names, shard index, tensor names and dtypes are what the official loaders read.
Each model is built on the meta device, materialised straight on the device with random bf16-representable
values (bench/models.py: `materialize_`, `random_init_`), saved with `max_shard_size`, and freed before the
next one, so the device holds one component at a time (the AR's 20 GB at most).

The non-weight files (processor/, tokenizer/, scheduler/, model_index.json) come from `glm_core.tiny`, the
same files the tiny test checkpoint has. The real GLM-4 tokenizer cannot be downloaded here, so processor/
gets the tiny byte-level tokenizer with its GLM-4 special tokens moved to the ids the configuration names
(`<|endoftext|>` = text_config.pad_token_id, `<sop>` +4, `<eop>` +5, `<|image|>` +14: spec §1.2.2): prompts
tokenize to other text ids than the real tokenizer would give, but every marker and image placeholder has its
real id, which is what the AR model and both processors act on. `check_tokenizer_fits` says so or raises.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/fullsize_checkpoint.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import models  # noqa: E402
from glm_core import tiny  # noqa: E402

# text_encoder/config.json at the real size (spec §1.4: ByT5-small encoder, fp32 on disk).
REAL_T5_CONFIG = {
    **{k: v for k, v in tiny.TINY_T5_CONFIG.items()
       if k not in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers")},
    "d_model": 1472, "d_ff": 3584, "d_kv": 64, "num_heads": 6, "num_layers": 12, "num_decoder_layers": 4,
}

# The GLM-4 special tokens' offsets from <|endoftext|> (the tiny tokenizer keeps the real offsets).
_SPECIAL_OFFSETS = {"<sop>": tiny.SOP_ID - tiny.ENDOFTEXT_ID, "<eop>": tiny.EOP_ID - tiny.ENDOFTEXT_ID,
                    "<|image|>": tiny.IMAGE_TOKEN_ID - tiny.ENDOFTEXT_ID}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# The tiny folder is sharded too (AR ~10 MB in ~10 shards, DiT in 2), so it has the real folder's shape.
TINY_MAX_SHARD_SIZE = "1MB"
REAL_SIZE_DISK_BYTES = 40e9  # ~36 GB of weights, and room to spare
# Written last: a folder holding it is complete (`--reuse` then leaves it as it is).
COMPLETE_MARKER = "RANDOM_WEIGHTS.json"


def log(message: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Non-weight files


def generation_config_for(ar_config: dict) -> dict:
    """generation_config.json as the official one is built (spec §1.2.1): sampling on, EOS = image-end
    marker, pad = <|image|>, top_p 0.75, temperature 0.9; ids from the AR config."""
    return {**tiny.TINY_AR_GENERATION_CONFIG, "eos_token_id": ar_config["image_end_token_id"],
            "pad_token_id": ar_config["image_token_id"]}


def tokenizer_json_for(ar_config: dict) -> str:
    """The tiny tokenizer with its GLM-4 specials moved so that <|endoftext|> has the config's pad id."""
    data = json.loads(tiny.build_tokenizer().to_str())
    shift = ar_config["text_config"]["pad_token_id"] - tiny.ENDOFTEXT_ID
    vocab = data["model"]["vocab"]
    for token, token_id in vocab.items():
        if token_id >= tiny.ENDOFTEXT_ID:
            vocab[token] = token_id + shift
    for added in data["added_tokens"]:
        if added["id"] >= tiny.ENDOFTEXT_ID:
            added["id"] += shift
    return json.dumps(data, ensure_ascii=False)


def check_tokenizer_fits(tokenizer_json: str, ar_config: dict) -> dict:
    """The ids the AR model acts on must be the tokenizer's: raise ValueError naming the mismatch.

    Returns the ids checked (for the log)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    text = ar_config["text_config"]
    ids = {token: tokenizer.token_to_id(token) for token in
           (f"<|dit_token_{ar_config['image_start_token_id']}|>", f"<|dit_token_{ar_config['image_end_token_id']}|>",
            "<|endoftext|>", *_SPECIAL_OFFSETS)}
    expected = {
        f"<|dit_token_{ar_config['image_start_token_id']}|>": ar_config["image_start_token_id"],
        f"<|dit_token_{ar_config['image_end_token_id']}|>": ar_config["image_end_token_id"],
        "<|endoftext|>": text["pad_token_id"],
        "<|image|>": ar_config["image_token_id"],
        **{token: text["pad_token_id"] + offset for token, offset in _SPECIAL_OFFSETS.items() if token != "<|image|>"},
    }
    wrong = {token: (ids[token], want) for token, want in expected.items() if ids[token] != want}
    if wrong:
        raise ValueError(f"tokenizer ids differ from the AR config (token: (tokenizer id, config id)): {wrong}; "
                         f"image_token_id must be pad_token_id + {_SPECIAL_OFFSETS['<|image|>']} as in GLM-4")
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if top >= text["vocab_size"]:
        raise ValueError(f"tokenizer id {top} does not fit the AR embedding table "
                         f"(text_config.vocab_size {text['vocab_size']})")
    vision_tokens = [tokenizer.token_to_id(f"<|dit_token_{i}|>") for i in (0, text["vision_vocab_size"] - 1)]
    if vision_tokens != [0, text["vision_vocab_size"] - 1] or \
            tokenizer.token_to_id(f"<|dit_token_{text['vision_vocab_size']}|>") is not None:
        raise ValueError(f"tokenizer's <|dit_token_N|> ids do not cover exactly the vision vocabulary "
                         f"0..{text['vision_vocab_size'] - 1} (text_config.vision_vocab_size)")
    return ids


def write_layout(root: Path, ar_config: dict) -> None:
    """Every non-weight file that no `save_pretrained` writes: model_index.json, processor/, tokenizer/,
    scheduler/ (the tiny layout's files, which are the real ones apart from the tokenizer ids)."""
    tiny.write_tiny_layout(root)
    tokenizer_json = tokenizer_json_for(ar_config)
    check_tokenizer_fits(tokenizer_json, ar_config)
    (root / "processor" / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    # The model folders get their config.json from save_pretrained; drop the tiny ones written above.
    for component in ("vision_language_encoder", "text_encoder", "transformer", "vae"):
        shutil.rmtree(root / component)


# --------------------------------------------------------------------------------------------
# Weights


def _quiet_progress_bars() -> None:
    """One log line per component instead of the libraries' per-shard progress bars."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def save_ar(root: Path, ar_config: dict, device, seed: int, max_shard_size: str) -> None:
    from transformers import GenerationConfig

    model = models.reference_ar(ar_config, device, torch.bfloat16, seed)
    model.generation_config = GenerationConfig.from_dict(generation_config_for(ar_config))
    model.save_pretrained(root / "vision_language_encoder", max_shard_size=max_shard_size)


def save_t5(root: Path, t5_config: dict, device, seed: int, max_shard_size: str) -> None:
    """fp32 on disk like the official file (spec §3); `encoder.embed_tokens` stays tied to `shared`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{k: v for k, v in copy.deepcopy(t5_config).items() if k != "architectures"})
    with torch.device("meta"):
        model = T5EncoderModel(config)
    models.materialize_(model, torch.device(device), torch.float32)
    models.init_reference_buffers_(model)
    models.random_init_(model, seed)
    model.save_pretrained(root / "text_encoder", max_shard_size=max_shard_size)


def save_dit(root: Path, dit_config: dict, device, seed: int, max_shard_size: str) -> None:
    model = models.reference_dit(dit_config, device, torch.bfloat16, seed)
    model.save_pretrained(root / "transformer", max_shard_size=max_shard_size)


def save_vae(root: Path, vae_config: dict, device, seed: int, max_shard_size: str) -> None:
    model = models.reference_vae(vae_config, device, torch.bfloat16, seed)
    model.save_pretrained(root / "vae", max_shard_size=max_shard_size)


def write_checkpoint(out: Path, *, use_tiny: bool = False, device=None, seed: int = 0,
                     max_shard_size: str | None = None, t0: float | None = None) -> dict:
    """Write the whole folder; returns {component: bytes on disk} plus the seconds it took."""
    t0 = time.monotonic() if t0 is None else t0
    max_shard_size = max_shard_size or (TINY_MAX_SHARD_SIZE if use_tiny else DEFAULT_MAX_SHARD_SIZE)
    configs = models.tiny_configs() if use_tiny else models.real_configs()
    t5_config = copy.deepcopy(tiny.TINY_T5_CONFIG if use_tiny else REAL_T5_CONFIG)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and not use_tiny else "cpu"))
    out = Path(out)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (model_index.json); pass an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_layout(out, configs.ar)
    log(f"layout written to {out} ({configs.source}, weights on {device})", t0)
    steps = [("vision_language_encoder", save_ar, configs.ar), ("text_encoder", save_t5, t5_config),
             ("transformer", save_dit, configs.dit), ("vae", save_vae, configs.vae)]
    _quiet_progress_bars()
    sizes = {}
    with torch.no_grad():
        for offset, (component, save, config) in enumerate(steps):
            save(out, config, device, seed + offset, max_shard_size)
            _free(device)
            sizes[component] = sum(p.stat().st_size for p in (out / component).iterdir())
            log(f"{component}: {sizes[component] / 1e9:.2f} GB", t0)
    sizes["seconds"] = round(time.monotonic() - t0, 1)
    (out / COMPLETE_MARKER).write_text(json.dumps(
        {"what": "GLM-Image folder with RANDOM weights (bench/fullsize_checkpoint.py)", "configuration": configs.source,
         "seed": seed, "bytes": {k: v for k, v in sizes.items() if k != "seconds"}}, indent=2) + "\n")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to create (must not hold a checkpoint yet)")
    p.add_argument("--tiny", action="store_true", help="tiny configuration on the CPU (seconds)")
    p.add_argument("--device", default=None, help="where the weights are built (default: cuda if available, "
                                                  "cpu with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true",
                   help="leave a complete folder written earlier as it is (a warm device machine keeps /tmp)")
    p.add_argument("--max-shard-size", default=None,
                   help=f"default {DEFAULT_MAX_SHARD_SIZE} ({TINY_MAX_SHARD_SIZE} with --tiny)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if args.reuse and (Path(args.out) / COMPLETE_MARKER).is_file():
        log(f"reusing the complete folder {args.out} ({COMPLETE_MARKER} is there)", t0)
        return 0
    if not args.tiny:
        existing = Path(args.out).resolve()
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < REAL_SIZE_DISK_BYTES:
            p.error(f"--out {args.out}: {free / 1e9:.0f} GB free on its disk, the real-size folder needs "
                    f"{REAL_SIZE_DISK_BYTES / 1e9:.0f} GB; pick a folder on a larger disk")
    sizes = write_checkpoint(Path(args.out), use_tiny=args.tiny, device=args.device, seed=args.seed,
                             max_shard_size=args.max_shard_size, t0=t0)
    total = sum(v for k, v in sizes.items() if k != "seconds")
    log(f"done: {args.out}, {total / 1e9:.2f} GB in {sizes['seconds']} s", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
