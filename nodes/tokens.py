"""Token files and token previews: keep an AR result across sessions, look at a grid before the DiT runs."""
from __future__ import annotations

import os
from pathlib import Path

from . import comfy_services
from .types import CATEGORY, GLM_IMAGE_TOKENS

TOKENS_SUFFIX = ".glm_tokens.safetensors"  # safetensors + JSON metadata (size, references, seeds); no pickle
OUTPUT_ANNOTATION = " [output]"  # ComfyUI's convention for a file offered from the output folder
_MAX_LIST_DEPTH = 2


def _token_files_under(root: Path) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        relative = Path(dirpath).relative_to(root)
        dirnames[:] = [] if len(relative.parts) >= _MAX_LIST_DEPTH else sorted(
            d for d in dirnames if not d.startswith("."))
        names += [(relative / name).as_posix() for name in sorted(filenames) if name.endswith(TOKENS_SUFFIX)]
    return names


def list_token_files() -> list[str]:
    """Token files in the input folder, then those in the output folder (annotated " [output]")."""
    names = []
    for root, annotation in ((comfy_services.input_directory(), ""),
                             (comfy_services.output_directory(), OUTPUT_ANNOTATION)):
        if root.is_dir():
            names += [name + annotation for name in _token_files_under(root)]
    return names


def _inside(root: Path, relative: str) -> Path:
    """root/relative, refusing paths that leave root (a prompt comes from the network)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{relative!r} points outside {root}; use a path inside that folder")
    return path


def resolve_token_file(name: str) -> Path:
    if name.endswith(OUTPUT_ANNOTATION):
        path = _inside(comfy_services.output_directory(), name[: -len(OUTPUT_ANNOTATION)])
    else:
        path = _inside(comfy_services.input_directory(), name)
    if not path.is_file():
        raise ValueError(f"GLM-Image tokens file not found: {path}. Save one with Save Tokens (it lands in the "
                         f"output folder) and pick it again from the list.")
    return path


class GlmImageSaveTokens:
    DESCRIPTION = ("Saves a token grid to ComfyUI's output folder (safetensors, with its image size and reference "
                   "info), to decode it again later with Load Tokens without re-running the AR stage.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": (GLM_IMAGE_TOKENS, {"tooltip": "Token grid from AR Generate Tokens."}),
                "filename_prefix": ("STRING", {
                    "default": "glm_image_tokens/GLM-Image",
                    "tooltip": f"File name prefix inside the output folder; a counter and {TOKENS_SUFFIX} "
                               "are appended. May contain sub-folders."}),
            }
        }

    def save(self, tokens, filename_prefix):
        from ..glm_core.pipeline import save_tokens

        output = comfy_services.output_directory()
        prefix = _inside(output, filename_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        counter = 1
        while (path := prefix.with_name(f"{prefix.name}_{counter:05}_{TOKENS_SUFFIX}")).exists():
            counter += 1
        save_tokens(tokens, path)
        # The name as Load Tokens lists it; web/token_files.js shows it on this node and offers it to Load Tokens.
        return {"ui": {"text": [path.relative_to(output.resolve()).as_posix() + OUTPUT_ANNOTATION]}}


class GlmImageLoadTokens:
    DESCRIPTION = ("Loads a token grid saved by Save Tokens (from the input folder, or the output folder for files "
                   "marked [output]). Decode it with a cond of the same size and number of references.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (GLM_IMAGE_TOKENS,)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The saved token grid, with the image size and reference info it was generated for.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens_file": (list_token_files(), {
                    "tooltip": f"A {TOKENS_SUFFIX} file written by Save Tokens."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tokens_file):
        # Naming tokens_file here makes ComfyUI check it with this function instead of against the list it sent
        # the page: a file saved after the page loaded (or deeper than the list goes) is accepted, and a missing
        # one is refused at queue time with our message rather than "Value not in list".
        try:
            resolve_token_file(tokens_file)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def IS_CHANGED(cls, tokens_file=""):  # the page sends no value while the list is empty
        try:
            return f"{tokens_file}:{resolve_token_file(tokens_file).stat().st_mtime_ns}"
        except (ValueError, OSError):
            return ""  # load() raises the clear error

    def load(self, tokens_file):
        from ..glm_core.pipeline import load_tokens

        return (load_tokens(resolve_token_file(tokens_file)),)


class GlmImagePreviewTokens:
    DESCRIPTION = ("Draws a token grid as a small colour picture (each token one block), to see the layout the AR "
                   "stage chose before the slow DiT runs. Connect it to Preview Image.")
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("One colour-map picture per token grid; equal tokens share a colour (colours carry no other meaning).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": (GLM_IMAGE_TOKENS, {"tooltip": "Token grid to look at."})}}

    def preview(self, tokens):
        from ..glm_core.pipeline import preview_tokens

        return (preview_tokens(tokens),)
