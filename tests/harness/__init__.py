"""A small in-repo stand-in for the parts of ComfyUI the node pack meets: the custom-node loader, stub
runtime modules (folder_paths, comfy.utils, comfy.model_management), `/object_info`, workflow validation,
UI -> API conversion and a caching executor. See README.md in this folder."""
from .core_nodes import UI_ONLY_TYPES, class_mappings, object_info
from .executor import Executor, PromptError, RunResult, reported_type_name
from .loader import LoadedPack, PackLoadError, copy_pack, load_pack, unload_pack
from .stubs import ComfyStubs, InterruptProcessingException
from .workflow import input_specs, ui_to_api, validate_prompt, validate_ui_workflow

__all__ = [
    "UI_ONLY_TYPES", "class_mappings", "object_info", "Executor", "PromptError", "RunResult", "reported_type_name",
    "LoadedPack",
    "PackLoadError", "copy_pack", "load_pack", "unload_pack", "ComfyStubs", "InterruptProcessingException",
    "input_specs", "ui_to_api", "validate_prompt", "validate_ui_workflow",
]
