"""The ``passkey`` evaluator: passkey retrieval accuracy, lengths x depths.

Settings: ``lengths`` (prompt lengths in tokens; () for none: the
evaluation is skipped; a prompt needs >= 247 tokens), ``depths``
(fractions in [0, 1]), ``trials`` (keys per cell), ``implementation``,
``decode`` (teacher_forced: one forward, the same accuracy as greedy; greedy:
KV-cache generation, the answers recorded), ``tokenizer`` ("byte"; "model":
the study's ``model_source`` tokenizer, the default in such a study; or any
``models.load_tokenizer`` name or path), ``chat`` (frame each prompt with
the tokenizer's chat template, for instruct models), ``prompt``
("landmark": Landmark Attention's prompt, >= 247 tokens; "short": "key=KEY. "
in the same filler, then "\nkey=", >= 16 tokens, so a model with a short
context can be scored inside its training length: ``data.
short_passkey_prompt``, what ``data.RetrievalMix`` trains on), ``masks`` (inference
variants as in the ``mask`` evaluator, e.g. "causal,causal+self_extend(8,
1024)"; "" for the model as it is) with ``window`` / ``num_sinks``.
Records: ``evaluators.passkey_retrieval`` (no documents needed). Report: the
mean over depths, a table per variant by depth and a heatmap per variant;
the study main prints the mean over depths.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

from matplotlib.figure import Figure

from extrapolax.common import checks
from extrapolax.experiments import evals
from extrapolax.experiments import records as records_lib
from extrapolax.experiments import report
from extrapolax.experiments.evals import length

__all__ = ["EVALUATOR", "HELP"]

DECODES = ("teacher_forced", "greedy")
PROMPTS = ("landmark", "short")

HELP = {
    "models": length.HELP["models"],
    "lengths": "prompt lengths in tokens (() for none; >= 247 tokens each)",
    "depths": "where the key sits, fractions in [0, 1]",
    "trials": "keys per (length, depth)",
    "implementation": length.HELP["implementation"],
    "decode": "teacher_forced (one forward; the accuracy greedy decoding "
              "gets) or greedy (KV-cache generation; records the answers)",
    "tokenizer": "byte, model (the study's model_source tokenizer; the "
                 "default there) or a load_tokenizer name / path",
    "chat": "frame the prompt with the tokenizer's chat template",
    "prompt": "landmark (Landmark Attention's, >= 247 tokens) or short "
              "('key=KEY. ' in the filler, then '\\nkey=', >= 16 tokens)",
    "masks": "inference variants (mask sweep entries, comma-separated, e.g. "
             "causal+self_extend(8, 1024)); empty: the model as it is",
    "window": "the window / Lambda band of the masks (None: train_len)",
    "num_sinks": "Lambda's global (sink) tokens in the masks",
}


def _tokenizer_setting(settings: dict, study) -> str:
  source = study.get("model_source")
  name = settings.get("tokenizer") or ("model" if source else "byte")
  if not isinstance(name, str):
    raise ValueError(f"tokenizer={name!r} must be 'byte', 'model' or a "
                     "tokenizer name / path")
  if name == "model":
    if not source:
      raise ValueError("tokenizer='model' needs config.model_source (the "
                       "loaded model's tokenizer); use 'byte' for a trained "
                       "byte model")
    return str(source)
  return name


def retrieval_grid(settings: dict) -> Optional[tuple]:
  """A retrieval evaluator's ``(lengths, depths, trials)``, or None when
  ``lengths`` is empty (the evaluation is skipped): lengths ints >= 1,
  depths fractions in [0, 1] (default 0 / 0.5 / 1), trials an int >= 1
  (default 4)."""
  lengths = evals.split_numbers(settings.get("lengths", ()))
  if not lengths:
    return None
  length.check_positive("lengths", lengths, integer=True)
  depths = evals.split_numbers(settings.get("depths", (0.0, 0.5, 1.0)))
  try:
    ok = bool(depths) and all(0.0 <= float(d) <= 1.0 for d in depths)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"depths={depths!r} must be fractions in [0, 1]")
  trials = settings.get("trials", 4)
  length.check_positive("trials", (trials,), integer=True)
  return lengths, depths, trials


def _validate(settings: dict, study) -> Optional[dict]:
  from extrapolax.experiments.evaluators import mask_sweep  # pylint: disable=import-outside-toplevel
  settings = length.known_settings(settings, HELP)
  grid = retrieval_grid(settings)
  if grid is None:
    return None
  lengths, depths, trials = grid
  decode = checks.check_choice("decode",
                               settings.get("decode", "teacher_forced"),
                               DECODES)
  chat = settings.get("chat", False)
  if not isinstance(chat, bool):
    raise ValueError(f"chat={chat!r} must be True or False")
  prompt = checks.check_choice("prompt", settings.get("prompt", "landmark"),
                               PROMPTS)
  if prompt == "short" and chat:
    raise ValueError("prompt='short' has no chat framing; use "
                     "prompt='landmark' with chat=True")
  masks = evals.split_names(settings.get("masks", "") or "")
  window = settings.get("window")
  if window is not None:
    length.check_positive("window", (window,), integer=True)
  num_sinks = checks.check_int("num_sinks", settings.get("num_sinks", 4), 0)
  train_len = int(study.train.train_len)
  mask_sweep.check_entries(masks, window=window or train_len,
                           num_sinks=num_sinks)
  return dict(lengths=tuple(int(l) for l in lengths),
              depths=tuple(float(d) for d in depths), trials=trials,
              train_len=train_len,
              implementation=settings.get("implementation"), decode=decode,
              tokenizer=_tokenizer_setting(settings, study), chat=chat,
              # Only when not the default: earlier fingerprints stay valid.
              **({} if prompt == "landmark" else {"prompt": prompt}),
              masks=tuple(masks), window=window, num_sinks=num_sinks)


def _load_tokenizer(name: str):
  if name == "byte":
    from extrapolax.experiments import data  # pylint: disable=import-outside-toplevel
    return data.get_tokenizer("byte")
  from extrapolax.models import load_tokenizer  # pylint: disable=import-outside-toplevel
  return load_tokenizer(name)


def _run(model, documents, settings: dict, labels: dict) -> list:
  del documents
  from extrapolax.experiments import evaluators  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments.data import tasks  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments.evaluators import mask_sweep  # pylint: disable=import-outside-toplevel
  settings = dict(settings)
  labels = dict(labels)
  experiment = labels.pop("experiment", "passkey")
  tokenizer = _load_tokenizer(settings.pop("tokenizer"))
  chat = settings.pop("chat")
  masks, num_sinks = settings.pop("masks"), settings.pop("num_sinks")
  window = settings.pop("window") or settings["train_len"]
  if settings.pop("prompt", "landmark") == "short":
    prompt_fn = tasks.short_passkey_prompt
  else:
    prompt_fn = functools.partial(tasks.passkey_prompt, chat=chat)
  runs = [model] if not masks else [
      mask_sweep.mask_variant(model, m, window=window, num_sinks=num_sinks)
      for m in masks]
  out = []
  for runner in runs:
    out += evaluators.passkey_retrieval(
        runner, labels=labels, experiment=experiment, tokenizer=tokenizer,
        prompt_fn=prompt_fn, **settings)
  return out


def _mean_over_depths(group) -> dict:
  """{(variant, length, seed): accuracy averaged over depths,
  trial-weighted}; the last record per (variant, length, depth, seed)
  wins."""
  last = {}
  for r in group:
    key = (records_lib.variant_label(r), r["eval_len"], r.get("depth"),
           r["seed"])
    last[key] = (r["value"], r.get("n_trials") or 1)
  sums: dict = {}
  for (variant, eval_len, _, seed), (value, trials) in last.items():
    total = sums.setdefault((variant, eval_len, seed), [0.0, 0])
    total[0] += value * trials
    total[1] += trials
  return {k: total / weight for k, (total, weight) in sums.items()}


def _mean_rows(group) -> list:
  """One row per (variant, length, seed): the mean over depths (for the
  tables and the curve: mean ± std over seeds)."""
  return [dict(group[0], depth=None, seed=seed, value=value, variant=variant,
               eval_len=eval_len)
          for (variant, eval_len, seed), value in
          _mean_over_depths(group).items()]


def _mean_table(group, digits: int = 3) -> str:
  return report.length_table(_mean_rows(group), "passkey_accuracy",
                             digits=digits)


def _depth_table(group) -> str:
  values, _ = report.cells(group, by=("eval_len", "depth"))
  lengths = sorted({k[1] for k in values})
  depths = sorted({k[2] for k in values})
  variant = records_lib.variant_label(group[0])
  rows = [[str(l)] + [report.fmt(values.get((variant, l, d)), 3)
                      for d in depths]
          for l in lengths]
  return report.markdown(["length \\ depth"] + [f"{d:g}" for d in depths],
                         rows)


def _heatmap(group, out_dir, name, title="Passkey retrieval accuracy by "
             "prompt length and key depth") -> str:
  variants = report.variants(group)
  values, _ = report.cells(group, by=("eval_len", "depth"))
  lengths = sorted({r["eval_len"] for r in group})
  depths = sorted({r["depth"] for r in group if r.get("depth") is not None})
  # Constrained layout keeps each panel's labels off its neighbour.
  fig = Figure(figsize=(min(4 + 3.2 * len(variants), 20), 3.8),
               layout="constrained")
  axes = fig.subplots(1, len(variants), squeeze=False)[0]
  image = None
  # Cell text as large as the cells allow (a 5 x 5 grid has room for 8 pt).
  cell_font = 8 if len(lengths) <= 6 and len(depths) <= 6 else 6
  for ax, variant in zip(axes, variants):
    grid = [[values.get((variant, l, d), math.nan) for l in lengths]
            for d in depths]
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis",
                      aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths],
                  rotation=45, fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths],
                  fontsize=7)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(variant, fontsize=9)
    for i, row in enumerate(grid):
      for j, v in enumerate(row):
        if not math.isnan(v):
          ax.text(j, i, f"{v:.1f}", ha="center", va="center",
                  fontsize=cell_font,
                  color="white" if v < 0.5 else "black")
  fig.colorbar(image, ax=list(axes), fraction=0.05, label="accuracy")
  fig.suptitle(title, fontsize=10)
  return report.save_figure(fig, out_dir, name)


def _answers_table(group) -> str:
  """Greedy records' answers: variant, length, depth, accuracy, answers."""
  rows = [[records_lib.variant_label(r), str(r["eval_len"]),
           f"{r['depth']:g}", report.fmt(r["value"], 2),
           " / ".join(repr(a.strip())[:40] for a in r["answers"][:4])]
          for r in group if r.get("answers")]
  if not rows:
    return ""
  return report.markdown(["variant", "length", "depth", "accuracy",
                          "answers"], rows)


