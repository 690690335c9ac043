"""The ``length`` evaluator (alias ``perplexity``): perplexity vs length.

Settings (``config.evals.<name>``)::

  type="length", models="",          # "" every variant
  multiples=(1, 2, 4, 8, 16),        # of train.train_len
  modes="nonoverlap",                # nonoverlap, sliding
  stride=None,                       # sliding stride (None: train_len // 2)
  max_tokens=16384,                  # scored tokens per length (None: all)
  tokens_per_batch=8192, implementation=None, context_devices=1

Records: metric ``perplexity`` per mode and length, and ``position_nll``
(loss per position) of the longest non-overlapping length
(``evaluators.perplexity_vs_length``). Report: a table and a log-scale plot
per mode, and the loss-per-position plot. The helpers here
(``perplexity_settings``, ``on_mesh``, ``perplexity_section``) serve the
other perplexity evaluators (rope_scaling, mask) too.
"""

from __future__ import annotations

from typing import Optional, Sequence

from extrapolax.common import checks
from extrapolax.experiments import evals
from extrapolax.experiments import records as records_lib
from extrapolax.experiments import report

__all__ = ["EVALUATOR", "HELP", "perplexity_settings", "on_mesh",
           "perplexity_section", "position_section", "check_choices", "check_positive"]

HELP = {
    "models": "the variants it runs on: comma-separated, '' every variant, "
              "'none' none",
    "multiples": "evaluation lengths, as multiples of train.train_len",
    "modes": "nonoverlap and/or sliding (comma-separated)",
    "stride": "the sliding stride (None: train_len // 2)",
    "max_tokens": "scored tokens per length and mode (None: all)",
    "tokens_per_batch": "windows per call = tokens_per_batch // length",
    "implementation": "attention implementation (None: the model's, auto)",
    "context_devices": "> 1: split each window over this many devices "
                       "(context-parallel); lengths must divide by it",
    "position_buckets": "loss per position over the longest length, in "
                        "this many buckets (0: none; None: the evaluator's "
                        "default, 32 for length, 0 for the sweeps)",
}


def check_choices(name: str, values: Sequence, allowed: Sequence) -> None:
  checks.check_choices(name, values, allowed)


def check_positive(name: str, values: Sequence, *, integer=False) -> None:
  checks.check_numbers(name, values, integer=integer)


def _device_count() -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.device_count()


def perplexity_settings(settings: dict, study) -> dict:
  """Checks the shared perplexity settings; returns the run's settings
  (lengths resolved from multiples)."""
  train_len = int(study.train.train_len)
  multiples = evals.split_numbers(settings.get("multiples", (1, 2, 4, 8, 16)))
  if not multiples:
    raise ValueError("multiples is empty; give multiples of train_len, e.g. "
                     "1,2,4")
  check_positive("multiples", multiples)
  modes = evals.split_names(settings.get("modes", "nonoverlap"))
  check_choices("modes", modes, records_lib.MODES)
  max_tokens = settings.get("max_tokens", 16384)
  if max_tokens is not None:
    check_positive("max_tokens", (max_tokens,), integer=True)
  tokens_per_batch = settings.get("tokens_per_batch", 8192)
  check_positive("tokens_per_batch", (tokens_per_batch,), integer=True)
  out = dict(
      lengths=tuple(int(round(train_len * float(m))) for m in multiples),
      modes=modes, stride=settings.get("stride"), max_tokens=max_tokens,
      tokens_per_batch=tokens_per_batch,
      implementation=settings.get("implementation"), train_len=train_len)
  context = settings.get("context_devices", 1)
  check_positive("context_devices", (context,), integer=True)
  if context > _device_count():
    raise ValueError(f"context_devices={context} but only "
                     f"{_device_count()} devices are available")
  if context > 1:   # only then (so default fingerprints stay as they were)
    out["context_devices"] = context
  buckets = settings.get("position_buckets")
  if buckets is not None:   # likewise
    out["position_buckets"] = checks.check_int("position_buckets", buckets)
  return out


def on_mesh(settings: dict) -> dict:
  """``context_devices`` -> ``mesh``: the first n devices split each
  evaluation window (context-parallel attention)."""
  settings = dict(settings)
  context = settings.pop("context_devices", 1)
  if context > 1:
    import jax  # pylint: disable=import-outside-toplevel
    from extrapolax.experiments import sharding  # pylint: disable=import-outside-toplevel
    settings["mesh"] = sharding.make_mesh({"context": context},
                                          jax.devices()[:context])
  return settings


