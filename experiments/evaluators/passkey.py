"""Passkey retrieval (Landmark Attention's test, reused by PI and YaRN).

A prompt of N tokens (REFERENCE.md's template: instruction, filler, the line
"The pass key is KEY. Remember it. KEY is the pass key." at depth d, more
filler, "What is the pass key? The pass key is") is built by
``passkey_prompt(num_tokens, depth, key, tokenizer) -> (prompt_ids,
key_ids)`` (``extrapolax.experiments.data`` by default). A trial passes
when the model's greedy continuation of ``len(key_ids)`` tokens equals
``key_ids`` exactly. Accuracy per (length, depth) is the fraction of trials
passed; keys are random ``key_digits``-digit numbers drawn from ``seed``.

Two ways to decide it, with the same answer:

* ``decode="teacher_forced"`` (default): one forward over prompt + key; the
  trial passes iff the argmax at every key position is the key token. Greedy
  decoding reproduces the key exactly iff each of its steps, fed the key's
  prefix, picks the next key token, which is this condition, so the
  accuracy equals greedy exact match at a fraction of the cost.
* ``decode="greedy"``: generate ``len(key_ids)`` tokens with the KV cache
  (``models.generate``: one prefill forward over the prompt, then one cached
  step per key token); records carry the decoded ``answer`` text of each
  trial.

Both use the memory-linear ``xla_chunked`` attention by default and batch the
prompts of one length (right-padded if the prompt builder returns slightly
different lengths: a causal model never sees the padding).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extrapolax.attention import use_implementation
from extrapolax.experiments import records as records_lib

from . import algorithmic
from . import perplexity
from . import variants

__all__ = ["greedy_continuations", "greedy_by_prefill", "passkey_retrieval",
           "DEFAULT_DEPTHS", "DECODES"]

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DECODES = ("teacher_forced", "greedy")
PromptFn = Callable[[int, float, str, Any], tuple[Any, Any]]


def greedy_continuations(model, prompts: Sequence[np.ndarray], steps: int,
                         *, batch_size: int = 8) -> np.ndarray:
  """Greedy ``steps`` tokens after each prompt, by full forwards.

  Args:
    model: a DecoderLM (or any nnx module ``tokens [B, T] -> logits``).
    prompts: 1-D int arrays (lengths may differ; they are right-padded).
    steps: tokens to generate.
    batch_size: the most prompts per call (balanced; the last batch is
      padded).
  Returns:
    int32 [len(prompts), steps].
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  lengths = np.array([len(p) for p in prompts])
  if not len(prompts) or lengths.min() < 1:
    raise ValueError("need at least one non-empty prompt")
  total = int(lengths.max()) + steps
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, buffer, prompt_len):
    m = nnx.merge(graphdef, state)
    rows = jnp.arange(buffer.shape[0])

    def body(k, buffer):
      logits = m(buffer)
      nxt = jnp.argmax(logits[rows, prompt_len - 1 + k], axis=-1)
      return buffer.at[rows, prompt_len + k].set(nxt.astype(buffer.dtype))

    buffer = jax.lax.fori_loop(0, steps, body, buffer)
    index = prompt_len[:, None] + jnp.arange(steps)[None]
    return jnp.take_along_axis(buffer, index, axis=1)

  batch_size = perplexity.balanced_batch(len(prompts), batch_size)
  out = np.zeros((len(prompts), steps), np.int32)
  for lo in range(0, len(prompts), batch_size):
    chunk = prompts[lo:lo + batch_size]
    buffer = np.zeros((batch_size, total), np.int32)
    prompt_len = np.ones(batch_size, np.int32)
    for row, p in enumerate(chunk):
      buffer[row, :len(p)] = p
      prompt_len[row] = len(p)
    got = np.asarray(run(state, buffer, prompt_len))
    out[lo:lo + len(chunk)] = got[:len(chunk)]
  return out


def greedy_by_prefill(model, prompts: Sequence[np.ndarray], steps: int, *,
                      batch_size: int = 8) -> np.ndarray:
  """Greedy ``steps`` tokens after each of ``prompts`` (equal lengths),
  by ``models.generate`` (prefill, then the KV cache): int32 [n, steps]."""
  from extrapolax.models.generate import generate  # pylint: disable=import-outside-toplevel
  lengths = {len(p) for p in prompts}
  if len(lengths) != 1:
    raise ValueError(f"prompts of one call must have one length, got "
                     f"{sorted(lengths)}")
  batch_size = perplexity.balanced_batch(len(prompts), batch_size)
  out = np.zeros((len(prompts), steps), np.int32)
  for lo in range(0, len(prompts), batch_size):
    chunk = list(prompts[lo:lo + batch_size])
    rows = len(chunk)
    chunk += [chunk[-1]] * (batch_size - rows)    # one shape per call
    got = generate(model, jnp.asarray(np.stack(chunk), jnp.int32), steps)
    out[lo:lo + rows] = np.asarray(got)[:rows, -steps:]
  return out


def _default_prompt_fn() -> PromptFn:
  from extrapolax.experiments import data  # pylint: disable=g-import-not-at-top
  return data.passkey_prompt


