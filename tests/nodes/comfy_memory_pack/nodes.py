"""The memory test nodes (see the package docstring). Imported only inside ComfyUI."""
from __future__ import annotations

import math

import torch

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.ops

GB = 1e9
BIG_MODEL = "MEMTEST_MODEL"


class MemoryTestWeights(torch.nn.Module):
    """`layers` square bf16 linears of ComfyUI's own op class; the class name is what ComfyUI's log prints."""

    def __init__(self, layers: int, width: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # One random layer, the others row-rotated copies of it: distinct storage of the full size at copy speed
        # (drawing 8 GB of random numbers on the CPU takes tens of seconds).
        base = torch.empty(width, width, dtype=torch.bfloat16).uniform_(-1.0 / math.sqrt(width),
                                                                        1.0 / math.sqrt(width), generator=generator)
        self.blocks = torch.nn.ModuleList()
        for index in range(layers):
            linear = comfy.ops.disable_weight_init.Linear(width, width, bias=False, device="cpu",
                                                           dtype=torch.bfloat16)
            # Assigned, not copied into: with dynamic VRAM on, ComfyUI's op classes build no weight (it comes
            # later from a state dict), so `linear.weight` is None here.
            linear.weight = torch.nn.Parameter(torch.roll(base, shifts=index, dims=0), requires_grad=False)
            self.blocks.append(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.nn.functional.normalize(block(x).float(), dim=-1).to(x.dtype) * math.sqrt(x.shape[-1])
        return x


def _patcher_class():
    # CoreModelPatcher is what ComfyUI's own loaders use: main.py points it at the dynamic-VRAM patcher
    # when dynamic VRAM is on. Older ComfyUI has only ModelPatcher.
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def _make_room_within(budget_gb: float, device: torch.device, incoming_bytes: int) -> None:
    """Emulate a device of `budget_gb`: ask ComfyUI to free what keeps loaded + incoming bytes within it."""
    if budget_gb <= 0:
        return
    loaded = sum(m.model_loaded_memory() for m in model_management.current_loaded_models if m.device == device)
    excess = loaded + incoming_bytes - budget_gb * GB
    if excess > 0:
        model_management.free_memory(model_management.get_free_memory(device) + excess, device)


def _loaded_models() -> list[dict]:
    entries = []
    for loaded in model_management.current_loaded_models:
        patcher = loaded.model
        if patcher is None:
            continue
        module = patcher.model
        stage_module = getattr(module, "stage_module", module)
        entries.append({
            "model": type(module).__name__,
            "patcher": type(patcher).__name__,
            "dynamic": bool(getattr(patcher, "is_dynamic", lambda: False)()),
            "device": str(loaded.device),
            "loaded_bytes": int(patcher.loaded_size()),
            "model_bytes": int(patcher.model_size()),
            "currently_used": bool(loaded.currently_used),
            # Same id before and after an eviction = the weights were not read from disk again.
            "module_id": id(stage_module),
        })
    return entries


def memory_report(reset_peak: bool = False) -> dict:
    device = model_management.get_torch_device()
    report = {
        "torch_device": str(device),
        "vram_state": getattr(model_management.vram_state, "name", str(model_management.vram_state)),
        "dynamic_vram": bool(getattr(getattr(comfy, "memory_management", None), "aimdo_enabled", False)),
        "core_patcher": _patcher_class().__name__,
        "loaded_models": _loaded_models(),
        "free_bytes": int(model_management.get_free_memory(device)),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        report.update(cuda_free_bytes=int(free), cuda_total_bytes=int(total),
                      torch_allocated_bytes=int(torch.cuda.memory_allocated(device)),
                      torch_reserved_bytes=int(torch.cuda.memory_reserved(device)),
                      torch_peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)))
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
    return report


class MemoryTestBigModel:
    DESCRIPTION = "Test only: a model of size_gb bf16 weights registered with ComfyUI's model management."
    CATEGORY = "testing/memory"
    RETURN_TYPES = (BIG_MODEL,)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "size_gb": ("FLOAT", {"default": 8.0, "min": 0.001, "max": 512.0, "step": 0.001}),
            "width": ("INT", {"default": 8192, "min": 64, "max": 65536}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffff}),
        }}

    def build(self, size_gb: float, width: int, seed: int):
        layers = max(1, round(size_gb * GB / (width * width * 2)))
        patcher = _patcher_class()(MemoryTestWeights(layers, width, seed),
                                   load_device=model_management.get_torch_device(),
                                   offload_device=model_management.unet_offload_device())
        return (patcher,)


class MemoryTestUseBigModel:
    DESCRIPTION = "Test only: load the big model through load_models_gpu and run a matmul over every weight."
    CATEGORY = "testing/memory"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "use"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (BIG_MODEL,),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffff}),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.001}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # a competing model is used on every queue

    def use(self, model, seed: int, budget_gb: float):
        device = model.load_device
        _make_room_within(budget_gb, device, model.model_size())
        model_management.load_models_gpu([model])
        generator = torch.Generator().manual_seed(seed)
        width = model.model.blocks[0].weight.shape[1]
        x = torch.randn(16, width, generator=generator).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            checksum = float(model.model(x).float().sum())
        if not math.isfinite(checksum):
            raise RuntimeError(f"memory test model produced {checksum}")
        return {"ui": {"memory_report": [memory_report()], "checksum": [checksum]}}


class MemoryTestFreeMemory:
    DESCRIPTION = ("Test only: ask ComfyUI's model management for room on the torch device, as load_models_gpu "
                   "does before a GPU load (it does not on a CPU device).")
    CATEGORY = "testing/memory"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "free"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "incoming_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.001}),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.001}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def free(self, incoming_gb: float, budget_gb: float):
        _make_room_within(budget_gb, model_management.get_torch_device(), int(incoming_gb * GB))
        return {"ui": {"memory_report": [memory_report()]}}


class MemoryTestReport:
    DESCRIPTION = ("Test only: what ComfyUI's model management holds now, and the device's memory figures. Link "
                   "the `after_*` inputs to the images of the workflow it is added to, so it runs last (as a node of "
                   "that workflow it does not make ComfyUI's cache drop the workflow's outputs, as a separate "
                   "prompt would).")
    CATEGORY = "testing/memory"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reset_peak": ("BOOLEAN", {"default": False})},
                "optional": {f"after_{i}": ("IMAGE",) for i in range(1, 5)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def report(self, reset_peak: bool, **after):
        return {"ui": {"memory_report": [memory_report(reset_peak)]}}


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (MemoryTestBigModel, MemoryTestUseBigModel,
                                                     MemoryTestFreeMemory, MemoryTestReport)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MemoryTestBigModel": "Memory Test: Big Model",
    "MemoryTestUseBigModel": "Memory Test: Use Big Model",
    "MemoryTestFreeMemory": "Memory Test: Free Memory",
    "MemoryTestReport": "Memory Test: Report",
}
