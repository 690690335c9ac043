"""The ``algorithmic`` evaluator: synthetic-task accuracy vs task length.

Settings: ``task`` (a name of ``data.get_task``: copy, reverse, ...),
``lengths`` (task lengths), ``train_len`` (the longest task length trained
on), ``train_min_len`` (the shortest, or None), ``num_examples``, ``seed``,
``implementation``, ``positions`` (plain, or a ``data.positions`` sampler
the examples' positions are drawn from, as Ruoss et al. evaluate models
trained with randomized positions). Records:
``evaluators.algorithmic_accuracy`` (no documents needed); report: a table
and an accuracy plot per metric with the training range shaded.
"""

from __future__ import annotations

from extrapolax.experiments import evals
from extrapolax.experiments import report
from extrapolax.experiments.evals import length

__all__ = ["EVALUATOR", "HELP"]

HELP = {
    "models": length.HELP["models"],
    "task": "the synthetic task (copy, reverse, addition, parity, "
            "associative_recall, flip_flop, multiplication, sorting, "
            "duplicate_string, modular_arithmetic, even_pairs, first)",
    "lengths": "task lengths to test",
    "train_len": "the longest task length trained on",
    "train_min_len": "the shortest (None: not recorded)",
    "num_examples": "examples per length",
    "seed": "the examples' random seed",
    "implementation": length.HELP["implementation"],
    "positions": "the examples' positions: plain (0..L-1) or a sampler of "
                 "data.positions, e.g. randomized(max_position=1000)",
}


def _validate(settings: dict, study) -> dict:
  del study
  settings = length.known_settings(settings, HELP)
  if not settings.get("task"):
    raise ValueError(f"task={settings.get('task')!r}: name a task, e.g. "
                     "'copy'")
  lengths = evals.split_numbers(settings.get("lengths", ()))
  if not lengths:
    raise ValueError("lengths is empty; give task lengths, e.g. 8,16,32")
  length.check_positive("lengths", lengths, integer=True)
  length.check_positive("train_len", (settings.get("train_len"),),
                        integer=True)
  positions = settings.get("positions") or "plain"
  from extrapolax.experiments.data import positions as positions_lib  # pylint: disable=import-outside-toplevel
  try:
    sampler = positions_lib.from_text(positions)
  except ValueError as e:
    raise ValueError(f"algorithmic positions: {e}") from None
  too_long = [l for l in lengths
              if not isinstance(sampler, positions_lib.Plain)
              and _max_tokens(settings["task"], l) > sampler.max_position]
  if too_long:
    raise ValueError(f"positions={positions!r}: examples of lengths "
                     f"{too_long} can exceed max_position="
                     f"{sampler.max_position} tokens; raise max_position")
  return dict(settings, lengths=tuple(int(l) for l in lengths))


def _max_tokens(task, length) -> int:
  """The task's token bound at ``length`` (0 for a task given by object)."""
  from extrapolax.experiments import data  # pylint: disable=import-outside-toplevel
  if not isinstance(task, str):
    return 0
  return data.get_task(task).max_tokens(int(length))


def _run(model, documents, settings: dict, labels: dict) -> list:
  del documents
  from extrapolax.experiments import evaluators  # pylint: disable=import-outside-toplevel
  labels = dict(labels)
  experiment = labels.pop("experiment", "algorithmic")
  settings = dict(settings)
  task = settings.pop("task")
  return evaluators.algorithmic_accuracy(model, task, labels=labels,
                                         experiment=experiment, **settings)


def _report(records, out_dir, all_records) -> str:
  del all_records
  parts = []
  for key, group in report.group_records(records).items():
    experiment, metric, _, _, task = key
    del experiment
    title = report.group_title(key)
    lo = min(r.get("train_min_len") or min(r["eval_len"] for r in group)
             for r in group)
    hi = max(r["train_len"] for r in group)
    lines = [f"## {title}", "", f"Training range: lengths {lo}..{hi}.", "",
             report.length_table(group, metric, digits=3)]
    if out_dir is not None:
      on = f" on {task}" if task else ""
      name = report.line_plot(
          group, f"{report.readable(metric)}{on} vs task length",
          metric.replace("_", " "), out_dir, f"{report.slug(key)}.png",
          shade=(lo, hi), xlabel="task length", past_train=False)
      lines += ["", f"![{title}]({name})"]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


EVALUATOR = evals.register(evals.Evaluator(
    name="algorithmic", run=_run, validate=_validate, report=_report,
    needs_documents=False,
    metrics=("sequence_accuracy", "token_accuracy"), help=HELP))
