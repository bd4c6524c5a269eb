"""A test-only ComfyUI node pack: another model competing with GLM-Image for the device, and a report of what
ComfyUI's model management holds. Used by bench/comfy_queue.py and tests/nodes/test_real_comfyui_memory.py;
never shipped (it lives under tests/, which .comfyignore keeps out of the registry zip).

Nodes (V1 contract, like the pack under test):
- Memory Test: Big Model (MemoryTestBigModel): a model of `size_gb` bf16 weights in ComfyUI's own linear layers
  (`comfy.ops.disable_weight_init.Linear`, what native models are built from), wrapped in
  `comfy.model_patcher.CoreModelPatcher`: the dynamic-VRAM patcher when ComfyUI runs with dynamic VRAM, the
  classic ModelPatcher otherwise, exactly as ComfyUI's own loaders choose. Built once; ComfyUI caches it.
- Memory Test: Use Big Model (MemoryTestUseBigModel): `load_models_gpu([patcher])`, then a chain of matmuls over
  every weight on the load device. Runs on every queue.
- Memory Test: Free Memory (MemoryTestFreeMemory): asks `comfy.model_management.free_memory` for room on the
  torch device. ComfyUI's `load_models_gpu` never frees memory for a CPU device, so a CPU run uses this node to
  make the request a GPU load would make (see `budget_gb` below).
- Memory Test: Report (MemoryTestReport): ComfyUI's loaded-model list and the device's memory figures, returned
  in the node's UI output (so they land in /history), optionally resetting the peak counters.

`budget_gb` (Use Big Model and Free Memory): 0 leaves every decision to ComfyUI's own accounting (the GPU case).
A positive value emulates a device of that size: before loading, the node asks ComfyUI to free as much as
keeps everything loaded on the device plus what is about to load within the budget; ComfyUI picks what to evict.
"""
from __future__ import annotations

try:
    import comfy.model_management  # noqa: F401
except ImportError:  # outside ComfyUI: nothing to register
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
