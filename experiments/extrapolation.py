r"""The length-extrapolation study: the README's main job.

::

  python -m extrapolax.experiments.extrapolation --workdir=/tmp/extrapolation

trains small models that differ only in their position encoding (the
variants of experiments/configs/extrapolation.py, the default ``--config``),
evaluates each far past its training length, and writes a report::

  WORKDIR/config.json        the study config
  WORKDIR/runs/<variant>/    each model's training run (trainer.train:
                             config.json, metrics.jsonl, checkpoints/, ...)
  WORKDIR/data/              the token stores, shared by the runs
  WORKDIR/results.jsonl      one results record per evaluation point
  WORKDIR/evaluations.json   which evaluations are done, with what settings
  WORKDIR/report.md, *.png   tables and plots (experiments.report)

Evaluations (each a list of records, appended to results.jsonl when done):

* ``length``: every variant's perplexity at eval.multiples x train_len
  (non-overlapping by default) and its loss per position at the longest.
* ``rope_scaling``: the rope_scaling.model variant with each zero-shot RoPE
  scaling (factor matched to the length by default), no fine-tuning.
* ``mask``: the masks.model variant with a sliding window and a Lambda mask
  at inference.
* ``passkey``: passkey accuracy over passkey.lengths x passkey.depths.

Rerunning the command with the same workdir reuses everything done: a
finished training run is not retrained (an unfinished one resumes from its
checkpoint), and an evaluation whose settings, model config and checkpoint
step are unchanged is skipped; the report is then rewritten from
results.jsonl. Changing an evaluation setting (``--config.eval.max_tokens``)
re-runs that evaluation and appends its records (the report shows the latest
value per point); changing a training field makes the trainer refuse the
workdir. ``python -m extrapolax.experiments.report --workdir=WORKDIR``
re-reports without JAX.

``--config=PATH[:ARGS]`` picks another config file (a name such as
``extrapolation.py:quick`` is found in the installed configs folder) and
``--config.FIELD=VALUE`` overrides a field, as for
``extrapolax.experiments.train``. Tuple fields take comma-separated values:
``--config.variants=rope,alibi``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from extrapolax.experiments import configs
from extrapolax.experiments import evaluators
from extrapolax.experiments import modeling
from extrapolax.experiments import records as records_lib
from extrapolax.experiments import report as report_lib
from extrapolax.experiments import sharding
from extrapolax.experiments import trainer

__all__ = ["DEFAULT_CONFIG", "Arguments", "Evaluation", "StudyResult",
           "split_names", "parse_flags", "validate_config", "variant_config",
           "evaluations", "run_study", "summary_tables", "main", "run"]

DEFAULT_CONFIG = os.path.join(configs.CONFIG_DIR, "extrapolation.py")
RESULTS_FILE = report_lib.RESULTS_FILE
DONE_FILE = "evaluations.json"
ROPE_SCALING_METHODS = ("none",) + evaluators.variants.ROPE_SCALINGS


# ----------------------------------------------------------------------------
# Config.


def split_names(value) -> tuple:
  """A list field: "rope,alibi", ("rope,alibi",) or ("rope", "alibi") ->
  ("rope", "alibi"); numbers are kept as they are."""
  if isinstance(value, str):
    value = (value,)
  out = []
  for item in value or ():
    if isinstance(item, str):
      out += [part.strip() for part in item.split(",") if part.strip()]
    else:
      out.append(item)
  return tuple(out)


def _factors(value) -> tuple:
  """rope_scaling.factors: numbers and "matched" (numeric text -> float)."""
  out = []
  for item in split_names(value):
    if isinstance(item, str) and item != "matched":
      try:
        item = float(item)
      except ValueError as e:
        raise ValueError(f"config.rope_scaling.factors: {item!r} is neither "
                         "a number nor 'matched'") from e
    out.append(item)
  return tuple(out)


def _choices(name: str, values: Sequence, allowed: Sequence) -> None:
  bad = [v for v in values if v not in allowed]
  if bad:
    raise ValueError(f"config.{name}={tuple(values)!r}: {bad} not in "
                     f"{tuple(allowed)}")


def _positive(name: str, values: Sequence, *, integer=False) -> None:
  for v in values:
    ok = (not isinstance(v, bool) and isinstance(v, (int, float))
          and v > 0 and (not integer or int(v) == v))
    if not ok:
      kind = "positive integers" if integer else "positive numbers"
      raise ValueError(f"config.{name}={tuple(values)!r} must hold {kind}; "
                       f"got {v!r}")


def _optional_model(config, section: str, variants: Sequence[str]) -> str:
  """config.<section>.model: "" (none) or one of the variants."""
  name = config[section].model or ""
  if name and name not in variants:
    raise ValueError(f"config.{section}.model={name!r} is not one of the "
                     f"variants {tuple(variants)} (use '' for none)")
  return name


def validate_config(config) -> None:
  """Raises ValueError naming the first bad field of a study config."""
  variants = split_names(config.variants)
  if not variants:
    raise ValueError("config.variants is empty; name at least one position "
                     f"encoding of {modeling.PE_CHOICES}")
  _choices("variants", variants, modeling.PE_CHOICES)
  if len(set(variants)) != len(variants):
    raise ValueError(f"config.variants={variants!r} repeats a name")
  if config.train.data.task is not None:
    raise ValueError(f"config.train.data.task={config.train.data.task!r}: "
                     "the study models text; use None")
  for variant in variants:
    trainer.validate_config(variant_config(config, variant, workdir=""))
  multiples = split_names(config.eval.multiples)
  if not multiples:
    raise ValueError("config.eval.multiples is empty")
  _positive("eval.multiples", multiples)
  _choices("eval.modes", split_names(config.eval.modes), records_lib.MODES)
  if config.eval.max_tokens is not None:
    _positive("eval.max_tokens", (config.eval.max_tokens,), integer=True)
  _positive("eval.tokens_per_batch", (config.eval.tokens_per_batch,),
            integer=True)
  context = config.eval.get("context_devices", 1)
  _positive("eval.context_devices", (context,), integer=True)
  if context > jax_device_count():
    raise ValueError(f"config.eval.context_devices={context} but only "
                     f"{jax_device_count()} devices are available")
  scaled = _optional_model(config, "rope_scaling", variants)
  if scaled:
    if scaled != "rope":
      raise ValueError(f"config.rope_scaling.model={scaled!r} has no RoPE "
                       "layer to scale; use 'rope' or ''")
    _choices("rope_scaling.methods", split_names(config.rope_scaling.methods),
             ROPE_SCALING_METHODS)
    factors = _factors(config.rope_scaling.factors)
    _positive("rope_scaling.factors", [f for f in factors if f != "matched"])
  if _optional_model(config, "masks", variants):
    _choices("masks.masks", split_names(config.masks.masks),
             evaluators.mask_sweep.MASKS)
    if config.masks.window is not None:
      _positive("masks.window", (config.masks.window,), integer=True)
  lengths = split_names(config.passkey.lengths)
  if lengths:
    _positive("passkey.lengths", lengths, integer=True)
    _choices("passkey.models", split_names(config.passkey.models), variants)
    depths = split_names(config.passkey.depths)
    if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
      raise ValueError(f"config.passkey.depths={depths!r} must be fractions "
                       "in [0, 1]")
    _positive("passkey.trials", (config.passkey.trials,), integer=True)


def variant_config(config, variant: str,
                   workdir: str) -> ml_collections.ConfigDict:
  """The training config of one variant: config.train with model.pe set.

  The runs share one token store folder, WORKDIR/data, unless
  config.train.data.cache_dir names one.
  """
  train = config.train.copy_and_resolve_references()
  train.unlock()
  train.model.pe = variant
  if train.data.cache_dir is None and workdir:
    train.data.cache_dir = os.path.join(os.path.abspath(workdir), "data")
  return train


# ----------------------------------------------------------------------------
# Evaluations.


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of one trained variant.

  Attributes:
    name: "<experiment>/<variant>", its key in evaluations.json.
    variant: the trained model it evaluates.
    settings: everything besides the model that decides its records.
    evaluate: (model, eval documents, labels) -> records.
  """
  name: str
  variant: str
  settings: dict
  evaluate: Callable[[Any, list, dict], list]


