"""Writes the shipped UI-format (0.4) workflows in workflows/ from short graph descriptions.

Run `python -m tests.harness.workflow_builder` from the repository root after changing a node's inputs;
the widget order, socket types and slot indices then come from the node definitions themselves. The files
stay ordinary frontend workflows: opening one in ComfyUI and saving it again is fine.
"""
from __future__ import annotations

import json
import tempfile
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .core_nodes import object_info
from .loader import REPO_ROOT, copy_pack, load_pack, unload_pack
from .stubs import ComfyStubs
from .workflow import input_specs

PACK_ID = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"]
PACK_VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
CORE_VERSION = "0.3.64"  # the ComfyUI release the workflows were checked against
FRONTEND_VERSION = "1.27.10"  # the frontend that release ships
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}
DEFAULT_MODEL_FOLDER = "GLM-Image"

SIZES = {  # default node sizes, close to what the frontend computes for these widgets
    "GLMImageLoader": (330, 82), "GLMImageEncode": (400, 300), "GLMImageGenerateTokens": (330, 226),
    "GLMImageDiTDecode": (330, 154), "GLMImageSaveTokens": (330, 58), "GLMImagePreviewTokens": (250, 26),
    "LoadImage": (300, 330), "SaveImage": (420, 470), "PreviewImage": (300, 300),
}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # input name -> (node id, output slot)
    title: str | None = None
    size: tuple[int, int] | None = None


def build(name: str, nodes: list[Node], groups: list[tuple[str, tuple[int, int, int, int]]], info: dict) -> dict:
    by_id = {node.id: node for node in nodes}
    links, ui_nodes = [], {}
    for node in nodes:
        ui_nodes[node.id] = _ui_node(node, info)
    for target in nodes:
        for input_name, (origin_id, origin_slot) in target.inputs.items():
            link_id = len(links) + 1
            ui_target, ui_origin = ui_nodes[target.id], ui_nodes[origin_id]
            slot = next(i for i, entry in enumerate(ui_target["inputs"]) if entry["name"] == input_name)
            link_type = ui_origin["outputs"][origin_slot]["type"]
            ui_target["inputs"][slot]["link"] = link_id
            ui_origin["outputs"][origin_slot]["links"] = (ui_origin["outputs"][origin_slot]["links"] or []) + [link_id]
            links.append([link_id, origin_id, origin_slot, target.id, slot, link_type])
    for order, node_id in enumerate(_execution_order(by_id)):
        ui_nodes[node_id]["order"] = order
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(by_id),
        "last_link_id": len(links),
        "nodes": [ui_nodes[node.id] for node in nodes],
        "links": links,
        "groups": [{"id": i + 1, "title": title, "bounding": list(box), "color": "#3f789e", "font_size": 24,
                    "flags": {}} for i, (title, box) in enumerate(groups)],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [80, 60]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def _ui_node(node: Node, info: dict) -> dict:
    if node.type in ("MarkdownNote", "Note"):
        return {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or (420, 300)),
                "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": node.title or "Note",
                "properties": {}, "widgets_values": list(node.widgets), **NOTE_COLORS}
    definition = info[node.type]
    core = definition["python_module"] == "nodes"
    inputs = [{"name": spec.name, **({} if spec.required else {"shape": 7}), "type": spec.socket_type, "link": None}
              for spec in input_specs(definition) if not spec.is_widget]
    outputs = [{"name": name, "type": output_type, "links": None}
               for name, output_type in zip(definition["output_name"], definition["output"])]
    ui = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or SIZES[node.type]),
          "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
          "properties": {"Node name for S&R": node.type, "cnr_id": "comfy-core" if core else PACK_ID,
                         "ver": CORE_VERSION if core else PACK_VERSION},
          "widgets_values": list(node.widgets)}
    if node.title:
        ui["title"] = node.title
    return ui


def _execution_order(by_id: dict) -> list[int]:
    order, seen = [], set()

    def visit(node_id):
        if node_id not in seen:
            seen.add(node_id)
            for origin_id, _ in by_id[node_id].inputs.values():
                visit(origin_id)
            order.append(node_id)

    for node_id in sorted(by_id, key=lambda i: (bool(by_id[i].inputs), i)):
        visit(node_id)
    return order


