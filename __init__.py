"""GLM-Image for ComfyUI: the entry point ComfyUI's loader imports (classic V1 node contract).

ComfyUI imports this file as a package under a name taken from its folder, which can be anything
(ComfyUI-Manager names it after the registry id), so everything below is a relative import. Importing
it touches no GPU, loads no weights and needs no ComfyUI: the nodes import glm_core and ComfyUI's
services only when they run.
"""
if __package__:  # imported as a package: ComfyUI's loader, the test harness
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # executed as a plain module (no parent package for the relative imports): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# Frontend extension served by ComfyUI (web/token_files.js: Save Tokens shows the file it wrote).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
