"""Mask sweep: the same trained weights with another mask at inference.

* ``"causal"``: the model as trained (a baseline column).
* ``"sliding_window"``: every query sees its last ``window`` keys.
* ``"lambda"``: LM-Infinite's Lambda mask, ``num_sinks`` first tokens plus a
  ``window``-key band (window = the training length by default).
* ``"lambda_ceiling"``: Lambda plus LM-Infinite's distance ceiling on the
  RoPE layers: sink keys past the band are scored at distance ``window``
  (RoPE models only).

Each variant is scored with
:func:`~extrapolax.experiments.evaluators.perplexity.perplexity_vs_length`;
its records' ``mask`` field says which mask ran
(``"lambda(sinks=4, window=128)"``, ``"...+ceiling(128)"``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from . import perplexity
from . import variants

__all__ = ["MASKS", "perplexity_with_masks", "mask_variant"]

MASKS = ("causal", "sliding_window", "lambda", "lambda_ceiling")


def mask_variant(model, mask: str, *, window: int, num_sinks: int):
  """``model`` with ``mask`` (one of MASKS) at inference, same weights."""
  if mask not in MASKS:
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
  if mask == "causal":
    return model
  if mask == "sliding_window":
    return variants.with_mask(model, "sliding_window", window=window)
  return variants.with_mask(
      model, "lambda", window=window, num_sinks=num_sinks,
      distance_ceiling=window if mask == "lambda_ceiling" else None)


def perplexity_with_masks(
    model, tokens, *, train_len: Optional[int] = None,
    masks: Sequence[str] = ("sliding_window", "lambda"),
    window: Optional[int] = None, num_sinks: int = 4,
    lengths: Optional[Sequence[int]] = None,
    labels: Optional[Mapping[str, Any]] = None, experiment: str = "mask",
    **perplexity_kwargs) -> list[dict]:
  """Perplexity of ``model`` under each inference mask.

  Args:
    model: a DecoderLM.
    tokens: the evaluation stream or documents.
    train_len: the training length (default ``model.config.max_len``).
    masks: any of MASKS.
    window: the band / window in keys (default train_len, LM-Infinite's
      n_local).
    num_sinks: Lambda's global (sink) tokens (LM-Infinite uses 10..100,
      StreamingLLM 4).
    lengths: evaluation lengths (default 1, 2, 4, 8, 16 x train_len).
    labels: record fields (model, seed, step); mask is set per variant.
    experiment: the records' experiment name.
    **perplexity_kwargs: modes, stride, max_tokens, tokens_per_batch,
      implementation, position_buckets (default 0 here), task.
  """
  train_len = int(train_len or model.config.max_len)
  window = int(window or train_len)
  if num_sinks < 0:
    raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")
  built = [(m, mask_variant(model, m, window=window, num_sinks=num_sinks))
           for m in masks]
  user = {k: v for k, v in dict(labels or {}).items()
          if k not in ("mask", "variant")}
  perplexity_kwargs.setdefault("position_buckets", 0)
  out = []
  for _, variant in built:
    out += perplexity.perplexity_vs_length(
        variant, tokens, train_len=train_len, lengths=lengths, labels=user,
        experiment=experiment, **perplexity_kwargs)
  return out
