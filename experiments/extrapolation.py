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

Evaluations: ``config.evals`` names them, each entry a plug-in of
``extrapolax.experiments.evals`` (``type``: length, rope_scaling, mask,
passkey, algorithmic, or "package.module:function" for one of your own) with
its settings; ``models`` picks the variants it runs on. The default config:

* ``length``: every variant's perplexity at multiples x train_len
  (non-overlapping by default) and its loss per position at the longest.
* ``rope_scaling``: the RoPE variant with each zero-shot RoPE scaling
  (factor matched to the length by default), no fine-tuning.
* ``mask``: the RoPE variant with a sliding window and a Lambda mask at
  inference.
* ``passkey``: passkey accuracy over lengths x depths.

Each evaluation's records are appended to results.jsonl (their
``experiment`` field is the entry's name) and written to TensorBoard
(``eval/<experiment>/<variant>/<metric>...`` scalars in WORKDIR); its
evaluator writes its report section.

``--config.from_zoo=True`` evaluates the zoo's shipped tiny presets instead
of training (seconds): each variant must be the preset of its name with the
zoo's recipe (the default config is; ``zoo_build.study_preset`` says what
differs otherwise).

Rerunning the command with the same workdir reuses everything done: a
finished training run is not retrained (an unfinished one resumes from its
checkpoint), and an evaluation whose settings, model config and checkpoint
step are unchanged is skipped; the report is then rewritten from
results.jsonl. Changing an evaluation setting
(``--config.evals.mask.num_sinks=2``) re-runs that evaluation and appends
its records (the report shows the latest value per point); records of an
evaluation a crash interrupted are dropped on the rerun; changing a
training field makes the trainer refuse the workdir.
``python -m extrapolax.experiments.report --workdir=WORKDIR`` re-reports
without JAX.

Fine-tuned variants: ``config.finetunes`` (``experiments.study_finetune``)
continues a trained variant at a longer length with PI, YaRN, NTK-by-parts
or ABF; each is a variant the evaluations can name, beside the zero-shot
scalings of its base.

Seeds: ``--config.seeds=0,1,2`` trains and evaluates every variant once per
seed, in ``WORKDIR/runs/<variant>/seed<k>`` (``experiments.seeds``; with no
seeds, one run per variant in ``runs/<variant>`` as before); the records
carry their seed, and the report's tables and plots show the mean over
seeds with its spread (sample std, n; a band in the plots). An evaluation
entry's ``seeds`` (like ``models``, read by the runner:
``--config.evals.mask.seeds=0``) runs it on those seeds' models only.

