"""Glyph text: the quoted substrings of a prompt, ByT5-tokenized and T5-encoded (spec §1.4, §6.13).

These embeddings are the DiT's only text input. The pieces, in order:
- `extract_glyph_texts(prompt)`: four regexes, concatenated in the reference's order.
- `byt5_token_ids(text)`: the ByT5 byte tokenizer (bytes + 3, EOS 1), written out here; the
  checkpoint's `tokenizer/` folder holds no vocabulary to read.
- `glyph_token_ids(texts)`: per-prompt id lists with the reference's leading-pad quirk.
- `GlyphEncoder.encode(prompts)`: the T5 encoder (`t5.py`, transformers' arithmetic op for op), valid
  positions concatenated per prompt, prompts left-padded with zeros.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

# Reference order: single quotes, curly double quotes, straight double quotes, corner brackets.
# The single-quote pattern runs first and captures across apostrophes ("it's don't" -> "s don").
GLYPH_PATTERNS = (
    re.compile(r"'([^']*)'"),
    re.compile("\u201c([^\u201c\u201d]*)\u201d"),
    re.compile(r'"([^"]*)"'),
    re.compile("\u300c([^\u300c\u300d]*)\u300d"),
)

BYT5_PAD_ID = 0
BYT5_EOS_ID = 1
BYT5_UNK_ID = 2
BYT5_BYTE_OFFSET = 3  # byte b -> id b + 3
BYT5_DEFAULT_EXTRA_IDS = 125  # ByT5Tokenizer default: "<extra_id_N>" -> 259 + N
GLYPH_MAX_LENGTH = 2048  # the pipeline's max_sequence_length


def extract_glyph_texts(prompt: str) -> list[str]:
    """Quoted substrings of `prompt`, all matches of each pattern in GLYPH_PATTERNS order."""
    texts: list[str] = []
    for pattern in GLYPH_PATTERNS:
        texts.extend(pattern.findall(prompt))
    return texts


class ByT5Tokenizer:
    """The ByT5 tokenizer as transformers 5.x runs it for GLM-Image.

    Text is UTF-8 bytes, each byte b -> id b + 3, then EOS (1) unless the ids already end in EOS.
    The literal strings "<pad>", "</s>", "<unk>" are single special ids that also swallow the
    whitespace around them; "<extra_id_N>" (N < extra_ids) is id 259 + N and swallows nothing.
    Truncation keeps max_length - 1 ids before the EOS.
    """

    _STRIPPING = {"<pad>": BYT5_PAD_ID, "</s>": BYT5_EOS_ID, "<unk>": BYT5_UNK_ID}

    def __init__(self, extra_ids: int = BYT5_DEFAULT_EXTRA_IDS, max_length: int = GLYPH_MAX_LENGTH):
        self.max_length = max_length
        self.special_ids = dict(self._STRIPPING)
        first_extra = 256 + BYT5_BYTE_OFFSET
        self.special_ids.update({f"<extra_id_{n}>": first_extra + n for n in range(extra_ids)})
        # No special string is a prefix of another, so leftmost alternation = transformers' trie split.
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.special_ids) + ")")

    @classmethod
    def from_folder(cls, tokenizer_dir, max_length: int = GLYPH_MAX_LENGTH) -> "ByT5Tokenizer":
        """From a checkpoint's `tokenizer/` folder (only `extra_ids` is read from tokenizer_config.json)."""
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise ValueError(f"glyph tokenizer folder not found: {tokenizer_dir}; a GLM-Image checkpoint has a "
                             f"tokenizer/ folder (ByT5Tokenizer)")
        config_path = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        tokenizer_class = config.get("tokenizer_class", "ByT5Tokenizer")
        if tokenizer_class != "ByT5Tokenizer":
            raise ValueError(f"{config_path}: tokenizer_class is {tokenizer_class!r}; GLM-Image's glyph "
                             f"tokenizer is ByT5Tokenizer")
        return cls(extra_ids=int(config.get("extra_ids", BYT5_DEFAULT_EXTRA_IDS)), max_length=max_length)

    def __call__(self, text: str) -> list[int]:
        pieces = self._split.split(text)  # odd indices are special strings
        for i in range(1, len(pieces), 2):
            if pieces[i] in self._STRIPPING:
                pieces[i - 1] = pieces[i - 1].rstrip()
                if i + 1 < len(pieces):
                    pieces[i + 1] = pieces[i + 1].lstrip()
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.special_ids[piece])
            else:
                ids.extend(b + BYT5_BYTE_OFFSET for b in piece.encode("utf-8"))
        ids = ids[:self.max_length - 1]
        if not ids or ids[-1] != BYT5_EOS_ID:
            ids.append(BYT5_EOS_ID)
        return ids


