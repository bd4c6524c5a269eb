"""Workflow JSON: check UI-format (0.4) workflows and API prompts against `/object_info` node definitions, and
convert UI format to API format.

Works from the `/object_info` dict alone, so the same checks run on the harness's export and on a real
server's. Written from the documented formats (ComfyUI docs: workflow JSON 0.4, the API prompt format and
the server's validation error types), not from ComfyUI code.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from .core_nodes import UI_ONLY_TYPES

PRIMITIVE_WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_AFTER_GENERATE_VALUES = ("fixed", "increment", "decrement", "randomize")
LEGACY_SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these INTs by name too
NODE_REQUIRED_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


@dataclass
class InputSpec:
    name: str
    type: object  # "INT", "IMAGE", ... or a list of combo options
    options: dict
    required: bool

    @property
    def is_combo(self) -> bool:
        return isinstance(self.type, list) or self.type == "COMBO"

    @property
    def combo_options(self) -> list:
        return self.type if isinstance(self.type, list) else list(self.options.get("options", []))

    @property
    def is_widget(self) -> bool:
        return (self.is_combo or self.type in PRIMITIVE_WIDGET_TYPES) and not self.options.get("forceInput")

    @property
    def socket_type(self) -> str:
        return "COMBO" if self.is_combo else self.type

    @property
    def extra_widget_values(self) -> int:
        """Values the frontend stores after this widget's own: the seed control mode, the upload button."""
        control = self.type == "INT" and (self.options.get("control_after_generate")
                                          or self.name in LEGACY_SEED_NAMES)
        return int(bool(control)) + int(bool(self.options.get("image_upload")))


def input_specs(info: dict) -> list[InputSpec]:
    """The node's visible inputs (required, then optional) in the order the frontend lays them out."""
    specs = []
    for section in ("required", "optional"):
        entries = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(entries)):
            input_type, *rest = entries[name]
            specs.append(InputSpec(name, input_type, rest[0] if rest else {}, section == "required"))
    return specs


def types_compatible(received: str, expected: str) -> bool:
    """ComfyUI's link rule: equal, "*" on either side, or overlapping comma-separated type sets."""
    if received == expected or "*" in (received, expected):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def value_error(spec: InputSpec, value) -> str | None:
    """Why `value` does not fit widget `spec` (type, min/max, combo options), or None."""
    if spec.is_combo:
        options = spec.combo_options
        return None if value in options else f"value_not_in_list: {spec.name}: {value!r} not in {options}"
    checks = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "STRING": lambda v: isinstance(v, str),
              "BOOLEAN": lambda v: isinstance(v, bool)}
    if not checks[spec.type](value):
        return f"invalid_input_type: {spec.name}: {value!r} is not a {spec.type}"
    if "min" in spec.options and value < spec.options["min"]:
        return f"value_smaller_than_min: {spec.name}: {value} < {spec.options['min']}"
    if "max" in spec.options and value > spec.options["max"]:
        return f"value_bigger_than_max: {spec.name}: {value} > {spec.options['max']}"
    return None


# --- UI format -----------------------------------------------------------------------------------------

@dataclass
class UiNodeWidgets:
    """A UI node's widget values matched to input names (control/upload values separated out)."""
    values: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # name -> the extra stored values (e.g. ["randomize"])
    errors: list = field(default_factory=list)


def match_widgets(node: dict, info: dict) -> UiNodeWidgets:
    result = UiNodeWidgets()
    widgets = [spec for spec in input_specs(info) if spec.is_widget]
    stored = node.get("widgets_values", [])
    if isinstance(stored, dict):  # some nodes store {name: value}
        result.values = {spec.name: stored[spec.name] for spec in widgets if spec.name in stored}
        return result
    expected = sum(1 + spec.extra_widget_values for spec in widgets)
    # A workflow saved before the node gained optional widgets at the end stores fewer values: the frontend keeps
    # those widgets' defaults (and queues them), so the file still loads.
    while len(stored) < expected and widgets and not widgets[-1].required and not widgets[-1].extra_widget_values:
        missing = widgets.pop()
        result.values[missing.name] = missing.options.get("default", (missing.combo_options or [None])[0])
        expected -= 1
    if len(stored) != expected:
        result.errors.append(f"widgets_values has {len(stored)} entries, the definition needs {expected} "
                             f"({', '.join(spec.name for spec in widgets)} + control/upload values)")
        return result
    position = 0
    for spec in widgets:
        result.values[spec.name] = stored[position]
        result.extras[spec.name] = stored[position + 1: position + 1 + spec.extra_widget_values]
        position += 1 + spec.extra_widget_values
    return result


