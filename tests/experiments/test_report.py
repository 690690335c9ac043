"""report.md and PNGs from hand-made records, and the command line."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpl_image

from extrapolax.experiments import records
from extrapolax.experiments import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(**fields):
  base = dict(model="rope", pe="rope", scaling="none", scale=1.0,
              mask="causal", train_len=64, eval_len=64, mode="nonoverlap",
              stride=None, task=None, metric="perplexity", value=1.0,
              n_tokens=1000, seed=0, step=10)
  base.update(fields)
  return records.make_record(**base)


PPL = {"rope": [20.07, 19.79, 31.58, 79.25],
       "alibi": [19.73, 19.14, 18.41, 18.31],
       "learned": [21.5, math.nan, math.nan, math.nan]}
LENGTHS = [64, 128, 256, 1024]


def hand_records():
  out = []
  for model, values in PPL.items():
    for length, value in zip(LENGTHS, values):
      out.append(rec(model=model, pe=model, eval_len=length, value=value,
                     experiment="length"))
      out.append(rec(model=model, pe=model, eval_len=length, mode="sliding",
                     stride=32, value=value * 0.9, experiment="length"))
    for position in range(0, 1024, 256):
      out.append(rec(model=model, pe=model, eval_len=1024,
                     metric="position_nll", value=2.0 + position / 1000,
                     position=position, position_end=position + 256,
                     experiment="length"))
  out.append(rec(scaling="linear", scale=4.0, eval_len=256, value=25.5,
                 variant="rope linear x4", experiment="rope_scaling"))
  out.append(rec(mask="lambda(sinks=4, window=64)", eval_len=256,
                 value=22.25, experiment="mask"))
  for length in (64, 256):
    for depth in (0.0, 0.5, 1.0):
      out.append(rec(eval_len=length, depth=depth, mode=None,
                     task="passkey", metric="passkey_accuracy",
                     value=1.0 if length == 64 else depth / 2,
                     n_trials=4, experiment="passkey"))
  for model, acc in (("nope", [1.0, 0.75, 0.5]), ("rope", [1.0, 0.2, 0.0])):
    for length, value in zip((8, 16, 32), acc):
      out.append(rec(model=model, pe=model, eval_len=length, train_len=16,
                     train_min_len=4, mode=None, task="copy",
                     metric="sequence_accuracy", value=value, n_trials=32,
                     experiment="algorithmic"))
  return out


def check_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  pixels = mpl_image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert np.ptp(pixels) > 0          # not a blank image


def table_rows(text, heading):
  section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
  return [line for line in section.splitlines() if line.startswith("| ")]


def test_report_tables_and_plots(tmp_path):
  path = report.write_report(hand_records(), str(tmp_path))
  assert path == str(tmp_path / "report.md")
  text = open(path).read()
  rows = table_rows(text, "length: perplexity (nonoverlap)")
  assert rows[0] == "| eval length | rope | alibi | learned |"
  assert rows[1] == "| 64 (train) | 20.07 | 19.73 | 21.50 |"
  assert rows[4] == "| 1024 | 79.25 | 18.31 | n/a |"
  rows = table_rows(text, "length: perplexity (sliding, stride 32)")
  assert rows[2] == "| 128 | 17.81 | 17.23 | n/a |"
  # Sweeps show the same model's base column beside theirs.
  rows = table_rows(text, "rope_scaling: perplexity (nonoverlap)")
  assert rows == ["| eval length | rope | rope linear x4 |",
                  "| 256 | 31.58 | 25.50 |"]
  rows = table_rows(text, "mask: perplexity (nonoverlap)")
  assert rows[-1] == "| 256 | 31.58 | 22.25 |"
  # Passkey: mean over depths (0, 0.25, 0.5 at 256), then by depth.
  rows = table_rows(text, "passkey: passkey_accuracy")
  assert rows[:3] == ["| eval length | rope |", "| 64 (train) | 1.000 |",
                      "| 256 | 0.250 |"]
  assert "| 256 | 0.000 | 0.250 | 0.500 |" in rows
  rows = table_rows(text, "algorithmic: sequence_accuracy on copy")
  assert rows[0] == "| eval length | nope | rope |"
  assert rows[3] == "| 32 | 0.500 | 0.000 |"
  assert "Training range: lengths 4..16." in text
  pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
  assert pngs == sorted([
      "length_perplexity_nonoverlap.png",
      "length_perplexity_sliding_32.png",
      "length_position_nll_nonoverlap.png",
      "rope_scaling_perplexity_nonoverlap.png",
      "mask_perplexity_nonoverlap.png",
      "passkey_passkey_accuracy_passkey.png",
      "passkey_passkey_accuracy_passkey_curve.png",
      "algorithmic_sequence_accuracy_copy.png"])
  for name in pngs:
    assert f"]({name})" in text
    check_png(tmp_path / name)


def test_reruns_and_seeds(tmp_path):
  rows = [rec(value=10.0), rec(value=12.0),            # a rerun: last wins
          rec(model="alibi", pe="alibi", value=4.0),
          rec(model="alibi", pe="alibi", value=6.0, seed=1)]
  text = open(report.write_report(rows, str(tmp_path))).read()
  # alibi: seeds 0 and 1 (mean 5, sample std sqrt(2)); rope: one seed.
  assert "| 64 (train) | 12.00 (n=1) | 5.00 ± 1.41 |" in text
  assert "(mean ± sample std over n=2 seeds)" in text


def test_seed_spread_tables_and_bands(tmp_path, monkeypatch):
  # Three seeds at two lengths, values recomputed here with numpy.
  values = {(64, 0): 10.0, (64, 1): 13.0, (64, 2): 11.5,
            (256, 0): 30.0, (256, 1): 50.0, (256, 2): 37.0}
  rows = [rec(eval_len=length, seed=seed, value=value, experiment="length")
          for (length, seed), value in values.items()]
  rows.append(rec(eval_len=256, seed=1, value=44.0, experiment="length"))
  values[(256, 1)] = 44.0   # a rerun of seed 1: its last value wins
  stats = report.cell_stats(rows)
  for length in (64, 256):
    seeds = np.array([values[(length, k)] for k in range(3)])
    got = stats[("rope", length)]
    assert got.n == 3
    np.testing.assert_allclose(got.mean, seeds.mean(), rtol=1e-12)
    np.testing.assert_allclose(got.std, seeds.std(ddof=1), rtol=1e-12)
    assert (got.low, got.high) == (seeds.min(), seeds.max())
  table = report.length_table(rows, "perplexity")
  assert "| 64 (train) | 11.50 ± 1.50 |" in table
  assert f"| 256 | 37.00 ± {np.std([30.0, 44.0, 37.0], ddof=1):.2f} |" in table
  assert "n=3 seeds" in table

  # The plot: the mean line and a band from mean - std to mean + std.
  figures = []
  monkeypatch.setattr(report, "save_figure",
                      lambda fig, out_dir, name: figures.append(fig) or name)
  report.line_plot(rows, "t", "perplexity", str(tmp_path), "p.png",
                   logy=True)
  (ax,) = figures[0].axes
  line = [l for l in ax.get_lines() if l.get_label().startswith("rope")][0]
  np.testing.assert_allclose(line.get_ydata(), [11.5, 37.0])
  (band,) = ax.collections
  ys = band.get_paths()[0].vertices[:, 1]
  for length in (64, 256):
    s = stats[("rope", length)]
    assert np.isclose(ys, s.mean - s.std).any()
    assert np.isclose(ys, s.mean + s.std).any()
  assert "n=3 seeds" in ax.get_title()

  # One seed: no band, no spread.
  figures.clear()
  one = [r for r in rows if r["seed"] == 0]
  report.line_plot(one, "t", "perplexity", str(tmp_path), "q.png")
  assert not figures[0].axes[0].collections
  assert "±" not in report.length_table(one, "perplexity")


def test_report_from_results_file_and_cli(tmp_path):
  workdir = tmp_path / "run"
  records.append(str(workdir / "results.jsonl"), hand_records())
  from_file = report.markdown_tables(str(workdir))
  assert from_file == report.markdown_tables(hand_records())
  out = subprocess.run(
      [sys.executable, "-m", "extrapolax.experiments.report",
       "--workdir", str(workdir)], capture_output=True, text=True,
      check=True)
  assert "| 64 (train) | 20.07 | 19.73 | 21.50 |" in out.stdout
  assert (workdir / "report.md").exists()
  check_png(workdir / "length_perplexity_nonoverlap.png")


def test_nothing_to_report(tmp_path):
  with pytest.raises(ValueError, match="no results file"):
    report.write_report(str(tmp_path), str(tmp_path))
  with pytest.raises(ValueError, match="no records"):
    report.write_report([], str(tmp_path))


def test_equal_lines_stay_distinguishable_and_titles_are_readable(
    tmp_path, monkeypatch):
  """Two variants with identical values (e.g. a window under
  Lambda+ceiling) get different markers and line styles and a legend note;
  a variant without points past the training length says so; plot titles
  hold no internal keys."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figures = []
  real_save = report.save_figure

  def keep(fig, out_dir, name):
    figures.append(fig)
    return real_save(fig, out_dir, name)

  monkeypatch.setattr(report, "save_figure", keep)
  rows = []
  for mask in ("sliding_window(16)", "lambda(sinks=4, window=16)+ceiling"):
    for length in (16, 64):
      rows.append(rec(mask=mask, train_len=16, eval_len=length, value=9.0,
                      experiment="mask"))
  rows.append(rec(model="learned", pe="learned", train_len=16, eval_len=16,
                  value=8.0, experiment="length"))
  rows.append(rec(model="learned", pe="learned", train_len=16, eval_len=64,
                  value=math.nan, experiment="length"))
  rows.append(rec(model="alibi", pe="alibi", train_len=16, eval_len=64,
                  value=8.5, experiment="length"))
  rows.append(rec(model="alibi", pe="alibi", train_len=16, eval_len=16,
                  value=8.0, experiment="length"))
  report.write_report(rows, str(tmp_path))
  assert figures and all(isinstance(f, Figure) for f in figures)
  by_title = {f.axes[0].get_title(): f.axes[0] for f in figures}
  for title in by_title:
    assert not any(key in title for key in (
        "nonoverlap", "perplexity (", "length:", "mask:", "_")), title
  masks = next(ax for t, ax in by_title.items() if "mask" in t.lower())
  lines = [l for l in masks.get_lines() if l.get_label().startswith("rope")]
  assert len(lines) == 2
  assert list(lines[0].get_ydata()) == list(lines[1].get_ydata())
  assert lines[0].get_marker() != lines[1].get_marker()
  assert lines[0].get_linestyle() != lines[1].get_linestyle()
  assert "(overlaps rope sliding_window(16))" in lines[1].get_label()
  base = next(ax for t, ax in by_title.items()
              if t.startswith("Position encodings"))
  labels = [l.get_label() for l in base.get_lines()]
  assert "learned (no result past the training length)" in labels
  assert "alibi" in labels


