"""Run under a real ComfyUI's interpreter: our nodes against ComfyUI's own model management, on the CPU.

    <COMFYUI_PYTHON> tests/harness/model_management_check.py <ComfyUI dir> <pack folder> <models dir> <out.json>

Imports the real `comfy.model_management` and `comfy.model_patcher` (as `main.py --cpu` configures them),
loads the pack from <pack folder> the way ComfyUI's loader does (a module named after its path), points the
`glm_image` model folder at <models dir> (which holds GLM-Image/), then runs Load -> Encode -> AR -> DiT by
calling the node functions, and records what ComfyUI's loaded-model list says after each step, after
`unload_all_models()`, after a partial unload request, after the next run, after the model object is dropped
(the loader still holds it, and hands it back), and once the loader's hold ends. Writes the findings as JSON for tests/nodes/test_real_comfyui.py to check. Nothing here imports
this repository's packages.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import logging
import sys
from pathlib import Path


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(comfyui_dir: str, pack_folder: str, models_dir: str, out_path: str) -> None:
    sys.path.insert(0, comfyui_dir)
    sys.argv = [str(Path(comfyui_dir) / "main.py"), "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.model_patcher  # noqa: F401  (what the pack imports at run time)
    import folder_paths
    import torch

    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)

    folder = Path(pack_folder)
    module_name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(module_name, folder / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = pack
    spec.loader.exec_module(pack)
    folder_paths.add_model_folder_path("glm_image", models_dir)
    nodes = pack.NODE_CLASS_MAPPINGS

    def ours():
        """{stage: facts} for every patcher of our pack on ComfyUI's loaded list."""
        found = {}
        for entry in mm.current_loaded_models:
            patcher = entry.model
            holder = getattr(patcher, "model", None)
            if patcher is None or not hasattr(holder, "stage_module"):
                continue
            found[holder.stage_name] = {
                "holder": type(holder).__name__, "patcher": type(patcher).__name__,
                "is_model_patcher": isinstance(patcher, comfy.model_patcher.ModelPatcher),
                "entry_device": str(entry.device), "load_device": str(patcher.load_device),
                "offload_device": str(patcher.offload_device), "loaded_size": patcher.loaded_size(),
                "model_size": patcher.model_size(), "currently_used": entry.currently_used,
                "is_dead": entry.is_dead(), "lowvram": bool(holder.model_lowvram),
                "weight_devices": sorted({str(p.device) for p in holder.parameters()}),
                "same_module": holder.stage_module is model.stage_modules().get(holder.stage_name)}
        return found

    report: dict = {"torch_device": str(mm.get_torch_device()), "offload_device": str(mm.unet_offload_device()),
                    "cpu_state": mm.cpu_state.name, "vram_state": mm.vram_state.name}
    (model,) = nodes["GLMImageLoader"]().load("GLM-Image", "fp32")
    (cond,) = nodes["GLMImageEncode"]().encode(model, 'a red fox holding a sign "HELLO"', 512, 512)
    (tokens,) = nodes["GLMImageGenerateTokens"]().generate(model, cond, 11, 0.9, 0.75, 50, 1)
    report["after_ar"] = ours()
    (first,) = nodes["GLMImageDiTDecode"]().decode(model, cond, tokens, 2, 1.5, 5)
    report["after_dit"] = ours()
    report["stage_module_attributes"] = {
        stage: sorted(name for name in ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
                                        "current_weight_patches_uuid") if name in vars(module))
        for stage, module in model.stage_modules().items()}

    # Another node needs everything: ComfyUI unloads all models on its device, ours included.
    mm.unload_all_models()
    report["after_unload_all"] = ours()
    report["devices_after_unload_all"] = {stage: sorted({str(p.device) for p in module.parameters()})
                                          for stage, module in model.stage_modules().items()}

    # The next run brings them back and gives the same image.
    (tokens_again,) = nodes["GLMImageGenerateTokens"]().generate(model, cond, 11, 0.9, 0.75, 50, 1)
    (second,) = nodes["GLMImageDiTDecode"]().decode(model, cond, tokens_again, 2, 1.5, 5)
    report["after_rerun"] = ours()
    report["same_tokens"] = bool(torch.equal(tokens.grid_ids, tokens_again.grid_ids))
    report["same_image"] = bool(torch.equal(first, second))

    # ComfyUI's partial unload (what free_memory does when it needs only part of a model's memory).
    dit_entry = next(e for e in mm.current_loaded_models if getattr(e.model.model, "stage_name", "") == "dit")
    report["partial_unload_returned"] = dit_entry.model_unload(memory_to_free=1)
    if report["partial_unload_returned"]:
        mm.current_loaded_models.remove(dit_entry)  # what free_memory does with a fully unloaded model
    report["after_partial_unload"] = ours()
    (third,) = nodes["GLMImageDiTDecode"]().decode(model, cond, tokens, 2, 1.5, 5)
    report["same_image_after_partial"] = bool(torch.equal(first, third))
    report["after_partial_rerun"] = ours()

    # The loader's output dropped (ComfyUI's cache released it): the loader still holds the model for a while
    # (nodes/recent_model.py), so a loader that runs again gets it back and our entries stay listed; once that
    # hold ends, they leave the loaded list.
    def our_entries() -> int:
        gc.collect()
        mm.cleanup_models_gc()
        return len([e for e in mm.current_loaded_models if hasattr(getattr(e.model, "model", None), "stage_module")])

    held_id = id(model)
    del model, cond, tokens, tokens_again, dit_entry
    report["after_model_dropped_held"] = our_entries()
    (again,) = nodes["GLMImageLoader"]().load("GLM-Image", "fp32")
    report["loader_again_same_model"] = id(again) == held_id
    del again
    sys.modules[f"{module_name}.nodes.recent_model"].let_go()
    report["after_model_dropped"] = our_entries()
    report["warnings"] = warnings.messages
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