def validate_ui_workflow(workflow: dict, object_info: dict, *, check_combos: bool = True) -> list[str]:
    """Every problem that would stop the frontend from loading the graph or the server from running it."""
    errors = []
    for key, kind in (("last_node_id", (int, str)), ("last_link_id", (int, float)), ("nodes", list),
                      ("links", list)):
        if not isinstance(workflow.get(key), kind):
            errors.append(f"top level: {key!r} missing or not {kind}")
    if workflow.get("version") != 0.4:
        errors.append(f"top level: version is {workflow.get('version')!r}, expected 0.4")
    if errors:
        return errors

    nodes = {}
    for node in workflow["nodes"]:
        missing = [key for key in NODE_REQUIRED_KEYS if key not in node]
        if missing:
            errors.append(f"node {node.get('id')}: missing keys {missing}")
        if node.get("id") in nodes:
            errors.append(f"node {node.get('id')}: duplicate id")
        nodes[node.get("id")] = node
    if nodes and max(nodes) > workflow["last_node_id"]:
        errors.append(f"last_node_id {workflow['last_node_id']} < highest node id {max(nodes)}")

    links = {}
    for link in workflow["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            errors.append(f"link {link!r}: expected [id, origin, origin_slot, target, target_slot, type]")
            continue
        if link[0] in links:
            errors.append(f"link {link[0]}: duplicate id")
        links[link[0]] = link
    if links and max(links) > workflow["last_link_id"]:
        errors.append(f"last_link_id {workflow['last_link_id']} < highest link id {max(links)}")

    for link_id, origin_id, origin_slot, target_id, target_slot, link_type in links.values():
        where = f"link {link_id} ({origin_id}:{origin_slot} -> {target_id}:{target_slot})"
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            errors.append(f"{where}: refers to a missing node")
            continue
        if origin_slot >= len(origin.get("outputs", [])) or target_slot >= len(target.get("inputs", [])):
            errors.append(f"{where}: slot index out of range")
            continue
        output, input_ = origin["outputs"][origin_slot], target["inputs"][target_slot]
        if link_id not in (output.get("links") or []):
            errors.append(f"{where}: origin output {output['name']!r} does not list the link")
        if input_.get("link") != link_id:
            errors.append(f"{where}: target input {input_['name']!r} does not point back at the link")
        if not (types_compatible(output["type"], input_["type"]) and types_compatible(link_type, input_["type"])):
            errors.append(f"{where}: type {output['type']} -> {input_['type']} (link says {link_type})")

    for node in nodes.values():
        errors += [f"node {node['id']} ({node['type']}): {e}"
                   for e in _validate_ui_node(node, links, object_info, check_combos)]
    return errors


def _validate_ui_node(node, links, object_info, check_combos) -> list[str]:
    if node["type"] in UI_ONLY_TYPES:
        return []
    info = object_info.get(node["type"])
    if info is None:
        return ["unknown node type (not in /object_info): missing custom node?"]
    errors = []
    if node.get("properties", {}).get("Node name for S&R") != node["type"]:
        errors.append("properties['Node name for S&R'] does not match the type")
    specs = {spec.name: spec for spec in input_specs(info)}
    for input_ in node.get("inputs", []):
        spec = specs.get(input_["name"])
        if spec is None:
            errors.append(f"input {input_['name']!r} is not in the definition")
        elif not types_compatible(input_["type"], spec.socket_type):
            errors.append(f"input {input_['name']!r} has type {input_['type']}, the definition says {spec.socket_type}")
    connected = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    for spec in specs.values():
        if spec.required and not spec.is_widget and spec.name not in connected:
            errors.append(f"required input {spec.name!r} is not connected")
    for slot, output in enumerate(node.get("outputs", [])):
        if slot >= len(info["output"]) or not types_compatible(output["type"], info["output"][slot]):
            errors.append(f"output {slot} {output['name']!r}: type {output['type']} does not match the definition")
    widgets = match_widgets(node, info)
    errors += widgets.errors
    for name, value in widgets.values.items():
        if name in connected:
            continue  # a widget converted to an input: its stored value is not used
        spec = specs[name]
        if spec.is_combo and not check_combos:
            continue
        problem = value_error(spec, value)
        if problem:
            errors.append(problem)
        for extra in widgets.extras.get(name, []):
            if spec.type == "INT" and extra not in CONTROL_AFTER_GENERATE_VALUES:
                errors.append(f"{name}: control_after_generate value {extra!r} not in {CONTROL_AFTER_GENERATE_VALUES}")
    return errors


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue: UI-only nodes dropped, muted nodes dropped, bypassed nodes
    wired through, widget values by name (control/upload values left out), links as [node_id, slot]."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(link_id, wanted_type):
        """(origin id, slot) behind a link, skipping bypassed nodes like the frontend does."""
        _, origin_id, origin_slot, *_ = links[link_id]
        origin = nodes[origin_id]
        if origin["mode"] == MODE_BYPASS:
            for input_ in origin.get("inputs", []):
                if input_.get("link") is not None and types_compatible(input_["type"], wanted_type):
                    return source_of(input_["link"], wanted_type)
            return None
        if origin["mode"] == MODE_NEVER:
            return None
        return [str(origin_id), origin_slot]

    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["order"]):
        if node["type"] in UI_ONLY_TYPES or node["mode"] in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs = dict(match_widgets(node, info).values)
        for input_ in node.get("inputs", []):
            if input_.get("link") is not None:
                source = source_of(input_["link"], input_["type"])
                if source is not None:
                    inputs[input_["name"]] = source
                else:
                    inputs.pop(input_["name"], None)
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title", info["display_name"])}}
    return prompt


