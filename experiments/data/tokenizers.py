"""Tokenizers: UTF-8 bytes by default; SentencePiece or tiktoken if installed.

``get_tokenizer(name)`` takes

* ``"byte"``: the UTF-8 bytes of the text, vocab_size 256, no special
  tokens. Lossless for any text; what the experiment runner uses.
* ``"sentencepiece:PATH"``: a SentencePiece model file (``pip install
  sentencepiece``).
* ``"tiktoken:ENCODING"``: a tiktoken encoding such as ``cl100k_base``
  (``pip install tiktoken``; the encoding's files must be cached locally or
  reachable).

Every tokenizer has ``.name`` (the string that recreates it, recorded in
token stores), ``.vocab_size``, ``.encode(text) -> int32[n]`` and
``.decode(ids) -> str``.
"""

from __future__ import annotations

import importlib
from typing import Protocol, Sequence, Union

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "get_tokenizer", "TOKENIZER_KINDS"]

TOKENIZER_KINDS = ("byte", "sentencepiece:PATH", "tiktoken:ENCODING")

IdsLike = Union[np.ndarray, Sequence[int]]


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  name: str
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: IdsLike) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255, no special tokens.

  ``decode`` replaces byte sequences that are not valid UTF-8 (a model can
  generate them) with U+FFFD instead of failing.
  """

  name = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise ValueError(f"encode takes a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: IdsLike) -> str:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte token ids must lie in [0, 255], got values in "
                       f"[{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _import_optional(module: str, pip_name: str, spec: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
        f"tokenizer {spec!r} needs the {pip_name!r} package, which is not "
        f"installed: pip install {pip_name} (or use the default 'byte')"
    ) from e


class SentencePieceTokenizer:
  """A SentencePiece model file; ids as the model numbers them."""

  def __init__(self, path: str):
    spm = _import_optional("sentencepiece", "sentencepiece",
                           f"sentencepiece:{path}")
    self.name = f"sentencepiece:{path}"
    self._processor = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._processor.get_piece_size())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), np.int32)

  def decode(self, ids: IdsLike) -> str:
    return self._processor.decode([int(i) for i in np.asarray(ids)])


class TiktokenTokenizer:
  """A tiktoken encoding (special tokens are encoded as plain text)."""

  def __init__(self, encoding: str):
    tiktoken = _import_optional("tiktoken", "tiktoken", f"tiktoken:{encoding}")
    self.name = f"tiktoken:{encoding}"
    self._encoding = tiktoken.get_encoding(encoding)
    self.vocab_size = int(self._encoding.n_vocab)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._encoding.encode(text, disallowed_special=()),
                      np.int32)

  def decode(self, ids: IdsLike) -> str:
    return self._encoding.decode([int(i) for i in np.asarray(ids)])


def get_tokenizer(name: str = "byte") -> Tokenizer:
  """The tokenizer ``name`` names (see the module docstring).

  Raises:
    ValueError: an unknown name or an empty path/encoding.
    ImportError: sentencepiece / tiktoken requested but not installed.
  """
  if not isinstance(name, str):
    raise ValueError(f"tokenizer name must be a str, got {name!r}")
  if name == "byte":
    return ByteTokenizer()
  kind, sep, arg = name.partition(":")
  if sep and arg and kind == "sentencepiece":
    return SentencePieceTokenizer(arg)
  if sep and arg and kind == "tiktoken":
    return TiktokenTokenizer(arg)
  raise ValueError(f"unknown tokenizer {name!r}; allowed: "
                   f"{', '.join(TOKENIZER_KINDS)}")
