"""FP8 weights for linear layers: e4m3 values with one fp32 scale per output channel.

Format
    A (out, in) weight W is stored as `weight` (out, in) `torch.float8_e4m3fn` and `weight_scale` (out,)
    fp32, with `weight_scale[n] = max_k |W[n, k]| / 448` and `weight[n, k] = round_e4m3(W[n, k] / weight_scale[n])`
    (448 is e4m3fn's largest finite value). Quantisation runs in fp32 on the weight's own device. A row
    whose scale would be zero (an all-zero row) or would fall below fp32's smallest normal number gets
    that smallest normal number as its scale, so nothing is ever divided by zero and zeros stay exactly zero.
    The bias, when there is one, stays in the compute dtype (bf16 in this project).

    Error bound: e4m3 keeps 3 mantissa bits, so rounding a value in e4m3's normal range changes it by at
    most half a unit in the last place, 2^-4 = 6.25 % relatively. Values below 2^-6 (in units of the row's
    scale, i.e. |W| < max|W_row| * 2^-6 / 448) are subnormal and rounded to a grid of 2^-9 (absolute error
    <= 2^-10 * scale). Per element: |W - dequant(W)| <= max(2^-4 |W|, 2^-10 * scale).

Why one scale per output channel
    y[m, n] = sum_k x[m, k] W[n, k] = weight_scale[n] * sum_k x[m, k] weight[n, k]: a per-output-channel
    scale sits outside the sum, so it is applied once per output element after the matrix product, exactly,
    both by `torch._scaled_mm`'s row-wise epilogue and by the weight-only path (F.linear on the e4m3 values,
    then a multiply by the scale). A single scale for the whole tensor would let one channel with large
    weights flatten the resolution of every other channel; a scale per input channel would sit inside the
    sum and could not be factored out.

Why dynamic per-token activation scales (FP8 matmul path)
    Activations change from token to token and, in the DiT, from step to step (timestep modulation), and
    transformer activations have outlier tokens. A scale per row (token) of x, computed on the fly as
    max|x_row| / 448, needs no calibration data, isolates an outlier token from the others, and is again a
    factor outside the sum over k. It is one reduction over x that torch.compile fuses with the cast.

Three ways to run the matmul (chosen from the input's device and rows; `Fp8Linear.forward`)
    - One row (a batch-1 decode step), bf16 x, CUDA compute capability >= 8.9 with triton (under cudaMallocAsync only
      inside compiled code: glm_core/gemv.py says why): a Triton GEMV that reads each e4m3 byte once and widens it
      in registers, scale and bias in its epilogue (glm_core/gemv.py).
      A decode step's time is the weight bytes read, which this halves against bf16; the `_scaled_mm` path
      below reads e4m3 weights no faster than cuBLAS reads bf16 at one row. Weight-only: x is not quantised.
      Where it does not run (an RTX 3090), the FP8 decode layer is compiled with tuned reductions, so inductor
      turns the weight-only path's one-row matmul into one reduction with the e4m3 cast fused in instead of
      writing a widened copy of the weight (on the H200: 114-127 us per decode layer against 746 us eagerly).
    - FP8 matrix units (CUDA compute capability >= 8.9, torch with row-wise `torch._scaled_mm`, not ROCm):
      x is quantised to e4m3 per row and multiplied with `torch._scaled_mm` (`scaled_mm_linear`).
    - Elsewhere (CPU, an RTX 3090 = sm_86, ROCm, an older torch): the e4m3 weight is cast to the compute dtype
      for the matmul and the per-channel scale multiplies the output (`dequant_linear`). Eagerly this saves
      memory, not time: the cast writes a compute-dtype copy of the weight that the matmul reads back, so a
      memory-bound decode step gets slower than in bf16 (bench/fp8_kernels.py measures by how much; compiled
      one-row steps avoid the copy, above).

Which layers (the caller's choice; this module only provides the contract)
    The project quantises the AR decoder's linear layers and the DiT transformer blocks' linear layers.
    Embeddings, norms, the VQ tokenizer and vision tower, the glyph encoder and the VAE stay bf16.
    `use_fp8_linears_` turns a meta-built model's chosen linears into meta Fp8Linear's before loading; the loader
    (`checkpoint.load_weights`) then quantises a bf16 checkpoint's weights as they load, or reads a pre-quantised
    copy (`glm_core.quantize`: `<name>.weight` e4m3 beside `<name>.weight_scale` fp32, official key names).

Dtypes moved with the module: `Fp8Linear` keeps `weight` in e4m3 and `weight_scale` in fp32 through
`module.to(dtype)` / `.half()` / `.bfloat16()` (they follow device moves only); a loader that casts
floating-point tensors to the compute dtype must leave the `.weight` / `.weight_scale` keys of quantised
layers alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .gemv import constant_per_device, gemv, takes_gemv
from .limits import WEIGHT_FORMATS

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# The smallest scale ever used: fp32's smallest normal number. Keeps all-zero rows at zero (0 / tiny = 0)
# and keeps rows of denormal-sized values from dividing by a denormal (or by zero on flush-to-zero hardware).
MIN_SCALE = torch.finfo(torch.float32).tiny

# torch._scaled_mm on CUDA needs K and N to be multiples of 16 (checked in aten ScaledBlas.cpp); M carries
# no such check in the torch versions read. Steps of fewer rows (decode, M = 1..4) are padded to this many rows
# anyway: the padding is a few hundred bytes (bench/fp8_kernels.py measures both). Longer inputs are not padded:
# there the copy is a pass over the whole activation, and a padded copy has another row count than the kernel
# that makes the rows, so inductor cannot fuse the quantisation into it (a DiT step's LayerNorm + modulation).
SCALED_MM_ALIGNMENT = 16


def rows_to_pad(rows: int) -> int:
    """Zero rows added to an input of `rows` rows before `_scaled_mm` (the note above)."""
    return SCALED_MM_ALIGNMENT - rows if rows < SCALED_MM_ALIGNMENT else 0


# --------------------------------------------------------------------------------------------
# Quantisation


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and one fp32 scale per row of a 2-D tensor (rows = weight output channels or tokens).

    Returns (quantised (R, C) e4m3, scale (R, 1) fp32) with values ~= quantised.float() * scale.
    Runs on `values`' device; peak extra memory is one fp32 copy of `values`.
    """
    if values.dim() != 2:
        raise ValueError(f"quantize_rows takes a 2-D tensor (rows, columns), got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"quantize_rows takes a floating-point tensor, got {values.dtype}")
    # (R, 1): the max of |v| without materialising |v|; exact in the input dtype, then widened.
    amax = torch.linalg.vector_norm(values, ord=float("inf"), dim=1, keepdim=True).to(torch.float32)
    scale = (amax / FP8_MAX).clamp_(min=MIN_SCALE)
    return cast_rows(values, scale), scale


def cast_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(R, C) values divided by their (R, 1) fp32 scales, in e4m3."""
    # fp32 division may land a hair above 448 for the row maximum; e4m3fn has no inf, and casting anything
    # beyond 448 gives NaN, so the clamp is required, not cosmetic.
    scaled = values.to(torch.float32).div_(scale) if values.dtype != torch.float32 else values / scale
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (e4m3 (out, in), fp32 scale (out,))."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D (out, in), got shape {tuple(weight.shape)}")
    quantised, scale = quantize_rows(weight.detach())
    return quantised, scale.squeeze(1)


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """fp32 (out, in) weight that the e4m3 values and their per-row scales stand for."""
    return weight.to(torch.float32) * weight_scale.to(torch.float32)[:, None]


# --------------------------------------------------------------------------------------------
# Which matmul path a device gets


def _torch_has_rowwise_scaled_mm() -> bool:
    # Row-wise scales (2-D scale_a (M, 1), scale_b (1, N)) arrived in torch 2.5 (pytorch PR 130059).
    return hasattr(torch, "_scaled_mm") and torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True where `torch._scaled_mm` with row-wise fp32 scales runs on FP8 matrix units.

    CUDA devices of compute capability 8.9 (Ada) or newer, a torch with row-wise `_scaled_mm`, and not ROCm
    (MI300 wants e4m3fnuz, not the e4m3fn stored here). False everywhere else, the CPU included.
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None or not _torch_has_rowwise_scaled_mm():
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


_PATH_BY_DEVICE: dict[str, bool] = {}
_uses_scaled_mm = constant_per_device(fp8_matmul_supported, _PATH_BY_DEVICE)


def quantizes_rows(x: torch.Tensor) -> bool:
    """Whether an Fp8Linear quantises the rows of input x to e4m3 (the `_scaled_mm` path) rather than taking the GEMV
    or the weight-only path: callers that make x can then make its e4m3 rows themselves (glm_core/dit/fp8_mlp.py)."""
    return not takes_gemv(x) and _uses_scaled_mm(str(x.device))


# --------------------------------------------------------------------------------------------
# Two of the matmul paths (called by Fp8Linear.forward; public so that tests and benchmarks can call each; the
# third, the one-row GEMV, is glm_core/gemv.py)


def dequant_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only path: y = (x @ weight^T) * weight_scale (+ bias), in x's dtype.

    fp32 inputs compute in fp32 and bf16 in bf16. fp16 inputs compute in bf16 and come back as fp16: e4m3
    values reach 448 before the scale is applied, and their products summed over thousands of inputs
    can exceed fp16's range (65504); bf16's rounding (2^-9) is far below e4m3's (2^-4).
    """
    compute = torch.bfloat16 if x.dtype == torch.float16 else x.dtype
    y = F.linear(x.to(compute), weight.to(compute))  # (..., out)
    y = y * weight_scale.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, *, use_fast_accum: bool = False,
                     pad_rows: bool = True, quantise=quantize_rows) -> torch.Tensor:
    """FP8 matmul path: x quantised per row to e4m3, then `torch._scaled_mm` with row-wise scales.

    `quantise` makes the e4m3 rows and their (M', 1) fp32 scales from x's (padded) 2-D rows: `quantize_rows`, or
    one that also applies the layer's input activation as it quantises (glm_core/dit/fp8_mlp.py).

    x (..., in) bf16 / fp16 / fp32 -> (..., out) in x's dtype (the product and the bias: `scaled_mm_quantised`;
    the kernels, cuBLAS and the CUTLASS sm89/sm90 fallback, write bf16 and take a bf16 bias for a bf16 output
    only). Leading dims are folded into M; when `pad_rows`, an M below SCALED_MM_ALIGNMENT is padded to it (zero
    rows, sliced off again; `rows_to_pad`). No host synchronisation and no data-dependent branch: fine under
    torch.compile and inside CUDA graphs.
    """
    in_features = x.shape[-1]
    out_features = weight.shape[0]
    x2 = x.reshape(-1, in_features)  # (M, K)
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    pad = rows_to_pad(rows) if pad_rows else 0
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))  # (M + pad, K)
    x_fp8, x_scale = quantise(x2)  # (M', K) e4m3, (M', 1) fp32
    y = scaled_mm_quantised(x_fp8, x_scale, weight, weight_scale, bias, x.dtype, use_fast_accum=use_fast_accum)
    if pad:
        y = y[:rows]
    return y.reshape(*x.shape[:-1], out_features)


