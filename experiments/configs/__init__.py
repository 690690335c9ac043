"""Experiment configs: Python files whose ``get_config(arg=None)`` returns an
``ml_collections.ConfigDict`` (big_vision style).

Chosen on the command line as ``--config=experiments/configs/tiny.py`` or with
variant arguments, ``--config=experiments/configs/tiny.py:pe=alibi,steps=300``;
every field can then be overridden with ``--config.FIELD=VALUE``. Each file's
docstring gives the exact command and the result it gave.

This module holds what the config files share: ``parse_arg`` for the variant
string, ``path`` / ``load`` / ``get_config`` to find and read a config file
(also from an installed package), and ``base_config``, the fields every
training config has.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from extrapolax.experiments import modeling
from extrapolax.experiments import sharding

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """Parses ``"key=value,flag"`` into defaults' keys, typed like the defaults.

  As big_vision's ``parse_arg``: a bare ``key`` means ``key=True``; values are
  converted to the default's type (bool accepts true/false/1/0); an unknown
  key or an unparsable value raises ValueError naming it.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; allowed: "
                       f"{sorted(defaults)}")
    default = defaults[key]
    if not sep:
      value: Any = True
    elif isinstance(default, bool):
      lowered = text.strip().lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={text!r} is not a bool")
      value = lowered in ("true", "1")
    elif default is None or isinstance(default, str):
      value = text.strip()
    else:
      try:
        value = type(default)(text.strip())
      except ValueError as e:
        raise ValueError(f"config argument {key}={text!r} is not a "
                         f"{type(default).__name__}") from e
    result[key] = value
  return result


def path(name: str) -> str:
  """The config file for ``name`` ("tiny", "tiny.py", or a path to one).

  A path that exists is returned (absolute); otherwise the file name is looked up
  in this package's folder (so ``experiments/configs/tiny.py`` also works
  from outside the repository, with the package installed).
  """
  if os.path.isfile(name):
    return os.path.abspath(name)
  base = os.path.basename(name)
  if not base.endswith(".py"):
    base += ".py"
  candidate = os.path.join(CONFIG_DIR, base)
  if os.path.isfile(candidate):
    return candidate
  available = sorted(f for f in os.listdir(CONFIG_DIR)
                     if f.endswith(".py") and not f.startswith("_"))
  raise ValueError(f"no config file {name!r} (nor {candidate}); configs in "
                   f"{CONFIG_DIR}: {available}")


