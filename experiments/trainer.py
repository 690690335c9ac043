"""Training loop: AdamW with warmup and cosine decay, a functional jax.jit step,
orbax checkpoints that include the data position, metrics and resume.

``train(config, workdir)`` trains the model ``config`` describes (see
``configs.base_config`` for the fields) and leaves in ``workdir``::

  config.json        the config, as JSON (``load_model`` reads it back)
  metrics.jsonl      one line per logged step (1, every log_every, the
                     last): step, loss (of that step's batch), lr,
                     grad_norm (before clipping), tokens_per_sec (since the
                     previous log), tokens (seen), target_tokens (weighted
                     targets in the batch), elapsed_sec (this process)
  events.out.tfevents.*   the same scalars for TensorBoard
  checkpoints/<step>/     orbax: params, opt_state, data (step, seed and the
                     data source's state); manifest.json, written last
                     (sha256 of each file, the run's fixed config)
  .lock              held while a run trains (workdir_lock: one run only)

A config with ``init_from`` (a trained workdir or a zoo checkpoint) starts
from those weights instead of fresh ones, at its own train_len and position
settings (``experiments.finetune``: fine-tuning to a longer context). A
config with ``curriculum`` trains in stages of (length, batch size) at a
fixed number of tokens per step (``experiments.curriculum``). What a run
trains on (the ``config.data`` checks, the token stores, the batch source
and its batch check) is ``experiments.train_data``; ``make_source``,
``data_dir``, ``device_batch``, ... are importable from here too.

Rerunning with the same workdir resumes from the latest checkpoint. Batches
are a pure function of (seed, step) and the step is deterministic, so a run
killed part-way and resumed logs the same losses, bit for bit on the CPU, as
one that never stopped (metrics logged after the checkpoint it resumes from are
dropped and logged again). A damaged checkpoint or a swapped config.json is
refused naming the file; an interrupted save is skipped. A non-finite loss
stops the run with ``NonFiniteLossError`` naming the step; no checkpoint is
written past it.

The step is a pure function of (params, opt_state, batch) under ``jax.jit``:
the model is split once into a graph definition and its parameter state (nnx
transforms cost Python time per call on models this small).

Several runs in one process (a study's variants)::

  for pe in ("nope", "sinusoidal", "rope", "alibi", "t5"):
    config = configs.get_config(f"tiny.py:pe={pe}")
    config.data.cache_dir = os.path.join(root, "data")   # one token store
    model = train(config, os.path.join(root, pe)).model

Each run compiles its own step (a few seconds on the CPU; the compiled step
and initialiser are kept per model and optimizer settings, so a second seed
or a resume of the same model skips it; set $JAX_COMPILATION_CACHE_DIR to
keep compilations across processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging as absl_logging
from flax import nnx

from extrapolax.common import checks
from extrapolax.experiments import checkpoints
from extrapolax.experiments import curriculum
from extrapolax.experiments import finetune
from extrapolax.experiments import modeling
from extrapolax.experiments import run_config
from extrapolax.experiments import runlog
from extrapolax.experiments import sharding
from extrapolax.experiments import train_data
from extrapolax.experiments import workdir_lock
from extrapolax.models import DecoderLM, ModelConfig

RESUMABLE_FIELDS = run_config.RESUMABLE_FIELDS
WorkdirLockedError = workdir_lock.WorkdirLockedError
# A run's data (experiments.train_data), kept importable from here.
data_dir = train_data.data_dir
device_batch = train_data.device_batch
make_source = train_data.make_source
validate_data_config = train_data.validate_data_config
vocab_size = train_data.vocab_size


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; ``step`` is the first such step."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


@dataclasses.dataclass
class TrainResult:
  """What ``train`` returns.

  Attributes:
    model: the trained DecoderLM.
    step: optimizer updates done (config.train_steps unless it resumed past
      a smaller value).
    metrics: every logged record of the run (metrics.jsonl), resumed parts
      included.
  """
  model: DecoderLM
  step: int
  metrics: list[dict]


# ----------------------------------------------------------------------------
# Config checks, schedule, optimizer.


def _check_number(name, value, **bounds):
  checks.check_setting(f"config.{name}", value, **bounds)


def validate_config(config) -> None:
  """Raises ValueError naming the first bad field of a training config."""
  for name in ("train_len", "batch_size", "log_every", "checkpoint_every",
               "keep_checkpoints"):
    _check_number(name, config[name], minimum=1, integer=True)
  _check_number("train_steps", config.train_steps, minimum=0, integer=True)
  _check_number("warmup_steps", config.warmup_steps, minimum=0, integer=True)
  _check_number("seed", config.seed, minimum=0, integer=True)
  _check_number("learning_rate", config.learning_rate, minimum=0)
  _check_number("min_lr_ratio", config.min_lr_ratio, minimum=0, maximum=1)
  _check_number("weight_decay", config.weight_decay, minimum=0)
  _check_number("adam_b1", config.adam_b1, minimum=0, maximum=1)
  _check_number("adam_b2", config.adam_b2, minimum=0, maximum=1)
  _check_number("grad_clip", config.grad_clip, minimum=0, allow_none=True)
  modeling.model_config(config)
  validate_data_config(config)
  sharding.validate_mesh_config(config)
  finetune.validate(config)
  curriculum.validate(config)


def learning_rate_schedule(config, *, xp=jnp) -> Callable[[Any], Any]:
  """count (updates done so far) -> learning rate of the next update.

  Linear warmup reaching ``learning_rate`` at update ``warmup_steps`` (the
  first update already gets learning_rate / warmup_steps), then a cosine
  decay to ``learning_rate * min_lr_ratio`` at ``train_steps``. ``xp=np``
  gives the same function in numpy (for logging without device work).
  """
  peak = float(config.learning_rate)
  floor = peak * float(config.min_lr_ratio)
  warmup, total = int(config.warmup_steps), int(config.train_steps)

  def schedule(count):
    step = xp.asarray(count, xp.float32)
    warm = peak * xp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    progress = xp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + xp.cos(xp.pi * progress))
    return xp.where(step < warmup, warm, cosine)

  return schedule


def _decay_mask(params):
  """Weight decay on matrices (kernels, embeddings), not on norm scales."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (unless grad_clip is 0/None), then AdamW."""
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1,
                      b2=config.adam_b2, eps=1e-8,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  if not config.grad_clip:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


