"""report.md and PNG plots from results records, without the models.

``write_report(records_or_path, out_dir)`` groups the records by
(experiment, metric, mode, stride, task) and writes, per group, a markdown
table (rows: evaluation length; columns: variant) and a plot:

* perplexity: perplexity vs length per variant, log-y, the training length
  as a dashed vertical line. Sweeps other than the base "length" experiment
  (RoPE scalings, masks) also show the base columns of the same models.
* position_nll: mean NLL vs position within the window.
* passkey_accuracy: a table of the mean over depths, a table per variant
  (rows length, columns depth) and a heatmap per variant (depth x length).
* accuracies of synthetic tasks: accuracy vs length with the training range
  shaded.

A record is a cell; when a (variant, length) cell has several records, the
last one per seed wins (reruns append) and seeds are averaged.

Command line (re-report a workdir from its results.jsonl)::

  python -m extrapolax.experiments.report --workdir DIR [--out_dir DIR]
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from matplotlib import ticker
from matplotlib.figure import Figure

from extrapolax.experiments import records as records_lib

__all__ = ["load_records", "group_records", "markdown_tables",
           "write_report", "main"]

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
BASE_EXPERIMENT = "length"
Records = Union[str, os.PathLike, Iterable[Mapping[str, Any]]]


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


def _experiment(record) -> str:
  if record.get("experiment"):
    return record["experiment"]
  if record["metric"] in ("perplexity", "position_nll"):
    return BASE_EXPERIMENT
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


def _title(key: GroupKey) -> str:
  experiment, metric, mode, stride, task = key
  parts = [f"{experiment}: {metric}"]
  if mode == "sliding":
    parts.append(f"(sliding, stride {stride})")
  elif mode:
    parts.append(f"({mode})")
  if task and task != experiment:
    parts.append(f"on {task}")
  return " ".join(parts)


def _slug(key: GroupKey) -> str:
  text = "_".join(str(k) for k in key if k is not None)
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _cells(records: Sequence[Mapping[str, Any]], *, by=("eval_len",)):
  """{(variant, *by): mean over seeds of the last value per seed}."""
  last = collections.OrderedDict()
  for r in records:
    key = (records_lib.variant_label(r),) + tuple(r[b] for b in by)
    last[key + (r["seed"],)] = r["value"]
  values = collections.OrderedDict()
  for key, value in last.items():
    values.setdefault(key[:-1], []).append(value)
  return {k: sum(v) / len(v) for k, v in values.items()}, max(
      (len(v) for v in values.values()), default=0)


def _fmt(value: Optional[float], metric: str) -> str:
  if value is None:
    return ""
  if math.isnan(value):
    return "n/a"
  if math.isinf(value):
    return "inf"
  if "accuracy" in metric:
    return f"{value:.3f}"
  return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"


def _variants(records) -> list[str]:
  out = []
  for r in records:
    label = records_lib.variant_label(r)
    if label not in out:
      out.append(label)
  return out


def _train_lens(records) -> list[int]:
  return sorted({r["train_len"] for r in records})


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _length_table(records, metric: str, columns=None) -> str:
  cells, seeds = _cells(records)
  columns = columns or _variants(records)
  lengths = sorted({r["eval_len"] for r in records})
  train = _train_lens(records)
  rows = []
  for length in lengths:
    label = f"{length}" + (" (train)" if length in train else "")
    rows.append([label] + [_fmt(cells.get((c, length)), metric)
                           for c in columns])
  note = f"\n\n(mean over {seeds} seeds)" if seeds > 1 else ""
  return _markdown(["eval length"] + list(columns), rows) + note


def _with_base_columns(key: GroupKey, group, all_groups):
  """The base experiment's records of the same models, for comparison."""
  experiment, metric, mode, stride, task = key
  if experiment == BASE_EXPERIMENT or metric != "perplexity":
    return group
  base = all_groups.get((BASE_EXPERIMENT, metric, mode, stride, task), [])
  models = {r["model"] for r in group}
  labels = set(_variants(group))
  lengths = {r["eval_len"] for r in group}
  extra = [r for r in base if r["model"] in models and r["eval_len"] in
           lengths and records_lib.variant_label(r) not in labels]
  return extra + list(group)


# ----------------------------------------------------------------------------
# Plots (matplotlib's object API: no display, no global backend change).


def _save(fig: Figure, out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return name


def _mark_train(ax, records):
  for i, train_len in enumerate(_train_lens(records)):
    ax.axvline(train_len, color="grey", linestyle="--", linewidth=1,
               label="training length" if i == 0 else None)


def _finite(xs, ys):
  pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and
           math.isfinite(y)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _line_plot(records, title, ylabel, out_dir, name, *, logy=False,
               x_of=lambda key: key[1], by=("eval_len",), shade=None,
               xlabel="evaluation length (tokens)"):
  cells, _ = _cells(records, by=by)
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  for variant in _variants(records):
    points = sorted((x_of(k), v) for k, v in cells.items()
                    if k[0] == variant)
    xs, ys = _finite([p[0] for p in points], [p[1] for p in points])
    if xs:
      ax.plot(xs, ys, marker="o", markersize=3, label=variant)
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
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, out_dir, name)


