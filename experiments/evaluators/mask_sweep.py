"""Mask sweep: the same trained weights with another mask at inference.

A sweep entry is any mask the library can name (``attention.masks.names()``:
registered masks, a user's included), as text with optional parameters,
optionally followed by ``+ceiling``:

* ``"causal"``: plain causal (the baseline column for a causal model).
* ``"sliding_window"``: every query sees its last ``window`` keys.
* ``"lambda"``: LM-Infinite's Lambda mask, ``num_sinks`` first tokens plus a
  ``window``-key band (window = the training length by default).
* ``"lambda+ceiling"`` (or its older name ``"lambda_ceiling"``): Lambda plus
  LM-Infinite's distance ceiling on the RoPE layers: sink keys past the band
  are scored at distance ``window`` (RoPE models only).
* ``"causal+self_extend(8, 1024)"``: any mask plus Self-Extend (group 8,
  neighbour window 1024) on the RoPE layers (RoPE models only).
* ``"causal+string(96, 8)"``: STRING (shift 96, local window 8) on the RoPE
  layers; ``"+p_rope(0.75)"``: p-RoPE; ``"+truncated_basis(0.001, 0.1,
  0.01)"``: Giraffe's truncated basis (training-free, RoPE models only).
  One such transform per entry, after the mask (and ``+ceiling``).
* ``"prefix_lm(prefix_len=8)"``, ``"my_mask(stride=2)"``, ...: any other
  registered mask; parameters named ``window`` / ``num_sinks`` that the text
  leaves out come from the sweep's shared settings.

Each variant is scored with
:func:`~extrapolax.experiments.evaluators.perplexity.perplexity_vs_length`;
its records' ``mask`` field says which mask ran
(``"lambda(sinks=4, window=128)"``, ``"...+ceiling(128)"``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

from extrapolax.attention import masks as masks_lib
from extrapolax.models import AttentionSpec

from . import perplexity
from . import variants

__all__ = ["MASKS", "CEILING", "perplexity_with_masks", "mask_variant",
           "check_entries"]

# The default sweep (any registered mask text may be used as well).
MASKS = ("causal", "sliding_window", "lambda", "lambda_ceiling")
CEILING = "+ceiling"
_ALIASES = {"lambda_ceiling": "lambda" + CEILING}
# Training-free RoPE transforms an entry may end with: name -> (the
# AttentionSpec field it sets, its arguments' type, how to write it).
_TRANSFORMS = {
    "self_extend": (int, "'+self_extend(GROUP, WINDOW)'"),
    "string": (int, "'+string(SHIFT, LOCAL_WINDOW)'"),
    "p_rope": (float, "'+p_rope(FRACTION)'"),
    "truncated_basis": (float, "'+truncated_basis(A, B, RHO)'"),
}
_TRANSFORM = re.compile(r"\+(" + "|".join(_TRANSFORMS)
                        + r")\(([^()]*)\)$")


def _split(entry: str) -> tuple[str, bool, dict[str, Any]]:
  """A sweep entry -> (mask text, with the distance ceiling, the RoPE
  transform as {AttentionSpec field: value}, empty for none)."""
  if not isinstance(entry, str):
    raise ValueError(f"a mask sweep entry must be text such as 'lambda' or "
                     f"'sliding_window(window=64)', got {entry!r}")
  entry = _ALIASES.get(entry.strip(), entry.strip())
  transform = {}
  match = _TRANSFORM.search(entry)
  if match:
    name = match.group(1)
    kind, how = _TRANSFORMS[name]
    try:
      args = tuple(kind(a) for a in match.group(2).split(","))
    except ValueError:
      raise ValueError(f"{entry!r}: write it as {how}") from None
    if name == "self_extend" and (len(args) != 2 or min(args) < 1):
      raise ValueError(f"self_extend{args} needs group and window >= 1")
    transform = {name: args[0] if name == "p_rope" else args}
    entry = entry[:match.start()]
  else:
    for name, (_, how) in _TRANSFORMS.items():
      if f"+{name}" in entry:
        raise ValueError(f"{entry!r}: write it as {how}")
  ceiling = entry.endswith(CEILING)
  return (entry[:-len(CEILING)] if ceiling else entry), ceiling, transform


def check_entries(entries: Sequence[str], *, window: int = 1,
                  num_sinks: int = 0) -> None:
  """Raises ValueError naming the first entry that names no valid mask."""
  for entry in entries:
    try:
      text, ceiling, transform = _split(entry)
      if transform:     # the values are valid
        AttentionSpec(**transform)
      name, params = masks_lib.parse(text)
      accepted = masks_lib.parameters(name)
      for key, value in (("window", window), ("num_sinks", num_sinks)):
        if key in accepted:
          params.setdefault(key, value)
      mask = masks_lib.from_name(name, **params)
      if ceiling and not isinstance(mask, masks_lib.Lambda):
        raise ValueError(f"{CEILING} needs a lambda mask, got {name!r}")
    except ValueError as e:
      raise ValueError(f"mask sweep entry {entry!r}: {e}") from e


def mask_variant(model, mask: str, *, window: int, num_sinks: int):
  """``model`` with the sweep entry ``mask`` at inference, same weights."""
  text, ceiling, transform = _split(mask)
  return variants.with_mask(model, text, window=window, num_sinks=num_sinks,
                            distance_ceiling=window if ceiling else None,
                            **transform)


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
    masks: sweep entries (MASKS, or any registered mask text, optionally
      with ``+ceiling``).
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
  check_entries(masks, window=window, num_sinks=num_sinks)
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
