"""report.md and PNG plots from results records, without the models.

``write_report(records_or_path, out_dir)`` groups the records by experiment
(the ``config.evals`` entry that made them) and asks that experiment's
evaluator plug-in (``extrapolax.experiments.evals``) for its section: a
markdown table and a plot. Records no evaluator claims get the generic
section: per (metric, mode, stride, task), a table (rows: evaluation
length; columns: variant) and a line plot of the metric vs length.

The helpers the sections share are public here (``length_table``,
``line_plot``, ``generic_section``, ...), for evaluators outside the
package too.

A record is a cell; when a (variant, length) cell has several records, the
last one per seed wins (reruns append) and seeds are averaged: a table cell
with n > 1 seeds reads "mean ± std" (the sample standard deviation, n - 1
in the denominator; the table notes n), and a plot draws the mean with a
band of mean ± std (``cell_stats``).

Command line (re-report a workdir from its results.jsonl; the evaluator of
each experiment is read from the workdir's config.json)::

  python -m extrapolax.experiments.report --workdir DIR [--out_dir DIR]
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from matplotlib import ticker
from matplotlib.figure import Figure

from extrapolax.experiments import evals
from extrapolax.experiments import records as records_lib

__all__ = ["load_records", "group_records", "markdown_tables",
           "summary_tables", "write_report", "main", "evaluator_types",
           "generic_section", "length_table", "line_plot", "group_title",
           "slug", "readable", "cells", "cell_stats", "CellStats", "fmt", "variants", "train_lens",
           "markdown", "save_figure"]

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
Records = Union[str, os.PathLike, Iterable[Mapping[str, Any]]]
# Distinct styles, so a line drawn over another (equal values) still shows.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def load_records(source: Records) -> list[dict[str, Any]]:
  """Records from a list, a JSON-lines file, or a workdir holding one."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if os.path.isdir(path):
      path = os.path.join(path, RESULTS_FILE)
    if not os.path.exists(path):
      raise ValueError(f"no results file at {path!r}")
    return records_lib.read(path)
  return [records_lib.make_record(**r) for r in source]


def evaluator_types(workdir: str) -> dict[str, str]:
  """{experiment: evaluator type} from a study workdir's config.json
  (``config.evals``); empty if there is none."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  entries = config.get("evals") if isinstance(config, dict) else None
  return {name: entry["type"] for name, entry in (entries or {}).items()
          if isinstance(entry, dict) and entry.get("type")}


def _experiment(record) -> str:
  if record.get("experiment"):
    return record["experiment"]
  evaluator = evals.resolve("", record["metric"])
  if evaluator is not None:
    return evaluator.name
  return record["task"] or record["metric"]


GroupKey = tuple  # (experiment, metric, mode, stride, task)


def group_records(records: Sequence[Mapping[str, Any]]
                  ) -> dict[GroupKey, list[dict]]:
  """Records by (experiment, metric, mode, stride, task), in first-seen
  order."""
  groups = collections.OrderedDict()
  for r in records:
    key = (_experiment(r), r["metric"], r["mode"], r["stride"], r["task"])
    groups.setdefault(key, []).append(dict(r))
  return groups


def group_title(key: GroupKey) -> str:
  """A group's markdown heading: "length: perplexity (nonoverlap)"."""
  experiment, metric, mode, stride, task = key
  parts = [f"{experiment}: {metric}"]
  if mode == "sliding":
    parts.append(f"(sliding, stride {stride})")
  elif mode:
    parts.append(f"({mode})")
  if task and task != experiment:
    parts.append(f"on {task}")
  return " ".join(parts)


def slug(key: GroupKey) -> str:
  text = "_".join(str(k) for k in key if k is not None)
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


@dataclasses.dataclass(frozen=True)
class CellStats:
  """A cell's values over seeds (the last value per seed).

  Attributes:
    mean: their mean.
    std: their sample standard deviation (n - 1 in the denominator); None
      for one seed or a non-finite value.
    n: how many seeds.
    low, high: the smallest and largest value.
  """
  mean: float
  std: Optional[float]
  n: int
  low: float
  high: float