def glyph_token_ids(texts: Sequence[str], tokenizer: ByT5Tokenizer) -> list[list[int]]:
    """One prompt's glyph texts -> id lists, as `_get_glyph_embeds` builds them (spec §1.4).

    No text -> [""] (just EOS). Quirk kept on purpose (spec §6.13): EVERY sequence gets one leading
    pad id iff the NUMBER of texts is even.
    """
    texts = list(texts) or [""]
    lead = [BYT5_PAD_ID] * ((len(texts) + 1) % 2)
    return [lead + tokenizer(text) for text in texts]


class GlyphEncoder(nn.Module):
    """ByT5 tokenizer + T5 encoder -> glyph embeddings for the DiT."""

    def __init__(self, text_encoder: nn.Module, tokenizer: ByT5Tokenizer):
        super().__init__()
        self.text_encoder = text_encoder  # t5.T5Encoder
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.text_encoder.shared.weight.device

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.d_model

    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(1, L_glyph, d_model): every valid position of every glyph text, concatenated in order."""
        sequences = glyph_token_ids(extract_glyph_texts(prompt), self.tokenizer)
        width = max(len(ids) for ids in sequences)
        input_ids = torch.tensor([ids + [BYT5_PAD_ID] * (width - len(ids)) for ids in sequences],
                                 device=self.device)  # (n_texts, width), right-padded
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences],
                                      device=self.device)
        hidden = self.text_encoder(input_ids, attention_mask)
        return hidden[attention_mask.bool()][None]

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, L, d_model) glyph embeddings; L is the longest prompt's glyph length.

        Shorter prompts are LEFT-padded with zeros that stay unmasked, as the reference does; the DiT
        then sees them as real (zero) glyph tokens, so a batch is not identical to separate calls.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        per_prompt = [self._encode_one(prompt) for prompt in prompts]
        length = max(e.shape[1] for e in per_prompt)
        padded = [torch.cat([e.new_zeros(1, length - e.shape[1], e.shape[2]), e], dim=1) for e in per_prompt]
        embeds = torch.cat(padded, dim=0)
        return embeds if dtype is None else embeds.to(dtype)

    def encode_negative(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The unconditional glyph: the T5 output of a lone EOS, (batch_size, 1, d_model)."""
        return self.encode([""] * batch_size, dtype=dtype)


def _keep_in_fp32(key: str) -> bool:
    return key.endswith(".wo.weight")


def _keep_fp32_rule(dtype: torch.dtype):
    """T5's FFN output projection `wo` stays fp32 only when loading in fp16.

    transformers 5.23 applies `T5PreTrainedModel._keep_in_fp32_modules = ["wo"]` for float16 only
    (`_keep_in_fp32_modules_strict` would also cover bf16; T5 has none). So under bf16 the reference
    T5 is bf16 throughout, `wo` included (checked by tests/parity/test_glyph.py; this corrects
    spec §6.23). Under fp16, `wo` is fp32 and its output promotes the residual stream.
    """
    return _keep_in_fp32 if dtype == torch.float16 else None


def load_glyph_encoder(checkpoint_folder, device, dtype, *, dry_run: bool = False) -> GlyphEncoder:
    """GlyphEncoder from a GLM-Image folder's `text_encoder/` and `tokenizer/` (eval mode); dry_run: checks only."""
    from .checkpoint import load_weights, open_checkpoint
    from .t5 import T5Encoder, T5EncoderConfig

    folder = open_checkpoint(checkpoint_folder)
    component = folder.component_dir("text_encoder")
    tokenizer = ByT5Tokenizer.from_folder(folder.component_dir("tokenizer"))
    config = T5EncoderConfig.from_dict(folder.read_config("text_encoder"))
    with torch.device("meta"):
        text_encoder = T5Encoder(config)  # `shared` and `encoder.embed_tokens` are one Parameter: the file may
        # hold either name or both, and load_weights fills both from whichever is stored
    load_weights(text_encoder, component, device=device, dtype=dtype, keep_fp32=_keep_fp32_rule(dtype),
                 dry_run=dry_run)
    return GlyphEncoder(text_encoder.eval().requires_grad_(False), tokenizer)