def scaled_mm_quantised(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype, *, use_fast_accum: bool = False
                        ) -> torch.Tensor:
    """`torch._scaled_mm` of rows already quantised (and padded by the caller where wanted): x_fp8 (M, K) e4m3,
    x_scale (M, 1) fp32 -> (M, N) in out_dtype. The product is written in bf16, the one output dtype every row-wise
    kernel accepts, then cast; the bias is fused into the kernel when it and out_dtype are bf16, added after
    otherwise."""
    out_features = weight.shape[0]
    fuse_bias = bias is not None and out_dtype == torch.bfloat16 and bias.dtype == torch.bfloat16
    y = torch._scaled_mm(x_fp8, weight.t(),  # weight (N, K) row-major = (K, N) column-major, as cuBLAS wants
                         scale_a=x_scale, scale_b=weight_scale.view(1, out_features),
                         bias=bias if fuse_bias else None, out_dtype=torch.bfloat16,
                         use_fast_accum=use_fast_accum).to(out_dtype)  # (M, N)
    if bias is not None and not fuse_bias:
        y = y + bias.to(out_dtype)
    return y


# --------------------------------------------------------------------------------------------
# The layer


class Fp8Linear(nn.Module):
    """Drop-in for nn.Linear with an e4m3 weight and per-output-channel fp32 scales.

    state_dict keys: `weight` (out, in) e4m3, `weight_scale` (out,) fp32, `bias` (out,) compute dtype when
    present. Constructible on the meta device like nn.Linear (`with torch.device("meta"): ...`); a freshly
    built layer holds zeros (weight), ones (scale) and zeros (bias) until weights are loaded or assigned.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype | None = None, use_fast_accum: bool = False):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_fast_accum = bool(use_fast_accum)
        bias_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(torch.zeros(self.out_features, self.in_features, device=device, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(self.out_features, device=device, dtype=torch.float32),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=bias_dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_fast_accum: bool = False) -> Fp8Linear:
        """Quantise an nn.Linear (on its device; a meta linear gives a meta layer). The bias is shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Fp8Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        weight, weight_scale = quantize_weight(linear.weight)
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                    dtype=linear.weight.dtype, use_fast_accum=use_fast_accum)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear({self.in_features} -> {self.out_features}) got an input whose last "
                             f"dimension is {x.shape[-1]} (shape {tuple(x.shape)})")
        # a batch-1 decode step: a GEMV, bound by reading the weight
        if takes_gemv(x):
            return gemv(x, self.weight, self.weight_scale, self.bias)
        if quantizes_rows(x):
            return scaled_mm_linear(x, self.weight, self.weight_scale, self.bias, use_fast_accum=self.use_fast_accum)
        return dequant_linear(x, self.weight, self.weight_scale, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (out, in) weight these e4m3 values and scales stand for (tests, accuracy checks)."""
        return dequantize_weight(self.weight, self.weight_scale)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every floating-point tensor; the e4m3 weight and the
        # fp32 scales must keep their dtypes and only follow the device (the bias follows both, like nn.Linear).
        quantised = {id(self.weight), id(self.weight_scale)}

        def keep_quantised_dtypes(tensor):
            moved = fn(tensor)
            if id(tensor) in quantised and moved.dtype != tensor.dtype:
                moved = tensor.to(device=moved.device)
            return moved

        return super()._apply(keep_quantised_dtypes, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=e4m3 per-output-channel scales, use_fast_accum={self.use_fast_accum}")


# --------------------------------------------------------------------------------------------
# Whole modules


def _parent_and_leaf(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(parent_name) if parent_name else module), leaf


def fp8_structure_(module: nn.Module, names: Iterable[str], *, use_fast_accum: bool = False) -> None:
    """Replace the named nn.Linear children by meta-device Fp8Linear's of the same shape, bias and dtype, for the
    loader to fill (quantising a bf16 checkpoint, or reading a pre-quantised copy as stored)."""
    for name in names:
        if not name:
            raise ValueError("fp8_structure_: the root module cannot be replaced in place; call it on its parent")
        try:
            parent, leaf = _parent_and_leaf(module, name)
            linear = getattr(parent, leaf)
        except AttributeError as exc:
            raise ValueError(f"fp8_structure_: no submodule {name!r} in {type(module).__name__} ({exc})") from None
        if isinstance(linear, Fp8Linear):
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"fp8_structure_: {name!r} is a {type(linear).__name__}, not an nn.Linear")
        setattr(parent, leaf, Fp8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        device="meta", dtype=linear.weight.dtype, use_fast_accum=use_fast_accum))


def has_fp8_linears(module: nn.Module) -> bool:
    return any(isinstance(child, Fp8Linear) for child in module.modules())


# --------------------------------------------------------------------------------------------
# Loading


def stored_in_fp8(component_dir) -> bool:
    """True when a checkpoint component holds pre-quantised layers (`*.weight_scale` keys; headers only)."""
    from .checkpoint import read_headers

    return any(key.endswith(".weight_scale") for key in read_headers(component_dir))


def use_fp8_linears_(model: nn.Module, pattern, weights: str, component_dir, *, use_fast_accum: bool = False) -> None:
    """Before loading: turn the meta-built model's linears whose names fully match `pattern` into FP8 layers when
    `weights` is "fp8" (`use_fast_accum`: their `_scaled_mm` calls, see `Fp8Linear`). A pre-quantised component can
    only load as FP8 (clear error otherwise)."""
    from .checkpoint import CheckpointError

    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights != "fp8":
        if stored_in_fp8(component_dir):
            raise CheckpointError(f"{component_dir} holds FP8 weights (a pre-quantised copy); load it with "
                                  "weights='fp8' (or 'auto')")
        return
    fp8_structure_(model, [name for name, child in model.named_modules()
                           if isinstance(child, nn.Linear) and pattern.fullmatch(name)], use_fast_accum=use_fast_accum)
