"""Open workflows in the real ComfyUI frontend (headless Chromium via Playwright) and report what it makes of them.

Runs under the interpreter of a local ComfyUI install that has `playwright` (not this project's venv):

    python frontend_check.py BASE_URL CHROMIUM OUT_DIR WORKFLOW.json [...]

For each workflow it writes OUT_DIR/<name>.json with: node types the frontend does not know, the graph as the
frontend serializes it after loading (to compare widget values), the API prompt from `app.graphToPrompt()`,
and browser console errors; plus OUT_DIR/<name>.jpg, a picture of the graph. Standard library + playwright only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

LOAD_AND_CONVERT = """async (workflow) => {
    const missing = [...new Set(workflow.nodes.map(n => n.type))]
        .filter(t => !(t in LiteGraph.registered_node_types));
    await app.loadGraphData(workflow, true, true, null,
                            {showMissingNodesDialog: false, showMissingModelsDialog: false});
    await new Promise(resolve => setTimeout(resolve, 500));
    const prompt = await app.graphToPrompt();
    return {missing, serialized: app.graph.serialize(), output: prompt.output};
}"""
# Zoom the canvas so every node and group fits with a margin; return the canvas area to photograph.
FIT_GRAPH = """() => {
    const box = [Infinity, Infinity, -Infinity, -Infinity];
    const grow = (x, y, w, h) => { box[0] = Math.min(box[0], x); box[1] = Math.min(box[1], y);
                                   box[2] = Math.max(box[2], x + w); box[3] = Math.max(box[3], y + h); };
    for (const node of app.graph._nodes) grow(node.pos[0], node.pos[1] - 30, node.size[0], node.size[1] + 30);
    for (const group of app.graph._groups) grow(...group._bounding);
    const rect = app.canvas.canvas.getBoundingClientRect(), margin = 24;
    const width = box[2] - box[0], height = box[3] - box[1];
    const scale = Math.min(1.0, (rect.width - 2 * margin) / width, (rect.height - 2 * margin) / height);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [margin / scale - box[0], margin / scale - box[1]];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return {x: rect.x, y: rect.y, width: Math.ceil(width * scale + 2 * margin),
            height: Math.ceil(height * scale + 2 * margin)};
}"""
READY = "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"


def check(base_url: str, chromium: str, out_dir: Path, workflows: list[Path]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2560, "height": 1440}, device_scale_factor=1)
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(base_url)
        page.wait_for_function(READY, timeout=120_000)
        page.wait_for_load_state("networkidle")
        for path in workflows:
            errors.clear()
            result = page.evaluate(LOAD_AND_CONVERT, json.loads(path.read_text()))
            page.wait_for_timeout(500)
            clip = page.evaluate(FIT_GRAPH)
            page.wait_for_timeout(300)
            page.screenshot(path=str(out_dir / f"{path.stem}.jpg"), type="jpeg", quality=85, clip=clip)
            result["console_errors"] = list(errors)
            (out_dir / f"{path.stem}.json").write_text(json.dumps(result, indent=1))
        browser.close()


if __name__ == "__main__":
    check(sys.argv[1], sys.argv[2], Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]])
