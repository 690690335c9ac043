"""RULER-style retrieval, tracking and aggregation: accuracy by length, depth.

Each trial is a ``data.ruler.ruler_prompt`` example (an exact number of
prompt tokens, the evidence at a depth) and its answer. A trial passes when
the model, reading prompt + answer once (teacher forcing), predicts every
answer token: the exact match greedy decoding gets (see ``passkey``), all
of a multi-value or multi-hop answer required, as RULER's
``string_match_all`` requires every reference. Accuracy per (task, length,
depth) is the fraction of trials passed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from extrapolax.experiments import records as records_lib

from . import algorithmic
from . import variants

__all__ = ["ruler_accuracy", "METRIC", "DEFAULT_DEPTHS"]

METRIC = "ruler_accuracy"
DEFAULT_DEPTHS = (0.0, 0.5, 1.0)


def _ruler():
  from extrapolax.experiments.data import ruler  # pylint: disable=import-outside-toplevel
  return ruler


def ruler_accuracy(
    model, *, tasks: Sequence[str], lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 4,
    train_len: Optional[int] = None, seed: int = 0, tokenizer=None,
    chat: bool = False, task_params: Optional[Mapping[str, dict]] = None,
    implementation: Optional[str] = "xla_chunked",
    tokens_per_batch: int = 16384, logits_fn=None,
    labels: Optional[Mapping[str, Any]] = None,
    experiment: str = "ruler") -> list[dict]:
  """Accuracy of ``model`` on RULER ``tasks`` over lengths x depths.

  Args:
    model: a DecoderLM (its labels; its forward unless ``logits_fn``).
    tasks: names of ``data.ruler.RULER_TASKS``.
    lengths: prompt lengths in tokens.
    depths: evidence depths, fractions in [0, 1] (common_words, which has
      none, runs once per length with depth None).
    trials: examples per (task, length, depth).
    train_len: the training length (default ``model.config.max_len``).
    seed: the examples' seed (the same examples for every model: each cell
      draws from ``default_rng([seed, task index, length, depth index])``).
    tokenizer: default ``data.get_tokenizer("byte")``.
    chat: frame each prompt with the tokenizer's chat template.
    task_params: {task: its sizes} (``data.ruler.task_params``).
    implementation: attention implementation (None: the model's).
    tokens_per_batch: prompts per call = max(1, this // length).
    logits_fn: ``tokens [B, T] -> logits or argmax [B, T]`` instead of the
      model's (tests, or a model under a transform).
    labels: record fields (model, seed, step, variant, ...).
    experiment: the records' experiment name.

  Returns:
    One record per (task, length, depth): metric "ruler_accuracy", task the
    RULER task, depth (None for common_words), n_trials, n_tokens = graded
    answer tokens.
  """
  ruler = _ruler()
  tasks = tuple(tasks)
  bad = [t for t in tasks if t not in ruler.RULER_TASKS]
  if bad or not tasks:
    raise ValueError(f"tasks={tasks!r}: each must be one of "
                     f"{ruler.RULER_TASKS}")
  params = dict(task_params or {})
  for task in params:
    if task not in tasks:
      raise ValueError(f"task_params names {task!r}, not in tasks={tasks}")
  for task in tasks:
    ruler.task_params(task, **params.get(task, {}))   # checks them
  for d in depths:
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"depths must lie in [0, 1], got {d!r}")
  if not lengths or not depths:
    raise ValueError(f"lengths={lengths!r} and depths={depths!r} must be "
                     "non-empty")
  if trials < 1:
    raise ValueError(f"trials must be >= 1, got {trials}")
  if tokenizer is None:
    from extrapolax.experiments import data  # pylint: disable=import-outside-toplevel
    tokenizer = data.get_tokenizer("byte")
  if logits_fn is None:
    logits_fn = (algorithmic.model_argmax_fn if hasattr(model, "hidden")
                 else algorithmic.model_logits_fn)(
                     model, implementation=implementation)
  train_len = int(train_len or model.config.max_len)
  shared = variants.labels_for(model, train_len, labels)
  out = []
  for t, task in enumerate(tasks):
    cells = (tuple(depths) if task in ruler.TASKS_WITH_DEPTH else (None,))
    for length in lengths:
      started = time.perf_counter()
      examples = []
      for d, depth in enumerate(cells):
        rng = np.random.default_rng([seed, ruler.RULER_TASKS.index(task),
                                     int(length), d])
        examples += [ruler.ruler_prompt(task, int(length), depth, rng,
                                        tokenizer, chat=chat,
                                        **params.get(task, {}))
                     for _ in range(trials)]
      sequences = [np.concatenate([e.prompt, e.answer]) for e in examples]
      masks = [np.arange(len(s)) >= len(e.prompt)
               for s, e in zip(sequences, examples)]
      batch_size = max(1, tokens_per_batch // max(len(s) for s in sequences))
      correct, graded = algorithmic.grade_examples(
          logits_fn, sequences, masks, batch_size=batch_size)
      passed = correct == graded
      for d, depth in enumerate(cells):
        rows = slice(d * trials, (d + 1) * trials)
        out.append(records_lib.make_record(
            **shared, eval_len=int(length), mode=None, stride=None,
            task=task, metric=METRIC, value=float(np.mean(passed[rows])),
            n_tokens=int(graded[rows].sum()),
            depth=None if depth is None else float(depth), n_trials=trials,
            experiment=experiment, decode="teacher_forced"))
      logging.info("ruler %s %s L=%d: %.2f (%.1fs)", task,
                   shared["model"], length, passed.mean(),
                   time.perf_counter() - started)
  return out
