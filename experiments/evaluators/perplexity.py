"""Perplexity vs evaluation length, non-overlapping and sliding.

Protocols (REFERENCE.md), for a window length L:

* ``nonoverlap``: windows start at 0, L, 2L, ...; each feeds tokens
  ``[s, s + L)`` and scores all L next-token predictions (targets
  ``[s + 1, s + L + 1)``), so every token but the first is scored once and the
  average context is L / 2 (the ALiBi paper's protocol).
* ``sliding`` with stride S: windows start at 0, S, 2S, ...; the first scores
  all L predictions, each later one only its S newest (targets
  ``[s + L - S + 1, s + L + 1)``), so every scored token sees at least
  L - S tokens of context. S = 1 is the most faithful, YaRN uses 256.

Windows never cross a document when ``tokens`` is a list of documents; a
1-D array is one stream. A window needs L + 1 tokens; tokens left over at a
stream's end are not scored. ``max_tokens`` caps the scored tokens per
length: windows are taken in order from the start, so every length scores
(about) the same text.

Perplexity is token-weighted: ``exp(sum NLL / tokens)`` over all scored
tokens. The loss per position (mean NLL at each index within the window) is
kept too: in full as :class:`StreamScore` arrays and, bucketed, as
``position_nll`` records for the longest non-overlapping length.

The model runs on a memory-linear attention implementation (``xla_chunked``
by default) so 16x the training length fits; one jit compilation per length
(the batch of windows has a fixed shape per length; the last one is padded).

Lengths that do not fit one device: pass ``mesh`` (``experiments.sharding.
make_mesh``); each window's sequence is split across the mesh's ``context``
devices and attention runs context-parallel (``attention.context_parallel``,
its local blocks on the requested implementation), parameters sharded by the
training rules, windows over data/fsdp when they divide the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extrapolax.attention import ContextParallel, use_implementation
from extrapolax.experiments import records as records_lib
from extrapolax.experiments import sharding

from . import variants

__all__ = ["MODES", "StreamScore", "as_documents", "plan_windows",
           "score_stream", "model_nll_fn", "logits_nll_fn",
           "default_lengths", "perplexity_vs_length", "perplexity_table"]

MODES = records_lib.MODES
Tokens = Union[np.ndarray, Sequence[np.ndarray]]
# (inputs int32 [B, L], targets int32 [B, L]) -> NLL float [B, L].
NllFn = Callable[[np.ndarray, np.ndarray], Any]


@dataclasses.dataclass
class StreamScore:
  """The NLL sums of one (length, mode, stride) evaluation.

  Attributes:
    length: window length L.
    mode: "nonoverlap" or "sliding".
    stride: the sliding stride (None for nonoverlap).
    nll_sum: sum of NLL (nats) over the scored tokens.
    n_tokens: number of scored tokens.
    n_windows: number of windows run.
    position_nll_sum: float64 [L]: NLL summed per index within the window.
    position_count: int64 [L]: scored tokens per index.
  """
  length: int
  mode: str
  stride: Optional[int]
  nll_sum: float
  n_tokens: int
  n_windows: int
  position_nll_sum: np.ndarray
  position_count: np.ndarray

  @property
  def mean_nll(self) -> float:
    return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

  @property
  def perplexity(self) -> float:
    return math.exp(self.mean_nll) if self.n_tokens else math.nan

  @property
  def position_nll(self) -> np.ndarray:
    """Mean NLL per index within the window (NaN where nothing scored)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.position_count > 0,
                      self.position_nll_sum / np.maximum(
                          self.position_count, 1), np.nan)


def as_documents(tokens: Tokens) -> list[np.ndarray]:
  """A 1-D array (one stream) or a sequence of 1-D arrays -> documents."""
  if isinstance(tokens, np.ndarray) or (hasattr(tokens, "__array__") and
                                        np.ndim(tokens) == 1):
    docs = [np.asarray(tokens)]
  else:
    docs = [np.asarray(d) for d in tokens]
  for i, d in enumerate(docs):
    if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
      raise ValueError(f"tokens must be a 1-D int array or a sequence of "
                       f"them; document {i} is {d.dtype}{list(d.shape)}")
  return docs


def _check_mode(mode: str, stride: Optional[int], length: int):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "sliding":
    if (stride is None or isinstance(stride, bool) or int(stride) != stride
        or not 1 <= stride <= length):
      raise ValueError(f"sliding needs an integer stride in [1, {length}] "
                       f"(the window length), got {stride!r}")
  elif stride is not None:
    raise ValueError(f"stride={stride} is only used by mode 'sliding'")