A study of a loaded model instead: ``config.model_source`` names a
pretrained model (a zoo name such as "smollm2-135m-instruct", a GGUF file,
a Hugging Face folder or a zoo checkpoint folder); nothing is trained.
``config.variants`` is then one name, the model's label in the records, and
the evaluations' variants (scalings, masks, Self-Extend) are the study's
arms. ``config.train`` holds only ``train_len`` (the model's trained
context, the unit of ``multiples``), ``seed`` and ``data``: ``corpora``
(comma-separated corpus names), ``min_doc_tokens`` (held-out documents are
joined to at least this many tokens of the model's own tokenizer),
``max_eval_tokens`` (per corpus), ``eval_fraction`` and ``split_seed``
(``data.long_documents``). See experiments/configs/pretrained.py.

``--config=PATH[:ARGS]`` picks another config file (a name such as
``extrapolation.py:quick`` is found in the installed configs folder) and
``--config.FIELD=VALUE`` overrides a field, as for
``extrapolax.experiments.train``. Tuple fields take comma-separated values:
``--config.variants=rope,alibi``. ``--config_help`` lists the fields.

The config's checks, each variant's training config and the evaluations it
lists are ``experiments.study_config`` (``validate_config``,
``variant_config``, ``evaluations``, ... are importable from here too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from extrapolax.experiments import cli
from extrapolax.experiments import configs
from extrapolax.experiments import evals
from extrapolax.experiments import records as records_lib
from extrapolax.experiments import report as report_lib
from extrapolax.experiments import runlog
from extrapolax.experiments import seeds as seeds_lib
from extrapolax.experiments import study_config
from extrapolax.experiments import study_finetune
from extrapolax.experiments import trainer
from extrapolax.experiments import workdir_lock
from extrapolax.experiments import zoo_build
from extrapolax.models import zoo

__all__ = ["DEFAULT_CONFIG", "Arguments", "Evaluation", "StudyResult",
           "split_names", "parse_flags", "validate_config", "variant_config",
           "variant_choices", "model_source", "load_source",
           "evaluations", "run_study", "summary_tables", "main", "run"]

DEFAULT_CONFIG = os.path.join(configs.CONFIG_DIR, "extrapolation.py")
RESULTS_FILE = report_lib.RESULTS_FILE
DONE_FILE = "evaluations.json"
split_names = evals.split_names

# The study config's checks and evaluations (experiments.study_config),
# kept importable from here.
Evaluation = study_config.Evaluation
evaluations = study_config.evaluations
model_source = study_config.model_source
validate_config = study_config.validate_config
variant_choices = study_config.variant_choices
variant_config = study_config.variant_config


# ----------------------------------------------------------------------------
# The workdir: evaluations done, eval documents, a loaded model.


def _types(config) -> dict[str, str]:
  """{experiment: evaluator type} of config.evals (for the report)."""
  return {name: config.evals[name].type for name in config.evals.keys()}


def _fingerprint(evaluation: Evaluation, train_config, step: int) -> str:
  """A hash of what decides an evaluation's records."""
  text = json.dumps({"settings": evaluation.settings, "step": step,
                     "train": json.loads(train_config.to_json_best_effort())},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _read_done(workdir: str) -> tuple[dict, Optional[int]]:
  """(evaluation name -> fingerprint, results.jsonl lines they account
  for; None: unknown, an older workdir)."""
  path = os.path.join(workdir, DONE_FILE)
  results = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isfile(results):
    return {}, 0   # no results: nothing counts as done
  if not os.path.isfile(path):
    return {}, 0   # records of an evaluation that never finished
  with open(path, encoding="utf-8") as f:
    done = json.load(f)
  if "evaluations" in done and "results_lines" in done:
    return dict(done["evaluations"]), int(done["results_lines"])
  return done, None


def _write_done(workdir: str, done: dict, results_lines: int) -> None:
  _write_json(os.path.join(workdir, DONE_FILE),
              {"evaluations": done, "results_lines": results_lines})


def _count_lines(path: str) -> int:
  if not os.path.isfile(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


def _drop_unfinished(results_path: str, committed: Optional[int]) -> None:
  """Drops the records an interrupted evaluation appended after the last
  finished one (they would be appended again by its rerun)."""
  if committed is None or not os.path.isfile(results_path):
    return
  with open(results_path, encoding="utf-8") as f:
    lines = f.readlines()
  if len(lines) <= committed:
    return
  logging.warning("%s: dropping %d records of an unfinished evaluation",
                  results_path, len(lines) - committed)
  with open(results_path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(lines[:committed])
  os.replace(results_path + ".tmp", results_path)


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


def _eval_documents(config, workdir: str) -> list:
  """The held-out documents (``data.eval_documents`` of the first run; with
  a model_source, its tokenizer's long documents, cached in WORKDIR/data)."""
  from extrapolax.experiments import data  # pylint: disable=g-import-not-at-top
  if model_source(config) is not None:
    return _source_documents(config, workdir)
  train = variant_config(config, split_names(config.variants)[0], workdir)
  return data.eval_documents(train, workdir)


def _source_fields(config) -> ml_collections.ConfigDict:
  """What decides a model_source study's records besides the evaluation:
  the source and config.train (its fingerprint's "train")."""
  fields = ml_collections.ConfigDict()
  fields.model_source = model_source(config)
  fields.train = config.train.copy_and_resolve_references()
  return fields


def _source_documents(config, workdir: str) -> list:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from extrapolax.experiments.data import long_documents  # pylint: disable=g-import-not-at-top
  from extrapolax.models import load_tokenizer  # pylint: disable=g-import-not-at-top
  data = config.train.data
  key = hashlib.sha256(_source_fields(config).to_json_best_effort(
      sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(workdir, "data", f"long_documents_{key}.npz")
  if os.path.isfile(path):
    with np.load(path) as stored:
      return [stored[k] for k in sorted(stored.files, key=int)]
  clock = time.perf_counter()
  docs = long_documents.long_documents(
      split_names(data.corpora), load_tokenizer(model_source(config)),
      min_tokens=int(data.min_doc_tokens),
      max_tokens=data.get("max_eval_tokens"),
      eval_fraction=float(data.get("eval_fraction", 0.1)),
      split_seed=int(data.get("split_seed", 0)),
      cache_dir=data.get("cache_dir"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", **{str(i): d for i, d in enumerate(docs)})
  os.replace(path + ".tmp.npz", path)
  logging.info("%d held-out documents, %d tokens (%.1fs)", len(docs),
               sum(len(d) for d in docs), time.perf_counter() - clock)
  return docs


def load_source(source: str):
  """The DecoderLM a model_source names: a GGUF file, a Hugging Face folder
  (config.json), else a zoo name or checkpoint folder."""
  from extrapolax import models  # pylint: disable=g-import-not-at-top
  from extrapolax.models import zoo  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(source)
  if os.path.isfile(path):
    return models.load_gguf(path)
  if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
      os.path.join(path, "manifest.json")):
    return models.load_hf(path)
  return zoo.from_pretrained(source)


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
    types: {experiment: evaluator type} of config.evals.
  """
  records: list
  report: str
  trained: list
  reused: list
  evaluated: list
  skipped: list
  seconds: float
  types: dict = dataclasses.field(default_factory=dict)


def _check_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file; give a folder (new or "
                     "a study's)")
  return workdir


def run_study(config, workdir: str) -> StudyResult:
  """Trains, evaluates and reports the study ``config`` describes.

  Raises:
    ValueError: a bad config value, a workdir that is a file, or a run in
      the workdir that was trained with another training config.
  """
  started = time.perf_counter()
  workdir = _check_workdir(workdir)
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir):    # one study per workdir at a time
    return _run_study(config, workdir, started)


def _run_study(config, workdir: str, started: float) -> StudyResult:
  _write_json(os.path.join(workdir, "config.json"),
              json.loads(config.to_json_best_effort()))
  results_path = os.path.join(workdir, RESULTS_FILE)
  done, committed = _read_done(workdir)
  _drop_unfinished(results_path, committed)
  result = StudyResult([], "", [], [], [], [], 0.0, _types(config))
  documents = {}   # the eval documents, read once when first needed
  by_variant: dict[str, list[Evaluation]] = {}
  for evaluation in evaluations(config):
    by_variant.setdefault(evaluation.variant, []).append(evaluation)
  seeds = seeds_lib.study_seeds(config)
  for variant in study_finetune.all_variants(config):   # fine-tunes after their bases
    for seed in seeds or (None,):
      mine = [e for e in by_variant.get(variant, ())
              if seed is None or e.seeds is None or seed in e.seeds]
      _run_variant(config, workdir, variant, seed, mine, done, result,
                   documents)
  if committed is None:   # an older workdir: start counting
    _write_done(workdir, done, _count_lines(results_path))
  result.records = records_lib.read(results_path)
  result.report = report_lib.write_report(results_path, workdir,
                                          types=result.types)
  result.seconds = time.perf_counter() - started
  return result


def _run_variant(config, workdir: str, variant: str, seed: Optional[int],
                 pending_evaluations, done: dict, result: StudyResult,
                 documents: dict) -> None:
  """Trains (or reuses) one run of a variant, seed None: the single-seed
  layout, and runs its evaluations not done yet."""
  run_dir = seeds_lib.run_dir(workdir, variant, seed)
  name = seeds_lib.done_key(variant, seed)   # in the logs and the result
  key = lambda e: seeds_lib.done_key(e.name, seed)
  results_path = os.path.join(workdir, RESULTS_FILE)
  source = model_source(config)
  preset = None
  if source is not None:   # a loaded model: nothing to train
    train, step, finished = _source_fields(config), 0, True
  else:
    if variant in study_finetune.names(config):
      train = study_finetune.train_config(config, variant, workdir, seed,
                                          variant_config)
    else:
      train = variant_config(config, variant, workdir)
      train.seed = seeds_lib.seed_of(config, seed)
    if config.get("from_zoo"):   # the shipped weights, no training
      preset, step = zoo_build.study_preset(train, variant)
    else:
      step = _latest_checkpoint(run_dir)
    finished = step >= train.train_steps
  pending = [e for e in pending_evaluations
             if done.get(key(e)) != _fingerprint(e, train, step)]
  if finished and not pending:
    logging.info("%s: trained (step %d) and evaluated; reusing", name, step)
    result.reused.append(name)
    result.skipped += [key(e) for e in pending_evaluations]
    return
  if source is not None:
    clock = time.perf_counter()
    model = load_source(source)
    result.reused.append(name)
    logging.info("%s: loaded %s (%.1fs)", name, source,
                 time.perf_counter() - clock)
  elif preset is not None:
    logging.info("%s: the zoo's %s (step %d)", name, preset, step)
    model = zoo.from_pretrained(preset)
    result.reused.append(name)
  else:
    model, step = _trained_model(train, run_dir, name, step, result)
  labels = dict(model=variant, seed=seeds_lib.seed_of(config, seed),
                step=int(step))
  if study_finetune.base_of(config, variant) is not None:
    labels["base"] = study_finetune.base_of(config, variant)
  for evaluation in pending_evaluations:
    fingerprint = _fingerprint(evaluation, train, step)
    if done.get(key(evaluation)) == fingerprint:
      result.skipped.append(key(evaluation))
      continue
    if "documents" not in documents and evaluation.needs_documents:
      documents["documents"] = _eval_documents(config, workdir)
    clock = time.perf_counter()
    new = evaluation.evaluate(model, documents.get("documents"), labels)
    records_lib.append(results_path, new)
    done[key(evaluation)] = fingerprint
    _write_done(workdir, done, _count_lines(results_path))
    runlog.write_eval_scalars(seeds_lib.scalars_dir(workdir, seed), new)
    result.evaluated.append(key(evaluation))
    logging.info("%s: %d records in %.1fs", key(evaluation), len(new),
                 time.perf_counter() - clock)


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


def summary_tables(records, types: Optional[dict] = None) -> str:
  """What the study main prints: each evaluator's summary (perplexity
  tables, passkey accuracy averaged over depths, ...), as markdown."""
  return report_lib.summary_tables(records, types)


# ----------------------------------------------------------------------------
# Command line.


@dataclasses.dataclass
class Arguments:
  """Parsed command line: the study config, the workdir, other arguments."""
  config: ml_collections.ConfigDict
  workdir: str
  argv: list
  config_help: bool = False
  config_path: str = DEFAULT_CONFIG


def parse_flags(argv: Sequence[str]) -> Arguments:
  """Parses ``--config``, ``--config.*``, ``--workdir`` and
  ``--config_help`` from argv.

  The flags live in their own FlagValues (not absl's global FLAGS), so this
  module and ``extrapolax.experiments.train`` can share a process; the
  arguments it does not know are returned in ``Arguments.argv``.

  Raises:
    flags.Error: a bad flag value or a missing --workdir.
    ValueError: a ``--config.*`` field the config does not have (one line,
      with close matches).
  """
  argv = configs.resolve_config_flag(argv)
  flag_values = flags.FlagValues()
  try:   # with sys_argv, the overrides are looked up here already
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Study config file, optionally with "
        f"':ARGS' (default {DEFAULT_CONFIG}).", flag_values=flag_values,
        lock_config=True, sys_argv=argv)
  except (AttributeError, KeyError) as e:
    raise ValueError(cli.one_line(e, argv, DEFAULT_CONFIG)) from None
  flags.DEFINE_string("workdir", None, "Study folder (runs/, results.jsonl, "
                      "report.md).", flag_values=flag_values)
  flags.DEFINE_bool("config_help", False, "List the --config.* fields with "
                    "their defaults and exit.", flag_values=flag_values)
  rest = cli.parse_known(flag_values, argv, DEFAULT_CONFIG)
  if flag_values.config_help:
    return Arguments(flag_values.config, flag_values.workdir or "", rest,
                     config_help=True,
                     config_path=cli.config_spec(argv, DEFAULT_CONFIG))
  if not flag_values.workdir:
    raise flags.IllegalFlagValueError("--workdir is required")
  return Arguments(flag_values.config, flag_values.workdir, rest)


def main(args: Arguments) -> None:
  """Runs the study and prints its tables."""
  if args.config_help:
    print(cli.config_help(args.config, args.config_path))
    return
  if len(args.argv) > 1:
    raise app.UsageError(f"unexpected arguments: {args.argv[1:]}")
  try:
    result = run_study(args.config, args.workdir)
  except (ValueError, trainer.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")   # one line: the message names the value
  print(summary_tables(result.records, result.types))
  print(f"\nstudy done in {result.seconds:.0f}s: trained "
        f"{len(result.trained)} model(s) {result.trained}, reused "
        f"{len(result.reused)}; ran {len(result.evaluated)} evaluation(s), "
        f"skipped {len(result.skipped)} already done. Report: "
        f"{result.report}", flush=True)


def _flags_parser(argv: list[str]) -> Arguments:
  cli.maybe_print_help(argv, __doc__, "extrapolax.experiments.extrapolation")
  try:
    args = parse_flags(argv)
    args.argv = flags.FLAGS(args.argv)   # absl's own (--verbosity, ...)
  except (flags.Error, ValueError) as e:
    cli.exit_on_flag_error(e)
  return args


def run() -> None:
  app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
  run()