def _passkey_heatmap(records, title, out_dir, name):
  variants = _variants(records)
  cells, _ = _cells(records, by=("eval_len", "depth"))
  lengths = sorted({r["eval_len"] for r in records})
  depths = sorted({r["depth"] for r in records if r.get("depth") is not None})
  fig = Figure(figsize=(min(4 + 3.2 * len(variants), 20), 3.6))
  axes = fig.subplots(1, len(variants), squeeze=False)[0]
  image = None
  for ax, variant in zip(axes, variants):
    grid = [[cells.get((variant, length, depth), math.nan)
             for length in lengths] for depth in depths]
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis",
                      aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths],
                  rotation=45, fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths],
                  fontsize=7)
    ax.set_xlabel("prompt length")
    ax.set_ylabel("depth")
    ax.set_title(variant, fontsize=9)
    for i, row in enumerate(grid):
      for j, v in enumerate(row):
        if not math.isnan(v):
          ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6,
                  color="white" if v < 0.5 else "black")
  fig.colorbar(image, ax=list(axes), fraction=0.025, label="accuracy")
  fig.suptitle(title, fontsize=10)
  return _save(fig, out_dir, name)


# ----------------------------------------------------------------------------
# The report.


def _section(key, group, all_groups, out_dir, plots: bool) -> str:
  experiment, metric, _, _, _ = key
  title, slug = _title(key), _slug(key)
  train = ", ".join(str(t) for t in _train_lens(group))
  parts = [f"## {title}", ""]
  if metric == "position_nll":
    longest = max(r["eval_len"] for r in group)
    parts.append(f"Mean NLL (nats) by position within windows of {longest} "
                 f"tokens; training length {train}.")
    if plots:
      name = _line_plot(group, title, "mean NLL (nats)", out_dir,
                        f"{slug}.png", by=("position", "position_end"),
                        x_of=lambda k: (k[1] + k[2]) / 2,
                        xlabel="position in the window")
      parts += ["", f"![{title}]({name})"]
    return "\n".join(parts)
  if metric == "passkey_accuracy":
    parts.append(f"Exact-match accuracy, mean over depths; training length "
                 f"{train}.")
    parts += ["", _passkey_mean_table(group)]
    for variant in _variants(group):
      parts += ["", f"{variant}, by depth:", "",
                _passkey_depth_table([r for r in group if records_lib
                                      .variant_label(r) == variant])]
    if plots:
      name = _passkey_heatmap(group, title, out_dir, f"{slug}.png")
      parts += ["", f"![{title}]({name})"]
    return "\n".join(parts)
  shown = _with_base_columns(key, group, all_groups)
  if "accuracy" in metric:
    lo = min(r.get("train_min_len") or min(r["eval_len"] for r in group)
             for r in group)
    hi = max(r["train_len"] for r in group)
    parts.append(f"Training range: lengths {lo}..{hi}.")
    parts += ["", _length_table(shown, metric)]
    if plots:
      name = _line_plot(shown, title, metric.replace("_", " "), out_dir,
                        f"{slug}.png", shade=(lo, hi), xlabel="task length")
      parts += ["", f"![{title}]({name})"]
    return "\n".join(parts)
  parts.append(f"Training length {train} (the row marked (train)).")
  parts += ["", _length_table(shown, metric)]
  if plots:
    name = _line_plot(shown, title, metric, out_dir, f"{slug}.png",
                      logy=metric == "perplexity")
    parts += ["", f"![{title}]({name})"]
  return "\n".join(parts)


def _passkey_mean_table(group) -> str:
  # Mean over depths, weighted by trials.
  merged = collections.OrderedDict()
  cells, _ = _cells(group, by=("eval_len", "depth"))
  trials = {(records_lib.variant_label(r), r["eval_len"], r["depth"]):
            r.get("n_trials") or 1 for r in group}
  for (variant, length, depth), value in cells.items():
    w = trials[(variant, length, depth)]
    total, weight = merged.get((variant, length), (0.0, 0))
    merged[(variant, length)] = (total + w * value, weight + w)
  means = [dict(r, depth=None, seed=None, value=total / weight,
                variant=variant, eval_len=length)
           for (variant, length), (total, weight) in merged.items()
           for r in group[:1]]
  return _length_table(means, "passkey_accuracy")


def _passkey_depth_table(group) -> str:
  cells, _ = _cells(group, by=("eval_len", "depth"))
  lengths = sorted({k[1] for k in cells})
  depths = sorted({k[2] for k in cells})
  variant = records_lib.variant_label(group[0])
  rows = [[str(length)] + [_fmt(cells.get((variant, length, d)),
                                "passkey_accuracy") for d in depths]
          for length in lengths]
  return _markdown(["length \\ depth"] + [f"{d:g}" for d in depths], rows)


def markdown_tables(records: Records) -> str:
  """Every group's section (tables only, no plots) as markdown."""
  records = load_records(records)
  groups = group_records(records)
  return "\n\n".join(_section(k, g, groups, "", plots=False)
                     for k, g in groups.items())


def write_report(records_or_path: Records, out_dir: str, *,
                 title: str = "Length extrapolation results") -> str:
  """Writes out_dir/report.md and one PNG per group; returns report.md's path.

  Args:
    records_or_path: a list of records, a results.jsonl path, or a workdir
      holding results.jsonl.
    out_dir: where report.md and the PNGs go (created if needed).
    title: the report's heading.
  """
  records = load_records(records_or_path)
  if not records:
    raise ValueError("no records to report")
  os.makedirs(out_dir, exist_ok=True)
  groups = group_records(records)
  models = sorted({r["model"] for r in records})
  header = [f"# {title}", "",
            f"{len(records)} records; models: {', '.join(models)}. "
            "Perplexity is token-weighted, exp(sum NLL / tokens); "
            "nonoverlap scores every token of disjoint windows, sliding "
            "scores only the stride's new tokens of each window. n/a: the "
            "model cannot run at that length."]
  sections = [_section(k, g, groups, out_dir, plots=True)
              for k, g in groups.items()]
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
