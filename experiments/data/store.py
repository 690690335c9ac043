"""A token store on disk: documents' tokens in tensorstore zarr arrays.

A store is a folder::

  tokens/         zarr int32 [num_tokens]      all documents, concatenated
  offsets/        zarr int64 [num_documents+1] document i is
                                                tokens[offsets[i]:offsets[i+1]]
  metadata.json   {"format", "num_documents", "num_tokens", "metadata": {...}}

``TokenStore.create`` writes the folder under a temporary name and renames
it into place, so a store that ``open`` accepts is complete.
``build_store`` tokenizes one split of a corpus into a store and reuses an
existing store whose metadata (corpus sha256, tokenizer, split and split
parameters) matches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import tensorstore as ts

from . import corpora as corpora_lib
from . import tokenizers as tokenizers_lib

__all__ = ["TokenStore", "build_store", "default_store_path", "SPLITS",
           "STORE_FORMAT"]

STORE_FORMAT = "extrapolax.token_store/1"
SPLITS = ("train", "eval", "all")
_CHUNK = 1 << 20
_METADATA_FILE = "metadata.json"


def _zarr_spec(path: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _write_zarr(path: str, array: np.ndarray) -> None:
  spec = _zarr_spec(path)
  spec["metadata"] = {
      "dtype": array.dtype.str, "shape": [int(array.size)],
      "chunks": [max(1, min(_CHUNK, int(array.size)))],
      "compressor": {"id": "zstd", "level": 3}}
  store = ts.open(spec, create=True, delete_existing=True).result()
  store.write(array).result()


class TokenStore:
  """Read access to a store folder (see the module docstring)."""

  def __init__(self, path: str, tokens: ts.TensorStore, offsets: np.ndarray,
               metadata: Mapping[str, Any]):
    self.path = path
    self._tokens = tokens
    self._offsets = offsets
    self._offsets.setflags(write=False)
    self._metadata = dict(metadata)

  @classmethod
  def create(cls, path: str, token_docs: Sequence[Any], *,
             metadata: Optional[Mapping[str, Any]] = None,
             overwrite: bool = False) -> "TokenStore":
    """Writes ``token_docs`` (integer arrays) as a new store at ``path``.

    Args:
      path: the store folder; must not exist unless ``overwrite``.
      token_docs: one 1-D integer array per document (values fit int32).
      metadata: JSON-serialisable facts to keep with the tokens.
      overwrite: replace an existing store at ``path``.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
      raise ValueError(f"{path} exists; pass overwrite=True to replace it")
    docs = []
    for i, doc in enumerate(token_docs):
      doc = np.asarray(doc)
      if doc.ndim != 1 or (doc.size and doc.dtype.kind not in "iu"):
        raise ValueError(f"document {i}: expected a 1-D integer array, got "
                         f"shape {doc.shape} dtype {doc.dtype}")
      if doc.size and (doc.min() < np.iinfo(np.int32).min
                       or doc.max() > np.iinfo(np.int32).max):
        raise ValueError(f"document {i}: token ids must fit int32")
      docs.append(doc.astype(np.int32))
    lengths = np.array([d.size for d in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    header = {"format": STORE_FORMAT, "num_documents": len(docs),
              "num_tokens": int(flat.size),
              "metadata": json.loads(json.dumps(dict(metadata or {})))}
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tokens-", dir=parent)
    try:
      _write_zarr(os.path.join(staging, "tokens"), flat)
      _write_zarr(os.path.join(staging, "offsets"), offsets)
      with open(os.path.join(staging, _METADATA_FILE), "w",
                encoding="utf-8") as f:
        json.dump(header, f, indent=1, sort_keys=True)
      if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(path, os.path.join(old, "store"))
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(staging, path)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    return cls.open(path)

  @classmethod
  def open(cls, path: str) -> "TokenStore":
    """Opens the store at ``path`` (ValueError if there is none)."""
    path = os.path.abspath(path)
    header_path = os.path.join(path, _METADATA_FILE)
    if not os.path.isfile(header_path):
      raise ValueError(f"{path} is not a token store (no {_METADATA_FILE})")
    with open(header_path, encoding="utf-8") as f:
      header = json.load(f)
    if header.get("format") != STORE_FORMAT:
      raise ValueError(f"{path}: format {header.get('format')!r}, expected "
                       f"{STORE_FORMAT!r}")
    tokens = ts.open(_zarr_spec(os.path.join(path, "tokens")),
                     open=True).result()
    offsets = ts.open(_zarr_spec(os.path.join(path, "offsets")),
                      open=True).result().read().result()
    offsets = np.asarray(offsets, np.int64)
    if (offsets.shape != (header["num_documents"] + 1,)
        or tokens.shape != (header["num_tokens"],)
        or offsets[-1] != header["num_tokens"]):
      raise ValueError(f"{path}: arrays do not match {_METADATA_FILE} "
                       f"(offsets {offsets.shape}, tokens {tokens.shape})")
    return cls(path, tokens, offsets, header["metadata"])

  @property
  def num_documents(self) -> int:
    return len(self._offsets) - 1

  @property
  def num_tokens(self) -> int:
    return int(self._offsets[-1])

  @property
  def offsets(self) -> np.ndarray:
    """int64 [num_documents + 1] (read-only)."""
    return self._offsets

  @property
  def document_lengths(self) -> np.ndarray:
    return np.diff(self._offsets)

  @property
  def metadata(self) -> dict:
    return json.loads(json.dumps(self._metadata))

  def tokens(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """int32 tokens[start:stop] of the concatenated documents."""
    stop = self.num_tokens if stop is None else stop
    if not 0 <= start <= stop <= self.num_tokens:
      raise ValueError(f"need 0 <= start <= stop <= {self.num_tokens}, got "
                       f"start={start}, stop={stop}")
    return np.asarray(self._tokens[start:stop].read().result(), np.int32)

  def document(self, index: int) -> np.ndarray:
    """int32 tokens of document ``index``."""
    if not -self.num_documents <= index < self.num_documents:
      raise ValueError(f"document index {index} out of range for "
                       f"{self.num_documents} documents")
    index %= self.num_documents
    return self.tokens(int(self._offsets[index]),
                       int(self._offsets[index + 1]))

  def gather(self, indices: np.ndarray) -> np.ndarray:
    """int32 tokens at arbitrary flat indices (any shape), read from disk."""
    indices = np.asarray(indices, np.int64)
    if not indices.size:
      return np.zeros(indices.shape, np.int32)
    return np.asarray(self._tokens.vindex[indices].read().result(), np.int32)

  def __repr__(self) -> str:
    return (f"TokenStore({self.path!r}, num_documents={self.num_documents}, "
            f"num_tokens={self.num_tokens})")


def _safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "x"


def default_store_path(root: str, corpus_name: str, tokenizer_name: str,
                       split: str) -> str:
  """A folder name under ``root`` for one (corpus, tokenizer, split)."""
  return os.path.join(root, "_".join(_safe_name(p) for p in (
      os.path.basename(corpus_name.rstrip("/\\")) or corpus_name,
      tokenizer_name, split)))


def build_store(path: str, corpus: Union[str, corpora_lib.Corpus],
                tokenizer: Union[str, tokenizers_lib.Tokenizer] = "byte", *,
                split: str = "train", eval_fraction: float = 0.1,
                split_seed: int = 0, min_eval_chars: Optional[int] = None,
                cache_dir: Optional[str] = None) -> TokenStore:
  """Tokenizes one split of ``corpus`` into a store at ``path``, cached.

  An existing store at ``path`` is reused when its metadata records the same
  corpus sha256, tokenizer and split parameters; otherwise it is rebuilt.

  Args:
    path: the store folder.
    corpus: a Corpus or a name for ``load_corpus``.
    tokenizer: a tokenizer or a name for ``get_tokenizer``.
    split: "train" or "eval" (``split_documents`` with the parameters
      below), or "all" documents.
    eval_fraction, split_seed, min_eval_chars: see ``split_documents``.
    cache_dir: archive cache for ``load_corpus`` when corpus is a name.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if isinstance(corpus, str):
    corpus = corpora_lib.load_corpus(corpus, cache_dir=cache_dir)
  if isinstance(tokenizer, str):
    tokenizer = tokenizers_lib.get_tokenizer(tokenizer)
  identity = {
      "corpus": corpus.name, "corpus_sha256": corpus.info["sha256"],
      "tokenizer": tokenizer.name, "vocab_size": int(tokenizer.vocab_size),
      "split": split,
      "eval_fraction": None if split == "all" else float(eval_fraction),
      "split_seed": None if split == "all" else int(split_seed),
      "min_eval_chars": None if split == "all" else min_eval_chars}
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, _METADATA_FILE)):
    existing = TokenStore.open(path)
    kept = existing.metadata
    if all(kept.get(k) == v for k, v in identity.items()):
      return existing
  elif os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{path} exists and is not a token store; not "
                     "overwriting it")
  if split == "all":
    indices = list(range(len(corpus.documents)))
  else:
    train, evaluation = corpora_lib.split_indices(
        [len(d) for d in corpus.documents], eval_fraction=eval_fraction,
        seed=split_seed, min_eval_chars=min_eval_chars)
    indices = train if split == "train" else evaluation
  names = corpus.document_names
  metadata = dict(
      identity, corpus_info=dict(corpus.info), document_indices=indices,
      document_names=[names[i] for i in indices] if names else None)
  token_docs = [tokenizer.encode(corpus.documents[i]) for i in indices]
  return TokenStore.create(path, token_docs, metadata=metadata,
                           overwrite=True)
