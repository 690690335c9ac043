"""Keeping non-finite values a mask hides out of attention outputs.

A probability of exactly zero still multiplies its value row in ``p @ v``,
and ``0 * nan`` is ``nan``: one NaN in a value row that the mask hides (a
future key, another packed document) would poison every output row. So every
implementation *selects* such rows away instead:

* value rows holding a non-finite entry are replaced by zeros
  (``clean_values``), so a hidden row contributes exactly nothing;
* a row that does see one (its own document's NaN) must still come out NaN,
  so the key is flagged (``bad``). Where autodiff runs over materialised
  logits (the dense path), the output rows that see a flagged key are
  selected to NaN afterwards. In a forward whose backward is written by hand
  (xla_chunked, the Pallas kernels) the flagged key rows are set to NaN
  (``poison_keys``): their logits are NaN for every query, and the mask,
  which selects hidden pairs to ``-inf``, lets the NaN through exactly where
  the pair is visible;
* a hand-written backward keeps the keys as given and gives rows whose
  forward is NaN no gradient (their probabilities selected to exactly 0), so
  their NaN reaches no other input.

Rows that see no flagged key are exactly what they would be without the bad
rows; their gradients stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["clean_values", "poison_keys"]


def clean_values(v: Array, axis: int = -1):
  """(v with non-finite rows zeroed, bool flag per row).

  A row is the vector along ``axis`` (the head dimension); the flag has
  ``v``'s shape without that axis.
  """
  bad = ~jnp.all(jnp.isfinite(v), axis=axis)
  return jnp.where(jnp.expand_dims(bad, axis), jnp.zeros((), v.dtype), v), bad


def poison_keys(bad: Array, *keys):
  """Each of ``keys`` (or None) with the rows ``bad`` flags set to NaN.

  For kernels with a custom backward: the forward's logits of a flagged
  column are then NaN for every query, and the mask selects the hidden
  pairs to -inf: no pass over the logits is needed.
  The backward must use the keys as given (``ds @ k`` would carry the NaN).
  """
  return tuple(None if k is None else jnp.where(
      bad[..., None], jnp.asarray(jnp.nan, k.dtype), k) for k in keys)