# ----------------------------------------------------------------------------
# The step.


def init_params(config, mesh: Optional[jax.sharding.Mesh] = None):
  """(graphdef, parameter State) of a fresh model, seeded by config.seed.

  With a ``mesh`` the parameters are created sharded (``sharding.
  param_shardings``); their values do not depend on the mesh.
  """
  model_config = modeling.model_config(config)
  graphdef, init = _compiled_init(model_config.to_json(), mesh)
  return graphdef, init(jax.random.key(config.seed))


@functools.lru_cache(maxsize=16)
def _compiled_init(model_config_json: str, mesh=None):
  """Built under jax.jit: one compilation instead of one per initialiser op
  (cached per model config and mesh, for several runs in one process)."""
  model_config = ModelConfig.from_json(model_config_json)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: DecoderLM(model_config, rngs=nnx.Rngs(0))), nnx.Param)
  out_shardings = (None if mesh is None else
                   sharding.param_shardings(abstract, mesh))

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def init(key):
    return nnx.state(DecoderLM(model_config, rngs=nnx.Rngs(key)), nnx.Param)

  return graphdef, init


def loss_fn(params, graphdef, batch) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token cross entropy: (mean loss, number of targets)."""
  model = nnx.merge(graphdef, params)
  logits_BxTxV = model(batch["tokens"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"))
  losses_BxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV, batch["targets"])
  weights_BxT = batch["weights"].astype(jnp.float32)
  # where(), not a product: a weight-0 position's NaN must not leak in.
  total = jnp.sum(jnp.where(weights_BxT > 0, losses_BxT * weights_BxT, 0.0))
  count = jnp.sum(weights_BxT)
  return total / jnp.maximum(count, 1.0), count


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *,
                    shardings: Optional[tuple] = None):
  """jit((params, opt_state, batch) -> (params, opt_state, metrics)).

  params and opt_state are donated (updated in place where the backend can).
  ``shardings``: (params, opt_state, batch) shardings (``step_shardings``);
  the outputs keep the inputs' and the metrics are replicated.
  """

  def train_step(params, opt_state, batch):
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, graphdef, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "targets": count,
                               "grad_norm": optax.tree.norm(grads)}

  if shardings is None:
    return jax.jit(train_step, donate_argnums=(0, 1))
  params_sh, opt_sh, batch_sh = shardings
  metrics_sh = sharding.replicated(batch_sh.mesh)
  return jax.jit(train_step, donate_argnums=(0, 1), in_shardings=shardings,
                 out_shardings=(params_sh, opt_sh, metrics_sh))


def step_shardings(params, optimizer, mesh) -> tuple:
  """(params, opt_state, batch) NamedShardings of a train step on ``mesh``
  (``params`` may be abstract)."""
  params_sh = sharding.param_shardings(params, mesh)
  abstract_opt = jax.eval_shape(optimizer.init, params)
  opt_sh = sharding.opt_state_shardings(optimizer, abstract_opt, params_sh,
                                        mesh)
  return params_sh, opt_sh, sharding.batch_sharding(mesh)


_OPTIMIZER_FIELDS = ("learning_rate", "warmup_steps", "train_steps",
                     "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2",
                     "grad_clip")


@functools.lru_cache(maxsize=16)
def _cached_train_step(model_config_json: str, optimizer_fields: tuple, mesh):
  """(init_opt_state, train_step, shardings), kept per (model, optimizer
  settings, mesh): a second run of the same model in one process (resume,
  another seed) skips compiling."""
  optimizer = make_optimizer(ml_collections.ConfigDict(dict(optimizer_fields)))
  graphdef, init_params_fn = _compiled_init(model_config_json, mesh)
  abstract = jax.eval_shape(init_params_fn, jax.random.key(0))
  shardings = step_shardings(abstract, optimizer, mesh)
  init = jax.jit(optimizer.init, out_shardings=shardings[1])
  return init, make_train_step(graphdef, optimizer, shardings=shardings), (
      shardings)


def _source_rows(source, takes_rows: bool, index: int,
                 shape: tuple[int, int], lo: int, hi: int) -> dict:
  """Rows [lo, hi) of batch ``index`` (the rows this process's devices
  hold), checked; a source whose ``batch`` takes ``rows=`` (``takes_rows``)
  builds only those."""
  if (lo, hi) == (0, shape[0]):
    batch = source.batch(index)
  elif takes_rows:
    batch = source.batch(index, rows=(lo, hi))
  else:
    batch = {k: None if v is None else np.asarray(v)[lo:hi]
             for k, v in source.batch(index).items()}
  return device_batch(batch, batch_size=hi - lo, seq_len=shape[1])


# ----------------------------------------------------------------------------
# Files in the workdir.


def _source_state(source, step: int) -> Any:
  """source.state(step) through JSON (as a checkpoint gives it back)."""
  state = source.state(step) if hasattr(source, "state") else None
  return json.loads(json.dumps(state, default=lambda x: np.asarray(x).item()))


# The run's config.json (kept here: the trainer's public reader).
read_config = run_config.read_config


# metrics.jsonl of a run (kept here: the trainer's public reader).
read_metrics = runlog.read_metrics


# ----------------------------------------------------------------------------
# train / load_model.


def _prepare(config) -> ml_collections.ConfigDict:
  """An unlocked copy with vocab_size resolved, validated."""
  config = config.copy_and_resolve_references()
  config.unlock()
  validate_config(config)
  config.model.vocab_size = vocab_size(config)
  return config


def _resume(manager, start, params, opt_state, config, source, workdir):
  """(params, opt_state) of checkpoint ``start``, after verifying its files
  and config and checking that the data source would serve the same
  batches."""
  manifest = checkpoints.verify(workdir, start)
  run_config.check_saved_config(manifest, run_config.config_json(config),
                                workdir, start)
  restored = checkpoints.restore(manager, start, {
      "params": nnx.to_pure_dict(params),
      "opt_state": jax.tree.leaves(opt_state), "data": None})
  expected = {"step": start, "seed": config.seed,
              "source": _source_state(source, start)}
  if restored["data"] != expected:
    raise ValueError(f"the checkpoint at step {start} in {workdir} was "
                     f"written with other data ({restored['data']}); this "
                     f"config gives {expected}")
  params = checkpoints.fill_params(params, restored["params"])
  opt_state = jax.tree.unflatten(jax.tree.structure(opt_state),
                                 restored["opt_state"])
  absl_logging.info("resuming %s from step %d", workdir, start)
  return params, opt_state


def _is_log_step(step: int, config) -> bool:
  return (step == 1 or step % config.log_every == 0
          or step == config.train_steps)


def train(config, workdir: str, *, source=None) -> TrainResult:
  """Trains (or resumes training) the model ``config`` describes.

  Args:
    config: a training ConfigDict (``configs.base_config`` lists the fields).
    workdir: the run's folder; created if needed. A run already there
      resumes from its latest checkpoint (its config must match except for
      RESUMABLE_FIELDS).
    source: optional data source (``.batch(step)`` returning a PackedBatch
      or a mapping with tokens, targets, weights [and positions,
      segment_ids], all [batch_size, train_len]; optional ``.state(step)``,
      JSON-able, stored in checkpoints). Default: ``make_source(config)``.

  Returns:
    TrainResult(model, step, metrics).

  Raises:
    ValueError: a bad config value, or a workdir holding another config.
    WorkdirLockedError: another run holds the workdir (names its pid/host).
    checkpoint_files.CheckpointError: the checkpoint to resume from is
      damaged (names the file) or was saved with another config.json.
    NonFiniteLossError: the loss became NaN or infinite (names the step).
  """
  config = _prepare(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir):
    return _train(config, workdir, source)


def _train(config, workdir: str, source) -> TrainResult:
  run_config.write_config(config, workdir)
  schedule = curriculum.stages(config)
  if source is None:
    source = (curriculum.make_source(config, workdir, make_source) if schedule
              else make_source(config, workdir))

  mesh = sharding.mesh_from_config(config)
  if mesh.size > 1:
    absl_logging.info("training on the mesh %s", sharding.describe(mesh))
  graphdef, params = init_params(config, mesh)
  init_opt_state, step_fn, shardings = _cached_train_step(
      modeling.model_config(config).to_json(),
      tuple((k, config[k]) for k in _OPTIMIZER_FIELDS), mesh)
  opt_state = init_opt_state(params)
  shape = (config.batch_size, config.train_len)
  takes_rows = "rows" in inspect.signature(source.batch).parameters
  with contextlib.ExitStack() as stack:
    # The ambient mesh lets attention split the sequence (context axis).
    stack.enter_context(jax.set_mesh(mesh))
    # Incomplete steps go before orbax lists the folder.
    start = checkpoints.latest_complete(workdir, remove_incomplete=True) or 0
    manager = checkpoints.open_manager(workdir)
    stack.callback(checkpoints.close, manager)
    if start:
      params, opt_state = _resume(manager, start, params, opt_state, config,
                                  source, workdir)
    elif config.get("init_from") is not None:   # a fine-tune's first start
      params, opt_state = finetune.initial_state(config, params, opt_state)
    log = stack.enter_context(runlog.RunLog(
        workdir, config, start, learning_rate_schedule(config, xp=np)))
    pending: list[tuple[int, dict]] = []
    watch = _DivergenceWatch()
    fixed = run_config.fixed_fields(run_config.config_json(config))
    for index in range(start, config.train_steps):
      step = index + 1
      if schedule:   # a length curriculum: this step's stage
        stage = curriculum.stage_at(schedule, index)[1]
        shape = (stage.batch_size, stage.train_len)
      batch = sharding.host_batch(
          functools.partial(_source_rows, source, takes_rows, index, shape),
          shardings[2], shape)
      params, opt_state, out = step_fn(params, opt_state, batch)
      pending.append((step, out))
      log.progress.update(1)
      save = step % config.checkpoint_every == 0 or step == config.train_steps
      if not (save or _is_log_step(step, config)):
        continue
      fetched, pending = jax.device_get(pending), []
      _check_finite(fetched, config, last_saved=manager.latest_step())
      watch.update(fetched, config)
      log.write(step, fetched[-1][1], written=_is_log_step(step, config))
      if save:
        checkpoints.save(manager, step, params, opt_state, {
            "step": step, "seed": config.seed,
            "source": _source_state(source, step)}, workdir=workdir,
                         config=fixed, keep=config.keep_checkpoints)
  return TrainResult(model=nnx.merge(graphdef, params),
                     step=max(start, config.train_steps),
                     metrics=runlog.read_metrics(workdir))


class _DivergenceWatch:
  """Warns once when the loss climbs far above where this run started.

  A too-large learning rate can train to a finite but useless loss (lr=10:
  127 after starting near log(vocab)) and exit 0; this says so in the log.
  """
  # "Far above": more than twice the first loss and at least 1 nat higher.
  FACTOR, MARGIN = 2.0, 1.0

  def __init__(self):
    self.first = None
    self.warned = False

  def update(self, fetched, config) -> None:
    for step, out in fetched:
      loss = float(out["loss"])
      if self.first is None:
        self.first = (step, loss)
        continue
      first_step, first = self.first
      if (not self.warned and loss > self.FACTOR * first
          and loss > first + self.MARGIN):
        self.warned = True
        absl_logging.warning(
            "the loss is diverging: %.4g at step %d, up from %.4g at step %d "
            "(learning_rate %g, grad_norm %.4g); the run goes on, but lower "
            "the learning rate or check grad_clip", loss, step, first,
            first_step, config.learning_rate, float(out["grad_norm"]))


def _check_finite(fetched, config, *, last_saved) -> None:
  for step, out in fetched:
    loss = float(out["loss"])
    if not math.isfinite(loss):
      saved = (f"the last checkpoint is step {last_saved}" if last_saved
               else "no checkpoint was written")
      raise NonFiniteLossError(
          f"training stopped: the loss is {loss} at step {step} (grad_norm "
          f"{float(out['grad_norm'])}, learning_rate {config.learning_rate}); "
          f"{saved}. Lower the learning rate or check the data", step)


def export_pretrained(workdir: str, path: str, *,
                      step: Optional[int] = None,
                      overwrite: bool = False) -> str:
  """Writes a run's latest (or given) checkpoint as a zoo checkpoint.

  ``zoo.from_pretrained(path)`` then loads it with no experiment code
  (config.json, manifest and checksums as ``zoo.save_pretrained`` writes).
  Returns ``path``.
  """
  from extrapolax.models import zoo  # pylint: disable=import-outside-toplevel
  model, _ = load_model(workdir, step=step)
  zoo.save_pretrained(model, path, overwrite=overwrite)
  return path


def load_model(workdir: str, *, step: Optional[int] = None,
               mesh: Optional[jax.sharding.Mesh] = None
               ) -> tuple[DecoderLM, ml_collections.ConfigDict]:
  """The model of a run's latest (or given) checkpoint, and its config.

  The parameters land on the first local device, or sharded on ``mesh``
  (``sharding.param_shardings``) whatever mesh wrote the checkpoint. The
  latest step is the newest complete one (an interrupted save is skipped
  with a warning); its files and config.json are verified against its
  manifest first (``checkpoint_files.CheckpointError`` names a damaged
  file, or a config.json the checkpoint was not saved with).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = read_config(workdir)
  abstract = nnx.eval_shape(lambda: modeling.create_model(
      config, nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  if mesh is not None:
    params = sharding.abstract_with(
        params, sharding.param_shardings(params, mesh))
  done, incomplete = checkpoints.steps(workdir)
  if step is None:
    step = checkpoints.latest_complete(workdir)
    if step is None:
      more = f" (incomplete: {incomplete})" if incomplete else ""
      raise ValueError(f"{workdir} has no complete checkpoint yet{more}")
  elif step not in done + incomplete:
    raise ValueError(f"no checkpoint at step {step} in {workdir}; "
                     f"steps: {done}")
  manifest = checkpoints.verify(workdir, step)
  run_config.check_saved_config(manifest, run_config.config_json(config),
                                workdir, step)
  manager = checkpoints.open_manager(workdir)
  try:
    pure = checkpoints.restore(manager, step,
                               {"params": nnx.to_pure_dict(params)})
  finally:
    checkpoints.close(manager)
  params = checkpoints.fill_params(params, pure["params"])
  return nnx.merge(graphdef, params), config
