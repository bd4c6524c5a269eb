// GLM-Image token files in the ComfyUI frontend.
// - Save Tokens shows the file it wrote (the node's "text" UI output) in a read-only field on the node.
// - Load Tokens nodes in the open graph offer that file at once: the server lists new files on every
//   /object_info, but the frontend reads that only on a page load or a "Refresh Node Definitions" (r).
// Only the public extension API is used (app.registerExtension, node.onExecuted, node.addDOMWidget).
import { app } from "../../scripts/app.js";

const SAVE_TOKENS = "GLMImageSaveTokens";
const LOAD_TOKENS = "GLMImageLoadTokens";
const SAVED_FILE_WIDGET = "saved_file";
const TOKENS_FILE_INPUT = "tokens_file";

function showSavedFile(node, name) {
  let widget = node.widgets?.find((w) => w.name === SAVED_FILE_WIDGET);
  if (!widget) {
    const field = document.createElement("input");
    field.readOnly = true;
    field.style.cssText = "width: 100%; height: 22px; box-sizing: border-box; font-size: 11px; padding: 2px 6px;" +
      " background: transparent; color: inherit; border: 1px solid rgba(127, 127, 127, 0.5); border-radius: 4px;";
    // Not part of the node's settings: kept out of the saved workflow and of the queued prompt.
    widget = node.addDOMWidget(SAVED_FILE_WIDGET, "glm_image_saved_file", field, {
      serialize: false,
      getValue: () => field.value,
      setValue: (value) => { field.value = value; },
      getMinHeight: () => 26,
      getMaxHeight: () => 26,
    });
    widget.serialize = false;
    // Grow the node to make room for the field; the frontend lays DOM widgets out when it next draws.
    const grow = () => {
      const needed = node.computeSize();
      node.setSize([Math.max(node.size[0], needed[0]), Math.max(node.size[1], needed[1])]);
      node.setDirtyCanvas?.(true, true);
    };
    grow();
    requestAnimationFrame(grow);
  }
  widget.value = name;
  const field = widget.element;
  if (field) {
    field.value = name;
    field.title = name;
    field.scrollLeft = field.scrollWidth;  // a narrow node still shows the end: the counter and suffix
  }
  node.setDirtyCanvas?.(true, true);
}

function offerInLoadTokensNodes(graph, name) {
  for (const node of graph?._nodes ?? graph?.nodes ?? []) {
    if (node.comfyClass !== LOAD_TOKENS && node.type !== LOAD_TOKENS) continue;
    const widget = node.widgets?.find((w) => w.name === TOKENS_FILE_INPUT);
    const values = widget?.options?.values;
    if (!Array.isArray(values)) continue;
    if (!values.includes(name)) values.push(name);
    if (!widget.value) widget.value = name;  // the list was empty: nothing chosen yet
  }
}

app.registerExtension({
  name: "GLMImage.TokenFiles",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SAVE_TOKENS) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const name = output?.text?.[0];
      if (!name) return;
      showSavedFile(this, name);
      offerInLoadTokensNodes(this.graph ?? app.graph, name);
    };
  },
});
