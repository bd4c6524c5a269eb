"""glm_core's runtime must not depend on the reference GLM-Image classes, diffusers or ComfyUI, and a whole image
imports no transformers at all (its model machinery cost seconds of every cold start; glm_core.t5 replaces it)."""
import subprocess
import sys

from tests.paths import REPO_ROOT

CHECK = r"""
import sys
from glm_core.pipeline import GlmImage, decode, encode_prompt, generate_tokens
model = GlmImage.from_folder(sys.argv[1], device="cpu")
cond = encode_prompt(model, 'a sign that says "hi"', 512, 512)
tokens = generate_tokens(model, cond, seed=0)
images = decode(model, cond, tokens, steps=1)
assert images.shape == (1, 512, 512, 3), images.shape
bad = sorted(m for m in sys.modules
             if m.split(".")[0] in ("diffusers", "comfy", "folder_paths") or m.startswith("transformers.models.glm_image"))
print("FORBIDDEN:" + ",".join(bad))
print("TRANSFORMERS:" + str("transformers" in sys.modules))
"""


def test_pipeline_runs_without_reference_glm_classes_diffusers_or_comfyui(tiny_checkpoint):
    result = subprocess.run([sys.executable, "-c", CHECK, str(tiny_checkpoint)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    forbidden, transformers = result.stdout.strip().splitlines()[-2:]
    assert forbidden == "FORBIDDEN:", f"glm_core pulled in reference/host modules: {forbidden}"
    assert transformers == "TRANSFORMERS:False", "a whole image imported transformers (cold-start cost)"