def _perplexity_settings(config) -> dict:
  train_len = config.train.train_len
  return dict(
      lengths=evaluators.default_lengths(train_len,
                                         split_names(config.eval.multiples)),
      modes=split_names(config.eval.modes), stride=config.eval.stride,
      max_tokens=config.eval.max_tokens,
      tokens_per_batch=config.eval.tokens_per_batch,
      implementation=config.eval.implementation, train_len=train_len)


def jax_device_count() -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.device_count()


def _on_mesh(settings: dict) -> dict:
  """``context_devices`` -> ``mesh``: the first n devices split each
  evaluation window (context-parallel attention)."""
  settings = dict(settings)
  context = settings.pop("context_devices", 1)
  if context > 1:
    import jax  # pylint: disable=import-outside-toplevel
    settings["mesh"] = sharding.make_mesh({"context": context},
                                          jax.devices()[:context])
  return settings


def evaluations(config) -> list[Evaluation]:
  """The study's evaluations, in the order they run (variant by variant)."""
  variants = split_names(config.variants)
  shared = _perplexity_settings(config)
  # The perplexity evaluations may split windows over devices; the key is
  # only present when it does (so default fingerprints stay as they were).
  if config.eval.get("context_devices", 1) > 1:
    shared["context_devices"] = config.eval.context_devices
  out = []
  for variant in variants:
    out.append(Evaluation(
        f"length/{variant}", variant, dict(shared),
        lambda m, docs, labels, s=shared: evaluators.perplexity_vs_length(
            m, docs, labels=labels, experiment="length", **_on_mesh(s))))
    if variant == config.rope_scaling.model:
      settings = dict(shared, methods=split_names(config.rope_scaling.methods),
                      factors=_factors(config.rope_scaling.factors))
      out.append(Evaluation(
          f"rope_scaling/{variant}", variant, settings,
          lambda m, docs, labels, s=settings: evaluators.rope_scaling_sweep(
              m, docs, labels=labels, experiment="rope_scaling",
              **_on_mesh(s))))
    if variant == config.masks.model:
      settings = dict(shared, masks=split_names(config.masks.masks),
                      window=config.masks.window,
                      num_sinks=config.masks.num_sinks)
      out.append(Evaluation(
          f"mask/{variant}", variant, settings,
          lambda m, docs, labels, s=settings: evaluators.perplexity_with_masks(
              m, docs, labels=labels, experiment="mask", **_on_mesh(s))))
    passkey_models = split_names(config.passkey.models) or variants
    if split_names(config.passkey.lengths) and variant in passkey_models:
      settings = dict(
          lengths=tuple(int(l) for l in split_names(config.passkey.lengths)),
          depths=tuple(float(d) for d in split_names(config.passkey.depths)),
          trials=config.passkey.trials, train_len=config.train.train_len,
          implementation=config.eval.implementation)
      out.append(Evaluation(
          f"passkey/{variant}", variant, settings,
          lambda m, docs, labels, s=settings: evaluators.passkey_retrieval(
              m, labels=labels, experiment="passkey", **s)))
  return out