def _stats(values: Sequence[float]) -> CellStats:
  n = len(values)
  mean = sum(values) / n
  std = None
  if n > 1 and all(math.isfinite(v) for v in values):
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return CellStats(mean, std, n, min(values), max(values))


def cell_stats(records: Sequence[Mapping[str, Any]], *, by=("eval_len",)
               ) -> dict[tuple, CellStats]:
  """{(variant, *by): CellStats over seeds of the last value per seed}."""
  last = collections.OrderedDict()
  for r in records:
    key = (records_lib.variant_label(r),) + tuple(r[b] for b in by)
    last[key + (r["seed"],)] = r["value"]
  values = collections.OrderedDict()
  for key, value in last.items():
    values.setdefault(key[:-1], []).append(value)
  return {k: _stats(v) for k, v in values.items()}


def cells(records: Sequence[Mapping[str, Any]], *, by=("eval_len",)):
  """({(variant, *by): mean over seeds of the last value per seed},
  the largest number of seeds of a cell)."""
  stats = cell_stats(records, by=by)
  return {k: s.mean for k, s in stats.items()}, max(
      (s.n for s in stats.values()), default=0)


def fmt(value: Optional[float], digits: int = 2) -> str:
  """A table cell: ``digits`` decimals (3 significant digits past 1e4),
  n/a for NaN (the model cannot run there), inf, "" for no value."""
  if value is None:
    return ""
  if math.isnan(value):
    return "n/a"
  if math.isinf(value):
    return "inf"
  return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def variants(records) -> list[str]:
  """The records' variant labels, in first-seen order."""
  out = []
  for r in records:
    label = records_lib.variant_label(r)
    if label not in out:
      out.append(label)
  return out


def train_lens(records) -> list[int]:
  return sorted({r["train_len"] for r in records})


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _cell_text(stats: Optional[CellStats], digits: int, seeds: int) -> str:
  """"mean", or "mean ± std" over several seeds ("(n=k)" added where a cell
  has fewer seeds than the table's most)."""
  if stats is None:
    return ""
  text = fmt(stats.mean, digits)
  if stats.std is not None:
    text += f" ± {fmt(stats.std, digits)}"
  if seeds > 1 and stats.n != seeds:
    text += f" (n={stats.n})"
  return text


def length_table(records, metric: str, columns=None, *,
                 digits: int = 2) -> str:
  """A markdown table of ``metric``: rows evaluation length, columns
  variant, ``digits`` decimals per cell; over several seeds each cell is
  "mean ± std" (sample std) and a note gives n."""
  del metric  # the records' metric; kept for the callers' readability
  stats = cell_stats(records)
  seeds = max((s.n for s in stats.values()), default=0)
  columns = columns or variants(records)
  lengths = sorted({r["eval_len"] for r in records})
  train = train_lens(records)
  rows = []
  for length in lengths:
    label = f"{length}" + (" (train)" if length in train else "")
    rows.append([label] + [_cell_text(stats.get((c, length)), digits, seeds)
                           for c in columns])
  note = (f"\n\n(mean ± sample std over n={seeds} seeds)" if seeds > 1
          else "")
  return markdown(["eval length"] + list(columns), rows) + note


# ----------------------------------------------------------------------------
# Plots (matplotlib's object API: no display, no global backend change).


def save_figure(fig: Figure, out_dir: str, name: str) -> str:
  """Writes ``fig`` to out_dir/name; returns name (for the markdown link)."""
  fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
  return name


def _mark_train(ax, records):
  for i, train_len in enumerate(train_lens(records)):
    ax.axvline(train_len, color="grey", linestyle="--", linewidth=1,
               label="training length" if i == 0 else None)


