"""Socket types of the pack (short CAPS names, like ComfyUI's own) and the menu category."""

CATEGORY = "GLM-Image"

GLM_IMAGE_MODEL = "GLM_IMAGE_MODEL"  # glm_core.pipeline.GlmImage (stages load lazily)
GLM_IMAGE_COND = "GLM_IMAGE_COND"  # glm_core.pipeline.Conditioning: prompt, size, size-adjusted references
GLM_IMAGE_TOKENS = "GLM_IMAGE_TOKENS"  # glm_core PriorTokens: the AR result the DiT decodes
