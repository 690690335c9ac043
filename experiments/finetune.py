"""Continue training from a checkpoint: fine-tuning to a longer context.

A training config (``trainer.train``) may name where its weights start:

  init_from: None (fresh weights, the default), a training run's workdir
    (its config.json and its latest complete checkpoint), or a zoo
    checkpoint (a name ``zoo.from_pretrained`` loads, or a folder
    ``zoo.save_pretrained`` wrote).
  init_from_optimizer: "reset" (the default; a fresh AdamW state) or "keep"
    (a workdir only: the checkpoint's Adam moments and their
    bias-correction count continue; the learning-rate schedule restarts at
    this run's step 0 with its own warmup and decay).

Everything else is the run's own config: ``train_len`` (the new context),
the position settings (``model.rope_scaling``, ``model.rope_base``, ...),
the data, the optimizer and its schedule. The papers' fine-tunings, from a
model trained at L to L' = factor * L (``scaling(method, factor, L)``
gives the rope_scaling and rope_base fields of each):

  pi            Position Interpolation: linear rope scaling by the factor.
  yarn          YaRN: NTK-by-parts interpolation and its attention
                temperature (0.1 ln(factor) + 1).
  ntk_by_parts  YaRN's frequency ramp without the temperature.
  abf           Adjusted base frequency (Code Llama, ABF): no scaling, the
                RoPE base multiplied by ``base_factor``.
  continue      The position settings unchanged (any position encoding):
                plain continued training, at the same length (factor 1,
                e.g. on another data mix) or longer (PI's "direct
                fine-tuning" baseline).

Only the first start of a run loads ``init_from``; a fine-tune that was
stopped resumes from its own checkpoints as any run does. The weights'
shapes must match: a config whose model sizes differ from the checkpoint's
(d_model, layers, heads, vocabulary, mlp_dim, ...; or a learned position
table of another length) is refused with one ValueError line naming the
field. ``configs/finetune.py`` builds such a config from a trained workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from extrapolax.attention import rope as rope_lib
from extrapolax.experiments import checkpoints
from extrapolax.experiments import modeling
from extrapolax.experiments import run_config

__all__ = ["OPTIMIZER_CHOICES", "METHODS", "SIZE_FIELDS", "validate",
           "scaling", "finetune_config", "initial_state"]

OPTIMIZER_CHOICES = ("reset", "keep")
METHODS = ("pi", "yarn", "ntk_by_parts", "abf", "continue")
# ModelConfig fields that decide the weights' shapes.
SIZE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "mlp_dim", "tie_embeddings")


def _is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "checkpoints"))


def _mode(config) -> str:
  mode = config.get("init_from_optimizer")
  return "reset" if mode is None else mode


def validate(config) -> None:
  """Raises ValueError naming a bad init_from / init_from_optimizer."""
  source = config.get("init_from")
  mode = _mode(config)
  if mode not in OPTIMIZER_CHOICES:
    raise ValueError(f"config.init_from_optimizer={mode!r} must be one of "
                     f"{OPTIMIZER_CHOICES}")
  if source is None:
    if mode != "reset":
      raise ValueError(f"config.init_from_optimizer={mode!r} needs "
                       "config.init_from (a training workdir)")
    return
  if not isinstance(source, str) or not source:
    raise ValueError(f"config.init_from={source!r} must be a training "
                     "workdir, a zoo checkpoint folder or a zoo name")
  path = os.path.expanduser(source)
  workdir = _is_workdir(path)
  if os.sep in source and not workdir and not os.path.isfile(
      os.path.join(path, "manifest.json")):
    raise ValueError(f"config.init_from={source!r} is neither a training "
                     "workdir (config.json, checkpoints/) nor a zoo "
                     "checkpoint folder (manifest.json)")
  if mode == "keep" and not workdir:
    raise ValueError(f"config.init_from_optimizer='keep' needs a training "
                     f"workdir's optimizer state; config.init_from="
                     f"{source!r} is a zoo checkpoint (use 'reset')")


def scaling(method: str, factor: float, original_len: int, *,
            base: float = 10000.0, base_factor: float = 100.0
            ) -> dict[str, Any]:
  """{"rope_scaling": dict or None, "rope_base": float} of a fine-tuning
  ``method`` (METHODS) from ``original_len`` to ``factor`` times it.

  ``base``: the checkpoint's RoPE base; ``base_factor``: abf's multiplier
  of it (Code Llama: 10,000 -> 1,000,000).
  """
  if method not in METHODS:
    raise ValueError(f"fine-tuning method {method!r} must be one of "
                     f"{METHODS}")
  if method == "continue":
    raise ValueError("method 'continue' keeps the run's own position "
                     "settings; finetune_config applies it (no scaling)")
  if method == "abf":
    if not base_factor > 0:
      raise ValueError(f"abf base_factor={base_factor!r} must be > 0")
    return {"rope_scaling": None, "rope_base": float(base) * base_factor}
  if method == "pi":
    return {"rope_scaling": rope_lib.zero_shot_scaling(
        "linear", factor, original_len), "rope_base": float(base)}
  rope_scaling = rope_lib.zero_shot_scaling("yarn", factor, original_len)
  if method == "ntk_by_parts":
    rope_scaling["attention_factor"] = 1.0
  return {"rope_scaling": rope_scaling, "rope_base": float(base)}


def finetune_config(config, init_from: Optional[str], *, method: str,
                    factor: float = 4.0, train_len: int = 0,
                    steps: int = 200, learning_rate: float = 0.0,
                    warmup_steps: int = 20, batch_size: int = 0,
                    optimizer: str = "reset", base_factor: float = 100.0):
  """A copy of the training ``config`` (the run it starts from) fine-tuned
  with ``method`` to ``train_len`` (0: factor x its train_len).

  The batch shrinks by the length factor (tokens per step kept; at least
  1) unless ``batch_size`` is given; ``learning_rate`` 0 means a tenth of
  the run's; log and checkpoint intervals are capped at ``steps``.
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  old_len = int(config.train_len)
  new_len = int(train_len) or int(round(factor * old_len))
  if method != "continue":   # "continue": the run's position settings
    settings = scaling(method, new_len / old_len, old_len,
                       base=float(config.model.get("rope_base", 10000.0)),
                       base_factor=base_factor)
    rope_scaling = settings["rope_scaling"]
    config.model.rope_scaling = (None if rope_scaling is None
                                 else json.dumps(rope_scaling))
    config.model.rope_base = settings["rope_base"]
  config.train_len = new_len
  config.batch_size = int(batch_size) or max(
      1, int(config.batch_size) * old_len // new_len)
  config.train_steps = int(steps)
  config.warmup_steps = min(int(warmup_steps), int(steps))
  config.learning_rate = float(learning_rate) or config.learning_rate / 10
  config.log_every = max(1, min(int(config.log_every), int(steps)))
  config.checkpoint_every = max(1, min(int(config.checkpoint_every),
                                       int(steps)))
  config.init_from = init_from
  config.init_from_optimizer = optimizer
  return config


def _source_config(source: str):
  """(ModelConfig of the checkpoint, its training config or None, the
  model when loaded from the zoo)."""
  path = os.path.abspath(os.path.expanduser(source))
  if _is_workdir(path):
    train = run_config.read_config(path)
    return modeling.model_config(train), train, None
  from extrapolax.models import zoo  # pylint: disable=import-outside-toplevel
  try:
    model = zoo.from_pretrained(source)
  except ValueError as e:
    raise ValueError(f"config.init_from={source!r}: {e}") from e
  return model.config, None, model


def _check_sizes(config, source: str, source_model) -> None:
  new = modeling.model_config(config)
  for field in SIZE_FIELDS:
    old, value = getattr(source_model, field), getattr(new, field)
    if old != value:
      raise ValueError(
          f"config.model.{field}={value!r} but config.init_from={source!r} "
          f"has {field}={old!r}: fine-tuning keeps the weights' shapes; "
          "change only train_len, the position settings and the training "
          "fields")


def _check_shapes(source: str, expected: dict, stored: dict) -> None:
  """The checkpoint's parameter shapes against the run's, by path."""
  flat_new = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_old = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
  for path in sorted(set(flat_new) | set(flat_old), key=str):
    name = jax.tree_util.keystr(path)
    if path not in flat_old or path not in flat_new:
      where = "the run" if path not in flat_old else "the checkpoint"
      raise ValueError(f"config.init_from={source!r}: parameter {name} is "
                       f"missing from {where} (another architecture)")
    a, b = jnp.shape(flat_new[path]), jnp.shape(flat_old[path])
    if a != b:
      raise ValueError(
          f"config.init_from={source!r}: parameter {name} has shape {b} "
          f"there but {a} in this run (a learned position table needs the "
          "same train_len; other sizes must match)")


def _reset_schedule(opt_state):
  """Zeroes the learning-rate schedule's step count (the moments stay)."""
  def reset(node):
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=jnp.zeros_like(node.count))
    return node
  return jax.tree.map(reset, opt_state, is_leaf=lambda n: isinstance(
      n, optax.ScaleByScheduleState))


