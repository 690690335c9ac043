"""The ``rope_scaling`` evaluator: zero-shot RoPE scalings of a RoPE model.

Settings: the ``length`` evaluator's (multiples, modes, max_tokens, ...)
plus ``methods`` (linear, dynamic, ntk, yarn, llama3; "none" adds the
unscaled model) and ``factors`` (numbers and/or "matched": the factor
eval_len / train_len). ``models`` must name RoPE variants (default config:
"rope"). Records: ``evaluators.rope_scaling_sweep``; report: the perplexity
table and plot with the model's unscaled (``length``) column beside.
"""

from __future__ import annotations

from extrapolax.experiments import evals
from extrapolax.experiments.evals import length

__all__ = ["EVALUATOR", "HELP"]

HELP = dict(length.HELP, models="the RoPE variants to scale (e.g. 'rope')",
            methods="linear, dynamic, ntk, yarn, llama3; 'none' adds the "
                    "unscaled model",
            factors="numbers and/or 'matched' (factor = eval_len / "
                    "train_len)")


def _factors(value) -> tuple:
  out = []
  for item in evals.split_names(value):
    if isinstance(item, str) and item != "matched":
      try:
        item = float(item)
      except ValueError as e:
        raise ValueError(f"factors: {item!r} is neither a number nor "
                         "'matched'") from e
    out.append(item)
  return tuple(out)


def _validate(settings: dict, study) -> dict:
  from extrapolax.experiments.evaluators import variants  # pylint: disable=import-outside-toplevel
  models = settings.get("models", ())
  settings = length.known_settings(settings, HELP)
  pretrained = study.get("model_source") is not None   # its RoPE layers
  not_rope = [m for m in models if m != "rope" and not pretrained]
  if not_rope:
    raise ValueError(f"models={tuple(models)!r}: {not_rope} have no RoPE "
                     "layer to scale; use 'rope' or 'none'")
  methods = evals.split_names(settings.pop("methods", "linear"))
  length.check_choices("methods", methods, ("none",) + variants.ROPE_SCALINGS)
  factors = _factors(settings.pop("factors", "matched"))
  length.check_positive("factors", [f for f in factors if f != "matched"])
  return dict(length.perplexity_settings(settings, study), methods=methods,
              factors=factors)


_run = length.sweep_runner("rope_scaling_sweep", "rope_scaling")


def _report(records, out_dir, all_records) -> str:
  parts = [length.perplexity_section(records, out_dir, all_records,
                                     what="Zero-shot RoPE scaling",
                                     base_columns=True),
           length.position_section(records, out_dir, all_records)]
  return "\n\n".join(p for p in parts if p)


EVALUATOR = evals.register(evals.Evaluator(
    name="rope_scaling", run=_run, validate=_validate, report=_report,
    help=HELP))
