"""What a request may ask for: a prompt, the target size, a reference's shape, the DiT's steps and guidance, the AR's sampling
settings (spec §4, §6.21). Plain Python, no torch: the CLI checks a command line with these before it imports
anything heavy, so a typo is answered at once; the pipeline runs the same checks for every other caller.
"""
from __future__ import annotations

from numbers import Integral

# Target sizes the model card and the API document (spec §4).
MIN_TARGET_SIDE = 512
MAX_TARGET_SIDE = 2048
SIZE_MULTIPLE = 32  # one AR token per 32×32 pixels; the DiT needs H/8 even and = 2×grid (spec §4)
# smart_resize refuses references more elongated than this (spec §1.3 step 1).
MAX_REFERENCE_ASPECT = 4.0
# How the AR decoder's and the DiT blocks' linears are stored ("auto" picks one at load), and where the stages'
# weights stay between uses (glm_core.pipeline.GlmImage). The CLI, the loader node and the core read these.
WEIGHT_FORMATS = ("bf16", "fp8")
WEIGHT_CHOICES = ("auto", *WEIGHT_FORMATS)
PLACEMENTS = ("auto", "gpu", "sequential")


def _nearest_valid(value: int, lo: int, hi: int) -> list[int]:
    below = min(hi, max(lo, value // SIZE_MULTIPLE * SIZE_MULTIPLE))
    above = min(hi, max(lo, -(-value // SIZE_MULTIPLE) * SIZE_MULTIPLE))
    return sorted({below, above})


def validate_target_size(height, width, *, min_side: int = MIN_TARGET_SIDE,
                         max_side: int = MAX_TARGET_SIDE) -> None:
    """ValueError unless both sides are multiples of 32 within [min_side, max_side] (spec §4); every bad side is
    named with its nearest valid values. TypeError for sides that are not integers (numpy integers are).

    The defaults are the documented 512–2048 range; tiny test models may pass a smaller min_side.
    """
    wrong_types = [f"{name} must be an integer number of pixels, got {value!r}"
                   for name, value in (("width", width), ("height", height))
                   if isinstance(value, bool) or not isinstance(value, Integral)]
    if wrong_types:
        raise TypeError("; ".join(wrong_types))
    messages = []
    for name, value in (("width", width), ("height", height)):
        value = int(value)
        problems = []
        if value % SIZE_MULTIPLE:
            problems.append(f"is not a multiple of {SIZE_MULTIPLE}")
        if value < min_side:
            problems.append(f"is below the minimum {min_side}")
        if value > max_side:
            problems.append(f"is above the maximum {max_side}")
        if problems:
            nearest = " or ".join(str(v) for v in _nearest_valid(value, min_side, max_side))
            messages.append(f"{name} {value} {' and '.join(problems)} (nearest valid {name}: {nearest})")
    if messages:
        raise ValueError(f"{'; '.join(messages)}. GLM-Image needs multiples of {SIZE_MULTIPLE} between {min_side} "
                         f"and {max_side} pixels per side")


def reference_size(height: int, width: int, *, min_side: int = MIN_TARGET_SIDE,
                   max_side: int = MAX_TARGET_SIDE) -> tuple[int, int]:
    """(H, W) that `processor.adjust_reference_size` resizes an H×W image to (spec §4).

    Scale so the short side ≥ min_side and the long side ≤ max_side (no scaling if it already
    fits), then round each side to the nearest multiple of 32. Already-valid sizes are unchanged.
    Aspect ratio > 4 → ValueError.
    """
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_REFERENCE_ASPECT:
        raise ValueError(f"reference image {width}x{height} (WxH) has aspect ratio {aspect:.3f}, "
                         f"above the limit {MAX_REFERENCE_ASPECT:g}; crop it first")
    scale = 1.0
    if min(height, width) < min_side:
        scale = min_side / min(height, width)
    if max(height, width) * scale > max_side:
        scale = max_side / max(height, width)

    def side(value: float) -> int:
        rounded = int(round(value * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE
        return min(max_side, max(min_side, rounded))

    return side(height), side(width)


def check_prompt(prompt) -> None:
    """ValueError for an empty prompt (the control tokens are checked by the processor, which knows them)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image you want (quote any text to render, "
                         'e.g. a sign that says "OPEN").')


def check_decode_settings(steps, guidance) -> None:
    """ValueError naming every bad DiT setting (before any weight is read)."""
    problems = []
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not guidance >= 1.0:
        problems.append(f"guidance must be >= 1.0 (1.0 disables classifier-free guidance), got {guidance!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_sampling(temperature, top_p, top_k) -> None:
    """ValueError naming every bad AR sampling setting (`ar.config.Sampling.validate`)."""
    problems = []
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        problems.append(f"temperature must be > 0 (got {temperature!r})")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        problems.append(f"top_p must be in (0, 1] (got {top_p!r}; 1 turns it off)")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        problems.append(f"top_k must be an integer >= 0 (got {top_k!r}; 0 turns it off)")
    if problems:
        raise ValueError("bad sampling settings: " + "; ".join(problems))