def _default_tokenizer():
  from extrapolax.experiments import data  # pylint: disable=g-import-not-at-top
  return data.get_tokenizer("byte")


def passkey_retrieval(
    model, *, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5, train_len: Optional[int] = None, key_digits: int = 5,
    seed: int = 0, tokenizer=None, prompt_fn: Optional[PromptFn] = None,
    implementation: Optional[str] = "xla_chunked",
    tokens_per_batch: int = 16384, decode: str = "teacher_forced",
    labels: Optional[Mapping[str, Any]] = None,
    experiment: str = "passkey") -> list[dict]:
  """Passkey accuracy over lengths x depths.

  Args:
    model: a DecoderLM.
    lengths: prompt lengths in tokens.
    depths: where the key line sits, fractions in [0, 1].
    trials: keys per (length, depth).
    train_len: the training length (default ``model.config.max_len``).
    key_digits: digits per key (keys are uniform among such numbers).
    seed: the keys' random seed (the same keys for every model).
    tokenizer: default ``get_tokenizer("byte")``.
    prompt_fn: ``(num_tokens, depth, key, tokenizer) -> (prompt_ids,
      key_ids)``; default ``extrapolax.experiments.data.passkey_prompt``.
    implementation: attention implementation (None: the model's).
    tokens_per_batch: prompts per call = max(1, this // length).
    decode: "teacher_forced" or "greedy" (the same accuracy; see the module
      docstring).
    labels: record fields (model, seed, step, variant, ...).
    experiment: the records' experiment name.

  Returns:
    One record per (length, depth): metric "passkey_accuracy", task
    "passkey", depth, n_trials, n_tokens = graded key tokens.
  """
  if trials < 1 or key_digits < 1:
    raise ValueError(f"trials and key_digits must be >= 1, got {trials}, "
                     f"{key_digits}")
  for d in depths:
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"depths must lie in [0, 1], got {d!r}")
  if not lengths:
    raise ValueError("lengths is empty")
  if decode not in DECODES:
    raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
  train_len = int(train_len or model.config.max_len)
  tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
  prompt_fn = prompt_fn or _default_prompt_fn()
  runner = model
  shared = variants.labels_for(model, train_len, labels)
  rng = np.random.default_rng(seed)
  logits_fn = None
  out = []
  for length in lengths:
    started = time.perf_counter()
    prompts, answers, cells = [], [], []
    for depth in depths:
      for _ in range(trials):
        key = str(rng.integers(10**(key_digits - 1), 10**key_digits))
        prompt_ids, key_ids = prompt_fn(int(length), float(depth), key,
                                        tokenizer)
        prompts.append(np.asarray(prompt_ids, np.int32))
        answers.append(np.asarray(key_ids, np.int32))
        cells.append(depth)
    steps = max(len(a) for a in answers)
    batch_size = max(1, tokens_per_batch // (int(length) + steps))
    said = None
    if decode == "greedy":
      with use_implementation(implementation):
        if len({len(p) for p in prompts}) == 1:
          generated = greedy_by_prefill(runner, prompts, steps,
                                        batch_size=batch_size)
        else:
          generated = greedy_continuations(runner, prompts, steps,
                                           batch_size=batch_size)
      passed = np.array([np.array_equal(g[:len(a)], a)
                         for g, a in zip(generated, answers)])
      if hasattr(tokenizer, "decode"):
        said = [_text(tokenizer, g) for g in generated]
    else:
      if logits_fn is None:
        logits_fn = (algorithmic.model_argmax_fn if hasattr(runner, "hidden")
                     else algorithmic.model_logits_fn)(
                         runner, implementation=implementation)
      correct, graded = algorithmic.grade_examples(
          logits_fn, [np.concatenate([p, a]) for p, a in zip(prompts,
                                                               answers)],
          [np.arange(len(p) + len(a)) >= len(p)
           for p, a in zip(prompts, answers)], batch_size=batch_size)
      passed = correct == graded
    for depth in depths:
      hits = [p for p, c in zip(passed, cells) if c == depth]
      graded = sum(len(a) for a, c in zip(answers, cells) if c == depth)
      extra = {}
      if said is not None:
        extra["answers"] = [t for t, c in zip(said, cells) if c == depth]
      out.append(records_lib.make_record(
          **shared, eval_len=int(length), mode=None, stride=None,
          task="passkey", metric="passkey_accuracy",
          value=float(np.mean(hits)), n_tokens=int(graded),
          depth=float(depth), n_trials=len(hits), experiment=experiment,
          decode=decode, **extra))
    logging.info("passkey %s L=%d: %.2f (%.1fs)", shared["model"], length,
                 passed.mean(), time.perf_counter() - started)
  return out


def _text(tokenizer, ids) -> str:
  """What a greedy trial said, as text (bytes a tokenizer cannot decode
  alone are replaced)."""
  try:
    return str(tokenizer.decode([int(i) for i in ids]))
  except (ValueError, UnicodeDecodeError):
    return repr([int(i) for i in ids])
