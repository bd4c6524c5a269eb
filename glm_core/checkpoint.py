"""GLM-Image checkpoint folders: layout check, config reading, safetensors -> nn.Module.

The folder is the diffusers layout of zai-org/GLM-Image (spec §3): a `model_index.json` naming
`GlmImagePipeline` plus one sub-folder per component. Each component folder holds a `config.json`
and either one `model.safetensors` / `diffusion_pytorch_model.safetensors` or shards listed in a
`*.safetensors.index.json` (`weight_map`: key -> shard file).

Loading contract (`load_weights`):
- The module is usually built on the meta device. Every parameter and *persistent* buffer is
  replaced (assign, not copy) by the checkpoint tensor, read straight onto the device by its byte
  range (`tensor_reader`: several in flight, through small page-locked buffers on a GPU) and cast on
  that device: no fp32 detour and no second full copy in host RAM.
- Loading is strict: the module's `state_dict` keys must equal the checkpoint keys (minus
  `ignore_keys`), with equal shapes. Everything is checked from the safetensors headers before a
  single tensor is read, so a bad checkpoint never leaves a half-loaded module behind.
- Computed tensors (rotary tables, position ids, ...) are not in the checkpoint. Models register
  them with `persistent=False` so that `state_dict` keys == checkpoint keys, and rebuild them in
  a method `init_computed_buffers(self, device)`, which `load_weights` calls on every sub-module
  that defines it after the weights are in place. A non-persistent buffer still on the meta
  device after that is a programming error and raises RuntimeError naming it.
- Tied parameters (the same Parameter under two names, e.g. T5 `shared` / `encoder.embed_tokens`)
  stay tied: any one of the names present in the checkpoint fills all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .tensor_reader import STORED_DTYPES, TensorReader, read_in_order, release_staging_memory

PIPELINE_CLASS_NAME = "GlmImagePipeline"
MODEL_INDEX_FILENAME = "model_index.json"
SINGLE_FILE_WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"

# The safetensors header dtype strings of floating-point tensors (cast to the compute dtype on load).
_SAFETENSORS_FLOAT_DTYPES = {name for name, dtype in STORED_DTYPES.items() if dtype.is_floating_point}


class CheckpointError(ValueError):
    """A GLM-Image checkpoint folder or weight file is not what the loader expects.

    The message names the file, the key (where there is one) and what was expected.
    """

    # ComfyUI shows an error's type as `__module__ + "." + __qualname__`, and inside ComfyUI our modules are
    # named after the pack's absolute path: users would read "/home/.../custom_nodes/<folder>.glm_core.checkpoint
    # .CheckpointError". The public name is short and the same everywhere.
    __module__ = "glm_core"


# --------------------------------------------------------------------------------------------
# Folder


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what}: cannot parse JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: expected a JSON object in {path}, found {type(data).__name__}")
    return data


def _read_model_index(root: Path) -> dict:
    """model_index.json of a GLM-Image folder, or CheckpointError saying what was found instead."""
    expected = (
        f"expected the diffusers folder of zai-org/GLM-Image: a folder with {MODEL_INDEX_FILENAME} "
        f"naming {PIPELINE_CLASS_NAME} and the sub-folders vision_language_encoder/, transformer/, vae/, ..."
    )
    if not root.exists():
        raise CheckpointError(f"GLM-Image checkpoint folder does not exist: {root}; {expected}")
    if not root.is_dir():
        raise CheckpointError(
            f"GLM-Image checkpoint must be a folder, got the file {root}; {expected}")
    index_path = root / MODEL_INDEX_FILENAME
    if not index_path.is_file():
        hint = ""
        if (root.parent / MODEL_INDEX_FILENAME).is_file():
            hint = f" (this looks like a component sub-folder: try its parent {root.parent})"
        elif (root / "config.json").is_file():
            hint = " (found a config.json only: a single model, not a whole GLM-Image pipeline folder)"
        raise CheckpointError(f"not a GLM-Image folder: {index_path} not found{hint}; {expected}")
    model_index = _read_json(index_path, "GLM-Image model index")
    class_name = model_index.get("_class_name")
    if class_name != PIPELINE_CLASS_NAME:
        raise CheckpointError(
            f"not a GLM-Image folder: {index_path} has _class_name={class_name!r}, "
            f"expected {PIPELINE_CLASS_NAME!r}; {expected}")
    return model_index


@dataclass
class CheckpointFolder:
    """An opened GLM-Image folder (only model_index.json has been read)."""

    root: Path
    model_index: dict = field(repr=False)

    @property
    def component_names(self) -> list[str]:
        """Components listed in model_index.json (keys that are not `_private`)."""
        return sorted(k for k in self.model_index if not k.startswith("_"))

    def component_dir(self, name: str) -> Path:
        """Path of a component sub-folder, e.g. "vision_language_encoder", "transformer", "vae"."""
        path = self.root / name
        if not path.is_dir():
            listed = ", ".join(self.component_names) or "none"
            raise CheckpointError(
                f"GLM-Image component folder missing: {path} (model_index.json lists: {listed}); "
                f"expected the official layout with one sub-folder per component")
        return path

    def read_config(self, name: str, filename: str = "config.json") -> dict:
        """The parsed JSON file `filename` of component `name`."""
        return _read_json(self.component_dir(name) / filename, f"config of component {name!r}")


def open_checkpoint(folder) -> CheckpointFolder:
    """Open a GLM-Image folder; CheckpointError if it is not one (the message says what it is)."""
    root = Path(folder).expanduser().resolve()
    return CheckpointFolder(root=root, model_index=_read_model_index(root))


def is_glm_image_folder(folder) -> bool:
    """True if `folder` has a model_index.json naming GlmImagePipeline. Never raises."""
    try:
        _read_model_index(Path(folder).expanduser())
    except Exception:  # noqa: BLE001 - a folder scan must never fail on one odd entry
        return False
    return True


# --------------------------------------------------------------------------------------------
# Weight files


def weight_map(component_dir) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, from the shard index or the single weight file.

    Only the index (or the single file's header) is read; shards are checked to exist.
    """
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise CheckpointError(f"component folder not found: {component_dir}")
    index_files = sorted(p for p in component_dir.iterdir() if p.name.endswith(INDEX_SUFFIX))
    if len(index_files) > 1:
        names = ", ".join(p.name for p in index_files)
        raise CheckpointError(
            f"{component_dir}: several shard indexes ({names}); expected exactly one *{INDEX_SUFFIX}")
    if index_files:
        index_path = index_files[0]
        index = _read_json(index_path, "safetensors shard index")
        mapping = index.get("weight_map")
        if not isinstance(mapping, dict) or not mapping:
            raise CheckpointError(
                f"{index_path}: expected a non-empty 'weight_map' object (key -> shard file)")
        result: dict[str, Path] = {}
        for key, shard_name in mapping.items():
            shard = component_dir / str(shard_name)
            if not shard.is_file():
                raise CheckpointError(
                    f"{index_path}: shard {shard_name!r} (holding key {key!r}) is listed in the index "
                    f"but missing on disk at {shard}; re-download the checkpoint")
            result[key] = shard
        return result

    singles = [component_dir / n for n in SINGLE_FILE_WEIGHT_NAMES if (component_dir / n).is_file()]
    if len(singles) > 1:
        raise CheckpointError(
            f"{component_dir}: both {singles[0].name} and {singles[1].name} exist; expected one weight file")
    if not singles:
        found = sorted(p.name for p in component_dir.iterdir())
        raise CheckpointError(
            f"{component_dir}: no weights found; expected one of {', '.join(SINGLE_FILE_WEIGHT_NAMES)} "
            f"or a *{INDEX_SUFFIX} with shards (found: {', '.join(found) or 'nothing'})")
    path = singles[0]
    return {key: path for key in _read_header(path)}


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype string) from a safetensors header; no tensor data read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {}
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                header[key] = (tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
            return header
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        raise (_access_error(path) or CheckpointError(
            f"cannot read safetensors file {path}: {exc}; the file is truncated or corrupt, "
            f"re-download it")) from exc


def _access_error(path: Path) -> CheckpointError | None:
    """Why the OS will not let us read `path`, if that is the problem; None when the file opens fine.

    safetensors reports a file it may not open as "No such file or directory", so the file is opened here
    to learn the real reason: only a file that opens and still fails to parse is called corrupt."""
    try:
        with open(path, "rb"):
            return None
    except PermissionError:
        return CheckpointError(f"cannot read {path}: permission denied; give this user read access to the "
                               f"checkpoint folder")
    except OSError as exc:
        return CheckpointError(f"cannot read {path}: {exc.strerror or exc}")


# --------------------------------------------------------------------------------------------
# Loading


def _target_dtype(key: str, checkpoint_dtype: str, dtype, keep_fp32) -> torch.dtype | None:
    """None = keep the stored dtype (integer / bool tensors, or dtype=None)."""
    if checkpoint_dtype not in _SAFETENSORS_FLOAT_DTYPES:
        return None
    if keep_fp32 is not None and keep_fp32(key):
        return torch.float32
    return dtype


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(value, nn.Parameter):
        setattr(owner, leaf, value)
    else:
        owner._buffers[leaf] = value


HeaderEntry = tuple[tuple[int, ...], str, Path]  # (shape, safetensors dtype string, file)


def read_headers(component_dir) -> dict[str, HeaderEntry]:
    """Every checkpoint key of a component with its shape, stored dtype and file, from the shard index and
    the safetensors headers; no tensor data is read. Missing, truncated or inconsistent files raise
    CheckpointError here, before anything is loaded."""
    component_dir = Path(component_dir)
    key_to_file = weight_map(component_dir)
    by_file: dict[Path, list[str]] = {}
    for key, path in key_to_file.items():
        by_file.setdefault(path, []).append(key)
    entries: dict[str, HeaderEntry] = {}
    for path, keys in by_file.items():
        header = _read_header(path)
        for key in keys:
            if key not in header:
                raise CheckpointError(
                    f"{path}: key {key!r} is listed in the shard index but is not in this shard; "
                    f"the index and the shards come from different downloads, re-download the folder")
            shape, st_dtype = header[key]
            entries[key] = (shape, st_dtype, path)
    return entries


def _fused_keys(module: nn.Module):
    """(sub-module, module key, checkpoint keys concatenated along dim 0 into it) for every sub-module whose class
    declares `checkpoint_fusions` ({local name: (local checkpoint names, ...)})."""
    for prefix, sub in module.named_modules():
        head = f"{prefix}." if prefix else ""
        for fused, parts in (getattr(type(sub), "checkpoint_fusions", None) or {}).items():
            yield sub, head + fused, tuple(head + part for part in parts)


def checkpoint_fusions(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """{module key: checkpoint keys concatenated along dim 0 into it}."""
    return {fused: parts for _, fused, parts in _fused_keys(module)}


def official_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict under the checkpoint's own key names: fused tensors split back into their parts
    (each fusing sub-module says how, with `fused_part_sizes()`: the parts' sizes along dim 0)."""
    state = dict(module.state_dict())
    for sub, fused, parts in _fused_keys(module):
        if fused in state:
            pieces = state.pop(fused).split(list(sub.fused_part_sizes()))
            state.update(dict(zip(parts, pieces)))
    return state


def fuse_checkpoint_keys(module, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook: concatenate the checkpoint's separate keys into the module's fused one
    (e.g. q/k/v -> qkv_proj), so a reference state dict loads into our modules unchanged."""
    for fused, parts in type(module).checkpoint_fusions.items():
        names = [prefix + part for part in parts]
        if all(name in state_dict for name in names):
            state_dict[prefix + fused] = torch.cat([state_dict.pop(name) for name in names])


def _read_failure(path: Path, exc: BaseException, device: torch.device, needed_bytes: int) -> Exception:
    """The error to raise when reading tensors from `path` failed: corrupt only when the file is."""
    from .memory import is_out_of_memory, out_of_memory_error

    if is_out_of_memory(exc):
        return out_of_memory_error(f"loading {path.parent.name}/ weights", device, exc, needed_bytes=needed_bytes)
    if (access := _access_error(path)) is not None:
        return access
    if "safetensor" in type(exc).__name__.lower() or isinstance(exc, (OSError, EOFError)):
        return CheckpointError(f"cannot read tensors from {path}: {exc}; the file is truncated or corrupt, "
                               f"re-download it")
    return exc


def load_weights(module: nn.Module, component_dir, *, device, dtype,
                 keep_fp32: Callable[[str], bool] | None = None,
                 ignore_keys: Callable[[str], bool] | None = None, dry_run: bool = False) -> None:
    """Strictly load a component's safetensors into `module` (usually built on the meta device).

    dry_run: every check (files, headers, keys, shapes) and nothing read: what `GlmImage.check` runs.

    Floating tensors become `dtype` (or fp32 where `keep_fp32(key)`), on `device`, read a few at a
    time; integer and bool tensors keep their dtype; `dtype=None` keeps the stored dtype.
    Checkpoint keys with `ignore_keys(key)` are neither loaded nor reported as unexpected.
    Sub-modules' `checkpoint_fusions` are honoured: the parts are read and concatenated on `device`.
    FP8 layers (`fp8.Fp8Linear`, whose meta weight is e4m3) read a pre-quantised file as stored, or quantise a
    bf16 checkpoint's weight on `device` as it loads (one layer in high precision at a time).
    Afterwards every sub-module defining `init_computed_buffers(device)` is called (see module doc).
    """
    component_dir = Path(component_dir)
    device = torch.device(device)
    where = f"{component_dir}"
    checkpoint = read_headers(component_dir)
    if ignore_keys is not None:
        checkpoint = {k: v for k, v in checkpoint.items() if not ignore_keys(k)}
    fusions = checkpoint_fusions(module)

    # Module tensors, grouping tied aliases (one Parameter under several names).
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    is_param: dict[int, bool] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
        is_param[id(param)] = True
    for name, buf in module.named_buffers(remove_duplicate=False):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._non_persistent_buffers_set:
            continue
        groups.setdefault(id(buf), []).append(name)
        tensors[id(buf)] = buf
        is_param[id(buf)] = False

    # FP8 layers (module tensors in e4m3) loading from a bf16 checkpoint are quantised as they load; their
    # scales then come from the weights, not from the file (`quantised_on_load`: weight key -> scale group).
    scale_groups = {names[0]: group_id for group_id, names in groups.items() if names[0].endswith(".weight_scale")}
    quantised_on_load: dict[str, int] = {}
    for group_id, names in groups.items():
        name = names[0]
        if tensors[group_id].dtype == torch.float8_e4m3fn:
            stored = [checkpoint.get(key) for key in fusions.get(name, (name,))]
            if all(entry is not None and not entry[1].startswith("F8") for entry in stored):
                quantised_on_load[name] = scale_groups[name[: -len("weight")] + "weight_scale"]
    derived = {groups[g][0] for g in quantised_on_load.values()}

    # Strict checks before any tensor data is read.
    expected_keys = set()
    for names in groups.values():
        for name in names:
            if name not in derived:
                expected_keys.update(fusions.get(name, (name,)))
    unexpected = sorted(set(checkpoint) - expected_keys)
    if unexpected:
        shown = ", ".join(f"{k!r} (in {checkpoint[k][2].name})" for k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{where}: unexpected key(s) not used by {type(module).__name__}: {shown}{more}; "
            f"expected only the module's state_dict keys (wrong component folder or model version?)")
    plan: list[tuple[tuple[str, ...], int]] = []  # (checkpoint keys concatenated into the tensor, tensor group)
    missing = []
    for group_id, names in groups.items():
        if names[0] in derived:
            continue
        expected_shape = tuple(tensors[group_id].shape)
        sources = [fusions.get(name, (name,)) for name in names]
        present = [keys for keys in sources if all(key in checkpoint for key in keys)]
        if not present:
            missing.extend(key for key in sources[0] if key not in checkpoint)
            continue
        for keys in present:
            shapes = [checkpoint[key][0] for key in keys]
            stacked = (sum(shape[0] for shape in shapes),) + shapes[0][1:] if shapes[0] else ()
            if any(shape[1:] != shapes[0][1:] for shape in shapes) or stacked != expected_shape:
                shown = " + ".join(f"{key!r} {list(shape)}" for key, shape in zip(keys, shapes))
                raise CheckpointError(
                    f"{checkpoint[keys[0]][2]}: {shown} gives shape {list(stacked)}, expected "
                    f"{list(expected_shape)} for {type(module).__name__} (config.json does not match "
                    f"the weights?)")
        plan.append((present[0], group_id))
    if missing:
        shown = ", ".join(repr(k) for k in sorted(missing)[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{where}: missing key(s) in the checkpoint: {shown}{more}; expected every "
            f"{type(module).__name__} parameter and persistent buffer to be stored")
    if dry_run:
        return

    # Read in file order, several tensors in flight (tensor_reader), assigned one at a time; fused parts are
    # concatenated on the device.
    reader = TensorReader(device)
    plan.sort(key=lambda item: (str(checkpoint[item[0][0]][2]), reader.byte_range(checkpoint[item[0][0]][2],
                                                                                    item[0][0])))

    def read_group(item: tuple[tuple[str, ...], int]) -> list[torch.Tensor]:
        keys, group_id = item
        target_tensor = tensors[group_id]
        quantise = groups[group_id][0] in quantised_on_load
        parts = []
        for key in keys:
            shape, stored, path = checkpoint[key]
            if quantise:
                target = None  # quantised below from the stored precision
            elif target_tensor.dtype == torch.float8_e4m3fn or key.endswith(".weight_scale"):
                target = target_tensor.dtype  # pre-quantised: e4m3 values and fp32 scales stay as stored
            else:
                target = _target_dtype(key, stored, dtype, keep_fp32)
            parts.append(reader.read(path, key, stored, shape).to(dtype=target))
        return parts

    try:
        for (keys, group_id), parts in read_in_order(plan, read_group):
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
            parts = None
            if groups[group_id][0] in quantised_on_load:
                from .fp8 import quantize_weight

                tensor, scale = quantize_weight(tensor)
                scale_group = quantised_on_load[groups[group_id][0]]
                for name in groups[scale_group]:
                    _assign(module, name, nn.Parameter(scale, requires_grad=False))
            if is_param[group_id]:
                tensor = nn.Parameter(tensor, requires_grad=tensors[group_id].requires_grad)
            for name in groups[group_id]:  # tied aliases share the one new tensor
                _assign(module, name, tensor)
    except CheckpointError:
        raise
    except Exception as exc:
        needed = sum(tensors[group_id].numel() * tensors[group_id].element_size() for _, group_id in plan)
        item = getattr(exc, "item", None)
        path = checkpoint[item[0][0]][2] if item is not None else checkpoint[plan[0][0][0]][2]
        failure = _read_failure(path, exc, device, needed)
        if failure is exc:
            raise
        raise failure from exc
    finally:
        if device.type == "cuda":
            release_staging_memory()

    init_computed_buffers(module, device)


def init_computed_buffers(module: nn.Module, device) -> None:
    """Rebuild non-persistent (computed) buffers after loading; see the module docstring.

    Calls `init_computed_buffers(device)` on each sub-module that defines it, moves the other
    non-persistent buffers to `device`, and raises RuntimeError if any is left on the meta device.
    """
    device = torch.device(device)
    for sub in module.modules():
        hook = getattr(type(sub), "init_computed_buffers", None)
        if callable(hook):
            sub.init_computed_buffers(device)
    for sub_name, sub in module.named_modules():
        for leaf in sub._non_persistent_buffers_set:
            buf = sub._buffers.get(leaf)
            if buf is None:
                continue
            if buf.is_meta:
                raise RuntimeError(
                    f"{type(module).__name__}: computed buffer {sub_name + '.' if sub_name else ''}{leaf} "
                    f"is still on the meta device after loading; {type(sub).__name__} must define "
                    f"init_computed_buffers(self, device) that rebuilds it")
            if buf.device != device:
                sub._buffers[leaf] = buf.to(device)


def save_sharded(state_dict: dict[str, torch.Tensor], folder, stem: str, num_shards: int) -> None:
    """Write HF-style shards `{stem}-0000k-of-0000n.safetensors` and `{stem}.safetensors.index.json`.

    The layout the official checkpoint uses for its two large components (spec §3); tensors are split
    in order into shards of roughly equal byte size.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    sizes = [state_dict[n].numel() * state_dict[n].element_size() for n in names]
    total_size = sum(sizes)
    num_shards = max(1, min(num_shards, len(names)))
    budget = total_size / num_shards
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in zip(names, sizes):
        if shards[-1] and filled + size / 2 > budget * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(name)
        filled += size
    weight_map = {}
    for k, shard_names in enumerate(shards, start=1):
        file_name = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state_dict[n].contiguous() for n in shard_names}, str(folder / file_name),
                  metadata={"format": "pt"})
        weight_map.update({n: file_name for n in shard_names})
    index = {
        "metadata": {"total_parameters": sum(t.numel() for t in state_dict.values()), "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / f"{stem}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2) + "\n")