# --- the shipped graphs --------------------------------------------------------------------------------

MODEL_NOTE = (
    "**Model:** download [zai-org/GLM-Image](https://huggingface.co/zai-org/GLM-Image) (the whole folder, "
    "with `model_index.json`) to `ComfyUI/models/glm_image/GLM-Image/`. Any folder under `models/glm_image/` "
    "or `models/diffusers/` shows up in **Load GLM-Image** (refresh with `r`).")
STAGES_NOTE = (
    "**AR Generate Tokens** (9B, slow: ~1300 tokens at 1024²) lays out the image as a token grid. "
    "**DiT Decode** (7B) paints it. ComfyUI caches the tokens: change only DiT settings (steps, guidance, "
    "its seed) and the AR stage is not run again. **Preview Tokens** shows the layout before the DiT runs.")
SIZE_NOTE = ("Sizes: multiples of 32 from 512 to 2048. Recommended: 1024×1024, 1280×1280, 1568×1056, 1056×1568, "
             "1472×1088, 1088×1472, 1728×960, 960×1728. Text in \"double quotes\" in the prompt is drawn as "
             "lettering.")


def _note(node_id, pos, title, text, size=(340, 440)):
    return Node(node_id, "MarkdownNote", pos, [text], title=title, size=size)


def _core_graph(prompt: str, references: list[str], ar_seed_mode: str, save_prefix: str):
    """Loader -> Encode (+ LoadImage references) -> AR -> Preview Tokens and DiT -> Save, ids 2..9 (+10.. refs)."""
    nodes = [
        Node(2, "GLMImageLoader", (40, 120), [DEFAULT_MODEL_FOLDER, "bf16"]),
        Node(3, "GLMImageEncode", (420, 120), [prompt, 1024, 1024], inputs={"model": (2, 0)}),
        Node(4, "GLMImageGenerateTokens", (870, 120), [42, ar_seed_mode, 0.9, 0.75, 50, 1],
             inputs={"model": (2, 0), "cond": (3, 0)}),
        Node(5, "GLMImagePreviewTokens", (870, 400), inputs={"tokens": (4, 0)}),
        Node(6, "PreviewImage", (870, 470), inputs={"images": (5, 0)}, title="Token layout", size=(330, 300)),
        Node(7, "GLMImageDiTDecode", (1250, 120), [50, 1.5, 0, "fixed"],
             inputs={"model": (2, 0), "cond": (3, 0), "tokens": (4, 0)}),
        Node(8, "SaveImage", (1630, 120), [save_prefix], inputs={"images": (7, 0)}),
    ]
    for index, filename in enumerate(references):
        node_id = 10 + index
        nodes.append(Node(node_id, "LoadImage", (40, 260 + 360 * index), [filename, "image"],
                          title=f"Reference {index + 1}"))
        nodes[1].inputs[f"image_{index + 1}"] = (node_id, 0)
    return nodes


def _stage_groups(reference_count: int):
    left_height = 250 + 360 * reference_count if reference_count else 160
    return [("1 · Model and references" if reference_count else "1 · Model", (20, 40, 360, left_height)),
            ("2 · Prompt and size", (400, 40, 440, 400)),
            ("3 · AR prior (tokens)", (850, 40, 370, 750)),
            ("4 · DiT decode", (1230, 40, 840, 570))]