# --- API format ----------------------------------------------------------------------------------------

def validate_prompt(prompt: dict, object_info: dict, class_mappings: dict | None = None) -> list[dict]:
    """What the server's /prompt validation would report, as {node_id, type, details} dicts.

    With the node classes (`class_mappings`), a node's VALIDATE_INPUTS runs as on the server: the inputs it
    names skip the type, range and combo-list checks and are judged by it instead (True, or a message that
    becomes a custom_validation_failed error)."""
    errors = []
    outputs = [node_id for node_id, node in prompt.items()
               if object_info.get(node.get("class_type"), {}).get("output_node")]
    if not outputs:
        errors.append({"node_id": None, "type": "prompt_no_outputs", "details": "prompt has no output nodes"})
    for node_id, node in prompt.items():
        info = object_info.get(node.get("class_type"))
        if info is None:
            errors.append({"node_id": node_id, "type": "invalid_prompt",
                           "details": f"class_type {node.get('class_type')!r} is not a registered node"})
            continue
        custom = _custom_validation(class_mappings, node)
        for spec in input_specs(info):
            if spec.name not in node["inputs"]:
                if spec.required:
                    errors.append({"node_id": node_id, "type": "required_input_missing", "details": spec.name})
                continue
            value = node["inputs"][spec.name]
            if isinstance(value, list):
                errors += _link_errors(prompt, object_info, node_id, spec, value)
                continue
            if custom and spec.name in custom.inputs:
                continue
            value = _coerce(spec, value)
            problem = value_error(spec, value) if value is not None else (
                f"invalid_input_type: {spec.name}: cannot convert to {spec.type}")
            if problem:
                kind, _, details = problem.partition(": ")
                errors.append({"node_id": node_id, "type": kind, "details": details})
        if custom:
            errors += custom.run(node_id, node)
    return errors


@dataclass
class _CustomValidation:
    """A node class's VALIDATE_INPUTS and the input names it takes."""
    function: object
    inputs: list

    def run(self, node_id: str, node: dict) -> list[dict]:
        from .loader import as_in_comfyui  # the pack's code runs where only its relative imports work

        constants = {name: value for name, value in node["inputs"].items()
                     if name in self.inputs and not isinstance(value, list)}
        with as_in_comfyui():
            verdict = self.function(**constants)
        if verdict is True:
            return []
        return [{"node_id": node_id, "type": "custom_validation_failed",
                 "details": ", ".join(constants) + ("" if verdict is False else f" - {verdict}")}]


def _custom_validation(class_mappings: dict | None, node: dict) -> _CustomValidation | None:
    function = getattr((class_mappings or {}).get(node.get("class_type")), "VALIDATE_INPUTS", None)
    if function is None:
        return None
    return _CustomValidation(function, [name for name in inspect.signature(function).parameters])


def _coerce(spec: InputSpec, value):
    """The server converts widget values to the declared type before range checks."""
    converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
    if spec.is_combo or spec.type not in converters:
        return value
    try:
        return converters[spec.type](value)
    except (TypeError, ValueError):
        return None


def _link_errors(prompt, object_info, node_id, spec, value) -> list[dict]:
    if len(value) != 2:
        return [{"node_id": node_id, "type": "bad_linked_input", "details": spec.name}]
    origin_id, slot = value
    origin = prompt.get(str(origin_id))
    origin_info = object_info.get(origin["class_type"]) if origin else None
    if origin_info is None or not isinstance(slot, int) or not 0 <= slot < len(origin_info["output"]):
        return [{"node_id": node_id, "type": "bad_linked_input", "details": f"{spec.name}: {value}"}]
    received = origin_info["output"][slot]
    if not types_compatible(received, spec.socket_type):
        return [{"node_id": node_id, "type": "return_type_mismatch",
                 "details": f"{spec.name}, received_type({received}) mismatch input_type({spec.socket_type})"}]
    return []
