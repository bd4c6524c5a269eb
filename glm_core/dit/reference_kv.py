"""Reference-image K/V for editing (spec §1.5.1, §2.2 steps 5-7).

Each reference image is run once through the DiT at t=0, alone (no glyph tokens, its own prior ids,
its own pixel size as target_size), and every block's attention keys (after QK-norm and RoPE) and
raw values are kept. Conditional passes prepend them to their own keys / values; unconditional
passes never see them. Several references are concatenated along the token axis in reference order.

A `ReferenceKV` is an immutable value: built by `GlmImageDiT.encode_references(...)`, passed to
`GlmImageDiT.forward(..., reference_kv=...)`. There is no mode to set and nothing to clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferenceKV:
    # One entry per DiT block, each (1, heads, N_ref, head_dim), N_ref = sum of the references'
    # image tokens. The leading 1 broadcasts over the batch of the conditional pass (all rows of a
    # batch share the same references, as in the reference pipeline with one cache sample).
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def __post_init__(self):
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError(f"ReferenceKV needs one key and one value tensor per block, got "
                             f"{len(self.keys)} keys and {len(self.values)} values")
        shape = self.keys[0].shape
        for k, v in zip(self.keys, self.values):
            if k.shape != shape or v.shape != shape or k.dim() != 4 or k.shape[0] != 1:
                raise ValueError(f"ReferenceKV tensors must all be (1, heads, N_ref, head_dim) of one shape, "
                                 f"got keys {tuple(k.shape)} and values {tuple(v.shape)} (first {tuple(shape)})")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def to(self, device=None, dtype=None) -> "ReferenceKV":
        return ReferenceKV(tuple(k.to(device=device, dtype=dtype) for k in self.keys),
                           tuple(v.to(device=device, dtype=dtype) for v in self.values))

    @classmethod
    def concat(cls, parts: Sequence["ReferenceKV"]) -> "ReferenceKV":
        """References side by side along the token axis, in the given order (spec §1.5.1 "write")."""
        if not parts:
            raise ValueError("ReferenceKV.concat needs at least one part")
        if len(parts) == 1:
            # Contiguous like a concatenation of several: the compiled DiT block guards on strides, and one
            # reference's transposed views would make a second reference count compile it again.
            return cls(tuple(k.contiguous() for k in parts[0].keys), tuple(v.contiguous() for v in parts[0].values))
        layers = {p.num_layers for p in parts}
        if len(layers) != 1:
            raise ValueError(f"ReferenceKV.concat: parts have different block counts {sorted(layers)}")
        keys = tuple(torch.cat([p.keys[i] for p in parts], dim=2) for i in range(parts[0].num_layers))
        values = tuple(torch.cat([p.values[i] for p in parts], dim=2) for i in range(parts[0].num_layers))
        return cls(keys, values)