def _report(records, out_dir, all_records) -> str:
  del all_records
  parts = []
  for key, group in report.group_records(records).items():
    title = report.group_title(key)
    train = ", ".join(str(t) for t in report.train_lens(group))
    lines = [f"## {title}", "",
             "Exact-match accuracy, mean over depths; training length "
             f"{train}.", "", _mean_table(group)]
    for variant in report.variants(group):
      lines += ["", f"{variant}, by depth:", "", _depth_table(
          [r for r in group if records_lib.variant_label(r) == variant])]
    said = _answers_table(group)
    if said:
      lines += ["", "What greedy decoding said (each trial's continuation, "
                "the key's length in tokens):", "", said]
    if out_dir is not None:
      name = _heatmap(group, out_dir, f"{report.slug(key)}.png")
      curve = report.line_plot(
          _mean_rows(group), "Passkey retrieval accuracy (mean over depths) "
          "vs prompt length", "accuracy", out_dir,
          f"{report.slug(key)}_curve.png", xlabel="prompt length (tokens)")
      lines += ["", f"![{title}]({name})", "", f"![{title}: curve]({curve})"]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def _summary(records, all_records) -> str:
  """Accuracy averaged over depths (rows: length, columns: variant; over
  several seeds mean ± std)."""
  del all_records
  return "\n".join(["## passkey: accuracy (mean over depths)", "",
                    _mean_table(records, digits=2)])


EVALUATOR = evals.register(evals.Evaluator(
    name="passkey", run=_run, validate=_validate, report=_report,
    summary=_summary, needs_documents=False, metrics=("passkey_accuracy",),
    help=HELP))