def _fingerprint(evaluation: Evaluation, train_config, step: int) -> str:
  """A hash of what decides an evaluation's records."""
  text = json.dumps({"settings": evaluation.settings, "step": step,
                     "train": json.loads(train_config.to_json_best_effort())},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _read_done(workdir: str) -> dict:
  path = os.path.join(workdir, DONE_FILE)
  if not (os.path.isfile(path) and
          os.path.isfile(os.path.join(workdir, RESULTS_FILE))):
    return {}   # no results: nothing counts as done
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(path + ".tmp", path)


def _latest_checkpoint(run_dir: str) -> int:
  folder = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(folder):
    return 0
  return max((int(n) for n in os.listdir(folder) if n.isdigit()), default=0)


def _eval_documents(config, workdir: str) -> list[np.ndarray]:
  """The held-out documents of the corpus (a cached token store)."""
  from extrapolax.experiments import data  # pylint: disable=g-import-not-at-top
  train = variant_config(config, split_names(config.variants)[0], workdir)
  fields = train.data
  path = data.default_store_path(trainer.data_dir(train, workdir),
                                 fields.corpus, fields.tokenizer, "eval")
  store = data.build_store(path, fields.corpus, fields.tokenizer,
                           split="eval", eval_fraction=fields.eval_fraction,
                           split_seed=fields.split_seed,
                           cache_dir=fields.cache_dir)
  return [store.document(i) for i in range(store.num_documents)]


# ----------------------------------------------------------------------------
# The study.


@dataclasses.dataclass
class StudyResult:
  """What ``run_study`` did.

  Attributes:
    records: every record of results.jsonl (earlier runs' included).
    report: the path of report.md.
    trained: variants trained (or resumed) in this run.
    reused: variants whose finished run was reused without training.
    evaluated: evaluation names run in this run.
    skipped: evaluation names reused from an earlier run.
    seconds: wall time of this run.
  """
  records: list
  report: str
  trained: list
  reused: list
  evaluated: list
  skipped: list
  seconds: float


def run_study(config, workdir: str) -> StudyResult:
  """Trains, evaluates and reports the study ``config`` describes.

  Raises:
    ValueError: a bad config value, or a run in the workdir that was trained
      with another training config.
  """
  started = time.perf_counter()
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"),
              json.loads(config.to_json_best_effort()))
  results_path = os.path.join(workdir, RESULTS_FILE)
  done = _read_done(workdir)
  result = StudyResult([], "", [], [], [], [], 0.0)
  documents = None
  by_variant: dict[str, list[Evaluation]] = {}
  for evaluation in evaluations(config):
    by_variant.setdefault(evaluation.variant, []).append(evaluation)
  for variant in split_names(config.variants):
    run_dir = os.path.join(workdir, "runs", variant)
    train = variant_config(config, variant, workdir)
    step = _latest_checkpoint(run_dir)
    pending = [e for e in by_variant.get(variant, ())
               if done.get(e.name) != _fingerprint(e, train, step)]
    if step >= train.train_steps and not pending:
      logging.info("%s: trained (step %d) and evaluated; reusing", variant,
                   step)
      result.reused.append(variant)
      result.skipped += [e.name for e in by_variant.get(variant, ())]
      continue
    model, step = _trained_model(train, run_dir, variant, step, result)
    labels = dict(model=variant, seed=int(train.seed), step=int(step))
    for evaluation in by_variant.get(variant, ()):
      fingerprint = _fingerprint(evaluation, train, step)
      if done.get(evaluation.name) == fingerprint:
        result.skipped.append(evaluation.name)
        continue
      if documents is None and evaluation.name.split("/")[0] != "passkey":
        documents = _eval_documents(config, workdir)
      clock = time.perf_counter()
      new = evaluation.evaluate(model, documents, labels)
      records_lib.append(results_path, new)
      done[evaluation.name] = fingerprint
      _write_json(os.path.join(workdir, DONE_FILE), done)
      result.evaluated.append(evaluation.name)
      logging.info("%s: %d records in %.1fs", evaluation.name, len(new),
                   time.perf_counter() - clock)
  result.records = records_lib.read(results_path)
  result.report = report_lib.write_report(results_path, workdir)
  result.seconds = time.perf_counter() - started
  return result


