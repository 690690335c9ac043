"""Algorithmic length generalisation: task accuracy vs length.

A task (``extrapolax.experiments.data.get_task(name)``, or any object with
``sample(rng, length) -> example`` where the example has ``tokens`` int[L]
and ``answer_mask`` bool[L]) gives sequences whose answer tokens are
graded. The model reads the whole sequence once (teacher forcing); the
prediction of token t is the argmax of the logits at t - 1.

* ``token_accuracy``: correct answer tokens / answer tokens.
* ``sequence_accuracy``: examples whose answer tokens are all correct. Under
  teacher forcing this equals exact match of greedy decoding (if every
  teacher-forced prediction is right, greedy decoding produces the answer).

Records carry the training range: ``train_len`` is the longest training
length of the task and ``train_min_len`` the shortest, so the report can
shade it.

Positions: plain 0..L-1 by default. ``positions`` names a sampler of
``data.positions`` instead (``"randomized(max_position=1000)"``): each
example then reads at positions drawn from it, as Ruoss et al. evaluate a
model trained with randomized positions (their reference code draws fresh
positions in every forward pass, evaluation included).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extrapolax.attention import use_implementation
from extrapolax.experiments import records as records_lib

from . import perplexity
from . import variants

__all__ = ["METRICS", "grade_examples", "model_logits_fn",
           "algorithmic_accuracy"]

METRICS = ("sequence_accuracy", "token_accuracy")


def _task_object(task):
  if isinstance(task, str):
    # pylint: disable-next=g-import-not-at-top
    from extrapolax.experiments import data
    return data.get_task(task)
  return task


def _task_name(task) -> str:
  name = getattr(task, "name", None)
  return name if isinstance(name, str) and name else type(task).__name__


def grade_examples(logits_fn, tokens: Sequence[np.ndarray],
                   answer_masks: Sequence[np.ndarray],
                   *, batch_size: int = 32,
                   positions: Optional[Sequence[np.ndarray]] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (correct answer tokens, answer tokens), teacher-forced.

  Args:
    logits_fn: int32 [B, T] -> logits [B, T, V], or the argmax tokens
      [B, T] (``model_argmax_fn``; right padding is never seen by a causal
      model, so examples are padded to the longest).
    tokens, answer_masks: per example, int [L] and bool [L].
    batch_size: the most examples per call (balanced; the last batch is
      padded).
    positions: per example, its int [L] positions (None: plain); then
      ``logits_fn(tokens, positions)`` is called with int32 [B, T]
      positions, padding continuing each row's last position by one.
  """
  if positions is not None and len(positions) != len(tokens):
    raise ValueError(f"need as many position arrays as examples, got "
                     f"{len(positions)} and {len(tokens)}")
  if len(tokens) != len(answer_masks) or not len(tokens):
    raise ValueError(f"need as many answer masks as examples (>= 1), got "
                     f"{len(tokens)} and {len(answer_masks)}")
  width = max(len(t) for t in tokens)
  batch_size = perplexity.balanced_batch(len(tokens), batch_size)
  correct = np.zeros(len(tokens), np.int64)
  graded = np.zeros(len(tokens), np.int64)
  for lo in range(0, len(tokens), batch_size):
    chunk = range(lo, min(lo + batch_size, len(tokens)))
    batch = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    where = np.broadcast_to(np.arange(width, dtype=np.int32),
                            (batch_size, width)).copy()
    for row, i in enumerate(chunk):
      t, m = np.asarray(tokens[i]), np.asarray(answer_masks[i], bool)
      if t.shape != m.shape or t.ndim != 1:
        raise ValueError(f"example {i}: tokens {t.shape} and answer_mask "
                         f"{m.shape} must be equal 1-D shapes")
      batch[row, :len(t)], mask[row, :len(m)] = t, m
      if positions is not None:
        p = np.asarray(positions[i])
        if p.shape != t.shape:
          raise ValueError(f"example {i}: positions {p.shape} must have the "
                           f"shape of its tokens {t.shape}")
        where[row, :len(p)] = p
        where[row, len(p):] = p[-1] + 1 + np.arange(width - len(p))
    out = np.asarray(logits_fn(batch) if positions is None
                     else logits_fn(batch, where))
    predicted = out if out.ndim == 2 else out.argmax(-1)   # predicts t + 1
    hit = (predicted[:, :-1] == batch[:, 1:]) & mask[:, 1:]
    rows = len(chunk)
    correct[lo:lo + rows] = hit[:rows].sum(1)
    graded[lo:lo + rows] = mask[:rows, 1:].sum(1)
  return correct, graded