def test_passkey_heatmap_panels_do_not_overlap(tmp_path, monkeypatch):
  figures = []
  real_save = report.save_figure
  monkeypatch.setattr(report, "save_figure", lambda fig, out, name: (
      figures.append(fig), real_save(fig, out, name))[1])
  rows = [rec(model=m, pe=m, eval_len=length, depth=depth, mode=None,
              task="passkey", metric="passkey_accuracy", value=depth,
              n_trials=4, experiment="passkey")
          for m in ("rope", "alibi", "sinusoidal")
          for length in (256, 512, 1024) for depth in (0.0, 0.5, 1.0)]
  report.write_report(rows, str(tmp_path))
  fig, _ = figures   # the heatmap, then the accuracy curve
  assert "Constrained" in type(fig.get_layout_engine()).__name__
  fig.draw_without_rendering()   # runs the layout
  renderer = fig._get_renderer()  # pylint: disable=protected-access
  panels = [ax for ax in fig.axes if ax.get_title()]
  assert [ax.get_title() for ax in panels] == ["rope", "alibi", "sinusoidal"]
  boxes = [ax.get_tightbbox(renderer) for ax in panels]   # labels included
  for left, right in zip(boxes, boxes[1:]):
    assert left.x1 <= right.x0, "a panel's labels overlap its neighbour"


