"""The training loop: learning, resume, NaN stop, checkpoints, load_model.

These runs use an in-memory byte stream (no corpus, no token store) through
``train(..., source=...)``; test_train_main.py runs the real data path.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import configs
from extrapolax.experiments import trainer
from extrapolax.models import zoo

SEQ_LEN, BATCH = 32, 4


class StreamSource:
  """Random windows of a token stream; batch(step) depends on (seed, step)."""

  def __init__(self, stream, *, seed=0, fail_at=None):
    self.stream, self.seed, self.fail_at = stream, seed, fail_at
    self.calls = []

  def batch(self, step):
    self.calls.append(step)
    if step == self.fail_at:
      raise KeyboardInterrupt(f"simulated kill before step {step + 1}")
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.stream) - SEQ_LEN - 1, BATCH)
    rows = np.stack([self.stream[s:s + SEQ_LEN + 1] for s in starts])
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "weights": np.ones((BATCH, SEQ_LEN), np.float32)}

  def state(self, step):
    return {"kind": "stream", "seed": self.seed, "length": len(self.stream)}


def _stream():
  text = ("def add(a, b):\n    return a + b\n\n" * 40).encode()
  return np.frombuffer(text, np.uint8).astype(np.int32)


def _config(**changes):
  config = configs.base_config()
  config.model.vocab_size = 256
  config.model.d_model = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.train_len = SEQ_LEN
  config.batch_size = BATCH
  config.train_steps = 6
  config.warmup_steps = 2
  config.log_every = 1
  config.checkpoint_every = 3
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _forward(model, tokens):
  """model(tokens) under jax.jit (eager nnx compiles op by op)."""
  graphdef, params = nnx.split(model, nnx.Param)
  return np.asarray(_jit_forward(graphdef, params, jnp.asarray(tokens)))


_jit_forward = jax.jit(lambda g, p, t: nnx.merge(g, p)(t), static_argnums=0)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_loss_decreases_on_a_learnable_stream(tmp_path):
  config = _config(train_steps=30, log_every=5, checkpoint_every=30,
                   learning_rate=1e-2)
  result = trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  losses = [r["loss"] for r in result.metrics]
  assert [r["step"] for r in result.metrics] == [1, 5, 10, 15, 20, 25, 30]
  assert losses[0] > math.log(256) - 0.5       # about uniform at the start
  assert losses[-1] < 0.5 * losses[0]          # the stream repeats: learnable
  assert losses[-1] < min(losses[:3])


def test_killed_and_resumed_run_logs_the_same_curve(tmp_path):
  config = _config()       # 6 steps, a checkpoint every 3
  straight = trainer.train(config, str(tmp_path / "straight"),
                           source=StreamSource(_stream()))
  assert [r["step"] for r in straight.metrics] == [1, 2, 3, 4, 5, 6]

  workdir = str(tmp_path / "killed")
  dying = StreamSource(_stream(), fail_at=4)   # dies after step 4 is logged
  with pytest.raises(KeyboardInterrupt):
    trainer.train(config, workdir, source=dying)
  assert [r["step"] for r in trainer.read_metrics(workdir)] == [1, 2, 3, 4]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]

  again = StreamSource(_stream())
  resumed = trainer.train(config, workdir, source=again)
  assert again.calls == [3, 4, 5]              # from the checkpoint on
  assert resumed.step == 6
  assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "grad_norm", "lr"):      # float32 bit for bit
    assert [r[key] for r in resumed.metrics] == [
        r[key] for r in straight.metrics], key
  for a, b in zip(_params(resumed.model), _params(straight.model)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Rerunning a finished run trains nothing and returns the same model.
  idle = StreamSource(_stream())
  rerun = trainer.train(config, workdir, source=idle)
  assert idle.calls == [] and rerun.step == 6
  for a, b in zip(_params(rerun.model), _params(straight.model)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_workdir_contents_and_load_model(tmp_path):
  config = _config(checkpoint_every=4, keep_checkpoints=2, log_every=4)
  result = trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  files = os.listdir(tmp_path)
  assert {"config.json", "metrics.jsonl", "checkpoints"} <= set(files)
  assert any(f.startswith("events.out.tfevents") for f in files)
  # every 4 steps plus the last, keeping the newest 2
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "6"]
  records = trainer.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 4, 6]
  for r in records:
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
    assert r["tokens_per_sec"] > 0 and r["tokens"] == r["step"] * 4 * 32
    assert r["target_tokens"] == 4 * 32        # every weight is 1
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["d_model"] == 32 and saved["log_every"] == 4

  model, loaded_config = trainer.load_model(str(tmp_path))
  assert loaded_config.model.pe == "rope" and loaded_config.train_len == 32
  tokens = _stream()[None, :SEQ_LEN]
  np.testing.assert_array_equal(_forward(model, tokens),
                                _forward(result.model, tokens))
  older, _ = trainer.load_model(str(tmp_path), step=4)
  assert not np.array_equal(_forward(older, tokens), _forward(model, tokens))
  with pytest.raises(ValueError, match="no checkpoint at step 3"):
    trainer.load_model(str(tmp_path), step=3)

  # A run's workdir is not a zoo checkpoint: one line saying how to load or
  # export it; the export then loads with no experiment code.
  with pytest.raises(ValueError, match="training run's workdir.*load_model"):
    zoo.from_pretrained(str(tmp_path))
  exported = trainer.export_pretrained(str(tmp_path), str(tmp_path / "zoo"))
  np.testing.assert_array_equal(_forward(zoo.from_pretrained(exported),
                                         tokens), _forward(model, tokens))


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
  config = _config(learning_rate=1e30, warmup_steps=0, train_steps=20,
                   checkpoint_every=1, grad_clip=None)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"loss is (nan|inf) at step \d+") as info:
    trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  bad_step = info.value.step
  assert 1 < bad_step < 20
  # Nothing at or past the bad step was checkpointed or logged.
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
  assert saved and max(saved) == bad_step - 1
  logged = [r["step"] for r in trainer.read_metrics(str(tmp_path))]
  assert logged == list(range(1, bad_step))


def test_nan_from_the_data_names_the_step(tmp_path):

  class PoisonedSource(StreamSource):

    def batch(self, step):
      batch = super().batch(step)
      if step == 2:
        batch["weights"] = np.full_like(batch["weights"], np.nan)
      return batch

  with pytest.raises(trainer.NonFiniteLossError, match="at step 3"):
    trainer.train(_config(), str(tmp_path), source=PoisonedSource(_stream()))


@pytest.mark.parametrize("key, value, match", [
    ("model.pe", "foo", "'foo'"),
    ("model.mask", "windowed", "'windowed'"),
    ("model.dtype", "float16", "'float16'"),
    ("train_len", 0, "train_len=0"),
    ("learning_rate", -1.0, "learning_rate=-1.0"),
    ("batch_size", -3, "batch_size=-3"),
    ("min_lr_ratio", 2.0, "min_lr_ratio=2.0"),
])
def test_bad_config_values_raise_naming_them(tmp_path, key, value, match):
  with pytest.raises(ValueError, match=match):
    trainer.train(_config(**{key: value}), str(tmp_path / "run"),
                  source=StreamSource(_stream()))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_resume_with_another_config_is_refused(tmp_path):
  trainer.train(_config(train_steps=3), str(tmp_path),
                source=StreamSource(_stream()))
  with pytest.raises(ValueError, match=r"model.pe: 'rope' -> 'alibi'"):
    trainer.train(_config(train_steps=3, **{"model.pe": "alibi"}),
                  str(tmp_path), source=StreamSource(_stream()))
  with pytest.raises(ValueError, match="other data"):
    trainer.train(_config(train_steps=6), str(tmp_path),
                  source=StreamSource(_stream()[:-10]))


def test_batches_of_the_wrong_shape_are_refused(tmp_path):

  class ShortSource(StreamSource):

    def batch(self, step):
      return {k: v[:, :-1] for k, v in super().batch(step).items()}

  with pytest.raises(ValueError, match=r"shape \(4, 31\)"):
    trainer.train(_config(), str(tmp_path), source=ShortSource(_stream()))


def test_bfloat16_compute_trains_with_float32_params(tmp_path):
  config = _config(train_steps=4, **{"model.dtype": "bfloat16"})
  result = trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  assert all(p.dtype == jnp.float32 for p in _params(result.model))
  losses = [r["loss"] for r in result.metrics]
  assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_schedule_warmup_then_cosine():
  config = _config(learning_rate=1.0, warmup_steps=4, train_steps=14,
                   min_lr_ratio=0.1)
  lr = trainer.learning_rate_schedule(config, xp=np)
  np.testing.assert_allclose([lr(i) for i in range(4)],
                             [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(lr(4), 1.0, rtol=1e-6)
  np.testing.assert_allclose(lr(9), 0.55, rtol=1e-6)   # half way: mean
  np.testing.assert_allclose([lr(14), lr(100)], [0.1, 0.1], rtol=1e-6)
  jax_lr = trainer.learning_rate_schedule(config)
  np.testing.assert_allclose([float(jax_lr(i)) for i in range(16)],
                             [float(lr(i)) for i in range(16)], rtol=1e-6)


def test_loss_ignores_weight_zero_positions():
  config = _config()
  graphdef, params = trainer.init_params(config)
  batch = StreamSource(_stream()).batch(0)
  weights = np.ones((BATCH, SEQ_LEN), np.float32)
  weights[:, SEQ_LEN // 2:] = 0
  masked = dict(batch, weights=weights)
  loss_fn = jax.jit(trainer.loss_fn, static_argnums=1)
  loss, count = loss_fn(params, graphdef, masked)
  assert float(count) == BATCH * SEQ_LEN // 2
  logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(
      params, jnp.asarray(batch["tokens"]))
  logp = jax.nn.log_softmax(logits[:, :SEQ_LEN // 2])
  expected = -jnp.take_along_axis(
      logp, jnp.asarray(batch["targets"][:, :SEQ_LEN // 2, None]),
      -1).mean()
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  # Garbage targets under weight 0 change nothing.
  scrambled = dict(masked, targets=np.where(
      weights > 0, batch["targets"], 7).astype(np.int32))
  np.testing.assert_allclose(
      float(loss_fn(params, graphdef, scrambled)[0]), float(loss),
      rtol=1e-6)


def test_weight_decay_skips_vectors():
  config = _config()
  _, params = trainer.init_params(config)
  mask = trainer._decay_mask(nnx.to_pure_dict(params))  # pylint: disable=protected-access
  flat = {"/".join(map(str, k)): v for k, v in
          jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat and all(v == (("norm" not in k) and ("scale" not in k))
                      for k, v in flat.items())


def _warnings(monkeypatch):
  said = []
  monkeypatch.setattr(trainer.absl_logging, "warning",
                      lambda msg, *args: said.append(msg % args))
  return said


def test_diverging_loss_warns_once(tmp_path, monkeypatch):
  """Issue 15 item 10: lr=10 trained to loss 127 and exited 0 silently."""
  said = _warnings(monkeypatch)
  config = _config(learning_rate=10.0, warmup_steps=0, train_steps=12,
                   checkpoint_every=12)
  trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  losses = [r["loss"] for r in trainer.read_metrics(str(tmp_path))]
  assert max(losses[1:]) > 2 * losses[0]
  diverging = [s for s in said if "the loss is diverging" in s]
  assert len(diverging) == 1, said
  assert "learning_rate 10" in diverging[0]


def test_healthy_run_does_not_warn(tmp_path, monkeypatch):
  said = _warnings(monkeypatch)
  config = _config(learning_rate=1e-2, train_steps=6, checkpoint_every=6)
  trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  assert not [s for s in said if "diverging" in s]
