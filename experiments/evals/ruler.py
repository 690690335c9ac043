"""The ``ruler`` evaluator: RULER-style task accuracy, lengths x depths.

One evaluator for the RULER families (``data.ruler``): ``tasks`` picks them
(comma-separated names of niah_multikey, niah_multivalue,
variable_tracking, common_words, kv_retrieval; default all). Settings:
``lengths`` (prompt lengths in tokens; () for none: skipped; in bytes the
default sizes need up to 380 tokens for the needle tasks, 420 for
common_words; a byte-level length too short is refused here), ``depths`` (fractions in [0, 1]),
``trials`` (examples per cell), ``seed``, the task sizes (``num_keys``,
``num_values``, ``num_hops``, ``num_chains``, ``num_common``,
``common_freq``, ``uncommon_freq``: each set for the task that has it),
``implementation``, and ``tokenizer`` / ``chat`` as the ``passkey``
evaluator has them ("byte" for a trained byte model; "model", the default
in a study with ``model_source``, for a loaded model's tokenizer). Records:
``evaluators.ruler_accuracy`` (teacher-forced exact match of the whole
answer; no documents needed), task = the RULER task. Report per task: the
mean over depths by length, a table per variant by depth and a heatmap
(common_words, which has no depth: the table and a line plot); the study
main prints the mean over depths per task.
"""

from __future__ import annotations

from typing import Optional

from extrapolax.common import checks
from extrapolax.experiments import evals
from extrapolax.experiments import records as records_lib
from extrapolax.experiments import report
from extrapolax.experiments.evals import length
from extrapolax.experiments.evals import passkey

__all__ = ["EVALUATOR", "HELP", "TASKS", "SIZES"]

# The names live in data.ruler; this package imports no JAX or NumPy task
# code, so they are repeated here and a test pins them equal.
TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking",
         "common_words", "kv_retrieval")
SIZES = {"num_keys": "niah_multikey", "num_values": "niah_multivalue",
         "num_hops": "variable_tracking", "num_chains": "variable_tracking",
         "num_common": "common_words", "common_freq": "common_words",
         "uncommon_freq": "common_words"}

# The passkey evaluator's tokenizer setting and its tables, shared.
# pylint: disable=protected-access
_tokenizer_setting = passkey._tokenizer_setting
_load_tokenizer = passkey._load_tokenizer
_mean_table = passkey._mean_table
_depth_table = passkey._depth_table
_heatmap = passkey._heatmap
# pylint: enable=protected-access

HELP = {
    "models": length.HELP["models"],
    "tasks": "RULER tasks, comma-separated (" + ", ".join(TASKS) + "); "
             "empty: all",
    "lengths": "prompt lengths in tokens (() for none)",
    "depths": "where the evidence sits, fractions in [0, 1]",
    "trials": "examples per (task, length, depth)",
    "seed": "the examples' random seed",
    "num_keys": "niah_multikey: needles (one asked) (None: 4)",
    "num_values": "niah_multivalue: values of the key (None: 4)",
    "num_hops": "variable_tracking: hops of the chain (None: 4)",
    "num_chains": "variable_tracking: chains, one asked (None: 1)",
    "num_common": "common_words: words asked for (None: 3)",
    "common_freq": "common_words: times each common word appears (None: 6)",
    "uncommon_freq": "common_words: times each other word appears (None: 2)",
    "implementation": length.HELP["implementation"],
    "tokenizer": passkey.HELP["tokenizer"],
    "chat": passkey.HELP["chat"],
}