def _finite(xs, ys):
  pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and
           math.isfinite(y)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _legend_label(variant, xs, ys, drawn, past) -> str:
  """The variant, noting a line within 2% of one drawn before (hidden
  under it) and a variant with no point past the training length."""
  label = variant
  for other, (oxs, oys) in drawn.items():
    if xs and oxs == xs and all(math.isclose(a, b, rel_tol=0.02)
                                for a, b in zip(oys, ys)):
      label += f" (overlaps {other})"
      break
  if past is not None and not any(x > past for x in xs):
    label += " (no result past the training length)"
  return label


def line_plot(records, title, ylabel, out_dir, name, *, logy=False,
              x_of=lambda key: key[1], by=("eval_len",), shade=None,
              xlabel="evaluation length (tokens)", past_train=True) -> str:
  """A line per variant (distinct marker and line style each) of the mean
  value vs ``x_of(cell key)``; the training length as a dashed line (or
  ``shade``: a (lo, hi) range); over several seeds a band of mean ± std
  (sample std) around each line. Returns the PNG's name."""
  stats = cell_stats(records, by=by)
  seeds = max((s.n for s in stats.values()), default=0)
  fig = Figure(figsize=(7, 4.2), layout="constrained")
  ax = fig.subplots()
  past = max(train_lens(records)) if past_train and by == ("eval_len",) \
      else None
  drawn = {}
  for i, variant in enumerate(variants(records)):
    points = sorted((x_of(k), v) for k, v in stats.items()
                    if k[0] == variant)
    xs, ys = _finite([p[0] for p in points], [p[1].mean for p in points])
    label = _legend_label(variant, xs, ys, drawn, past)
    # Later lines are drawn thinner with hollow markers, so one under an
    # equal earlier line still shows.
    (line,) = ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)],
            linestyle=LINESTYLES[i % len(LINESTYLES)],
            markersize=max(7 - i, 3), linewidth=max(2.2 - 0.3 * i, 1.0),
            markerfacecolor="none" if i % 2 else None, label=label)
    drawn[variant] = (xs, ys)
    band = [(x, s.mean - s.std, s.mean + s.std) for x, s in points
            if s.std is not None]
    if band:
      ax.fill_between([b[0] for b in band], [b[1] for b in band],
                      [b[2] for b in band], color=line.get_color(),
                      alpha=0.18, linewidth=0)
  if shade:
    ax.axvspan(shade[0], shade[1], color="tab:green", alpha=0.12,
               label="training range")
  else:
    _mark_train(ax, records)
  lengths = sorted({r["eval_len"] for r in records})
  if by == ("eval_len",) and len(lengths) > 1 and lengths[-1] >= (
      4 * lengths[0]):
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
  if logy:
    ax.set_yscale("log")
    # Plain numbers; minor ticks labelled only over a short range.
    ax.yaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(
        labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
    ax.tick_params(axis="y", which="minor", labelsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if seeds > 1:
    title += f"\nmean over n={seeds} seeds, band: ± sample std"
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out_dir, name)


# ----------------------------------------------------------------------------
# Sections.


def readable(metric: str) -> str:
  """"sequence_accuracy" -> "Sequence accuracy"."""
  text = metric.replace("_", " ").strip()
  return text[:1].upper() + text[1:]


def _digits(records) -> int:
  """3 decimals for values in [0, 1] (accuracies, rates), else 2."""
  values = [r["value"] for r in records if math.isfinite(r["value"])]
  return 3 if values and all(0.0 <= v <= 1.0 for v in values) else 2


def generic_section(records, out_dir: Optional[str],
                    all_records=None) -> str:  # pylint: disable=unused-argument
  """The fallback section: per (metric, mode, stride, task) a length table
  and (with ``out_dir``) a line plot of the metric vs length."""
  parts = []
  for key, group in group_records(records).items():
    metric, mode, stride = key[1], key[2], key[3]
    title = group_title(key)
    train = ", ".join(str(t) for t in train_lens(group))
    lines = [f"## {title}", "",
             f"Training length {train} (the row marked (train)).", "",
             length_table(group, metric, digits=_digits(group))]
    if out_dir is not None:
      where = {"sliding": f", sliding windows (stride {stride})",
               "nonoverlap": ", non-overlapping windows"}.get(mode, "")
      name = line_plot(group, f"{readable(metric)} vs length{where}",
                       readable(metric), out_dir, f"{slug(key)}.png")
      lines += ["", f"![{title}]({name})"]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def _sections(records, out_dir: Optional[str], types, *,
              summary: bool) -> list[str]:
  """One section per experiment: builtin evaluators in registration order,
  then the others in first-seen order."""
  by_experiment = collections.OrderedDict()
  for r in records:
    by_experiment.setdefault(_experiment(r), []).append(r)
  order = evals.names()
  chosen = []
  for index, (experiment, group) in enumerate(by_experiment.items()):
    evaluator = evals.resolve(experiment, group[0]["metric"], types)
    rank = (order.index(evaluator.name) if evaluator is not None and
            evaluator.name in order else len(order))
    chosen.append((rank, index, evaluator, group))
  out = []
  for _, _, evaluator, group in sorted(chosen, key=lambda c: c[:2]):
    if summary and evaluator is not None and evaluator.summary is not None:
      text = evaluator.summary(group, records)
    elif evaluator is not None and evaluator.report is not None:
      text = evaluator.report(group, out_dir, records)
    else:
      text = generic_section(group, out_dir, records)
    if text:
      out.append(text)
  return out


def markdown_tables(records: Records,
                    types: Optional[Mapping[str, str]] = None) -> str:
  """Every experiment's section (tables only, no plots) as markdown.

  ``types``: {experiment: evaluator type} (a study's config.evals; default:
  the workdir's config.json when ``records`` is a workdir).
  """
  if types is None and isinstance(records, (str, os.PathLike)) and (
      os.path.isdir(records)):
    types = evaluator_types(os.fspath(records))
  return "\n\n".join(_sections(load_records(records), None, types,
                               summary=False))


def summary_tables(records: Records,
                   types: Optional[Mapping[str, str]] = None) -> str:
  """What the study main prints: each evaluator's summary (its tables)."""
  text = "\n\n".join(_sections(load_records(records), None, types,
                               summary=True))
  return text or "(no records)"


def write_report(records_or_path: Records, out_dir: str, *,
                 title: str = "Length extrapolation results",
                 types: Optional[Mapping[str, str]] = None) -> str:
  """Writes out_dir/report.md and the PNGs; returns report.md's path.

  Args:
    records_or_path: a list of records, a results.jsonl path, or a workdir
      holding results.jsonl.
    out_dir: where report.md and the PNGs go (created if needed).
    title: the report's heading.
    types: {experiment: evaluator type} (a study's config.evals); default:
      the workdir's config.json when ``records_or_path`` is a workdir.
  """
  if types is None and isinstance(records_or_path, (str, os.PathLike)) and (
      os.path.isdir(records_or_path)):
    types = evaluator_types(os.fspath(records_or_path))
  records = load_records(records_or_path)
  if not records:
    raise ValueError("no records to report")
  os.makedirs(out_dir, exist_ok=True)
  models = sorted({r["model"] for r in records})
  header = [f"# {title}", "",
            f"{len(records)} records; models: {', '.join(models)}. "
            "Perplexity is token-weighted, exp(sum NLL / tokens); "
            "nonoverlap scores every token of disjoint windows, sliding "
            "scores only the stride's new tokens of each window. n/a: the "
            "model cannot run at that length."]
  sections = _sections(records, out_dir, types, summary=False)
  path = os.path.join(out_dir, REPORT_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\n".join(["\n".join(header)] + sections) + "\n")
  return path


def main(argv=None):
  """``--workdir DIR [--out_dir DIR]``: re-report DIR/results.jsonl."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m extrapolax.experiments.report",
      description="Write report.md and PNG plots from results.jsonl.")
  parser.add_argument("--workdir", required=True,
                      help="a folder holding results.jsonl")
  parser.add_argument("--out_dir", default=None,
                      help="where to write (default: the workdir)")
  args = parser.parse_args(argv)
  path = write_report(args.workdir, args.out_dir or args.workdir)
  print(markdown_tables(args.workdir))
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
