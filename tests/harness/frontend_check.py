"""Drive the real ComfyUI frontend (headless Chromium via Playwright) in a 1600x1000 window and report what it
shows of the pack.

Runs under the interpreter of a local ComfyUI install that has `playwright` (not this project's venv):

    python frontend_check.py BASE_URL CHROMIUM OUT_DIR PLAN.json

PLAN.json says what to look at; every part is optional:
- "workflows": [paths]. Per workflow, OUT_DIR/<name>.json with the node types the frontend does not know, the
  graph as it serializes it after loading (widget values), the API prompt of `app.graphToPrompt()`, browser
  console errors and the layout at the saved view (`extra.ds`): every node's and group's box in window pixels
  and the points of it that something else covers or that lie outside the window. OUT_DIR/<name>.view.png is
  the window. With "pictures": true also OUT_DIR/<name>.jpg, the graph cut out of that window (the shipped
  workflows/*.jpg).
- "search": {"query": ...}: the node search box's text for the query (OUT_DIR/search.png).
- "templates": {"module": ...}: the template browser's text after picking the pack (OUT_DIR/templates.png).
- "error": {"workflow": {...}}: queued from the page; the text of the error dialog or panel the frontend then
  shows, with its details opened (OUT_DIR/error.png).
- "tokens": {"workflow": {...}}: a Load Tokens node is added to the graph, the graph is queued from the page;
  then what Save Tokens shows, the Load Tokens choices, and what the page would save and queue now
  (OUT_DIR/tokens.png).
The answers go to OUT_DIR/report.json. Standard library + playwright only.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

WINDOW = {"width": 1600, "height": 1000}
READY = "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
LOAD = """async (workflow) => {
    const missing = [...new Set(workflow.nodes.map(n => n.type))]
        .filter(t => !(t in LiteGraph.registered_node_types));
    await app.loadGraphData(workflow, true, true, null,
                            {showMissingNodesDialog: false, showMissingModelsDialog: false});
    await new Promise(resolve => setTimeout(resolve, 800));
    return missing;
}"""
CONVERT = """async () => {
    const prompt = await app.graphToPrompt();
    return {serialized: app.graph.serialize(), output: prompt.output};
}"""
# Boxes of nodes (with title bars) and groups in window pixels at the current view, and the points on and
# inside each box's edge that the window does not show: outside it, or under something that is neither the
# canvas nor one of the graph's own DOM widgets (the menus, side bar and toolbars float over the canvas in
# newer frontends).
LAYOUT = """() => {
    const canvas = app.canvas.canvas, rect = canvas.getBoundingClientRect(), ds = app.canvas.ds;
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const widgetElements = [];
    for (const node of app.graph._nodes) for (const w of node.widgets ?? []) if (w.element) widgetElements.push(w.element);
    const shows = (x, y) => {
        if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) return false;
        const top = document.elementFromPoint(x, y);
        return top === canvas || widgetElements.some(e => e === top || e.contains(top));
    };
    const toWindow = (gx, gy) => [rect.left + (gx + ds.offset[0]) * ds.scale, rect.top + (gy + ds.offset[1]) * ds.scale];
    const measure = (label, gx, gy, gw, gh) => {
        const [left, top] = toWindow(gx, gy), [right, bottom] = toWindow(gx + gw, gy + gh);
        const hidden = [];
        const steps = (a, b) => { const n = Math.max(2, Math.ceil((b - a) / 40)); return [...Array(n + 1).keys()].map(i => a + (b - a) * i / n); };
        const inset = 3;
        for (const x of steps(left + inset, right - inset)) for (const y of [top + inset, bottom - inset])
            if (!shows(x, y)) hidden.push([Math.round(x), Math.round(y)]);
        for (const y of steps(top + inset, bottom - inset)) for (const x of [left + inset, right - inset])
            if (!shows(x, y)) hidden.push([Math.round(x), Math.round(y)]);
        return {label, box: [left, top, right, bottom].map(Math.round), hidden};
    };
    const items = [];
    for (const node of app.graph._nodes)
        items.push(measure(`node ${node.id} ${node.title}`, node.pos[0], node.pos[1] - title, node.size[0], node.size[1] + title));
    for (const group of app.graph._groups) {
        const [x, y, w, h] = group._bounding;
        items.push(measure(`group ${group.title}`, x, y, w, h));
    }
    return {ds: {scale: ds.scale, offset: [...ds.offset]}, canvas: [rect.left, rect.top, rect.width, rect.height],
            window: [innerWidth, innerHeight], items};
}"""
SAVED_FILE_WIDGET = "saved_file"


def check(base_url: str, chromium: str, out_dir: Path, plan: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=WINDOW, device_scale_factor=1)
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(base_url)
        page.wait_for_function(READY, timeout=120_000)
        page.wait_for_load_state("networkidle")
        report["frontend_version"] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        for path in map(Path, plan.get("workflows", [])):
            errors.clear()
            report.setdefault("workflows", {})[path.stem] = _workflow(page, path, out_dir, plan.get("pictures"))
            report["workflows"][path.stem]["console_errors"] = list(errors)
        if "search" in plan:
            report["search"] = _search(page, plan["search"]["query"], out_dir)
        if "templates" in plan:
            report["templates"] = _templates(page, plan["templates"]["module"], out_dir)
        if "tokens" in plan:
            report["tokens"] = _tokens(page, plan["tokens"]["workflow"], out_dir)
        if "error" in plan:
            report["error"] = _error(page, plan["error"]["workflow"], out_dir)
        browser.close()
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _workflow(page, path: Path, out_dir: Path, pictures: bool) -> dict:
    missing = page.evaluate(LOAD, json.loads(path.read_text()))
    page.wait_for_timeout(500)
    layout = page.evaluate(LAYOUT)
    page.screenshot(path=str(out_dir / f"{path.stem}.view.png"))
    if pictures:
        margin = 8  # stays clear of the toolbars floating over the canvas (SAFE_CANVAS_BOX has 10 px to spare)
        left = max(0, min(item["box"][0] for item in layout["items"]) - margin)
        top = max(0, min(item["box"][1] for item in layout["items"]) - margin)
        right = min(WINDOW["width"], max(item["box"][2] for item in layout["items"]) + margin)
        bottom = min(WINDOW["height"], max(item["box"][3] for item in layout["items"]) + margin)
        page.screenshot(path=str(out_dir / f"{path.stem}.jpg"), type="jpeg", quality=85,
                        clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
    return {"missing": missing, "layout": layout, **page.evaluate(CONVERT)}


def _open_node_search(page) -> None:
    """Double-click an empty spot of an empty graph: the frontend opens its node search box."""
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(500)
    page.mouse.dblclick(WINDOW["width"] // 2, WINDOW["height"] // 2)
    page.wait_for_timeout(1000)


def _search(page, query: str, out_dir: Path) -> dict:
    _open_node_search(page)
    page.keyboard.type(query, delay=40)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out_dir / "search.png"))
    text = page.evaluate("() => document.body.innerText")
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    return {"text": text}


def _templates(page, module: str, out_dir: Path) -> dict:
    page.get_by_text("Templates", exact=True).first.click()
    page.wait_for_timeout(2500)
    page.get_by_text(module).first.click()  # the pack's entry (its folder name) in the dialog's list
    page.wait_for_timeout(2500)
    page.screenshot(path=str(out_dir / "templates.png"))
    text = page.evaluate("() => document.body.innerText")
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    return {"text": text}


def _queue_from_page(page, timeout_s: float = 300) -> dict:
    """What the Run button does (convert the graph, POST it with this page's client id); returns the prompt's
    /history entry once it has finished."""
    before = page.evaluate("async () => Object.keys(await (await fetch('/history')).json())")
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = page.evaluate("""async (before) => {
            const history = await (await fetch('/history')).json();
            const fresh = Object.entries(history).filter(([id]) => !before.includes(id));
            const done = fresh.find(([, entry]) => entry.status &&
                (entry.status.completed || entry.status.status_str === 'error'));
            return done ? done[1] : null;
        }""", before)
        if done:
            page.wait_for_timeout(1500)  # the last websocket messages reach the page
            return done
        page.wait_for_timeout(1000)
    raise TimeoutError(f"the prompt queued from the page did not finish within {timeout_s} s")


def _tokens(page, workflow: dict, out_dir: Path) -> dict:
    page.evaluate(LOAD, workflow)
    page.evaluate("""() => {
        const node = LiteGraph.createNode('GLMImageLoadTokens');
        node.pos = [40, 900];
        app.graph.add(node);
    }""")
    before = page.evaluate("""() => app.graph._nodes.find(n => n.type === 'GLMImageLoadTokens')
        .widgets.find(w => w.name === 'tokens_file').options.values.slice()""")
    entry = _queue_from_page(page)
    page.screenshot(path=str(out_dir / "tokens.png"))
    state = page.evaluate(f"""async () => {{
        const save = app.graph._nodes.find(n => n.type === 'GLMImageSaveTokens');
        const load = app.graph._nodes.find(n => n.type === 'GLMImageLoadTokens');
        const shown = save.widgets.find(w => w.name === '{SAVED_FILE_WIDGET}');
        const prompt = await app.graphToPrompt();
        return {{
            shown: shown ? (shown.element?.value ?? shown.value) : null,
            shown_visible: shown?.element ? shown.element.getBoundingClientRect().height > 0 : null,
            load_choices: load.widgets.find(w => w.name === 'tokens_file').options.values.slice(),
            save_widgets_values: save.serialize().widgets_values,
            save_prompt_inputs: Object.keys(prompt.output[String(save.id)].inputs).sort(),
        }};
    }}""")
    return {"status": entry["status"]["status_str"], "choices_before": before, **state}


def _error(page, workflow: dict, out_dir: Path) -> dict:
    page.evaluate(LOAD, workflow)
    entry = _queue_from_page(page)
    # 1.27 opens a dialog with the message; 1.49 and later show a toast whose "View details" opens the
    # error panel with the report.
    details = page.get_by_text("View details")
    opened = details.count() > 0
    if opened:
        details.first.click()
        page.wait_for_timeout(1500)
    page.screenshot(path=str(out_dir / "error.png"))
    text = page.evaluate("() => document.body.innerText")
    page.keyboard.press("Escape")
    return {"status": entry["status"]["status_str"], "details_opened": opened, "text": text}


if __name__ == "__main__":
    check(sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(Path(sys.argv[4]).read_text()))
