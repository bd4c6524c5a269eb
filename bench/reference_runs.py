"""The reference timed whole: diffusers' `GlmImagePipeline` (with transformers' AR inside) on a checkpoint folder.

- Load: `GlmImagePipeline.from_pretrained(folder, dtype=...)` (diffusers 0.42's name for `torch_dtype`), on the
  device.
- Warm-up, cheap: a short AR `generate` (a few new tokens) on the text-to-image and the editing prompt, and one
  pipeline step with given prior tokens, with and without a reference image (glyph encoder, DiT, VAE, K/V write).
- Text to image: ONE whole `pipe(prompt, height, width, num_inference_steps, guidance_scale)` call. Its AR part is
  the `generate` inside it (timed by a wrapper), its DiT steps come from `callback_on_step_end` timestamps.
- Editing: the pipeline's own prior generation is broken for editing with transformers 5.23 (spec §6.26), so the
  edit is timed as its two halves, each whole: the AR (the processor, the reference image's VQ ids as the pipeline
  means to compute them, `generate` for the edit prompt) plus the pipeline call given those prior tokens.

Two guards that only random weights need, both inside the timed calls and counted in the report: `generate` runs
with `min_new_tokens = max_new_tokens` (random logits can sample the end-of-image id early), and generated ids
outside the DiT's codebook (the AR head covers 16512 ids, the codebook 16384; random weights sample the rest) are
folded into it before the DiT sees them (else an index error kills the CUDA context). Neither changes the cost.
"""

from __future__ import annotations

import gc

import torch

from bench import workloads
from bench.harness import Deadline, Laps, log


class TimedGenerate:
    """Stands in for `pipe.vision_language_encoder.generate`: the same call, timed between synchronisations, with
    the two random-weight guards of the module docstring."""

    def __init__(self, model, codebook_size: int, device: torch.device):
        self.inner, self.codebook_size, self.device = model.generate, codebook_size, device
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("min_new_tokens", kwargs.get("max_new_tokens"))
        laps = Laps(self.device)
        out = self.inner(*args, **kwargs)
        prompt_length = kwargs["input_ids"].shape[1]
        generated = out[:, prompt_length:]
        outside = generated >= self.codebook_size
        outside[:, -1] = False  # the end-of-image marker's place, after the grid: the pipeline never reads it
        if bool(outside.any()):
            out = out.clone()
            out[:, prompt_length:] = torch.where(outside, generated % self.codebook_size, generated)
        self.calls.append({"seconds": laps.lap(), "new_tokens": int(generated.shape[1]),
                           "ids_outside_codebook": int(outside.sum())})
        return out


class StepClock:
    """`callback_on_step_end` that times each denoising step from the previous step's end (after a sync)."""

    def __init__(self, device: torch.device):
        self.device, self.laps, self.steps = device, None, []

    def __call__(self, pipe, step, timestep, tensors: dict) -> dict:
        if self.laps is None:  # the first step's end: what came before it is set-up, not a step
            self.laps = Laps(self.device)
        else:
            self.steps.append(self.laps.lap())
        return tensors

    def seconds_per_step(self) -> float | None:
        """Mean over the steps after the first one (None with fewer than two steps)."""
        return sum(self.steps) / len(self.steps) if self.steps else None