def _trained_model(train, run_dir: str, variant: str, step: int,
                   result: StudyResult):
  """(model, step): trains, resumes, or (finished) just loads the run.

  ``trainer.train`` also checks that the workdir's run has this config.
  """
  if step >= train.train_steps:
    logging.info("%s: trained (step %d); loading", variant, step)
    result.reused.append(variant)
  else:
    logging.info("%s: training %s (%d steps)%s", variant, run_dir,
                 train.train_steps, f", resuming at {step}" if step else "")
    result.trained.append(variant)
  clock = time.perf_counter()
  trained = trainer.train(train, run_dir)
  last = trained.metrics[-1]["loss"] if trained.metrics else float("nan")
  logging.info("%s: step %d, loss %.3f (%.1fs)", variant, trained.step, last,
               time.perf_counter() - clock)
  return trained.model, trained.step


def summary_tables(records) -> str:
  """The perplexity tables of the report and the passkey accuracy (mean over
  depths; rows: length, columns: variant), as markdown."""
  shown = [r for r in records if r["metric"] == "perplexity"]
  parts = [report_lib.markdown_tables(shown)] if shown else []
  passkey = [r for r in records if r["metric"] == "passkey_accuracy"]
  if passkey:
    parts.append(_passkey_summary(passkey))
  return "\n\n".join(parts) if parts else "(no records)"


