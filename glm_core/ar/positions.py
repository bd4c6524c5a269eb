"""3-D M-RoPE positions (t, h, w) of the AR prompt and of the tokens it generates (spec §1.2.4).

Pure functions on host-side lists; the decode loop turns the result into cos/sin tables once.

Prefill (valid, i.e. unpadded, tokens only):
- text tokens, and the image start/end markers, get the same running position on all three axes;
- the tokens of a reference image (between a start marker and its end marker) get t = s,
  h = s + row, w = s + col, where s is the next free position; then s advances by max(h, w).
Decode: the grids still to generate (those without an end marker in the prompt) are visited in
reverse `image_grid_thw` order (t2i: preview first, then the large grid); each starts at `base`
with t = base, h = base + row, w = base + col, then base += max(h, w); a final end-marker position
`base` follows. Decode token k (k = 0 for the first generated token) uses column k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grid = tuple[int, int]  # (h, w) in tokens


def _grid_columns(base: int, h: int, w: int) -> list[list[int]]:
    rows = [base + r for r in range(h) for _ in range(w)]
    cols = [base + c for _ in range(h) for c in range(w)]
    return [[base] * (h * w), rows, cols]


def sample_positions(
    token_ids: Sequence[int],
    grids: Sequence[Grid],
    *,
    image_start_token_id: int,
    image_end_token_id: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Positions of one unpadded prompt and of its generation.

    grids: every grid of this sample in `image_grid_thw` order (reference grids first, then the
    target grid(s)). Returns (prefill [3][len(token_ids)], decode [3][N_decode]).
    """
    token_ids = list(token_ids)
    ends = [i for i, t in enumerate(token_ids) if t == image_end_token_id]
    starts = [i + 1 for i, t in enumerate(token_ids) if t == image_start_token_id]

    prefill: list[list[int]] = [[], [], []]
    pos = 0  # next free position
    segment_start = 0  # first token of the current text segment
    # like the reference, pair the k-th start marker with the k-th end marker, one grid each;
    # the text segment runs from the previous end marker up to and including the start marker
    for k, (start, end) in enumerate(zip(starts, ends)):
        if k >= len(grids):
            break
        h, w = grids[k]
        if end - start != h * w:
            raise ValueError(
                f"image {k} of the prompt has {end - start} placeholder tokens but its grid is {h}x{w}={h * w}"
            )
        for axis in prefill:
            axis.extend(range(pos, pos + start - segment_start))
        pos += start - segment_start
        for axis, values in zip(prefill, _grid_columns(pos, h, w)):
            axis.extend(values)
        pos += max(h, w)
        segment_start = end
    for axis in prefill:
        axis.extend(range(pos, pos + len(token_ids) - segment_start))
    pos += len(token_ids) - segment_start

    # grids with an end marker in the prompt are inputs; the rest are generated, last one first
    num_generated = max(len(grids) - len(ends), 0)
    decode: list[list[int]] = [[], [], []]
    base = pos
    for h, w in reversed(list(grids)[len(grids) - num_generated :]):
        for axis, values in zip(decode, _grid_columns(base, h, w)):
            axis.extend(values)
        base += max(h, w)
    for axis in decode:  # the end-marker (EOS) slot
        axis.append(base)
    return prefill, decode


def batch_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    grids_per_sample: Sequence[Sequence[Grid]],
    *,
    image_start_token_id: int,
    image_end_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch -> (prefill (3, B, P) long, decode (3, B, N) long) on the CPU.

    Padded prompt slots get position 1 (as the reference; they are masked out anyway). Decode
    columns of shorter generations are padded by repeating their last column.
    """
    batch, length = input_ids.shape
    ids = input_ids.tolist()
    valid = [[True] * length] * batch if attention_mask is None else attention_mask.bool().tolist()
    prefill = torch.ones(3, batch, length, dtype=torch.long)
    decodes = []
    for b in range(batch):
        keep = [i for i in range(length) if valid[b][i]]
        sample_prefill, sample_decode = sample_positions(
            [ids[b][i] for i in keep],
            grids_per_sample[b],
            image_start_token_id=image_start_token_id,
            image_end_token_id=image_end_token_id,
        )
        prefill[:, b, keep] = torch.tensor(sample_prefill, dtype=torch.long)
        decodes.append(sample_decode)
    n = max(len(d[0]) for d in decodes)
    decode = torch.tensor([[axis + axis[-1:] * (n - len(axis)) for axis in d] for d in decodes], dtype=torch.long)
    return prefill, decode.permute(1, 0, 2).contiguous()
