"""Run an API prompt like ComfyUI's executor: only output nodes and their ancestors, in topological order, with
an output cache keyed by each node's input signature, so a node whose inputs (and ancestors) did not change is
not run again. Interrupts arrive as the stubbed InterruptProcessingException and end the run cleanly.

Written from ComfyUI's documented execution contract (V1 nodes: INPUT_TYPES, FUNCTION, RETURN_TYPES,
OUTPUT_NODE, IS_CHANGED, results as a tuple or {"ui", "result"}); not ComfyUI code.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .loader import as_in_comfyui
from .stubs import InterruptProcessingException


class PromptError(ValueError):
    """The prompt cannot run (validation failed, cycle, missing node)."""


@dataclass
class RunResult:
    status: str  # "success", "interrupted" or "error"
    executed: list[str] = field(default_factory=list)  # node ids actually run, in order
    cached: list[str] = field(default_factory=list)  # node ids answered from the cache
    outputs: dict = field(default_factory=dict)  # node id -> tuple of output values
    ui: dict = field(default_factory=dict)  # node id -> the node's "ui" dict
    error: BaseException | None = None
    error_node: str | None = None

    @property
    def exception_type(self) -> str | None:
        """The error's type as the server's `execution_error` message names it."""
        return None if self.error is None else reported_type_name(type(self.error))


def reported_type_name(exception_class: type) -> str:
    """ComfyUI's name for an exception class in its error reports: `<module>.<qualname>`, the bare qualname for
    builtins. Inside ComfyUI a custom node's module name starts with the pack folder's absolute path."""
    module = exception_class.__module__
    return exception_class.__qualname__ if module == "builtins" else f"{module}.{exception_class.__qualname__}"


class Executor:
    """One "server": keeps node instances and the output cache between prompts, like ComfyUI does."""

    def __init__(self, class_mappings: dict):
        self.class_mappings = class_mappings
        self._instances: dict[tuple[str, str], object] = {}
        self._cache: dict[str, tuple[str, tuple]] = {}  # node id -> (signature, outputs)
        self._runs = 0

    def cached_node_ids(self) -> set[str]:
        """Nodes whose outputs the cache holds (a failed or interrupted node is never among them)."""
        return set(self._cache)

    # -- graph --------------------------------------------------------------------------------------

    def _order(self, prompt: dict) -> list[str]:
        """Output nodes and their ancestors, each after everything it reads (depth-first, cycle check)."""
        outputs = [node_id for node_id, node in prompt.items()
                   if getattr(self._class(prompt, node_id), "OUTPUT_NODE", False)]
        if not outputs:
            raise PromptError("prompt has no output nodes")
        order, state = [], {}

        def visit(node_id, path):
            if state.get(node_id) == "done":
                return
            if state.get(node_id) == "visiting":
                raise PromptError(f"dependency cycle through nodes {path + [node_id]}")
            state[node_id] = "visiting"
            for value in prompt[node_id]["inputs"].values():
                if _is_link(value):
                    if str(value[0]) not in prompt:
                        raise PromptError(f"node {node_id} reads missing node {value[0]}")
                    visit(str(value[0]), path + [node_id])
            state[node_id] = "done"
            order.append(node_id)

        for node_id in sorted(outputs, key=_numeric_id):
            visit(node_id, [])
        return order

    def _class(self, prompt, node_id):
        class_type = prompt[node_id]["class_type"]
        if class_type not in self.class_mappings:
            raise PromptError(f"node {node_id}: class_type {class_type!r} is not registered")
        return self.class_mappings[class_type]

    def _signature(self, prompt: dict, node_id: str, memo: dict) -> str:
        """Class, IS_CHANGED value and constant inputs of the node and, recursively, of its ancestors."""
        if node_id in memo:
            return memo[node_id]
        node = prompt[node_id]
        node_class = self._class(prompt, node_id)
        parts = {"class_type": node["class_type"], "inputs": {}}
        for name, value in sorted(node["inputs"].items()):
            parts["inputs"][name] = ([self._signature(prompt, str(value[0]), memo), value[1]]
                                     if _is_link(value) else value)
        if hasattr(node_class, "IS_CHANGED"):
            constants = {k: v for k, v in node["inputs"].items() if not _is_link(v)}
            changed = node_class.IS_CHANGED(**constants)
            # NaN never equals itself: ComfyUI re-runs such a node every time.
            if isinstance(changed, float) and math.isnan(changed):
                parts["is_changed"] = f"nan, run {self._runs}"
            else:
                parts["is_changed"] = repr(changed)
        memo[node_id] = json.dumps(parts, sort_keys=True, default=repr)
        return memo[node_id]

    # -- run ----------------------------------------------------------------------------------------

    def run(self, prompt: dict) -> RunResult:
        with as_in_comfyui():  # the pack's code runs where only its relative imports work
            return self._run(prompt)

    def _run(self, prompt: dict) -> RunResult:
        self._runs += 1
        order = self._order(prompt)
        signatures: dict = {}
        result = RunResult(status="success")
        for node_id in order:
            signature = self._signature(prompt, node_id, signatures)
            cached = self._cache.get(node_id)
            if cached is not None and cached[0] == signature:
                result.outputs[node_id] = cached[1]
                result.cached.append(node_id)
                continue
            try:
                outputs, ui = self._run_node(prompt, node_id, result.outputs)
            except InterruptProcessingException as exc:
                self._cache.pop(node_id, None)
                result.status, result.error, result.error_node = "interrupted", exc, node_id
                return result
            except Exception as exc:  # ComfyUI reports the node's error and keeps serving
                self._cache.pop(node_id, None)
                result.status, result.error, result.error_node = "error", exc, node_id
                return result
            self._cache[node_id] = (signature, outputs)
            result.outputs[node_id] = outputs
            result.executed.append(node_id)
            if ui is not None:
                result.ui[node_id] = ui
        return result

    def _run_node(self, prompt, node_id, available):
        node = prompt[node_id]
        node_class = self._class(prompt, node_id)
        key = (node_id, node["class_type"])
        if key not in self._instances:
            self._instances[key] = node_class()
        kwargs = {}
        for name, value in node["inputs"].items():
            kwargs[name] = available[str(value[0])][value[1]] if _is_link(value) else value
        hidden = node_class.INPUT_TYPES().get("hidden", {})
        for name, kind in hidden.items():
            kwargs[name] = {"PROMPT": prompt, "UNIQUE_ID": node_id, "EXTRA_PNGINFO": None}.get(kind)
        returned = getattr(self._instances[key], node_class.FUNCTION)(**kwargs)
        if isinstance(returned, dict):
            outputs, ui = tuple(returned.get("result", ())), returned.get("ui")
        else:
            outputs, ui = tuple(returned), None
        if len(outputs) != len(node_class.RETURN_TYPES):
            raise PromptError(f"node {node_id} ({node['class_type']}) returned {len(outputs)} values, "
                              f"RETURN_TYPES has {len(node_class.RETURN_TYPES)}")
        return outputs, ui


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _numeric_id(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