def load(name: str) -> types.ModuleType:
  """The config file ``name`` (see ``path``) as a module."""
  file = path(name)
  module_name = "extrapolax_config_" + os.path.splitext(
      os.path.basename(file))[0]
  spec = importlib.util.spec_from_file_location(module_name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(spec: str) -> ml_collections.ConfigDict:
  """``"tiny.py:pe=alibi"`` -> that file's ``get_config("pe=alibi")``, as
  ``--config=`` would give it (without command-line overrides)."""
  name, _, arg = spec.partition(":")
  return load(name).get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
  """Every training config field, at the tiny model's defaults.

  Fields:
    seed: model initialisation and data order.
    model: see ``modeling.MODEL_FIELDS`` (pe, mask, window, sizes, dtype...).
    data.corpus: "python_stdlib" (default), "pydoc_topics", "kjv",
      "shakespeare" or a path to a text file or folder.
    data.tokenizer: "byte" (vocab 256), "sentencepiece:PATH", "tiktoken:NAME".
    data.packing: "concat" (a contiguous stream), "first_fit", "best_fit"
      (whole documents with segment ids and per-document positions).
    data.task: None for language modelling, or a synthetic task (copy,
      reverse, addition, parity, associative_recall, flip_flop); the loss
      then covers only the answer tokens. data.task_min_length,
      data.task_max_length: the range of task sizes trained on (None: the
      task's smallest / the largest that fits train_len).
    data.positions: training positions: "plain", or a sampler with its
      parameters, "randomized(max_position=1024)", "pose(max_position=1024)",
      "cream(max_position=1024)", "e2(max_position=1024, max_scale=4)"
      (``data.positions``); evaluation always uses plain positions.
    data.eval_fraction, data.split_seed: the document split (the evaluators
      use the same one: ``data.build_store(..., split="eval",
      eval_fraction=..., split_seed=...)``).
    data.retrieval_mix: optional, absent here: the fraction of each batch's
      rows that are short passkey examples (``data.RetrievalMix``; a
      retrieval fine-tune sets it).
    data.cache_dir: the token stores (and downloaded corpus archives); None:
      stores in WORKDIR/data, archives in data.default_cache_dir().
    train_len: training sequence length (the model's max_len).
    batch_size, train_steps: rows per step; optimizer updates.
    learning_rate, warmup_steps, min_lr_ratio: linear warmup to the peak,
      cosine decay to peak * min_lr_ratio at train_steps.
    weight_decay, adam_b1, adam_b2, grad_clip: AdamW (decay on matrices
      only), global-norm clipping (0 or None: none).
    log_every: metrics.jsonl / TensorBoard every N steps (plus steps 1 and
      the last). checkpoint_every, keep_checkpoints: orbax checkpoints.
    mesh.data, mesh.fsdp, mesh.tensor, mesh.context: device mesh sizes (all
      1: one device; their product must be the device count). data and fsdp
      split the batch, fsdp shards parameters and optimizer state, tensor
      shards heads / MLP width / vocabulary, context splits the sequence
      (``sharding`` module). A run may resume on another mesh.
    init_from, init_from_optimizer: optional, absent here (set them in a
      config file): start from a checkpoint's weights, optimizer state
      "reset" or "keep" (``experiments.finetune``, ``configs/finetune.py``).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = modeling.default_model_config()
  config.data = ml_collections.ConfigDict(dict(
      corpus="python_stdlib", tokenizer="byte", packing="concat",
      task=config_dict.placeholder(str),
      task_min_length=config_dict.placeholder(int),
      task_max_length=config_dict.placeholder(int),
      eval_fraction=0.1, split_seed=0, positions="plain",
      cache_dir=config_dict.placeholder(str)))
  config.train_len = 128
  config.batch_size = 16
  config.train_steps = 600
  config.learning_rate = 3e-3
  config.warmup_steps = 50
  config.min_lr_ratio = 0.1
  config.weight_decay = 0.1
  config.adam_b1 = 0.9
  config.adam_b2 = 0.95
  config.grad_clip = 1.0
  config.log_every = 50
  config.checkpoint_every = 200
  config.keep_checkpoints = 3
  config.mesh = sharding.default_mesh_config()
  return config


def shrink_for_smoke(train: ml_collections.ConfigDict, *,
                     model: bool = True) -> None:
  """A study's ``quick`` training (a smoke test: seconds, not a result): 4
  steps of batch 4, logged and checkpointed every 2, and with ``model`` the
  1-layer, d_model-32 model."""
  train.train_steps = 4
  train.batch_size = 4
  train.log_every = 2
  train.checkpoint_every = 2
  if model:
    train.model.d_model = 32
    train.model.num_layers = 1
    train.model.num_heads = 2
    train.model.num_kv_heads = 1
    train.model.mlp_dim = 64


def resolve_config_flag(argv):
  """Rewrites ``--config=PATH[:ARGS]`` whose PATH is missing to the packaged
  config file of the same name (``path``); other arguments pass unchanged.

  Shared by the absl mains (train, extrapolation).
  """
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      value, prefix = arg[len("--config="):], "--config="
    elif arg == "--config" and i + 1 < len(out):
      value, prefix, i = out[i + 1], "", i + 1
    else:
      continue
    name, sep, args = value.partition(":")
    try:
      out[i] = f"{prefix}{path(name)}{sep}{args}"
    except ValueError:
      pass      # config_flags reports the missing file itself
  return out
