"""Length curricula (experiments.curriculum): the schedule, tokens per
step, and a resume mid-schedule that equals an uninterrupted run."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import configs
from extrapolax.experiments import curriculum
from extrapolax.experiments import sharding
from extrapolax.experiments import trainer

# 64 tokens per step in every stage; the model's train_len is 32.
SCHEDULE = "0:8x8;3:16x4;6:32x2"   # ';': inside a config argument
SHAPES = [(8, 8)] * 3 + [(4, 16)] * 3 + [(2, 32)] * 2


def _config(tmp_path, **changes):
  config = configs.get_config(
      f"tiny.py:steps=8,train_len=32,batch_size=2,curriculum={SCHEDULE}")
  config.model.d_model = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.model.mlp_dim = 64
  config.warmup_steps = 2
  config.log_every = 1
  config.checkpoint_every = 2
  config.data.cache_dir = str(tmp_path / "data")
  for key, value in changes.items():
    config[key] = value
  return config


def _params(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_stages_follow_the_schedule(tmp_path):
  config = _config(tmp_path)
  schedule = curriculum.stages(config)
  assert schedule == (curriculum.Stage(0, 8, 8), curriculum.Stage(3, 16, 4),
                      curriculum.Stage(6, 32, 2))
  for same in ("0:8x8, 3:16x4, 6:32x2", ((0, 8, 8), (3, 16, 4), (6, 32, 2))):
    with config.ignore_type():
      config.curriculum = same
    assert curriculum.stages(config) == schedule
  assert [curriculum.stage_at(schedule, i)[0] for i in range(8)] == [
      0, 0, 0, 1, 1, 1, 2, 2]
  source = curriculum.make_source(trainer._prepare(config), str(tmp_path),  # pylint: disable=protected-access
                                  trainer.make_source)
  for index, (rows, length) in enumerate(SHAPES):
    batch = source.batch(index)
    assert np.asarray(batch["tokens"]).shape == (rows, length)
    assert np.asarray(batch["weights"]).sum() == 64    # tokens per step
    # The stage's own source serves the same batch (a pure function of
    # seed and step).
    number = curriculum.stage_at(schedule, index)[0]
    np.testing.assert_array_equal(
        batch["tokens"], source.sources[number].batch(index)["tokens"])
  assert source.state(4)["stage"] == 1 and source.state(4)["train_len"] == 16


def test_training_follows_the_schedule_and_resumes_mid_schedule(
    tmp_path, monkeypatch):
  config = _config(tmp_path)
  shapes = []
  host_batch = sharding.host_batch
  monkeypatch.setattr(sharding, "host_batch", lambda get, sh, shape: (
      shapes.append(tuple(shape)) or host_batch(get, sh, shape)))
  straight = trainer.train(config, str(tmp_path / "straight"))
  assert shapes == SHAPES
  assert [m["target_tokens"] for m in straight.metrics] == [64] * 8
  assert [m["tokens"] for m in straight.metrics] == [64 * s for s in
                                                     range(1, 9)]

  # Killed before step 6 (in the second stage; the last checkpoint is
  # step 4), then resumed: the same losses and weights, bit for bit.
  workdir = str(tmp_path / "killed")
  batch = curriculum.CurriculumSource.batch

  def dying(self, index):
    if index == 5:
      raise KeyboardInterrupt("simulated kill before step 6")
    return batch(self, index)

  monkeypatch.setattr(curriculum.CurriculumSource, "batch", dying)
  with pytest.raises(KeyboardInterrupt):
    trainer.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4"]
  monkeypatch.setattr(curriculum.CurriculumSource, "batch", batch)
  shapes.clear()
  resumed = trainer.train(config, workdir)
  assert shapes == SHAPES[4:]                 # from the checkpoint on
  for key in ("loss", "grad_norm", "lr", "target_tokens"):
    assert [m[key] for m in resumed.metrics] == [
        m[key] for m in straight.metrics], key
  for a, b in zip(_params(resumed.model), _params(straight.model)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Another schedule is refused on resume (the data would differ).
  other = _config(tmp_path, curriculum="0:8x8,4:16x4,6:32x2", train_steps=10)
  with pytest.raises(ValueError, match="curriculum"):
    trainer.train(other, workdir)


@pytest.mark.parametrize("value, message", [
    ("0:8x8,3:16x3", r"stage 16x3 has 48 tokens per step; every stage "
     r"needs config.train_len x config.batch_size = 64"),
    ("1:8x8", "the first stage must start at step 0, not 1"),
    ("0:8x8,3:16x4,3:32x2", r"stage starts must increase \(3 then 3\)"),
    ("0:8x8,9:32x2", r"the stage at step 9 is never reached"),
    ("0:64x1", r"length 64 must be in \[1, config.train_len=32\]"),
    ("0:8by8", r"stage '0:8by8' is not STEP:LENGTHxBATCH"),
    (((0, 8),), r"must be a string"),
])
def test_bad_schedules_are_named(tmp_path, value, message):
  config = _config(tmp_path)
  with config.ignore_type():
    config.curriculum = value
  with pytest.raises(ValueError, match=message) as info:
    trainer.validate_config(config)
  assert "\n" not in str(info.value)
