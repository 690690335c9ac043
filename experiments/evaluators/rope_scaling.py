"""Zero-shot RoPE scaling sweep: the trained weights with a Hugging Face
``rope_scaling`` dict put on at evaluation, no fine-tuning.

Each variant is a ``DecoderLM`` built from the model's config with every RoPE
layer's ``rope_scaling`` replaced (``variants.with_rope_scaling``) and the
trained state merged in, then scored by
:func:`~extrapolax.experiments.evaluators.perplexity.perplexity_vs_length`.

Factors: a number s runs that scaling at every length; ``"matched"`` uses
s = max(1, eval_len / train_len) at each length (position interpolation's
usual choice). Dynamic NTK already follows the length (its ratio is
``s * l / M - (s - 1)``, l/M at s = 1), so "matched" runs dynamic at s = 1,
which is exactly static NTK at the matched factor (base * (l/M)^(d/(d-2)))
in a full forward: the two "matched" columns agree by construction. Fixed
factors tell them apart (dynamic at s = 2 is emozilla's original setting).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from . import perplexity
from . import variants

__all__ = ["rope_scaling_sweep", "matched_factor"]

Factor = Union[float, str]


def matched_factor(method: str, eval_len: int, train_len: int) -> float:
  """The "matched" factor at ``eval_len`` (1.0 for dynamic)."""
  if method == "dynamic":
    return 1.0
  return max(1.0, eval_len / train_len)


def _factor_label(factor: float) -> str:
  return f"x{factor:g}"


def rope_scaling_sweep(
    model, tokens, *, train_len: Optional[int] = None,
    methods: Sequence[str] = variants.ROPE_SCALINGS,
    factors: Sequence[Factor] = ("matched",),
    lengths: Optional[Sequence[int]] = None,
    labels: Optional[Mapping[str, Any]] = None,
    experiment: str = "rope_scaling", **perplexity_kwargs) -> list[dict]:
  """Perplexity of ``model`` under each RoPE scaling and factor.

  Args:
    model: a DecoderLM with at least one RoPE layer.
    tokens: the evaluation stream or documents (as perplexity_vs_length).
    train_len: the training length (default ``model.config.max_len``): the
      original context of yarn/llama3 and dynamic's max_position_embeddings.
    methods: any of "none" (the model unchanged), "linear", "dynamic", "ntk",
      "yarn", "llama3".
    factors: numbers > 0 and/or "matched" (see the module docstring).
    lengths: evaluation lengths (default 1, 2, 4, 8, 16 x train_len).
    labels: record fields (model, seed, step); scaling, scale and variant
      are set per variant.
    experiment: the records' experiment name.
    **perplexity_kwargs: modes, stride, max_tokens, tokens_per_batch,
      implementation, position_buckets (default 0 here), task.

  Returns:
    Records with scaling = method, scale = the factor used at that length,
    variant = "<model> <method> x<factor>" or "<model> <method> matched".
  """
  train_len = int(train_len or model.config.max_len)
  lengths = tuple(lengths or perplexity.default_lengths(train_len))
  for method in methods:
    variants.rope_scaling_dict(method, 1.0, train_len)  # validates the name
  for factor in factors:
    if factor != "matched" and (isinstance(factor, (str, bool)) or
                                not factor > 0):
      raise ValueError(f"factors must be numbers > 0 or 'matched', got "
                       f"{factor!r}")
  user = {k: v for k, v in dict(labels or {}).items()
          if k not in ("scaling", "scale", "variant")}
  name = user.get("model", variants.describe(model)["pe"])
  perplexity_kwargs.setdefault("position_buckets", 0)
  out = []
  for method in methods:
    if method == "none":
      variant = variants.with_rope_scaling(model, None, train_len=train_len)
      out += perplexity.perplexity_vs_length(
          variant, tokens, train_len=train_len, lengths=lengths,
          labels=dict(user, variant=f"{name} none"), experiment=experiment,
          **perplexity_kwargs)
      continue
    for factor in factors:
      if factor == "matched":
        for length in lengths:
          s = matched_factor(method, length, train_len)
          variant = variants.with_rope_scaling(
              model, variants.rope_scaling_dict(method, s, train_len),
              train_len=train_len)
          out += perplexity.perplexity_vs_length(
              variant, tokens, train_len=train_len, lengths=(length,),
              labels=dict(user, variant=f"{name} {method} matched"),
              experiment=experiment, **perplexity_kwargs)
      else:
        variant = variants.with_rope_scaling(
            model, variants.rope_scaling_dict(method, factor, train_len),
            train_len=train_len)
        out += perplexity.perplexity_vs_length(
            variant, tokens, train_len=train_len, lengths=lengths,
            labels=dict(user, variant=(f"{name} {method} "
                                       f"{_factor_label(factor)}")),
            experiment=experiment, **perplexity_kwargs)
  return out