def _passkey_summary(records) -> str:
  """Passkey accuracy averaged over depths (trial-weighted); the last record
  per (variant, length, depth, seed) wins, as in the report."""
  last = {}
  for r in records:
    key = (records_lib.variant_label(r), r["eval_len"], r.get("depth"),
           r["seed"])
    last[key] = (r["value"], r.get("n_trials") or 1)
  sums: dict[tuple, list] = {}
  for (variant, length, _, _), (value, trials) in last.items():
    total = sums.setdefault((variant, length), [0.0, 0])
    total[0] += value * trials
    total[1] += trials
  variants = list(dict.fromkeys(k[0] for k in sums))
  lengths = sorted({k[1] for k in sums})
  lines = ["## passkey: accuracy (mean over depths)", "",
           "| prompt length | " + " | ".join(variants) + " |",
           "|" + "---|" * (len(variants) + 1)]
  for length in lengths:
    cells = [f"{sums[(v, length)][0] / sums[(v, length)][1]:.2f}"
             if (v, length) in sums else "" for v in variants]
    lines.append(f"| {length} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line.


@dataclasses.dataclass
class Arguments:
  """Parsed command line: the study config, the workdir, other arguments."""
  config: ml_collections.ConfigDict
  workdir: str
  argv: list


def parse_flags(argv: Sequence[str]) -> Arguments:
  """Parses ``--config``, ``--config.*`` and ``--workdir`` from argv.

  The flags live in their own FlagValues (not absl's global FLAGS), so this
  module and ``extrapolax.experiments.train`` can share a process; the
  arguments it does not know are returned in ``Arguments.argv``.

  Raises:
    flags.Error: a bad flag value or a missing --workdir.
  """
  argv = configs.resolve_config_flag(argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Study config file, optionally with ':ARGS' "
      f"(default {DEFAULT_CONFIG}).", flag_values=flag_values,
      lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Study folder (runs/, results.jsonl, "
                      "report.md).", flag_values=flag_values)
  rest = flag_values(argv, known_only=True)
  if not flag_values.workdir:
    raise flags.IllegalFlagValueError("--workdir is required")
  return Arguments(flag_values.config, flag_values.workdir, rest)


def main(args: Arguments) -> None:
  """Runs the study and prints its tables."""
  if len(args.argv) > 1:
    raise app.UsageError(f"unexpected arguments: {args.argv[1:]}")
  try:
    result = run_study(args.config, args.workdir)
  except (ValueError, trainer.NonFiniteLossError) as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  print(summary_tables(result.records))
  print(f"\nstudy done in {result.seconds:.0f}s: trained "
        f"{len(result.trained)} model(s) {result.trained}, reused "
        f"{len(result.reused)}; ran {len(result.evaluated)} evaluation(s), "
        f"skipped {len(result.skipped)} already done. Report: "
        f"{result.report}", flush=True)


def _flags_parser(argv: list[str]) -> Arguments:
  try:
    args = parse_flags(argv)
    args.argv = flags.FLAGS(args.argv)   # absl's own (--verbosity, ...)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                     "Pass --helpfull to see help on flags.\n")
    sys.exit(1)
  return args


def run() -> None:
  app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
  run()
