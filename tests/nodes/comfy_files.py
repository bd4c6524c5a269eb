"""Files a node test puts into the ComfyUI folders of the stubs (or of a real server): the model folder and the
input images that the shipped workflows load."""
from __future__ import annotations

from pathlib import Path

from tests.nodes.pack_facts import DEFAULT_MODEL_FOLDER


def models_dir(comfy) -> Path:
    return Path(comfy.modules["folder_paths"].models_dir)


def install_checkpoint(comfy, checkpoint: Path) -> Path:
    """Link a checkpoint as models/glm_image/GLM-Image, the shipped workflows' default name."""
    link = models_dir(comfy) / "glm_image" / DEFAULT_MODEL_FOLDER
    link.parent.mkdir(parents=True)
    link.symlink_to(checkpoint, target_is_directory=True)
    return link


def write_reference_images(input_dir: Path) -> list[str]:
    """Input images the shipped workflows load (LoadImage widgets), of different sizes."""
    import PIL.Image

    names = {"reference.png": (640, 512), "subject_1.png": (512, 512), "subject_2.png": (512, 768),
             "subject_3.png": (768, 512)}
    for index, (name, size) in enumerate(names.items()):
        PIL.Image.new("RGB", size, (40 + 60 * index, 120, 200 - 40 * index)).save(input_dir / name)
    return list(names)