def load_pipeline(folder, device: torch.device, dtype: torch.dtype):
    import diffusers.utils.logging
    import transformers.utils.logging
    from diffusers import GlmImagePipeline

    transformers.utils.logging.disable_progress_bar()  # per-shard bars would bury the bench's log
    diffusers.utils.logging.disable_progress_bar()

    pipe = GlmImagePipeline.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _chat_inputs(pipe, prompt: str, width: int, height: int, images=()):
    """The processor's AR inputs, built as the pipeline's `generate_prior_tokens` builds them."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    return pipe.processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True, padding=False,
                                              target_h=height, target_w=width, return_dict=True,
                                              return_tensors="pt").to(pipe._execution_device)


def edit_prior_tokens(pipe, prompt: str, image, width: int, height: int, seed: int,
                      max_new_tokens: int | None = None) -> dict:
    """The edit's AR half, as `generate_prior_tokens` means it (spec §6.26, fixture-notes §7): the reference's VQ
    ids through `get_image_tokens(get_image_features(...).pooler_output)`, then `generate` for the edit prompt.
    Returns the keyword arguments the pipeline takes instead of generating (None values with `max_new_tokens`,
    a warm-up)."""
    model = pipe.vision_language_encoder
    inputs = _chat_inputs(pipe, prompt, width, height, [image])
    grids = inputs["image_grid_thw"]  # (2, 3): the reference's grid, then the target's
    source = grids[:1]
    features = model.get_image_features(inputs["pixel_values"], source, return_dict=True).pooler_output
    image_ids = model.get_image_tokens(features)  # (gh·gw,) the reference's codebook ids
    _, target_h, target_w = (int(v) for v in grids[-1])
    torch.manual_seed(seed)  # what the pipeline does with its generator's seed
    out = model.generate(**inputs, max_new_tokens=max_new_tokens or target_h * target_w + 1, do_sample=True)
    if max_new_tokens is not None:
        return {}
    large = out[0, inputs["input_ids"].shape[1]:][: target_h * target_w]
    _, source_h, source_w = (int(v) for v in source[0])
    return {"prior_token_ids": pipe._upsample_token_ids(large, target_h, target_w),
            "prior_token_image_ids": [pipe._upsample_token_ids(image_ids, source_h, source_w)[0]],
            "source_image_grid_thw": [torch.tensor([[1, 2 * source_h, 2 * source_w]], device=large.device)]}


def _random_prior(pipe, width: int, height: int, seed: int, device) -> torch.Tensor:
    codebook = int(pipe.transformer.config.prior_vq_quantizer_codebook_size)
    grid = torch.randint(0, codebook, ((height // 32) * (width // 32),), generator=torch.Generator().manual_seed(seed))
    return pipe._upsample_token_ids(grid.to(device), height // 32, width // 32)


def warm_up(pipe, sizes: workloads.E2ESizes, seed: int) -> None:
    """Cheap: CUDA context, cuBLAS / cuDNN handles and the allocator warmed on every path the timed calls take."""
    width, height = sizes.t2i
    device = pipe._execution_device
    model = pipe.vision_language_encoder
    torch.manual_seed(seed)
    model.generate(**_chat_inputs(pipe, workloads.T2I_PROMPT, width, height), max_new_tokens=8, do_sample=True)
    image = workloads.reference_image(*sizes.edit_reference, seed)
    edit_prior_tokens(pipe, workloads.EDIT_PROMPT, image, width, height, seed, max_new_tokens=8)
    pipe(prompt=workloads.T2I_PROMPT, height=height, width=width, num_inference_steps=1,
         guidance_scale=sizes.guidance, prior_token_ids=_random_prior(pipe, width, height, seed, device),
         generator=_generator(device, seed))
    ref_w, ref_h = sizes.edit_reference
    pipe(prompt=workloads.EDIT_PROMPT, image=[image], height=height, width=width, num_inference_steps=1,
         guidance_scale=sizes.guidance, prior_token_ids=_random_prior(pipe, width, height, seed, device),
         prior_token_image_ids=[_random_prior(pipe, ref_w, ref_h, seed + 1, device)[0]],
         source_image_grid_thw=[torch.tensor([[1, ref_h // 16, ref_w // 16]], device=device)],
         generator=_generator(device, seed))


def text_to_image(pipe, sizes: workloads.E2ESizes, size: tuple[int, int], seed: int) -> dict:
    """One whole `pipe(...)` call: its seconds, and the AR and per-step figures from inside it."""
    width, height = size
    device = pipe._execution_device
    model = pipe.vision_language_encoder
    timed = TimedGenerate(model, int(pipe.transformer.config.prior_vq_quantizer_codebook_size), device)
    clock = StepClock(device)
    model.generate = timed
    try:
        laps = Laps(device)
        image = pipe(prompt=workloads.T2I_PROMPT, height=height, width=width, num_inference_steps=sizes.steps,
                     guidance_scale=sizes.guidance, generator=_generator(device, seed),
                     callback_on_step_end=clock).images[0]
        total = laps.lap()
    finally:
        del model.generate  # the instance attribute goes; the class's generate is back
    if image.size != (width, height):
        raise RuntimeError(f"the reference pipeline returned a {image.size} image, expected {(width, height)}")
    (call,) = timed.calls
    return {"total_s": total, "ar_s": call["seconds"], "ar_tokens": call["new_tokens"],
            "ids_outside_codebook": call["ids_outside_codebook"], "dit_s_per_step": clock.seconds_per_step(),
            "rest_s": total - call["seconds"]}


def edit(pipe, sizes: workloads.E2ESizes, seed: int) -> dict:
    """An edit with one reference: its AR half and the pipeline call given those tokens, each timed whole."""
    width, height = sizes.t2i
    device = pipe._execution_device
    image = workloads.reference_image(*sizes.edit_reference, seed)
    model = pipe.vision_language_encoder
    timed = TimedGenerate(model, int(pipe.transformer.config.prior_vq_quantizer_codebook_size), device)
    model.generate = timed
    try:
        laps = Laps(device)
        prior = edit_prior_tokens(pipe, workloads.EDIT_PROMPT, image, width, height, seed)
        ar_s = laps.lap()
    finally:
        del model.generate
    clock = StepClock(device)
    laps = Laps(device)
    pipe(prompt=workloads.EDIT_PROMPT, image=[image], height=height, width=width, num_inference_steps=sizes.steps,
         guidance_scale=sizes.guidance, generator=_generator(device, seed), callback_on_step_end=clock, **prior)
    pipeline_s = laps.lap()
    (call,) = timed.calls
    return {"total_s": ar_s + pipeline_s, "ar_s": ar_s, "pipeline_s": pipeline_s, "ar_tokens": call["new_tokens"],
            "ids_outside_codebook": call["ids_outside_codebook"], "dit_s_per_step": clock.seconds_per_step()}


def phase_reference(b, clock: Deadline) -> None:
    """Load, warm up, one whole text-to-image run, one edit; the pipeline is freed at the end (GPU memory)."""
    sizes, seed = b.sizes, b.args.seed
    b.reset_peak()
    laps = Laps(b.device)
    pipe = load_pipeline(b.folder, b.device, b.dtype)
    b.record("reference", "load_s", laps.lap())
    try:
        warm_up(pipe, sizes, seed)
        b.record("reference", "warm_up_s", laps.lap())
        run = text_to_image(pipe, sizes, sizes.t2i, seed + 1)
        b.record("reference", "e2e_s_t2i_1024", run["total_s"], run)
        b.record("reference", "ar_s_t2i_1024", run["ar_s"])
        b.record("reference", "ar_ms_per_token", 1e3 * run["ar_s"] / run["ar_tokens"])
        b.record("reference", "dit_s_per_step_1024", run["dit_s_per_step"])
        b.record("reference", "decode_s_t2i_1024", run["rest_s"])
        b.count_outside_codebook(run["ids_outside_codebook"])
        if not b.fits(clock, run["total_s"], "the reference edit"):
            return
        run = edit(pipe, sizes, seed + 2)
        b.record("reference", "e2e_s_edit_1024", run["total_s"], run)
        b.record("reference", "ar_s_edit_1024", run["ar_s"])
        b.count_outside_codebook(run["ids_outside_codebook"])
        b.record("reference", "peak_gb", b.peak())
    finally:
        del pipe
        gc.collect()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  reference pipeline freed ({b.allocated()} GB still allocated)", b.deadline)
