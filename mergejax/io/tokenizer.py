"""Tokenizers of Hugging Face checkpoint directories (tokenizer.json, through `tokenizers`)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np


def load_tokenizer(directory: str | os.PathLike, *, max_length: int | None = None) -> Any:
  """Loads the fast tokenizer (tokenizer.json) of a checkpoint directory with the `tokenizers` lib.

  Args:
    directory: holds tokenizer.json (transformers' fast-tokenizer file; special tokens and the
      post-processor that adds [CLS]/[SEP] or <|startoftext|>/<|endoftext|> are part of it).
    max_length: truncate to this many tokens, special tokens included (e.g. CLIP's 77).

  Returns:
    A `tokenizers.Tokenizer` that pads each batch to its longest sequence.
  """
  from tokenizers import Tokenizer  # noqa: PLC0415 (optional dependency)

  path = pathlib.Path(directory) / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer.json in {directory}.")
  tok = Tokenizer.from_file(str(path))
  pad = tok.padding or {}
  tok.no_truncation()
  if max_length:
    tok.enable_truncation(max_length)
  # Pad to the batch's longest row, whatever fixed length the file asks for.
  tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
  return tok


def encode(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes a batch of texts.

  Args:
    tokenizer: from `load_tokenizer`.
    texts: the strings.

  Returns:
    `(input_ids, attention_mask)`, both int32 `[len(texts), longest]`.
  """
  encodings = tokenizer.encode_batch(texts)
  ids = np.asarray([e.ids for e in encodings], np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  return ids, mask