def shipped_workflows(info: dict) -> dict[str, dict]:
    t2i = _core_graph(
        "A cozy bookshop storefront at dusk, warm light spilling onto a wet cobblestone street, a hand-painted "
        "wooden sign that reads \"GLM BOOKS\" above the door, photorealistic, 35mm photo", [], "randomize",
        "GLM-Image/t2i")
    t2i.append(_note(1, (40, 330), "Text to image", "\n\n".join(
        ["## GLM-Image: text to image", MODEL_NOTE, STAGES_NOTE, SIZE_NOTE])))

    edit = _core_graph(
        "Turn this photo into a soft watercolor painting, keep the composition and the subject's pose, and add "
        "the word \"Spring\" in elegant lettering in the sky", ["reference.png"], "randomize", "GLM-Image/edit")
    edit.append(_note(1, (40, 680), "Image edit", "\n\n".join([
        "## GLM-Image: edit one image",
        "Load the picture to edit in **Reference 1** and say in the prompt what to change. The reference's size "
        "does not have to match the output size; it is resized for the model.", MODEL_NOTE, STAGES_NOTE])))

    multi = _core_graph(
        "The cat from the first image and the dog from the second image sitting side by side on a red velvet "
        "sofa in a sunny living room, the hat from the third image on the dog's head, photorealistic",
        ["subject_1.png", "subject_2.png", "subject_3.png"], "randomize", "GLM-Image/multi_subject")
    multi.append(_note(1, (-420, 120), "Multi-subject", "\n\n".join([
        "## GLM-Image: combine subjects",
        "Each **Reference** is one subject; refer to them in the prompt by order (\"the first image\", ...). "
        "Up to four reference inputs; a batch of images in one input counts as several references. Every "
        "reference costs AR and DiT time.", MODEL_NOTE, STAGES_NOTE]), size=(400, 470)))

    reuse = _core_graph(
        "An isometric illustration of a tiny floating island with a lighthouse, waterfalls pouring into the "
        "clouds, a banner that says \"HELLO\", soft pastel colors", [], "fixed", "GLM-Image/reuse_a")
    next(node for node in reuse if node.id == 7).title = "DiT Decode · A (50 steps, guidance 1.5)"
    reuse += [
        Node(9, "GLMImageSaveTokens", (870, 820), ["glm_image_tokens/GLM-Image"], inputs={"tokens": (4, 0)}),
        Node(12, "GLMImageDiTDecode", (1250, 650), [50, 3.0, 0, "fixed"],
             inputs={"model": (2, 0), "cond": (3, 0), "tokens": (4, 0)},
             title="DiT Decode · B (guidance 3.0)"),
        Node(13, "SaveImage", (1630, 650), ["GLM-Image/reuse_b"], inputs={"images": (12, 0)}),
        Node(14, "GLMImageDiTDecode", (1250, 1180), [30, 1.5, 7, "fixed"],
             inputs={"model": (2, 0), "cond": (3, 0), "tokens": (4, 0)},
             title="DiT Decode · C (30 steps, other seed)"),
        Node(15, "SaveImage", (1630, 1180), ["GLM-Image/reuse_c"], inputs={"images": (14, 0)}),
        _note(1, (40, 330), "Token reuse", "\n\n".join([
            "## GLM-Image: one AR run, several decodes",
            "The AR seed is **fixed**, so after the first run ComfyUI answers **AR Generate Tokens** from its "
            "cache: only the DiT decodes run when you change their steps, guidance or seed.",
            "**Save Tokens** writes the grid to `output/glm_image_tokens/`. To decode it in a later session, "
            "replace AR Generate Tokens with **Load Tokens** and pick the file marked `[output]`; use the same "
            "size and references in Encode Prompt.", MODEL_NOTE]), size=(330, 560)),
    ]
    reuse_groups = _stage_groups(0)[:2] + [("3 · AR prior (tokens), saved", (850, 40, 370, 860)),
                                           ("4 · Three DiT decodes of the same tokens", (1230, 40, 840, 1660))]
    return {
        "text_to_image.json": build("text_to_image", t2i, _stage_groups(0), info),
        "image_edit.json": build("image_edit", edit, _stage_groups(1), info),
        "multi_subject.json": build("multi_subject", multi, _stage_groups(3), info),
        "token_reuse.json": build("token_reuse", reuse, reuse_groups, info),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        stubs = ComfyStubs(Path(scratch) / "comfyui")
        with stubs.installed():
            pack = load_pack(copy_pack(Path(scratch) / "custom_nodes"))
            try:
                info = object_info(pack)
                for filename, workflow in shipped_workflows(info).items():
                    text = json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"
                    (REPO_ROOT / "workflows" / filename).write_text(text)
                    print("wrote", filename)
            finally:
                unload_pack(pack)


if __name__ == "__main__":
    main()