def test_sweep_position_plot_draws_the_models_own_curve(tmp_path,
                                                        monkeypatch):
  # A mask sweep's loss-per-position plot also draws the same model's
  # length-study curve over the same windows (where plain RoPE turns up),
  # not another model's, and only the sweep's own curves without all_records.
  from extrapolax.experiments.evals import length  # pylint: disable=import-outside-toplevel
  def curve(model, mask, experiment, slope):
    return [rec(model=model, pe=model, mask=mask, eval_len=1024,
                metric="position_nll", value=2.0 + slope * position,
                position=position, position_end=position + 256,
                experiment=experiment) for position in range(0, 1024, 256)]
  plain = curve("rope", "causal", "length", 0.004)
  other = curve("alibi", "causal", "length", 0.0)
  swept = curve("rope", "lambda(sinks=4, window=64)", "mask", 0.0001)
  figures = []
  monkeypatch.setattr(report, "save_figure",
                      lambda fig, out_dir, name: figures.append(fig) or name)

  def drawn():
    (ax,) = figures[-1].axes
    return {l.get_label(): list(l.get_ydata()) for l in ax.get_lines()
            if l.get_label() != "training length"}

  length.position_section(swept, str(tmp_path), plain + other + swept)
  lines = drawn()
  assert set(lines) == {"rope", "rope lambda(sinks=4, window=64)"}
  np.testing.assert_allclose(lines["rope"],
                             [r["value"] for r in plain])
  np.testing.assert_allclose(lines["rope lambda(sinks=4, window=64)"],
                             [r["value"] for r in swept])
  length.position_section(swept, str(tmp_path))
  assert set(drawn()) == {"rope lambda(sinks=4, window=64)"}