def initial_state(config, params, opt_state) -> tuple[Any, Any]:
  """(params, opt_state) a run with ``config.init_from`` starts from.

  ``params`` and ``opt_state`` are the run's fresh ones (their shapes and
  shardings are the targets).

  Raises:
    ValueError: the model sizes or parameter shapes differ from the
      checkpoint's, or (keep) the optimizer state has another structure.
    checkpoint_files.CheckpointError: a damaged checkpoint.
  """
  source = config.init_from
  mode = _mode(config)
  source_model, source_train, loaded = _source_config(source)
  _check_sizes(config, source, source_model)
  pure = nnx.to_pure_dict(params)
  if loaded is not None:   # a zoo checkpoint, already in memory
    stored = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    _check_shapes(source, pure, stored)
    restored = jax.tree.map(
        lambda new, old: jax.device_put(jnp.asarray(old, new.dtype),
                                        new.sharding), pure, stored)
    step: Optional[int] = None
  else:
    workdir = os.path.abspath(os.path.expanduser(source))
    stored = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: modeling.create_model(source_train, nnx.Rngs(0))), nnx.Param))
    _check_shapes(source, pure, stored)
    step = checkpoints.latest_complete(workdir)
    if step is None:
      raise ValueError(f"config.init_from={source!r} has no complete "
                       "checkpoint yet")
    manifest = checkpoints.verify(workdir, step)
    run_config.check_saved_config(manifest, run_config.config_json(
        source_train), workdir, step)
    items = {"params": pure}
    if mode == "keep":
      _check_optimizer(source, source_train, opt_state, params)
      items["opt_state"] = jax.tree.leaves(opt_state)
    manager = checkpoints.open_manager(workdir)
    try:
      got = checkpoints.restore(manager, step, items)
    finally:
      checkpoints.close(manager)
    restored = got["params"]
    if mode == "keep":
      opt_state = _reset_schedule(jax.tree.unflatten(
          jax.tree.structure(opt_state), got["opt_state"]))
  params = checkpoints.fill_params(params, restored)
  logging.info("initialised from %s%s (optimizer state: %s)", source,
               f" step {step}" if step is not None else "", mode)
  return params, opt_state


def _check_optimizer(source, source_train, opt_state, params) -> None:
  """The checkpoint's optimizer state (from its config) must have the
  run's structure and shapes for "keep"."""
  from extrapolax.experiments import trainer  # pylint: disable=import-outside-toplevel
  theirs = jax.eval_shape(trainer.make_optimizer(source_train).init, params)
  same = jax.tree.structure(theirs) == jax.tree.structure(opt_state) and all(
      a.shape == b.shape for a, b in zip(jax.tree.leaves(theirs),
                                         jax.tree.leaves(opt_state)))
  if not same:
    raise ValueError(
        f"config.init_from_optimizer='keep': the optimizer state of "
        f"{source!r} has another structure (its grad_clip="
        f"{source_train.get('grad_clip')!r}); match it or use 'reset'")
