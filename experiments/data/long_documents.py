"""Long held-out documents tokenized with a pretrained model's tokenizer.

A study of a loaded model (``config.model_source``) scores windows of up to
several times the model's context, each inside one document. Real corpora
rarely hold documents that long, so consecutive held-out documents (in the
corpus order, whole documents only) are joined with a blank line until each
reaches ``min_tokens`` tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from extrapolax.common import checks

from . import corpora as corpora_lib

__all__ = ["long_documents", "join_documents"]


def join_documents(texts: Sequence[str], encode, *, min_tokens: int,
                   max_tokens: Optional[int] = None,
                   separator: str = "\n\n") -> list[np.ndarray]:
  """Tokenizes ``texts``, joining consecutive ones to >= min_tokens each.

  Args:
    texts: documents in order.
    encode: text -> token ids.
    min_tokens: every returned document has at least this many tokens; a
      trailing remainder shorter than that is dropped.
    max_tokens: stop once the documents hold this many tokens (None: all).
    separator: text put between joined documents.
  """
  checks.check_numbers("min_tokens", (min_tokens,), integer=True)
  out, pending, pending_len, total = [], [], 0, 0
  for text in texts:
    if not text.strip():
      continue
    ids = list(encode((separator if pending else "") + text))
    pending.append(np.asarray(ids, np.int32))
    pending_len += len(ids)
    if pending_len >= min_tokens:
      out.append(np.concatenate(pending))
      total += pending_len
      pending, pending_len = [], 0
      if max_tokens is not None and total >= max_tokens:
        break
  return out


def long_documents(corpora: Sequence[str], tokenizer, *, min_tokens: int,
                   max_tokens: Optional[int] = None,
                   eval_fraction: float = 0.1, split_seed: int = 0,
                   cache_dir: Optional[str] = None) -> list[np.ndarray]:
  """The held-out documents of ``corpora``, tokenized, >= min_tokens each.

  Each corpus's eval split (``corpora.split_documents``, the split a
  training run on it leaves out) is joined by :func:`join_documents`;
  ``max_tokens`` caps each corpus's share.

  Raises:
    ValueError: an unknown corpus, or one whose held-out split holds fewer
      than min_tokens tokens.
  """
  out = []
  for name in corpora:
    corpus = corpora_lib.load_corpus(name, cache_dir=cache_dir)
    _, held_out = corpora_lib.split_documents(
        corpus, eval_fraction=eval_fraction, seed=split_seed)
    docs = join_documents(held_out, tokenizer.encode, min_tokens=min_tokens,
                          max_tokens=max_tokens)
    if not docs:
      raise ValueError(f"corpus {name!r}: its held-out split has fewer than "
                       f"min_tokens={min_tokens} tokens")
    out += docs
  return out
