"""Writes the shipped UI-format (0.4) workflows in workflows/ from short graph descriptions.

Run `python -m tests.harness.workflow_builder` from the repository root after changing a node's inputs;
the widget order, socket types and slot indices then come from the node definitions themselves. The files
stay ordinary frontend workflows: opening one in ComfyUI and saving it again is fine.

Each workflow opens at a saved view (`extra.ds`) that shows the whole graph in a 1600x1000 browser window on
the frontends checked (1.27, 1.49, 1.58): `saved_view` fits the graph into SAFE_CANVAS_BOX.
"""
from __future__ import annotations

import json
import math
import tempfile
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .core_nodes import WORKFLOW_CORE_VERSION, object_info
from .loader import REPO_ROOT, copy_pack, load_pack, unload_pack
from .stubs import ComfyStubs
from .workflow import input_specs

PACK_ID = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"]
PACK_VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
CORE_VERSION = ".".join(map(str, WORKFLOW_CORE_VERSION))  # the oldest ComfyUI release the workflows load in
FRONTEND_VERSION = "1.27.10"  # the frontend that release ships
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}
DEFAULT_MODEL_FOLDER = "GLM-Image"

SIZES = {  # default node sizes: at least what the frontends compute for these widgets (they grow smaller ones)
    "GLMImageLoader": (400, 130), "GLMImageEncode": (400, 300), "GLMImageGenerateTokens": (330, 226),
    "GLMImageDiTDecode": (330, 170), "GLMImageSaveTokens": (330, 58), "GLMImagePreviewTokens": (250, 26),
    "LoadImage": (330, 326), "SaveImage": (380, 430), "PreviewImage": (330, 300),
}
NODE_TITLE_HEIGHT = 30  # drawn above a node's pos
# Where the graph goes at its saved view, in canvas pixels, for a 1600x1000 window. Frontend 1.27 places the
# canvas at (64, 78) beside its menus; 1.49 and 1.58 spread it under the whole window, with the side bar
# (x < 62), the breadcrumb and Run toolbar (y < 95) and the zoom controls (bottom right, y > 940) floating
# over it. This box is clear of all of them in both arrangements (the frontend check measures it).
SAFE_CANVAS_BOX = (75, 105, 1525, 860)  # left, top, right, bottom
MIN_READABLE_SCALE = 0.65


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
        "extra": {"ds": saved_view(nodes, groups), "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def graph_box(nodes: list[Node], groups) -> tuple[float, float, float, float]:
    """Left, top, right, bottom of every node (with its title bar) and group, in graph units."""
    boxes = [(n.pos[0], n.pos[1] - NODE_TITLE_HEIGHT, n.pos[0] + (n.size or SIZES[n.type])[0],
              n.pos[1] + (n.size or SIZES[n.type])[1]) for n in nodes]
    boxes += [(x, y, x + w, y + h) for _, (x, y, w, h) in groups]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def saved_view(nodes: list[Node], groups) -> dict:
    """`extra.ds`: the largest scale (in hundredths) at which the graph fits SAFE_CANVAS_BOX, centred across
    it and at its top. The frontend draws graph point p at canvas pixel (p + offset) * scale."""
    left, top, right, bottom = graph_box(nodes, groups)
    safe_left, safe_top, safe_right, safe_bottom = SAFE_CANVAS_BOX
    scale = int(100 * min((safe_right - safe_left) / (right - left), (safe_bottom - safe_top) / (bottom - top))) / 100
    if scale < MIN_READABLE_SCALE:
        raise ValueError(f"the graph ({right - left}x{bottom - top} units) fits the window only at scale {scale}; "
                         f"lay it out more compactly (node text is hard to read below {MIN_READABLE_SCALE})")
    spare = (safe_right - safe_left) - (right - left) * scale
    # Tenths of a unit, rounded up: the box's top and left stay inside (the scale leaves room at the far side).
    return {"scale": scale, "offset": [math.ceil(((safe_left + spare / 2) / scale - left) * 10) / 10,
                                       math.ceil((safe_top / scale - top) * 10) / 10]}


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


# Four columns, left to right: references (or a note), model + prompt, AR prior, DiT decode + save.
COLUMN_X = {"references": 40, "prompt": 420, "ar": 870, "dit": 1250, "save": 1630}
TOP = 120  # first node row (the group titles sit above it)
REFERENCE_PITCH = 360  # LoadImage is at least 326 high in every frontend checked, plus its title bar


def _core_graph(prompt: str, references: list[str], ar_seed_mode: str, save_prefix: str, save_size=None):
    """Loader -> Encode (+ LoadImage references) -> AR -> Preview Tokens and DiT -> Save, ids 2..9 (+10.. refs)."""
    nodes = [
        Node(2, "GLMImageLoader", (COLUMN_X["prompt"], TOP), [DEFAULT_MODEL_FOLDER, "bf16", "auto", "auto"]),
        Node(3, "GLMImageEncode", (COLUMN_X["prompt"], TOP + 180), [prompt, 1024, 1024], inputs={"model": (2, 0)}),
        Node(4, "GLMImageGenerateTokens", (COLUMN_X["ar"], TOP), [42, ar_seed_mode, 0.9, 0.75, 50, 1],
             inputs={"model": (2, 0), "cond": (3, 0)}),
        Node(5, "GLMImagePreviewTokens", (COLUMN_X["ar"], TOP + 280), inputs={"tokens": (4, 0)}),
        Node(6, "PreviewImage", (COLUMN_X["ar"], TOP + 350), inputs={"images": (5, 0)}, title="Token layout"),
        Node(7, "GLMImageDiTDecode", (COLUMN_X["dit"], TOP), [50, 1.5, 0, "fixed"],
             inputs={"model": (2, 0), "cond": (3, 0), "tokens": (4, 0)}),
        Node(8, "SaveImage", (COLUMN_X["save"], TOP), [save_prefix], inputs={"images": (7, 0)}, size=save_size),
    ]
    for index, filename in enumerate(references):
        node_id = 10 + index
        nodes.append(Node(node_id, "LoadImage", (COLUMN_X["references"], TOP + REFERENCE_PITCH * index),
                          [filename, "image"], title=f"Reference {index + 1}"))
        nodes[1].inputs[f"image_{index + 1}"] = (node_id, 0)
    return nodes


def _stage_groups(reference_count: int, ar_height: int = 750, dit_height: int = 530):
    groups = [("2 · Model, prompt and size", (400, 40, 440, 520)),
              ("3 · AR prior (tokens)", (850, 40, 370, ar_height)),
              ("4 · DiT decode", (1230, 40, 800, dit_height))]
    if reference_count:
        groups.insert(0, ("1 · References", (20, 40, 370, 60 + REFERENCE_PITCH * reference_count)))
    return groups


def shipped_workflows(info: dict) -> dict[str, dict]:
    t2i = _core_graph(
        "A cozy bookshop storefront at dusk, warm light spilling onto a wet cobblestone street, a hand-painted "
        "wooden sign that reads \"GLM BOOKS\" above the door, photorealistic, 35mm photo", [], "randomize",
        "GLM-Image/t2i")
    t2i.append(_note(1, (COLUMN_X["references"], TOP), "Text to image", "\n\n".join(
        ["## GLM-Image: text to image", MODEL_NOTE, STAGES_NOTE, SIZE_NOTE]), size=(340, 440)))

    edit = _core_graph(
        "Turn this photo into a soft watercolor painting, keep the composition and the subject's pose, and add "
        "the word \"Spring\" in elegant lettering in the sky", ["reference.png"], "randomize", "GLM-Image/edit")
    edit.append(_note(1, (COLUMN_X["references"], TOP + REFERENCE_PITCH + 60), "Image edit", "\n\n".join([
        "## GLM-Image: edit one image",
        "Load the picture to edit in **Reference 1** and say in the prompt what to change. The reference's size "
        "does not have to match the output size; it is resized for the model.", MODEL_NOTE, STAGES_NOTE]),
        size=(340, 420)))

    multi = _core_graph(
        "The cat from the first image and the dog from the second image sitting side by side on a red velvet "
        "sofa in a sunny living room, the hat from the third image on the dog's head, photorealistic",
        ["subject_1.png", "subject_2.png", "subject_3.png"], "randomize", "GLM-Image/multi_subject")
    multi.append(_note(1, (COLUMN_X["prompt"], TOP + 540), "Multi-subject", "\n\n".join([
        "## GLM-Image: combine subjects",
        "Each **Reference** is one subject; refer to them in the prompt by order (\"the first image\", ...). "
        "Up to four reference inputs; a batch of images in one input counts as several references. Every "
        "reference costs AR and DiT time.", MODEL_NOTE, STAGES_NOTE]), size=(400, 440)))

    reuse_save = (330, 300)
    row_pitch = reuse_save[1] + 40
    reuse = _core_graph(
        "An isometric illustration of a tiny floating island with a lighthouse, waterfalls pouring into the "
        "clouds, a banner that says \"HELLO\", soft pastel colors", [], "fixed", "GLM-Image/reuse_a", reuse_save)
    next(node for node in reuse if node.id == 7).title = "DiT Decode · A (50 steps, guidance 1.5)"
    reuse += [
        Node(9, "GLMImageSaveTokens", (COLUMN_X["ar"], TOP + 700), ["glm_image_tokens/GLM-Image"],
             inputs={"tokens": (4, 0)}),
        Node(12, "GLMImageDiTDecode", (COLUMN_X["dit"], TOP + row_pitch), [50, 3.0, 0, "fixed"],
             inputs={"model": (2, 0), "cond": (3, 0), "tokens": (4, 0)},
             title="DiT Decode · B (guidance 3.0)"),
        Node(13, "SaveImage", (COLUMN_X["save"], TOP + row_pitch), ["GLM-Image/reuse_b"], inputs={"images": (12, 0)},
             size=reuse_save),
        Node(14, "GLMImageDiTDecode", (COLUMN_X["dit"], TOP + 2 * row_pitch), [30, 1.5, 7, "fixed"],
             inputs={"model": (2, 0), "cond": (3, 0), "tokens": (4, 0)},
             title="DiT Decode · C (30 steps, other seed)"),
        Node(15, "SaveImage", (COLUMN_X["save"], TOP + 2 * row_pitch), ["GLM-Image/reuse_c"],
             inputs={"images": (14, 0)}, size=reuse_save),
        _note(1, (COLUMN_X["references"], TOP), "Token reuse", "\n\n".join([
            "## GLM-Image: one AR run, several decodes",
            "The AR seed is **fixed**, so after the first run ComfyUI answers **AR Generate Tokens** from its "
            "cache: only the DiT decodes run when you change their steps, guidance or seed.",
            "**Save Tokens** writes the grid to `output/glm_image_tokens/` and shows the file's name. To decode "
            "it in a later session, replace AR Generate Tokens with **Load Tokens** and pick the file marked "
            "`[output]`; use the same size and references in Encode Prompt.", MODEL_NOTE]), size=(340, 520)),
    ]
    reuse_groups = [("2 · Model, prompt and size", (400, 40, 440, 520)),
                    ("3 · AR prior (tokens), saved", (850, 40, 370, 900)),
                    ("4 · Three DiT decodes of the same tokens", (1230, 40, 750, 100 + 3 * row_pitch))]
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
