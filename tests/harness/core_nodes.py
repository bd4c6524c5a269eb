"""Hand-written stand-ins for the ComfyUI core nodes the shipped workflows use, and `/object_info` export.

LoadImage, SaveImage and PreviewImage follow their documented contract (inputs, outputs, widget options,
IMAGE = (B, H, W, 3) float32 in [0, 1]); Note and MarkdownNote exist only in the frontend and never reach
the backend, so they are listed as UI-only types.

The contract depends on the ComfyUI release: since 0.26.0 SaveImage and PreviewImage also pass their images on
through an `IMAGE` output. `core_node_class_mappings(version)` gives the stand-ins of a release; the default is
the oldest release the shipped workflows are written for (WORKFLOW_CORE_VERSION), whose saved files load in both.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

UI_ONLY_TYPES = ("Note", "MarkdownNote")
WORKFLOW_CORE_VERSION = (0, 3, 64)
# ComfyUI commit b0f9e326 "Add output socket to save nodes (#13866)", first released in 0.26.0.
SAVE_NODES_OUTPUT_IMAGES_SINCE = (0, 26, 0)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _directory(kind: str) -> Path:
    import folder_paths  # the harness stub, installed by the fixtures

    return Path(getattr(folder_paths, f"get_{kind}_directory")())


def _save_images(images: torch.Tensor, prefix: str, kind: str) -> list[dict]:
    folder = _directory(kind)
    (folder / prefix).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for image in images:
        counter = 1
        while (path := folder / f"{prefix}_{counter:05}_.png").exists():
            counter += 1
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        PIL.Image.fromarray(pixels).save(path)
        results.append({"filename": path.name, "subfolder": path.parent.relative_to(folder).as_posix().strip("."),
                        "type": kind})
    return results


class LoadImage:
    CATEGORY = "image"
    FUNCTION = "load_image"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def INPUT_TYPES(cls):
        folder = _directory("input")
        files = sorted(f for f in os.listdir(folder)
                       if (folder / f).is_file() and f.lower().endswith(IMAGE_EXTENSIONS))
        return {"required": {"image": (files, {"image_upload": True})}}

    def load_image(self, image):
        picture = PIL.Image.open(_directory("input") / image)
        rgb = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]  # (1, H, W, 3)
        if "A" in picture.getbands():
            alpha = np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0
            mask = 1.0 - torch.from_numpy(alpha)[None]  # ComfyUI's mask is the inverted alpha
        else:
            mask = torch.zeros((1, 64, 64), dtype=torch.float32)
        return (rgb, mask)


class SaveImage:
    CATEGORY = "image"
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "File name prefix."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return {"ui": {"images": _save_images(images, filename_prefix, "output")}}


class PreviewImage:
    CATEGORY = "image"
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        return {"ui": {"images": _save_images(images, "ComfyUI_temp", "temp")}}


class SaveImagePassingImages(SaveImage):
    """SaveImage from ComfyUI 0.26.0 on: the saved images also leave through an IMAGE output."""
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return {**super().save_images(images, filename_prefix, prompt, extra_pnginfo), "result": (images,)}


class PreviewImagePassingImages(PreviewImage):
    """PreviewImage from ComfyUI 0.26.0 on (see SaveImagePassingImages)."""
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        return {**super().save_images(images, prompt, extra_pnginfo), "result": (images,)}


def parse_version(text: str) -> tuple[int, ...]:
    """"0.33.0" -> (0, 33, 0), as /system_stats reports comfyui_version."""
    return tuple(int(part) for part in text.split("."))


def core_node_class_mappings(comfyui_version: tuple[int, ...] = WORKFLOW_CORE_VERSION) -> dict:
    """The core-node stand-ins as the given ComfyUI release defines them."""
    if comfyui_version >= SAVE_NODES_OUTPUT_IMAGES_SINCE:
        return {"LoadImage": LoadImage, "SaveImage": SaveImagePassingImages, "PreviewImage": PreviewImagePassingImages}
    return {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage}


CORE_NODE_CLASS_MAPPINGS = core_node_class_mappings()
CORE_DISPLAY_NAMES = {"LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image"}


def node_info(name: str, node_class, display_name: str | None, python_module: str) -> dict:
    """One `/object_info` entry for a V1 node class, in the shape ComfyUI's server returns."""
    input_types = node_class.INPUT_TYPES()
    info = {
        "input": input_types,
        "input_order": {section: list(entries) for section, entries in input_types.items()},
        "output": list(node_class.RETURN_TYPES),
        "output_is_list": list(getattr(node_class, "OUTPUT_IS_LIST", [False] * len(node_class.RETURN_TYPES))),
        "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(node_class, "DESCRIPTION", ""),
        "python_module": python_module,
        "category": getattr(node_class, "CATEGORY", "sd"),
        "output_node": bool(getattr(node_class, "OUTPUT_NODE", False)),
    }
    if hasattr(node_class, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(node_class.OUTPUT_TOOLTIPS)
    return info


def object_info(pack, comfyui_version: tuple[int, ...] = WORKFLOW_CORE_VERSION) -> dict:
    """`/object_info` for the pack's nodes plus the core nodes above (a JSON-able dict)."""
    from .loader import as_in_comfyui

    with as_in_comfyui():
        return _object_info(pack, comfyui_version)


def _object_info(pack, comfyui_version) -> dict:
    out = {name: node_info(name, cls, CORE_DISPLAY_NAMES.get(name), "nodes")
           for name, cls in core_node_class_mappings(comfyui_version).items()}
    for name, cls in pack.node_class_mappings.items():
        out[name] = node_info(name, cls, pack.display_name_mappings.get(name), pack.python_module)
    return out


def class_mappings(pack, comfyui_version: tuple[int, ...] = WORKFLOW_CORE_VERSION) -> dict:
    """Everything the executor can run: core stand-ins plus the pack's nodes."""
    return {**core_node_class_mappings(comfyui_version), **pack.node_class_mappings}
