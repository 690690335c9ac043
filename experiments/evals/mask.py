"""The ``mask`` evaluator: a trained model with another mask at inference.

Settings: the ``length`` evaluator's (multiples, modes, max_tokens, ...)
plus ``masks``: any mask the library can name, as text with parameters,
optionally with ``+ceiling`` (causal, sliding_window, lambda,
lambda+ceiling, prefix_lm(8), a mask registered in the user's own module;
see ``evaluators.mask_sweep``), ``window`` (None: train_len) and ``num_sinks``.
Records: ``evaluators.perplexity_with_masks``; report: the perplexity table
and plot with the model's causal (``length``) column beside.
"""

from __future__ import annotations

from extrapolax.common import checks
from extrapolax.experiments import evals
from extrapolax.experiments.evals import length

__all__ = ["EVALUATOR", "HELP"]

HELP = dict(length.HELP,
            masks="the inference masks (comma-separated): any registered "
                  "mask as text, e.g. causal, sliding_window, lambda, "
                  "lambda+ceiling, prefix_lm(prefix_len=8); window and "
                  "num_sinks fill parameters the text leaves out",
            window="the window / Lambda band in keys (None: train_len)",
            num_sinks="Lambda's global (sink) tokens")


def _validate(settings: dict, study) -> dict:
  from extrapolax.experiments.evaluators import mask_sweep  # pylint: disable=import-outside-toplevel
  settings = length.known_settings(settings, HELP)
  masks = evals.split_names(settings.pop("masks", "sliding_window,lambda"))
  window = settings.pop("window", None)
  if window is not None:
    length.check_positive("window", (window,), integer=True)
  num_sinks = checks.check_int("num_sinks", settings.pop("num_sinks", 4), 0)
  if not masks:
    raise ValueError("masks is empty")
  mask_sweep.check_entries(masks, window=window or int(study.train.train_len),
                           num_sinks=num_sinks)
  return dict(length.perplexity_settings(settings, study), masks=masks,
              window=window, num_sinks=num_sinks)


_run = length.sweep_runner("perplexity_with_masks", "mask")


def _report(records, out_dir, all_records) -> str:
  parts = [length.perplexity_section(records, out_dir, all_records,
                                     what="Inference masks", base_columns=True),
           length.position_section(records, out_dir, all_records)]
  return "\n\n".join(p for p in parts if p)


EVALUATOR = evals.register(evals.Evaluator(
    name="mask", run=_run, validate=_validate, report=_report, help=HELP))