def plan_windows(doc_lengths: Sequence[int], length: int, *, mode: str,
                 stride: Optional[int] = None,
                 max_tokens: Optional[int] = None
                 ) -> list[tuple[int, int, int]]:
  """The windows to run: (document, start, first scored index) triples.

  A window feeds ``doc[start:start + length]`` and scores the predictions at
  indices ``first..length-1`` (targets ``doc[start + 1 + index]``). Stops
  once ``max_tokens`` tokens are scored (None: no cap).
  """
  if isinstance(length, bool) or int(length) != length or length < 1:
    raise ValueError(f"length must be an integer >= 1, got {length!r}")
  _check_mode(mode, stride, length)
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
  step = length if mode == "nonoverlap" else stride
  plan, scored = [], 0
  for doc, n in enumerate(doc_lengths):
    for start in range(0, n - length, step):   # needs start + length + 1 <= n
      first = 0 if (mode == "nonoverlap" or start == 0) else length - stride
      plan.append((doc, start, first))
      scored += length - first
      if max_tokens is not None and scored >= max_tokens:
        return plan
  return plan


def logits_nll_fn(logits_fn: Callable[[Any], Any]) -> NllFn:
  """An NLL function from any ``tokens [B, L] -> logits [B, L, V]``."""

  def nll(inputs, targets):
    return _token_nll(jnp.asarray(logits_fn(inputs)), jnp.asarray(targets))

  return nll


# The LM head runs over at most this many logits at a time (a 32k window of a
# 49k vocabulary would be 6 GB of float32 logits at once).
HEAD_CHUNK_LOGITS = 1 << 26


def _token_nll(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def head_in_chunks(model, hidden, fn, *per_position):
  """``fn(logits, *per_position)`` over position chunks of ``hidden`` [B, L,
  D] (each ``per_position`` array [B, L, ...] cut alike), so the logits held
  at once stay below HEAD_CHUNK_LOGITS; results joined back to [B, L, ...]
  (the same values as the whole head at once)."""
  b, length, d = hidden.shape
  vocab = model.config.vocab_size
  chunk = max(1, HEAD_CHUNK_LOGITS // max(1, b * vocab))
  if chunk >= length:
    return fn(model.head(hidden), *per_position)
  while length % chunk:     # a divisor of the length: one shape per call
    chunk -= 1
  cut = lambda x: x.reshape((b, length // chunk, chunk) + x.shape[2:]
                            ).swapaxes(0, 1)
  out = jax.lax.map(lambda a: fn(model.head(a[0]), *a[1:]),
                    (cut(hidden),) + tuple(cut(x) for x in per_position))
  return out.swapaxes(0, 1).reshape((b, length) + out.shape[3:])


def _head_nll(model, hidden, targets):
  """NLL of ``targets`` [B, L] from the final hidden states [B, L, D]."""
  return head_in_chunks(model, hidden, _token_nll, targets)


def model_nll_fn(model, mesh: Optional[jax.sharding.Mesh] = None,
                 implementation=None) -> NllFn:
  """A jitted NLL function of an nnx model (compiles once per shape), its
  attention on ``implementation`` (a name or an Implementation; None: the
  model's own), chosen at call time (no rebuild).

  With ``mesh`` the parameters are placed by ``sharding.param_shardings``,
  each call's windows are split over the mesh (sequence over ``context``,
  rows over data/fsdp when they divide them) and the model runs under the
  mesh, so its attention can run context-parallel.
  """
  graphdef, state = nnx.split(model)

  def nll(state, inputs, targets):
    m = nnx.merge(graphdef, state)
    if not hasattr(m, "hidden"):     # any tokens -> logits module
      return _token_nll(m(inputs), targets)
    return _head_nll(m, m.hidden(inputs), targets)

  if mesh is None:
    jitted = jax.jit(nll)

    def call_here(inputs, targets):
      with use_implementation(implementation):
        return jitted(state, inputs, targets)

    return call_here
  state = jax.device_put(state, sharding.param_shardings(state, mesh))
  jitted = jax.jit(nll)

  def call(inputs, targets):
    window = _window_sharding(mesh, np.shape(inputs))
    inputs, targets = (jax.device_put(np.asarray(x), window)
                       for x in (inputs, targets))
    with jax.set_mesh(mesh), use_implementation(implementation):
      return jitted(state, inputs, targets)

  return call


def _window_sharding(mesh, shape) -> jax.sharding.NamedSharding:
  """[B, L] windows: L over context (must divide), B over data/fsdp when
  they divide it."""
  batch, length = shape
  context = mesh.shape.get("context", 1)
  if length % context:
    raise ValueError(f"window length {length} is not divisible by the "
                     f"mesh's context={context} devices")
  rows = math.prod(mesh.shape.get(a, 1) for a in sharding.BATCH_AXES)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      sharding.BATCH_AXES if batch % rows == 0 else None, "context"))


def score_stream(nll_fn: NllFn, tokens: Tokens, length: int, *,
                 mode: str = "nonoverlap", stride: Optional[int] = None,
                 max_tokens: Optional[int] = None,
                 batch_size: int = 8) -> StreamScore:
  """Runs the windows of :func:`plan_windows` in batches; sums their NLL.

  Args:
    nll_fn: (inputs int32 [B, L], targets int32 [B, L]) -> NLL [B, L]
      (:func:`model_nll_fn` or :func:`logits_nll_fn`).
    tokens: a 1-D token stream or a list of documents.
    length: window length L.
    mode, stride: see the module docstring.
    max_tokens: cap on scored tokens (None: the whole stream).
    batch_size: the most windows per call (balanced so the last, padded
      batch wastes little; every call has the same shape).
  Raises:
    ValueError: no window of length + 1 tokens fits any document.
  """
  docs = as_documents(tokens)
  plan = plan_windows([len(d) for d in docs], length, mode=mode,
                      stride=stride, max_tokens=max_tokens)
  if not plan:
    raise ValueError(f"no window of {length} + 1 tokens fits: the longest "
                     f"document has {max(len(d) for d in docs)} tokens")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = balanced_batch(len(plan), batch_size)
  position_sum = np.zeros(length, np.float64)
  position_count = np.zeros(length, np.int64)
  index = np.arange(length)
  for lo in range(0, len(plan), batch_size):
    chunk = plan[lo:lo + batch_size]
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length), bool)
    for row, (doc, start, first) in enumerate(chunk):
      window = docs[doc][start:start + length + 1]
      inputs[row], targets[row] = window[:-1], window[1:]
      scored[row] = index >= first
    nll = np.asarray(nll_fn(inputs, targets), np.float64)
    if nll.shape != inputs.shape:
      raise ValueError(f"nll_fn returned shape {nll.shape}, want "
                       f"{inputs.shape}")
    position_sum += np.where(scored, nll, 0.0).sum(0)
    position_count += scored.sum(0)
  return StreamScore(length=length, mode=mode, stride=stride,
                     nll_sum=float(position_sum.sum()),
                     n_tokens=int(position_count.sum()), n_windows=len(plan),
                     position_nll_sum=position_sum,
                     position_count=position_count)