def known_settings(settings: dict, allowed) -> dict:
  """A copy of an entry's settings without ``models``; a name not in
  ``allowed`` raises, listing the allowed ones."""
  settings = dict(settings)
  settings.pop("models", None)
  unknown = sorted(set(settings) - set(allowed))
  if unknown:
    raise ValueError(f"unknown settings {unknown}; allowed: {sorted(allowed)}")
  return settings


def sweep_runner(function: str, experiment: str):
  """The ``run`` of a perplexity sweep: ``evaluators.<function>`` on the
  documents, the settings' mesh applied."""

  def run(model, documents, settings: dict, labels: dict) -> list:
    from extrapolax.experiments import evaluators  # pylint: disable=import-outside-toplevel
    labels = dict(labels)
    name = labels.pop("experiment", experiment)
    return getattr(evaluators, function)(
        model, documents, labels=labels, experiment=name, **on_mesh(settings))

  return run


def _validate(settings: dict, study) -> dict:
  settings = known_settings(settings, HELP)
  return perplexity_settings(settings, study)


_run = sweep_runner("perplexity_vs_length", "length")


def _with_base_columns(group, all_records):
  """The base (``length`` type) perplexity of the same models, and of the
  models fine-tuned from them with a RoPE scaling (records whose ``base`` is
  one of them and whose ``scaling`` is not "none": PI, YaRN), at the same
  lengths and protocol, as columns beside a sweep's."""
  key = lambda r: (r["metric"], r["mode"], r["stride"], r["task"])
  keys = {key(r) for r in group}
  models = {r["model"] for r in group}
  labels = set(report.variants(group))
  lengths = {r["eval_len"] for r in group}
  base = [r for r in all_records or ()
          if r.get("experiment") == "length" and key(r) in keys
          and (r["model"] in models or (r.get("base") in models
                                        and r["scaling"] != "none"))
          and r["eval_len"] in lengths
          and records_lib.variant_label(r) not in labels]
  return base + list(group)


def perplexity_section(records, out_dir: Optional[str], all_records, *,
                       what: str, base_columns: bool = False) -> str:
  """Per (mode, stride, task): the perplexity table and (with out_dir) a
  log-scale plot titled "<what>: perplexity vs length, ..."."""
  parts = []
  for key, group in report.group_records(records).items():
    if key[1] != "perplexity":
      continue
    title = report.group_title(key)
    shown = _with_base_columns(group, all_records) if base_columns else group
    train = ", ".join(str(t) for t in report.train_lens(group))
    lines = [f"## {title}", "",
             f"Training length {train} (the row marked (train)).", "",
             report.length_table(shown, "perplexity")]
    if out_dir is not None:
      mode, stride = key[2], key[3]
      where = (f"sliding windows, stride {stride}" if mode == "sliding"
               else "non-overlapping windows")
      name = report.line_plot(
          shown, f"{what}: perplexity vs length ({where})", "perplexity",
          out_dir, f"{report.slug(key)}.png", logy=True)
      lines += ["", f"![{title}]({name})"]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def position_section(records, out_dir: Optional[str], all_records=None) -> str:
  """The loss-per-position plots of ``records`` (their position_nll); with
  ``all_records``, a sweep's plot also draws the same models' ``length``
  curve over the same windows (as perplexity_section's base columns)."""
  parts = []
  for key, group in report.group_records(records).items():
    if key[1] != "position_nll":
      continue
    if all_records is not None:
      # A sweep's curves beside the same models' own (length) curve.
      group = _with_base_columns(group, all_records)
    title = report.group_title(key)
    longest = max(r["eval_len"] for r in group)
    train = ", ".join(str(t) for t in report.train_lens(group))
    lines = [f"## {title}", "",
             f"Mean NLL (nats) by position within windows of {longest} "
             f"tokens; training length {train}."]
    if out_dir is not None:
      name = report.line_plot(
          group, f"Loss by position within {longest}-token windows",
          "mean NLL (nats)", out_dir, f"{report.slug(key)}.png",
          by=("position", "position_end"),
          x_of=lambda k: (k[1] + k[2]) / 2,
          xlabel="position in the window")
      lines += ["", f"![{title}]({name})"]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def _report(records, out_dir: Optional[str], all_records) -> str:
  others = [r for r in records
           if r["metric"] not in ("perplexity", "position_nll")]
  parts = [perplexity_section(records, out_dir, all_records,
                              what="Position encodings"),
           position_section(records, out_dir)]
  if others:
    parts.append(report.generic_section(others, out_dir))
  return "\n\n".join(p for p in parts if p)


def _summary(records, all_records) -> str:
  return perplexity_section(records, None, all_records,
                            what="Position encodings")


EVALUATOR = evals.register(evals.Evaluator(
    name="length", run=_run, validate=_validate, report=_report,
    summary=_summary, metrics=("perplexity", "position_nll"), help=HELP),
    "perplexity")