def _validate(settings: dict, study) -> Optional[dict]:
  settings = length.known_settings(settings, HELP)
  grid = passkey.retrieval_grid(settings)
  if grid is None:
    return None
  lengths, depths, trials = grid
  tasks = evals.split_names(settings.get("tasks", "") or "") or TASKS
  bad = [t for t in tasks if t not in TASKS]
  if bad:
    raise ValueError(f"tasks={settings.get('tasks')!r}: {bad} not in {TASKS}")
  seed = checks.check_int("seed", settings.get("seed", 0), 0)
  task_params = {}
  for name, task in SIZES.items():
    value = settings.get(name)
    if value is None:
      continue
    length.check_positive(name, (value,), integer=True)
    if task not in tasks:
      raise ValueError(f"{name}={value!r} sets {task}, which is not in "
                       f"tasks={tuple(tasks)}")
    task_params.setdefault(task, {})[name] = int(value)
  chat = settings.get("chat", False)
  if not isinstance(chat, bool):
    raise ValueError(f"chat={chat!r} must be True or False")
  tokenizer = _tokenizer_setting(settings, study)
  if tokenizer == "byte":   # a length too short fails now, not after training
    _check_fits(tasks, min(int(l) for l in lengths), task_params)
  return dict(tasks=tuple(tasks), lengths=tuple(int(l) for l in lengths),
              depths=tuple(float(d) for d in depths), trials=int(trials),
              seed=seed, task_params=task_params,
              train_len=int(study.train.train_len),
              implementation=settings.get("implementation"),
              tokenizer=tokenizer,
              chat=chat)


def _check_fits(tasks, shortest: int, task_params: dict) -> None:
  """Raises ValueError when a task's byte prompt does not fit ``shortest``
  tokens."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments.data import ruler  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments.data import tokenizers  # pylint: disable=import-outside-toplevel
  for task in tasks:
    try:
      ruler.ruler_prompt(task, shortest, 0.5, np.random.default_rng(0),
                         tokenizers.ByteTokenizer(),
                         **task_params.get(task, {}))
    except ValueError as e:
      raise ValueError(f"lengths: {task} at {shortest} bytes: {e}") from e


def _run(model, documents, settings: dict, labels: dict) -> list:
  del documents
  from extrapolax.experiments import evaluators  # pylint: disable=import-outside-toplevel
  settings = dict(settings)
  labels = dict(labels)
  experiment = labels.pop("experiment", "ruler")
  tokenizer = _load_tokenizer(settings.pop("tokenizer"))
  return evaluators.ruler_accuracy(model, tokenizer=tokenizer, labels=labels,
                                   experiment=experiment, **settings)


def _has_depth(group) -> bool:
  return any(r.get("depth") is not None for r in group)


def _report(records, out_dir, all_records) -> str:
  del all_records
  parts = []
  for key, group in report.group_records(records).items():
    task = key[4]
    title = report.group_title(key)
    train = ", ".join(str(t) for t in report.train_lens(group))
    how = "mean over depths" if _has_depth(group) else "no depth"
    lines = [f"## {title}", "",
             f"Exact match of the whole answer (teacher-forced), {how}; "
             f"training length {train}.", "",
             _mean_table(group)]
    if _has_depth(group):
      for variant in report.variants(group):
        lines += ["", f"{variant}, by depth:", "", _depth_table(
            [r for r in group if records_lib.variant_label(r) == variant])]
    if out_dir is not None:
      name = f"{report.slug(key)}.png"
      if _has_depth(group):
        name = _heatmap(
            group, out_dir, name,
            title=f"{task}: accuracy by prompt length and evidence depth")
      else:
        name = report.line_plot(group, f"{task}: accuracy vs prompt length",
                                "accuracy", out_dir, name,
                                xlabel="prompt length (tokens)")
      lines += ["", f"![{title}]({name})"]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def _summary(records, all_records) -> str:
  """Per task: accuracy averaged over depths (rows length, columns
  variant; over several seeds mean ± std)."""
  del all_records
  parts = []
  for key, group in report.group_records(records).items():
    parts.append(f"## ruler: {key[4]} accuracy (mean over depths)\n\n"
                 + _mean_table(group, digits=2))
  return "\n\n".join(parts)


EVALUATOR = evals.register(evals.Evaluator(
    name="ruler", run=_run, validate=_validate, report=_report,
    summary=_summary, needs_documents=False, metrics=("ruler_accuracy",),
    help=HELP))