def balanced_batch(num_items: int, max_batch: int) -> int:
  """The smallest batch <= max_batch that needs as few calls as max_batch.

  25 items at max_batch 15: 13 (two calls, one padded row) instead of 15
  (two calls, five padded rows).
  """
  calls = -(-num_items // max_batch)
  return max(1, -(-num_items // calls))


def default_lengths(train_len: int,
                    multiples: Sequence[float] = (1, 2, 4, 8, 16)
                    ) -> tuple[int, ...]:
  """Evaluation lengths: train_len times each multiple."""
  return tuple(int(round(train_len * m)) for m in multiples)


def position_records(score: StreamScore, base: Mapping[str, Any],
                     num_buckets: int) -> list[dict]:
  """``position_nll`` records: mean NLL in equal buckets of window index."""
  edges = np.unique(np.linspace(0, score.length, num_buckets + 1).round()
                    .astype(int))
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    count = int(score.position_count[lo:hi].sum())
    value = (float(score.position_nll_sum[lo:hi].sum() / count) if count
             else math.nan)
    out.append(records_lib.make_record(
        **base, metric="position_nll", value=value, n_tokens=count,
        position=int(lo), position_end=int(hi)))
  return out


def _cannot_run(model, length: int) -> Optional[str]:
  config = getattr(model, "config", None)
  if config is not None and config.absolute == "learned" and (
      length > config.max_len):
    return (f"learned absolute table has {config.max_len} rows; length "
            f"{length} cannot run")
  return None


def perplexity_vs_length(
    model, tokens: Tokens, *, train_len: Optional[int] = None,
    lengths: Optional[Sequence[int]] = None,
    modes: Sequence[str] = ("nonoverlap",), stride: Optional[int] = None,
    max_tokens: Optional[int] = 8192, tokens_per_batch: int = 8192,
    implementation: Optional[str] = "xla_chunked", position_buckets: int = 32,
    labels: Optional[Mapping[str, Any]] = None,
    experiment: str = "length", task: Optional[str] = None,
    return_scores: bool = False,
    mesh: Optional[jax.sharding.Mesh] = None):
  """Perplexity records of ``model`` on ``tokens`` at each length and mode.

  Args:
    model: a DecoderLM (its parameters are used as they are).
    tokens: an evaluation stream (1-D int array) or a list of documents.
    train_len: the training length (default ``model.config.max_len``).
    lengths: evaluation lengths (default 1, 2, 4, 8, 16 x train_len).
    modes: any of "nonoverlap", "sliding".
    stride: the sliding stride (default train_len // 2), the same at every
      length.
    max_tokens: scored tokens per length and mode (None: all).
    tokens_per_batch: windows per call = max(1, tokens_per_batch // length).
    implementation: attention implementation to run (None: the model's).
    position_buckets: the longest nonoverlap length's loss per position is
      recorded in this many buckets (0: none).
    labels: record fields to set (model, seed, step, variant, ...); the rest
      come from :func:`variants.labels_for`.
    experiment: the records' ``experiment`` (one report table each).
    task: the records' ``task`` (None for text).
    return_scores: also return {(mode, length): StreamScore}.
    mesh: run on this device mesh (``sharding.make_mesh``): with a
      ``context`` axis > 1 each window's sequence is split over it and
      attention runs context-parallel, its local blocks on
      ``implementation``; every length must then divide by the context size.

  Returns:
    A list of records (metric "perplexity" per mode and length, then
    "position_nll" buckets of the longest nonoverlap length), and the scores
    with ``return_scores``. A learned
    absolute model past its table gets a NaN record with n_tokens 0.
  """
  train_len = int(train_len or model.config.max_len)
  lengths = tuple(lengths or default_lengths(train_len))
  if stride is None and "sliding" in modes:
    stride = max(1, train_len // 2)
  for mode in modes:
    for length in lengths:
      _check_mode(mode, stride if mode == "sliding" else None, length)
  if not lengths:
    raise ValueError("lengths is empty")
  if mesh is not None and mesh.shape.get("context", 1) > 1:
    bad = [l for l in lengths if l % mesh.shape["context"]]
    if bad:
      raise ValueError(f"lengths {bad} are not divisible by the mesh's "
                       f"context={mesh.shape['context']} devices")
    # Every layer splits the sequence over the mesh's context axis, with
    # ``implementation`` computing each device's blocks.
    implementation = ContextParallel(inner=implementation)
  nll_fn = model_nll_fn(model, mesh, implementation)
  shared = variants.labels_for(model, train_len, labels)
  out, scores = [], {}
  for mode in modes:
    mode_stride = stride if mode == "sliding" else None
    for length in lengths:
      base = dict(shared, eval_len=int(length), mode=mode, stride=mode_stride,
                  task=task, experiment=experiment)
      reason = _cannot_run(model, length)
      if reason:
        logging.info("perplexity: %s", reason)
        out.append(records_lib.make_record(
            **base, metric="perplexity", value=math.nan, n_tokens=0))
        continue
      started = time.perf_counter()
      score = score_stream(nll_fn, tokens, length, mode=mode,
                           stride=mode_stride, max_tokens=max_tokens,
                           batch_size=max(1, tokens_per_batch // length))
      logging.info("perplexity %s L=%d %s: %.3f over %d tokens (%.1fs)",
                   shared["model"], length, mode, score.perplexity,
                   score.n_tokens, time.perf_counter() - started)
      scores[(mode, length)] = score
      out.append(records_lib.make_record(
          **base, metric="perplexity", value=score.perplexity,
          n_tokens=score.n_tokens))
  longest = max((l for (m, l) in scores if m == "nonoverlap"), default=None)
  if position_buckets and longest is not None:
    base = dict(shared, eval_len=longest, mode="nonoverlap", stride=None,
                task=task, experiment=experiment)
    out.extend(position_records(scores[("nonoverlap", longest)], base,
                                position_buckets))
  return (out, scores) if return_scores else out


def perplexity_table(records: Sequence[Mapping[str, Any]], *,
                     mode: str = "nonoverlap",
                     variant: Optional[str] = None) -> dict[int, float]:
  """{eval length: perplexity} of ``perplexity_vs_length``'s records.

  ``perplexity_table(perplexity_vs_length(model, docs))`` reads the result
  directly; the last record per length wins (reruns append).

  Args:
    records: results records (other metrics are ignored).
    mode: "nonoverlap" or "sliding".
    variant: the report label to keep (``records.variant_label``) when the
      records hold several (sweeps, several models); None: the only one.

  Raises:
    ValueError: a bad mode, or several variants and no ``variant``.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  chosen = [r for r in records
            if r["metric"] == "perplexity" and r["mode"] == mode]
  labels = list(dict.fromkeys(records_lib.variant_label(r) for r in chosen))
  if variant is None and len(labels) > 1:
    raise ValueError(f"the records hold variants {labels}; pass variant= "
                     "one of them")
  if variant is not None:
    if variant not in labels:
      raise ValueError(f"variant={variant!r} is not one of {labels}")
    chosen = [r for r in chosen if records_lib.variant_label(r) == variant]
  return {int(r["eval_len"]): float(r["value"])
          for r in sorted(chosen, key=lambda r: r["eval_len"])}