def model_logits_fn(model, implementation=None):
  """A jitted ``tokens [B, T] -> logits`` of an nnx model, its attention on
  ``implementation`` (None: the model's own)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, tokens, positions):
    return nnx.merge(graphdef, state)(tokens, positions=positions)

  def call(tokens, positions=None):
    with use_implementation(implementation):
      return logits(state, jnp.asarray(tokens),
                    None if positions is None
                    else jnp.asarray(positions, jnp.int32))

  return call


def model_argmax_fn(model, implementation=None):
  """A jitted ``tokens [B, T] -> argmax tokens [B, T]`` of a DecoderLM, the
  LM head run over position chunks (a 16k prompt's logits over a 49k
  vocabulary would be 3 GB at once)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def argmax(state, tokens):
    m = nnx.merge(graphdef, state)
    return perplexity.head_in_chunks(
        m, m.hidden(tokens), lambda logits: jnp.argmax(logits, -1))

  def call(tokens):
    with use_implementation(implementation):
      return argmax(state, jnp.asarray(tokens))

  return call


def algorithmic_accuracy(
    model, task, *, lengths: Sequence[int], train_len: int,
    train_min_len: Optional[int] = None, num_examples: int = 64,
    seed: int = 0, batch_size: int = 32,
    implementation: Optional[str] = "xla_chunked",
    labels: Optional[Mapping[str, Any]] = None,
    experiment: str = "algorithmic", positions: str = "plain") -> list[dict]:
  """Sequence and token accuracy of ``model`` on ``task`` at each length.

  Args:
    model: a DecoderLM.
    task: a task object or a name for ``data.get_task``.
    lengths: task lengths (the ``length`` argument of ``task.sample``).
    train_len: the longest task length seen in training.
    train_min_len: the shortest (default: not recorded).
    num_examples: examples per length (drawn from ``seed``; the same for
      every model).
    seed: the examples' random seed.
    batch_size: examples per call.
    implementation: attention implementation (None: the model's).
    labels: record fields (model, seed, step, variant, ...).
    experiment: the records' experiment name.
    positions: "plain" (0..L-1), or a ``data.positions`` sampler
      ("randomized(max_position=1000)") each example's positions are drawn
      from (from ``(seed, length, 1)``; the same for every model).

  Returns:
    Two records per length (METRICS), with n_tokens = graded answer tokens
    and n_trials = examples.
  """
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if not lengths:
    raise ValueError("lengths is empty")
  # pylint: disable-next=g-import-not-at-top
  from extrapolax.experiments.data import positions as positions_lib
  sampler = positions_lib.from_text(positions)
  if isinstance(sampler, positions_lib.Plain):
    sampler = None
  task = _task_object(task)
  name = _task_name(task)
  logits_fn = model_logits_fn(model, implementation)
  extra = {} if train_min_len is None else {"train_min_len": train_min_len}
  shared = variants.labels_for(model, train_len, {**extra, **(labels or {})})
  out = []
  for length in lengths:
    started = time.perf_counter()
    rng = np.random.default_rng([seed, int(length)])
    examples = [task.sample(rng, int(length)) for _ in range(num_examples)]
    drawn = None
    if sampler is not None:
      position_rng = np.random.default_rng([seed, int(length), 1])
      drawn = []
      for e in examples:
        sampler.check_length(len(e.tokens))
        drawn.append(sampler(position_rng, len(e.tokens)))
    correct, graded = grade_examples(
        logits_fn, [np.asarray(e.tokens) for e in examples],
        [np.asarray(e.answer_mask) for e in examples], batch_size=batch_size,
        positions=drawn)
    if not graded.sum():
      raise ValueError(f"task {name!r} at length {length} has no graded "
                       "answer tokens")
    values = dict(sequence_accuracy=float(np.mean(correct == graded)),
                  token_accuracy=float(correct.sum() / graded.sum()))
    for metric in METRICS:
      out.append(records_lib.make_record(
          **shared, eval_len=int(length), mode=None, stride=None, task=name,
          metric=metric, value=values[metric], n_tokens=int(graded.sum()),
          n_trials=num_examples, experiment=experiment))
    logging.info("%s %s L=%d: seq %.3f token %.3f (%.1fs)", name,
                 shared["model"], length, values["sequence_accuracy"],
                 values["token_accuracy"], time.perf_counter() - started)
  return out
