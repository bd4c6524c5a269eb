"""Full-size bf16 parity on the GPU: glm_core (bf16) against the reference computed in fp32, next to
the reference's own bf16 error on the same inputs (the yardstick, ../shared/reference/bf16-yardstick.md).

    python -m bench.parity_fullsize --out DIR     # real configuration, one GPU, a few minutes
    python -m bench.parity_fullsize --tiny        # tiny configuration on the CPU (smoke test)
    python -m bench.parity_fullsize --model DIR   # real weights from a GLM-Image folder
    python -m bench.parity_fullsize --only glyph  # one phase (or several, comma-separated)

Per the yardstick's rules:
- the same bf16-representable weights on every side (random bf16 values; an fp32 reference holds them
  exactly); the fp32 reference runs with TF32 off;
- the bf16 reference is made like `from_pretrained(dtype=bfloat16)`: parameters cast, buffers (the
  rotary inv_freq) kept in fp32; glm_core then shares those very bf16 tensors;
- the AR is judged by teacher-forced logits over a whole 1024² text-to-image generation (prompt + 1280
  forced codebook ids = 1281 logit rows), with the reference's positions from `get_rope_index` +
  `_cached_decode_position_ids`; ours uses its own positions (checked equal to the reference's);
- rel = ‖test − fp32‖ / ‖fp32‖ over the whole tensor, plus per-row median / max for the AR, top-1
  agreement overall and by the fp32 top-2 margin (> 0.05, > 0.1, > 0.25), mean KL(fp32 ‖ test) at T = 0.9.

Phases (one at a time, GPU freed in between): ar (fp32 reference 40 GB → cast in place to bf16
20 GB → ours shares it), dit (28 GB → 14 GB), vae, glyph (ByT5 encoder, 0.9 GB in fp32). Results are
written after every comparison. The glyph phase loads both sides from a folder (--model's, else a random-weight
text_encoder/ written to a temporary folder), so that ours goes through glm_core's own loader and T5
(`load_glyph_encoder`) and the reference through `T5EncoderModel.from_pretrained` + the pipeline's `encode_prompt`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/parity_fullsize.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import harness, models, workloads  # noqa: E402
from bench.harness import Deadline, PhaseRunner, Report, fmt, log  # noqa: E402

FP32, BF16 = torch.float32, torch.bfloat16
MARGINS = (0.05, 0.1, 0.25)
KL_TEMPERATURE = 0.9
# Each phase's share of --budget-s, renormalised over the phases --only selects. The glyph phase runs last: by
# then transformers / diffusers are imported and the GPU is warm, and its ~20 s cannot delay the big phases.
PHASE_SHARE = {"ar": 0.55, "dit": 0.25, "vae": 0.12, "glyph": 0.08}

# The reference's own bf16-vs-fp32 error as measured on 2026-11-26 (bf16-yardstick.md), for the table.
YARDSTICK_DOC = {
    "ar.teacher_forced": "2.43e-2 (1281 rows), top-1 0.946",
    "ar.prefill": "≈2.5e-2",
    "dit.cond": "1.26e-2", "dit.uncond": "1.26e-2", "dit.guided": "1.83e-2",
    "vae.decode": "1.9e-2 – 2.5e-2, PSNR 48.9–49.3 dB",
    "glyph.embeds": "not measured there (this run's reference_bf16 row is the yardstick)",
}

# Prompts as users write them for text rendering: English in straight double quotes, Chinese in corner brackets
# (three UTF-8 bytes, so three ByT5 ids, per character). Each holds two texts, so the reference's leading-pad
# quirk (spec §6.13) is in play: 81 and 61 glyph tokens.
GLYPH_PROMPTS = (
    'A vintage travel poster of a lighthouse on a rocky coast at dusk, the headline "VISIT THE NORTHERN LIGHTS '
    'COAST" in bold capitals at the top and "Ferries daily from Harbor Pier 3, 9 AM to 6 PM" in small print at '
    'the bottom',
    "一家咖啡店门口的手写黑板菜单，顶部写着「今日推荐」，下面写着「燕麦拿铁 28元 / 手冲耶加雪菲 35元」，粉笔字，暖色灯光",
)


# --------------------------------------------------------------------------------------------
# Comparisons


def strict_fp32() -> None:
    """fp32 reference numbers: no TF32 anywhere (bf16-yardstick.md)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def compare(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """rel / max abs of `test` against the fp32 `ref` (same shape), on the CPU in fp32."""
    test, ref = test.detach().float().cpu(), ref.detach().float().cpu()
    if test.shape != ref.shape:
        raise ValueError(f"shape mismatch: test {tuple(test.shape)} vs reference {tuple(ref.shape)}")
    finite = bool(torch.isfinite(test).all())
    diff = test - ref
    return {"rel": (diff.norm() / ref.norm()).item() if finite else float("nan"),
            "max_abs": diff.abs().max().item() if finite else float("nan"),
            "ref_std": ref.std().item(), "finite": finite}


def compare_logits(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """Logit rows (R, V): whole-tensor rel, per-row rel median / max, top-1 agreement overall and by
    fp32 margin band, mean KL(fp32 ‖ test) at T = 0.9."""
    out = compare(test, ref)
    test, ref = test.detach().float().cpu(), ref.detach().float().cpu()
    row_rel = (test - ref).norm(dim=-1) / ref.norm(dim=-1)
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = test.argmax(-1) == ref.argmax(-1)
    log_p = torch.log_softmax(ref / KL_TEMPERATURE, dim=-1)
    log_q = torch.log_softmax(test / KL_TEMPERATURE, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    out.update({
        "rows": int(ref.shape[0]),
        "row_rel_median": row_rel.median().item(),
        "row_rel_max": row_rel.max().item(),
        "top1": agree.float().mean().item(),
        "top1_by_margin": {f">{m}": {"agreement": agree[margin > m].float().mean().item()
                                     if bool((margin > m).any()) else None,
                                     "rows": int((margin > m).sum())} for m in MARGINS},
        "kl_t09_mean": kl.mean().item(),
    })
    return out


def compare_images(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """VAE outputs in [-1, 1]: rel on the raw output, PSNR and worst pixel (/255) on the [0, 1] image."""
    out = compare(test, ref)
    a = (test.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    b = (ref.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    mse = ((a - b) ** 2).mean().item()
    out["psnr_db"] = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
    out["worst_pixel_255"] = ((a - b).abs().max() * 255).item()
    return out


# --------------------------------------------------------------------------------------------
# Context


class Parity:
    def __init__(self, args, device: torch.device, report: Report, deadline: Deadline):
        self.args, self.device, self.report, self.deadline = args, device, report, deadline
        self.configs = models.configs_for(args)
        self.folder = Path(args.model) if args.model else None
        self.sizes = workloads.TINY_SIZES if args.tiny else workloads.Sizes()

    def generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.args.seed + offset)

    def record(self, path: str, result: dict) -> None:
        self.report.set(path, result)
        extra = ""
        if "top1" in result:
            extra = f", top-1 {result['top1']:.4f}, row max {result['row_rel_max']:.3g}"
        if "psnr_db" in result:
            extra = f", PSNR {result['psnr_db']:.2f} dB, worst pixel {result['worst_pixel_255']:.2f}/255"
        log(f"  {path}: rel {fmt(result.get('rel'))}, max abs {fmt(result.get('max_abs'))}{extra}", self.deadline)


# --------------------------------------------------------------------------------------------
# AR


def reference_positions(ref, prompt: workloads.ARPrompt, device, n_forced: int) -> torch.Tensor:
    """(3, B, P + n_forced) positions the reference's generate() uses: get_rope_index for the prompt,
    then `_cached_decode_position_ids` columns for the generated tokens (bf16-yardstick.md)."""
    kwargs = prompt.reference_kwargs(device)
    prefill_pos, _ = ref.model.get_rope_index(kwargs["input_ids"], kwargs["image_grid_thw"],
                                              kwargs["images_per_sample"], kwargs["attention_mask"])
    parts = [prefill_pos]
    if n_forced:
        decode = ref.model._cached_decode_position_ids[:, :, :n_forced].permute(1, 0, 2)  # (3, B, n)
        parts.append(decode.to(prefill_pos.device))
    return torch.cat(parts, dim=-1)


def ours_positions(cfg: dict, prompt: workloads.ARPrompt, n_forced: int) -> torch.Tensor:
    from glm_core.ar.positions import batch_positions

    grids = [[(int(h), int(w)) for _, h, w in prompt.image_grid_thw.tolist()]]
    prefill_pos, decode_pos = batch_positions(prompt.input_ids, prompt.attention_mask.bool(), grids,
                                              image_start_token_id=int(cfg["image_start_token_id"]),
                                              image_end_token_id=int(cfg["image_end_token_id"]))
    return torch.cat([prefill_pos, decode_pos[:, :, :n_forced]], dim=-1)


def reference_vq_ids(ref, prompt: workloads.ARPrompt, device) -> torch.Tensor:
    """The reference model's own vision encoder + VQ on the editing prompt's reference (spec §6.26:
    the pipeline's wrapper crashes, the model's methods do not)."""
    grids = prompt.image_grid_thw[:-1].to(device)  # the source grids (the target grid is last)
    features = ref.model.get_image_features(prompt.pixel_values.to(device), grids, return_dict=True)
    return ref.model.get_image_tokens(features.pooler_output).view(-1)


def phase_ar(p: Parity, clock: Deadline) -> None:
    from glm_core.ar.decode import prefill, prepare_prompt, setup_caches
    from glm_core.compiling import compile_backend
    from tests.forcing import cached_forced_logits, teacher_forced_logits

    cfg, s, device = p.configs.ar, p.sizes, p.device
    gen = p.generator(10)
    codebook = int(cfg["vq_config"]["num_embeddings"])
    # Inputs: a t2i prompt + forced codebook ids for the whole generation; an editing prompt.
    prompt = workloads.ar_prompt(cfg, s.ar_t2i, s.ar_t2i, generator=gen, preview_side=s.preview)
    n_rows = prompt.num_new_tokens  # 1281 at 1024²: last prompt row + one per forced token
    length = prompt.input_ids.shape[1]
    forced = torch.randint(0, codebook, (1, n_rows - 1), generator=gen)
    full_ids = torch.cat([prompt.input_ids, forced], dim=1)
    edit = workloads.ar_prompt(cfg, s.ar_t2i, s.ar_t2i, reference=(s.ar_reference,) * 2, generator=gen,
                               preview_side=s.preview)
    p.report.set("ar.inputs", {"prompt_tokens": length, "forced_tokens": n_rows - 1, "logit_rows": n_rows,
                               "edit_prompt_tokens": edit.input_ids.shape[1],
                               "grids": prompt.image_grid_thw.tolist(), "edit_grids": edit.image_grid_thw.tolist()})

    ref = models.reference_ar(cfg, device, FP32, p.args.seed, p.folder)
    log(f"  AR reference built in fp32 ({models.parameter_bytes(ref) / 1e9:.1f} GB)", p.deadline)
    positions = reference_positions(ref, prompt, device, n_rows - 1)
    edit_positions = reference_positions(ref, edit, device, 0)
    placeholder = edit.input_ids == int(cfg["image_token_id"])

    def run_reference(dtype_name: str) -> dict:
        out = {}
        logits = ref(input_ids=full_ids.to(device), attention_mask=torch.ones_like(full_ids).to(device),
                     position_ids=positions, use_cache=False).logits[0].float().cpu()  # (P + n - 1, V)
        out["prefill"], out["forced"] = logits[:length], logits[length - 1:]
        del logits
        out["vq"] = reference_vq_ids(ref, edit, device).cpu()
        log(f"  reference {dtype_name}: teacher-forced logits and VQ ids done", p.deadline)
        return out

    with torch.no_grad():
        r32 = run_reference("fp32")
        # editing prompt: the LM with the fp32 reference's VQ ids in place (every side gets the same ids,
        # so this isolates the decoder; VQ id agreement is reported separately)
        edit_ids = edit.input_ids.masked_scatter(placeholder, r32["vq"])
        r32["edit"] = ref(input_ids=edit_ids.to(device), attention_mask=edit.attention_mask.to(device),
                          position_ids=edit_positions, use_cache=False).logits[0].float().cpu()
        models.cast_parameters_(ref, BF16)
        harness.free_memory()
        log(f"  reference cast to bf16 (parameters only; inv_freq stays fp32), "
            f"{models.parameter_bytes(ref) / 1e9:.1f} GB", p.deadline)
        r16 = run_reference("bf16")
        r16["edit"] = ref(input_ids=edit_ids.to(device), attention_mask=edit.attention_mask.to(device),
                          position_ids=edit_positions, use_cache=False).logits[0].float().cpu()
        p.record("ar.teacher_forced.reference_bf16", compare_logits(r16["forced"], r32["forced"]))
        p.record("ar.prefill.reference_bf16", compare_logits(r16["prefill"], r32["prefill"]))
        p.record("ar.edit_prefill.reference_bf16", compare_logits(r16["edit"], r32["edit"]))
        p.report.set("ar.vq_agreement.reference_bf16", (r16["vq"] == r32["vq"]).float().mean().item())

        ours = models.ours_ar(cfg, ref, device)
        ours.compile_backend = None  # eager first; the compiled decode layer is its own row below
        our_pos = ours_positions(cfg, prompt, n_rows - 1)
        our_edit_pos = ours_positions(cfg, edit, 0)
        p.report.set("ar.positions_equal_reference", {
            "t2i_prefill_and_decode": bool(torch.equal(our_pos, positions.cpu())),
            "edit_prefill": bool(torch.equal(our_edit_pos, edit_positions.cpu()))})
        logits = teacher_forced_logits(ours, full_ids, our_pos).float()[0].cpu()
        p.record("ar.teacher_forced.ours", compare_logits(logits[length - 1:], r32["forced"]))
        p.record("ar.prefill.ours", compare_logits(logits[:length], r32["prefill"]))
        p.record("ar.teacher_forced.ours_vs_reference_bf16", compare_logits(logits[length - 1:], r16["forced"]))
        del logits
        logits = teacher_forced_logits(ours, edit_ids, our_edit_pos).float()[0].cpu()
        p.record("ar.edit_prefill.ours", compare_logits(logits, r32["edit"]))
        p.record("ar.edit_prefill.ours_vs_reference_bf16", compare_logits(logits, r16["edit"]))
        del logits, r16
        vq = models.ours_vision(cfg, ref, device).image_token_ids(edit.pixel_values, edit.reference_grids).cpu()
        p.report.set("ar.vq_agreement.ours", (vq == r32["vq"]).float().mean().item())
        log(f"  VQ id agreement with fp32: reference bf16 {p.report.get('ar.vq_agreement.reference_bf16'):.4f}, "
            f"ours {p.report.get('ar.vq_agreement.ours'):.4f}", p.deadline)
        # our real prefill path (KV cache, masks): its last row against the fp32 row P-1
        plan = prepare_prompt(ours, prompt.ours_inputs())
        cache = setup_caches(ours, 1, length + plan.num_new_tokens)
        last = prefill(ours, plan, cache).float().cpu()
        del cache, plan
        p.record("ar.prefill_last_row_cached.ours", compare_logits(last, r32["forced"][:1]))
        # our real decode path, eager (prefill + one cached step per forced token), if time allows
        estimate = 0.06 * n_rows if device.type == "cuda" else 0.02 * n_rows
        if clock.remaining() > 1.5 * estimate + 20:
            logits = cached_forced_logits(ours, prompt.ours_inputs(), forced).float()[0].cpu()
            p.record("ar.teacher_forced_cached.ours", compare_logits(logits, r32["forced"]))
            del logits
            if device.type == "cuda" and clock.remaining() > estimate + 40:
                # the path generate_tokens takes on a GPU: the torch.compile'd decode layer
                ours.compile_backend = compile_backend(device)
                logits = cached_forced_logits(ours, prompt.ours_inputs(), forced).float()[0].cpu()
                p.record("ar.teacher_forced_cached_compiled.ours", compare_logits(logits, r32["forced"]))
                del logits
        else:
            p.report.note(f"AR cached-decode teacher forcing skipped: {clock.remaining():.0f}s left in the "
                          f"phase, ~{estimate:.0f}s needed")


# --------------------------------------------------------------------------------------------
# DiT


def phase_dit(p: Parity, clock: Deadline) -> None:
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    from glm_core.dit.sampling import DiTConditioning, predict_velocity

    cfg, s, device = p.configs.dit, p.sizes, p.device
    gen = p.generator(20)
    size, ref_size = s.dit_1, s.dit_reference
    x = workloads.dit_inputs(cfg, size, size, glyph_tokens=32, generator=gen, timestep=499.0)
    ref_inputs = workloads.dit_inputs(cfg, ref_size, ref_size, glyph_tokens=1, generator=gen)
    ref_latent = ref_inputs.latents
    ref_prior = workloads.upsampled_prior(ref_size // 32, ref_size // 32,
                                          int(cfg["prior_vq_quantizer_codebook_size"]), gen)
    guidance, text_dim = s.guidance, int(cfg["text_embed_dim"])
    p.report.set("dit.inputs", {"size": size, "glyph_tokens": 32, "timestep": x.timestep,
                                "reference_size": ref_size, "guidance": guidance})
    ref = models.reference_dit(cfg, device, FP32, p.args.seed + 1, p.folder)
    log(f"  DiT reference built in fp32 ({models.parameter_bytes(ref) / 1e9:.1f} GB)", p.deadline)

    def run_reference(dtype) -> dict:
        """The pipeline's calls (pipeline_glm_image.py L909-L1047) in `dtype`."""
        lat = x.latents.to(device, dtype)
        prior = x.prior_ids.to(device)
        common = dict(hidden_states=lat, prior_token_id=prior, timestep=torch.full((1,), x.timestep, device=device),
                      target_size=torch.tensor([[size, size]], dtype=dtype, device=device),
                      crop_coords=torch.zeros(1, 2, dtype=dtype, device=device), return_dict=False)
        keep = torch.zeros_like(prior, dtype=torch.bool)
        cond = ref(encoder_hidden_states=x.glyph.to(device, dtype), prior_token_drop=keep, **common)[0].float()
        uncond = ref(encoder_hidden_states=x.negative_glyph.to(device, dtype),
                     prior_token_drop=torch.ones_like(keep), **common)[0].float()
        kv = GlmImageKVCache(num_layers=int(cfg["num_layers"]))
        kv.set_mode("write")
        rp = ref_prior.to(device)
        ref(hidden_states=ref_latent.to(device, dtype),
            encoder_hidden_states=torch.zeros(1, 0, text_dim, dtype=dtype, device=device),
            prior_token_id=rp, prior_token_drop=torch.zeros_like(rp, dtype=torch.bool),
            timestep=torch.zeros((1,), device=device), target_size=torch.tensor([[ref_size, ref_size]], device=device),
            crop_coords=torch.zeros((1, 2), device=device), kv_caches=kv)
        kv.set_mode("read")
        cond_ref = ref(encoder_hidden_states=x.glyph.to(device, dtype), prior_token_drop=keep, kv_caches=kv,
                       **common)[0].float()
        kv.clear()
        return {"cond": cond.cpu(), "uncond": uncond.cpu(), "cond_ref": cond_ref.cpu(),
                "guided": (uncond + guidance * (cond - uncond)).cpu(),
                "guided_ref": (uncond + guidance * (cond_ref - uncond)).cpu()}

    with torch.no_grad():
        r32 = run_reference(FP32)
        log("  reference fp32 velocities done", p.deadline)
        models.cast_parameters_(ref, BF16)
        harness.free_memory()
        r16 = run_reference(BF16)
        for key in r32:
            p.record(f"dit.{key}.reference_bf16", compare(r16[key], r32[key]))
        ours = models.ours_dit(cfg, ref, device)
        target = (size, size)
        lat, glyph, neg, prior = (t.to(device) for t in (x.latents, x.glyph, x.negative_glyph, x.prior_ids))
        cond = DiTConditioning(glyph_embeds=glyph, negative_glyph_embeds=neg, prior_ids=prior, target_size=target)
        results = {
            "cond": ours(lat, glyph, prior, x.timestep, target).float(),
            "uncond": ours(lat, neg, prior, x.timestep, target, prior_drop=torch.ones(1, dtype=torch.bool)).float(),
            "guided": predict_velocity(ours, lat, cond, x.timestep, guidance),
        }
        cond.reference_kv = ours.encode_references([ref_latent.to(device)], [ref_prior.to(device)],
                                                   [(ref_size, ref_size)])
        results["cond_ref"] = ours(lat, glyph, prior, x.timestep, target, reference_kv=cond.reference_kv).float()
        results["guided_ref"] = predict_velocity(ours, lat, cond, x.timestep, guidance)
        del cond
        for key in r32:
            p.record(f"dit.{key}.ours", compare(results[key], r32[key]))
            p.record(f"dit.{key}.ours_vs_reference_bf16", compare(results[key], r16[key]))
        p.report.note("DiT ours: guided velocities come from glm_core.dit.sampling.predict_velocity (the CFG of "
                      "every denoising step), on CUDA through the torch.compile'd blocks (the default); cond/uncond "
                      "rows are single forwards.")


# --------------------------------------------------------------------------------------------
# VAE


def phase_vae(p: Parity, clock: Deadline) -> None:
    cfg, s, device = p.configs.vae, p.sizes, p.device
    gen = p.generator(30)
    size = s.vae_1
    z = workloads.vae_latents(cfg, size, size, gen)
    images = workloads.vae_images(size, size, gen)
    ref = models.reference_vae(cfg, device, FP32, p.args.seed + 2, p.folder)

    def run_reference(dtype):
        mean, std = workloads.latent_stats(cfg, device, dtype)
        decoded = ref.decode(z.to(device, dtype) * std + mean, return_dict=False)[0].float().cpu()
        encoded = ((ref.encode(images.to(device, dtype)).latent_dist.mode() - mean) / std).float().cpu()
        return {"decode": decoded, "encode": encoded}

    with torch.no_grad():
        r32 = run_reference(FP32)
        models.cast_parameters_(ref, BF16)
        harness.free_memory()
        r16 = run_reference(BF16)
        p.record("vae.decode.reference_bf16", compare_images(r16["decode"], r32["decode"]))
        p.record("vae.encode.reference_bf16", compare(r16["encode"], r32["encode"]))
        ours = models.ours_vae(cfg, ref, device)
        decoded = ours.decode_latents(z.to(device))
        encoded = ours.encode_latents(images.to(device))
        p.record("vae.decode.ours", compare_images(decoded, r32["decode"]))
        p.record("vae.encode.ours", compare(encoded, r32["encode"]))
        p.record("vae.decode.ours_vs_reference_bf16", compare_images(decoded, r16["decode"]))
        p.record("vae.encode.ours_vs_reference_bf16", compare(encoded, r16["encode"]))


# --------------------------------------------------------------------------------------------
# Glyph


def glyph_folder(p: Parity, scratch: Path) -> Path:
    """The GLM-Image folder whose text_encoder/ and tokenizer/ both sides load: --model's, or else one written into
    `scratch` by bench.fullsize_checkpoint (its layout files and a T5 of the run's size with random bf16-valued
    weights, fp32 on disk like the official file)."""
    if p.folder is not None:
        return p.folder
    from bench import fullsize_checkpoint
    from glm_core import tiny

    t5_config = tiny.TINY_T5_CONFIG if p.args.tiny else fullsize_checkpoint.REAL_T5_CONFIG
    fullsize_checkpoint.write_layout(scratch, p.configs.ar)
    fullsize_checkpoint.save_t5(scratch, t5_config, p.device, p.args.seed + 3,
                                fullsize_checkpoint.DEFAULT_MAX_SHARD_SIZE)
    return scratch


def phase_glyph(p: Parity, clock: Deadline) -> None:
    import tempfile

    from diffusers import GlmImagePipeline

    from glm_core.glyph import extract_glyph_texts, glyph_token_ids, load_glyph_encoder
    from tests.reference import reference_byt5_tokenizer, reference_t5

    prompts, device = list(GLYPH_PROMPTS), p.device
    with tempfile.TemporaryDirectory(prefix="parity_glyph_") as scratch, torch.no_grad():
        folder = glyph_folder(p, Path(scratch))
        # The reference as the pipeline loads it (`from_pretrained(dtype=bfloat16)`); its glyph code is the
        # pipeline's own `encode_prompt`, on a pipeline holding only the tokenizer and the text encoder.
        reference = reference_t5(folder, BF16).to(device)
        pipe = GlmImagePipeline(tokenizer=reference_byt5_tokenizer(folder), processor=None, text_encoder=reference,
                                vision_language_encoder=None, vae=None, transformer=None, scheduler=None)
        ours = load_glyph_encoder(folder, device, BF16)
        log(f"  glyph encoders loaded from {'--model' if p.folder else 'a random-weight folder'} "
            f"({models.parameter_bytes(reference) / 1e9:.2f} GB in bf16)", p.deadline)
        ours_weights, reference_weights = ours.text_encoder.state_dict(), reference.state_dict()
        p.report.set("glyph.weights_equal_reference_bf16", ours_weights.keys() == reference_weights.keys() and all(
            torch.equal(ours_weights[key], reference_weights[key]) for key in ours_weights))
        p.report.set("glyph.inputs", {
            "prompts": prompts, "texts": [extract_glyph_texts(prompt) for prompt in prompts],
            "glyph_tokens": [sum(len(ids) for ids in glyph_token_ids(extract_glyph_texts(prompt), ours.tokenizer))
                             for prompt in prompts]})

        def run_reference(dtype) -> dict:
            embeds, negative = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device=device,
                                                  dtype=dtype)
            return {"embeds": embeds.float().cpu(), "negative": negative.float().cpu()}  # (B, L, d), (B, 1, d)

        r16 = run_reference(BF16)
        # The fp32 reference computes on exactly the bf16 weights both bf16 sides hold (the official file is
        # fp32: rounded once by the bf16 load, then widened back exactly).
        models.cast_parameters_(reference, FP32)
        r32 = run_reference(FP32)
        results = {"embeds": ours.encode(prompts), "negative": ours.encode_negative(len(prompts))}
        for key in r32:
            p.record(f"glyph.{key}.reference_bf16", compare(r16[key], r32[key]))
            p.record(f"glyph.{key}.ours", compare(results[key], r32[key]))
            p.record(f"glyph.{key}.ours_vs_reference_bf16", compare(results[key], r16[key]))


# --------------------------------------------------------------------------------------------
# Report


AR_ROWS = [("teacher_forced", "AR teacher-forced logits, whole 1024² t2i generation"),
           ("teacher_forced_cached", "AR teacher-forced logits through our cached decode path"),
           ("teacher_forced_cached_compiled", "same, with the compiled decode layer (the GPU default)"),
           ("prefill", "AR prefill logits, t2i prompt (all prompt rows)"),
           ("prefill_last_row_cached", "AR prefill last row through our cached prefill"),
           ("edit_prefill", "AR prefill logits, editing prompt (one 1024² ref, fp32 VQ ids)")]
DIT_ROWS = [("cond", "DiT velocity 1024², conditional"), ("uncond", "DiT velocity 1024², unconditional"),
            ("guided", "DiT guided velocity (CFG 1.5)"), ("cond_ref", "DiT velocity, conditional + one ref KV"),
            ("guided_ref", "DiT guided velocity + one ref KV")]
SIDES = ("reference_bf16", "ours", "ours_vs_reference_bf16")  # the first two against the fp32 reference
VAE_ROWS = [("decode", "VAE decode 1024²"), ("encode", "VAE encode 1024² (mode, normalised)")]
GLYPH_ROWS = [("embeds", "glyph embeddings, two quoted-text prompts"),
              ("negative", "glyph embedding of the empty negative prompt")]


def _ratio(ours: dict | None, ref: dict | None) -> str:
    if not ours or not ref or not ref.get("rel") or not isinstance(ours.get("rel"), float):
        return "–"
    return f"{ours['rel'] / ref['rel']:.2f}×"


def render_markdown(data: dict) -> str:
    lines = harness.markdown_header("GLM-Image full-size bf16 parity: glm_core vs reference", data)
    lines += ["- every error is relative to the reference in fp32 (TF32 off) on the same bf16-valued weights; "
              "'ours / yardstick' = our rel error over the reference's own bf16 rel error "
              "(≈1: as faithful as bf16 allows; ≥ 2: look for a bug). Rows `ours_vs_reference_bf16` compare "
              "ours directly with the reference's bf16 output instead (0 = bit-identical).", ""]
    ar = data.get("ar") or {}
    if ar:
        lines += ["## AR", "", "| what | side | rows | rel | row median | row max | max abs | top-1 | "
                  "top-1 m>0.05 | m>0.1 | m>0.25 | KL T=0.9 | ours / yardstick |", "|" + "---|" * 13]
        for key, label in AR_ROWS:
            entry = ar.get(key) or {}
            for side in SIDES:
                r = entry.get(side)
                if not r:
                    continue
                bands = r.get("top1_by_margin") or {}
                band = [fmt((bands.get(f">{m}") or {}).get("agreement"), 4) for m in MARGINS]
                lines.append(f"| {label} | {side} | {r.get('rows')} | {fmt(r.get('rel'))} | "
                             f"{fmt(r.get('row_rel_median'))} | {fmt(r.get('row_rel_max'))} | {fmt(r.get('max_abs'))} | "
                             f"{fmt(r.get('top1'), 4)} | {' | '.join(band)} | {fmt(r.get('kl_t09_mean'))} | "
                             f"{_ratio(r, entry.get('reference_bf16')) if side == 'ours' else '–'} |")
        vq = ar.get("vq_agreement") or {}
        lines += ["", f"- VQ ids of the editing reference, agreement with fp32: reference bf16 "
                      f"{fmt(vq.get('reference_bf16'), 4)}, ours {fmt(vq.get('ours'), 4)}",
                  f"- our positions equal the reference's: {ar.get('positions_equal_reference')}",
                  f"- yardstick document (H100, 2026-11-26): {YARDSTICK_DOC['ar.teacher_forced']}", ""]
    for section, rows, doc_prefix in (("dit", DIT_ROWS, "dit"), ("vae", VAE_ROWS, "vae"),
                                      ("glyph", GLYPH_ROWS, "glyph")):
        block = data.get(section) or {}
        if not any(block.get(k) for k, _ in rows):
            continue
        lines += [f"## {section.upper()}", "", "| what | side | rel | max abs | PSNR dB | worst px /255 | "
                  "ours / yardstick | yardstick doc |", "|" + "---|" * 8]
        for key, label in rows:
            entry = block.get(key) or {}
            for side in SIDES:
                r = entry.get(side)
                if not r:
                    continue
                lines.append(f"| {label} | {side} | {fmt(r.get('rel'))} | {fmt(r.get('max_abs'))} | "
                             f"{fmt(r.get('psnr_db'), 4)} | {fmt(r.get('worst_pixel_255'))} | "
                             f"{_ratio(r, entry.get('reference_bf16')) if side == 'ours' else '–'} | "
                             f"{YARDSTICK_DOC.get(f'{doc_prefix}.{key}', '') if side == 'reference_bf16' else ''} |")
        if section == "glyph":
            inputs = block.get("inputs") or {}
            lines += ["", f"- glyph tokens per prompt: {inputs.get('glyph_tokens')}; our weights equal the bf16 "
                          f"reference's: {block.get('weights_equal_reference_bf16')}"]
        lines.append("")
    lines += harness.markdown_tail(data)
    return "\n".join(lines)


def summary_text(data: dict) -> str:
    rows = [["what", "side", "rel", "max abs", "top-1", "extra", "ours/yardstick"]]
    for section, keys in (("ar", AR_ROWS), ("dit", DIT_ROWS), ("vae", VAE_ROWS), ("glyph", GLYPH_ROWS)):
        block = data.get(section) or {}
        for key, label in keys:
            entry = block.get(key) or {}
            for side in SIDES:
                r = entry.get(side)
                if not r:
                    continue
                extra = ""
                if "row_rel_max" in r:
                    extra = f"row max {fmt(r['row_rel_max'])}, top-1 m>0.1 " \
                            f"{fmt((r['top1_by_margin'].get('>0.1') or {}).get('agreement'), 4)}"
                if "psnr_db" in r:
                    extra = f"PSNR {fmt(r['psnr_db'], 4)} dB"
                rows.append([label, side, fmt(r.get("rel")), fmt(r.get("max_abs")), fmt(r.get("top1"), 4), extra,
                             _ratio(r, entry.get("reference_bf16")) if side == "ours" else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# --------------------------------------------------------------------------------------------
# Entry point


PHASES = {"ar": phase_ar, "dit": phase_dit, "vae": phase_vae, "glyph": phase_glyph}  # in running order


def parse_args(argv):
    p = harness.common_arguments(__doc__.split("\n\n")[0], "out/parity")
    p.add_argument("--only", default="", help=f"comma-separated phases: {','.join(PHASES)} (default all)")
    args = harness.parse_common(p, argv)
    args.selected = set(harness.named_phases(p, "--only", args.only, PHASES)) or None  # None: all
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    mode = "tiny" if args.tiny else ("checkpoint" if args.model else "full size, random bf16-valued weights")
    report, deadline, device = harness.open_report(args, argv, "bench.parity_fullsize", "parity", mode,
                                                   render_markdown)
    strict_fp32()
    parity = Parity(args, device, report, deadline)
    report.set("configuration", parity.configs.source)
    report.note("Inputs (yardstick): t2i prompt of random text ids + image-start with the 1024² grids; "
                "forced tokens = random codebook ids; DiT latents randn (1,16,128,128), glyph randn (1,32,1472), "
                "negative (1,1,1472), prior ids = 2x-upsampled random 32x32 grid, t = 499; VAE z randn "
                "de-normalised with the per-channel mean/std. All inputs rounded to bf16 values. Glyph: "
                "GLYPH_PROMPTS (two quoted texts each), the empty negative prompt.")
    selected = args.selected
    runner = PhaseRunner(report, deadline, device, selected)
    selected_share = sum(share for name, share in PHASE_SHARE.items() if selected is None or name in selected)
    for name, fn in PHASES.items():
        cap = PHASE_SHARE[name] / selected_share * args.budget_s
        runner.run(name, lambda fn=fn, cap=cap: fn(parity, Deadline(cap)),
                   share=min(1.0, cap / max(deadline.remaining(), 1e-3)), min_s=min(30.0, cap / 3))
    print("\n" + summary_text(report.data), flush=True)
    return harness.finish(report, "parity", deadline)


if __name__ == "__main__":
    main()
