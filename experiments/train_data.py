"""A training run's data: the checks of ``config.data``, where its token
stores go, the batch source it names, and the check that turns a source's
batch into the arrays the train step takes.

``make_source(config, workdir)`` is what ``trainer.train`` trains on when it
is given no source: a synthetic task (``data.TaskSource``) or a corpus's
training split in a token store (``data.TrainSource``), optionally with
passkey rows mixed in (``data.RetrievalMix``) and sampled positions
(``data.PositionSampling``). Every batch a source serves goes through
``device_batch``: tokens, targets and weights (and optionally positions,
segment_ids), each [batch_size, train_len].

``experiments.trainer`` keeps these names importable.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from extrapolax.common import checks

_REQUIRED_KEYS = ("tokens", "targets", "weights")
_OPTIONAL_KEYS = ("positions", "segment_ids")


def data_dir(config, workdir: str) -> str:
  """Where the token stores go: config.data.cache_dir, else WORKDIR/data.

  Several runs (the variants of a study) share one tokenisation by pointing
  config.data.cache_dir at one folder; a store is rebuilt only when its
  corpus sha256, tokenizer or split differ.
  """
  return os.path.abspath(os.path.expanduser(
      config.data.cache_dir or os.path.join(workdir, "data")))


def _data():
  from extrapolax.experiments import data  # pylint: disable=import-outside-toplevel
  return data


def validate_data_config(config) -> None:
  """Raises ValueError naming a bad config.data value."""
  data, fields = _data(), config.data
  if fields.packing not in data.PACKING_METHODS:
    raise ValueError(f"config.data.packing={fields.packing!r} is not one of "
                     f"{data.PACKING_METHODS}")
  if fields.task is not None:
    if fields.task not in data.TASK_NAMES:
      raise ValueError(f"config.data.task={fields.task!r} is not one of "
                       f"{data.TASK_NAMES} (or None for language modelling)")
    if fields.tokenizer != "byte":
      raise ValueError(f"config.data.tokenizer={fields.tokenizer!r}: the "
                       "synthetic tasks are byte-level text; use 'byte'")
  if not isinstance(fields.corpus, str) or not fields.corpus:
    raise ValueError(f"config.data.corpus={fields.corpus!r} must be a corpus "
                     f"name ({data.CORPUS_NAMES}) or a path")
  checks.check_setting("config.data.eval_fraction", fields.eval_fraction,
                       minimum=0, maximum=1)
  checks.check_setting("config.data.split_seed", fields.split_seed, minimum=0,
                       integer=True)
  mix = fields.get("retrieval_mix")
  if mix is not None:
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not (
        0 <= mix <= 1):
      raise ValueError(f"config.data.retrieval_mix={mix!r} must be a "
                       "fraction in [0, 1] of each batch's rows (0: none)")
    if mix and fields.task is not None:
      raise ValueError(f"config.data.retrieval_mix={mix!r} mixes passkey "
                       "examples into a text corpus; config.data.task="
                       f"{fields.task!r} is a task (use one or the other)")
  try:
    sampler = data.position_sampler(fields.get("positions", "plain"))
    sampler.check_length(config.train_len)
  except ValueError as e:
    raise ValueError(f"config.data.positions: {e}") from e


def vocab_size(config) -> int:
  """config.model.vocab_size, else the tokenizer's."""
  if config.model.get("vocab_size"):
    return int(config.model.vocab_size)
  return int(_data().get_tokenizer(config.data.tokenizer).vocab_size)


def make_source(config, workdir: str):
  """The training batches config.data names (``.batch(step)``,
  ``.state(step)``).

  A task: ``data.TaskSource`` (answer-only weights; example sizes in
  [data.task_min_length, data.task_max_length], default: all that fit
  train_len). Otherwise the training split of config.data.corpus, tokenized
  into a token store under ``data_dir`` (cached), served by
  ``data.TrainSource`` with config.data.packing; with
  config.data.retrieval_mix (optional, a fraction), that share of each
  batch's rows holds short passkey examples instead (``data.RetrievalMix``).
  """
  data, fields = _data(), config.data
  if fields.task is not None:
    source = data.TaskSource(
        fields.task, seq_len=config.train_len, batch_size=config.batch_size,
        seed=config.seed, min_length=fields.get("task_min_length"),
        max_length=fields.get("task_max_length"))
  else:
    path = data.default_store_path(data_dir(config, workdir), fields.corpus,
                                   fields.tokenizer, "train")
    store = data.build_store(
        path, fields.corpus, fields.tokenizer, split="train",
        eval_fraction=fields.eval_fraction, split_seed=fields.split_seed,
        cache_dir=fields.cache_dir)
    source = data.TrainSource(store, seq_len=config.train_len,
                              batch_size=config.batch_size, seed=config.seed,
                              packing=fields.packing)
  if fields.get("retrieval_mix"):
    source = data.RetrievalMix(
        source, fraction=fields.retrieval_mix, seq_len=config.train_len,
        seed=config.seed, tokenizer=data.get_tokenizer(fields.tokenizer))
  sampler = data.position_sampler(fields.get("positions", "plain"))
  if isinstance(sampler, data.positions.Plain):
    return source
  return data.PositionSampling(source, sampler, seed=config.seed)


def device_batch(batch: Mapping, *, batch_size: int, seq_len: int) -> dict:
  """A PackedBatch (or dict) -> dict of int32 / float32 arrays, checked."""
  missing = [k for k in _REQUIRED_KEYS if k not in batch]
  if missing:
    raise ValueError(f"a training batch needs {_REQUIRED_KEYS}; {missing} "
                     f"missing from {sorted(batch)}")
  arrays = {}
  for key in _REQUIRED_KEYS + _OPTIONAL_KEYS:
    if batch.get(key) is None:
      continue
    value = np.asarray(batch[key])
    if value.shape != (batch_size, seq_len):
      raise ValueError(f"batch[{key!r}] has shape {value.shape}, expected "
                       f"(batch_size, train_len) = ({batch_size}, {seq_len})")
    arrays[key] = value.astype(np.float32 if key == "weights" else np.int32)
  return arrays
