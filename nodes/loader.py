"""Load GLM-Image: pick a GLM-Image folder (diffusers layout) from models/glm_image/ or models/diffusers/."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from . import comfy_services, recent_model
from .types import CATEGORY, GLM_IMAGE_MODEL

log = logging.getLogger("glm_core")
DEFAULT_MODEL_FOLDER = "GLM-Image"  # models/glm_image/GLM-Image = a download of zai-org/GLM-Image
# fp16 is left out: the reference reports fp16 VAE overflow (black / NaN images) for this model.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_MAX_SCAN_DEPTH = 3  # models/glm_image/<org>/<name>/model_index.json is depth 2; stop well before a big tree
# (folder, dtype, weights) -> the folder's files (name, size, mtime) when this process last checked them whole.
# ComfyUI 0.33 runs the loader again whenever its cache dropped the loader's output (often: see README); the
# full check reads every shard header and builds every stage on the meta device (seconds at the real size), so
# an unchanged folder is not checked twice.
_CHECKED_FOLDERS: dict[tuple[str, str, str], tuple] = {}

comfy_services.register_model_folder()


def _glm_image_folders_under(root: Path) -> list[str]:
    """Folders under `root` (relative, '/'-separated) that hold a GLM-Image model_index.json."""
    from ..glm_core.checkpoint import MODEL_INDEX_FILENAME, is_glm_image_folder

    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        relative = Path(dirpath).relative_to(root)
        if relative.parts and MODEL_INDEX_FILENAME in filenames and is_glm_image_folder(dirpath):
            found.append(relative.as_posix())
            dirnames.clear()  # a model folder's sub-folders are its components, not more models
        elif len(relative.parts) >= _MAX_SCAN_DEPTH:
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return found


def list_model_folders() -> list[str]:
    """Every GLM-Image folder under the registered roots; the first root wins on equal names."""
    names: list[str] = []
    for root in comfy_services.model_search_roots():
        if root.is_dir():
            names += [name for name in _glm_image_folders_under(root) if name not in names]
    return names


def resolve_model_folder(name: str) -> Path:
    """The folder behind a combo value, or ValueError that says where GLM-Image is looked for."""
    from ..glm_core.checkpoint import is_glm_image_folder

    roots = comfy_services.model_search_roots()
    if ".." not in Path(name).parts and not Path(name).is_absolute():
        for root in roots:
            if is_glm_image_folder(root / name):
                return root / name
    searched = ", ".join(str(root) for root in roots) or "(no model folders registered)"
    raise ValueError(
        f"GLM-Image model folder {name!r} not found. Searched: {searched}. Put a download of "
        f"zai-org/GLM-Image (the whole folder with model_index.json) at models/glm_image/{DEFAULT_MODEL_FOLDER}, "
        f"or add a `glm_image:` path in extra_model_paths.yaml, then refresh the node list.")


class LoadGlmImage:
    DESCRIPTION = (
        "Opens a GLM-Image model folder (the diffusers layout of zai-org/GLM-Image) and checks every file in it. "
        "Cheap: each stage's weights (AR prior, DiT, VAE, glyph encoder) load on first use.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (GLM_IMAGE_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The GLM-Image model; connect it to Encode Prompt, AR Generate Tokens and DiT Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..glm_core.limits import PLACEMENTS, WEIGHT_CHOICES

        return {
            "required": {
                "model_folder": (list_model_folders(), {
                    "tooltip": "A folder containing GLM-Image's model_index.json, found under models/glm_image/ "
                               f"(default name: {DEFAULT_MODEL_FOLDER}) or models/diffusers/."}),
                "dtype": (list(DTYPES), {
                    "default": "bf16",
                    "tooltip": "Compute precision. bf16: the checkpoint's own precision, half the memory of fp32. "
                               "fp32: for CPUs without fast bf16, or to rule out precision issues."}),
            },
            "optional": {
                "weights": (list(WEIGHT_CHOICES), {
                    "default": "auto",
                    "tooltip": "How the big layers are stored. bf16: as published (AR 17.8 GB, DiT 13.9 GB). fp8: "
                               "the AR's and the DiT's linear layers in FP8, half the memory, for 12-16 GB cards, "
                               "and on cards with FP8 support faster token generation (measured on an H200); slightly "
                               "different images. auto: bf16 if the larger stage fits the GPU memory "
                               "ComfyUI could free for it (other models unload on demand), else fp8; a pre-quantised "
                               "folder is always fp8. The console says which."}),
                "placement": (list(PLACEMENTS), {
                    "default": "auto",
                    "tooltip": "Where the stages stay between runs. auto: follow ComfyUI (--highvram keeps both on "
                               "the GPU, --lowvram one at a time, otherwise what fits the free memory). gpu: both "
                               "stay on the GPU (needs about 36 GB in bf16). sequential: one stage on the GPU at a "
                               "time (each swap costs a copy from host memory)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model_folder, dtype, weights="auto", placement="auto"):
        # Re-open the folder when its model_index.json changes (a new download), not only when the name does.
        try:
            index = resolve_model_folder(model_folder) / "model_index.json"
            return f"{index}:{index.stat().st_mtime_ns}:{dtype}:{weights}:{placement}"
        except (ValueError, OSError):
            return ""  # load() raises the clear error

    def load(self, model_folder, dtype, weights="auto", placement="auto"):
        from ..glm_core.pipeline import GlmImage

        folder = resolve_model_folder(model_folder)
        if placement == "auto":
            placement = comfy_services.placement_from_flags()
        files = _files_of(folder)
        recent_key = (str(folder), dtype, weights, placement, files)
        model = recent_model.get(recent_key)
        if model is not None:  # ComfyUI's cache had let go of our output; the stages come back as they were
            return (model,)
        device = comfy_services.torch_device()
        model = GlmImage.from_folder(folder, device=device, dtype=DTYPES[dtype], weights=weights, placement=placement,
                                     gpu_memory=comfy_services.gpu_memory_within_reach(device))
        key = (str(folder), dtype, model.weights)
        if _CHECKED_FOLDERS.get(key) != files:
            start = time.perf_counter()
            model.check()  # every config, shard index and shard header now, not when a stage first runs
            _CHECKED_FOLDERS[key] = files
            log.info("checked every file of %s in %.2f s", folder, time.perf_counter() - start)
        recent_model.put(recent_key, model)
        return (model,)


def _files_of(folder: Path) -> tuple:
    """(relative name, size, mtime) of every file under the folder: what a re-download or an edit changes."""
    entries = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)
