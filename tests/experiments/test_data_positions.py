"""Training-time position sampling (randomized, PoSE, CREAM, E^2-LLM)."""

import math

import numpy as np
import pytest

from extrapolax.experiments import configs, data, trainer
from extrapolax.experiments.data import positions as P

M = 64
SAMPLERS = {
    "randomized": P.Randomized(max_position=M),
    "pose": P.PoSE(max_position=M),
    "cream": P.Cream(max_position=M, head=2),
    "e2": P.E2(max_position=M, max_scale=3),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_strictly_increasing_in_range_and_reaching_the_maximum(name):
  sampler = SAMPLERS[name]
  rng = np.random.default_rng(0)
  top = 0
  for draw in range(600):
    n = 1 + draw % 16
    pos = sampler(rng, n)
    assert pos.shape == (n,)
    assert np.all(np.diff(pos) > 0), (name, pos)
    assert pos.min() >= 0 and pos.max() < M, (name, pos)
    top = max(top, int(pos.max()))
  assert top == M - 1
  # And they do move past the piece's own length (else nothing is gained).
  assert np.mean([sampler(rng, 16).max() > 15 for _ in range(50)]) > 0.5


def test_pose_is_two_contiguous_chunks_as_the_reference():
  rng = np.random.default_rng(1)
  for _ in range(200):
    pos = P.PoSE(max_position=M)(rng, 12)
    jumps = np.flatnonzero(np.diff(pos) != 1)
    assert len(jumps) <= 1               # two chunks (the skip may be 0)
    first = jumps[0] + 1 if len(jumps) else None
    if first is not None:
      assert 1 <= first <= (12 + 1) // 2


def test_cream_keeps_head_and_tail_at_the_ends():
  rng = np.random.default_rng(2)
  seen = set()
  for _ in range(100):
    pos = P.Cream(max_position=M, head=2)(rng, 15)
    # k = head (2) or n // 3 (5), with equal chance.
    k = next(k for k in (5, 2) if np.array_equal(pos[:k], np.arange(k))
             and np.array_equal(pos[-k:], M - k + np.arange(k)))
    seen.add(k)
    assert np.all(np.diff(pos[k:-k]) == 1)          # a contiguous middle
  assert seen == {2, 5}


def test_e2_is_an_offset_stride():
  pos = P.E2(max_position=M, max_scale=3)(np.random.default_rng(3), 10)
  steps = np.diff(pos)
  assert len(set(steps)) == 1 and 1 <= steps[0] <= 3


def test_rows_sample_per_document_piece_and_are_pure():
  seg = np.array([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16])
  sampler = P.PoSE(max_position=M)
  a = P.sample_rows(sampler, seg, seed=0, step=4)
  b = P.sample_rows(sampler, seg, seed=0, step=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, P.sample_rows(sampler, seg, seed=0, step=5))
  for lo, hi in ((0, 5), (5, 12), (12, 16)):
    assert np.all(np.diff(a[0, lo:hi]) > 0)
  assert np.all(np.diff(a[1]) > 0)
  # A row range gives those rows of the whole batch.
  np.testing.assert_array_equal(
      P.sample_rows(sampler, seg[1:], seed=0, step=4, row_offset=1), a[1:])
  np.testing.assert_array_equal(
      P.sample_rows(P.Plain(), seg, seed=0, step=0)[0],
      np.r_[np.arange(5), np.arange(7), np.arange(4)])


@pytest.mark.parametrize("text,match", [
    ("poses", r"positions must be one of .*'pose'"),
    ("pose(max_pos=4)", r"positions 'pose' has no parameter 'max_pos'"),
    ("pose(max_position=0)", "pose max_position must be >= 1"),
    ("pose(4)", "parameters are key=value numbers, got '4'"),
])
def test_bad_names_and_values_are_one_clear_error(text, match):
  with pytest.raises(ValueError, match=match):
    data.position_sampler(text)


def test_config_checks_the_range_covers_train_len():
  config = configs.base_config()
  config.data.positions = "randomized(max_position=64)"
  with pytest.raises(ValueError, match="config.data.positions: .*a 128-token "
                     "piece does not fit max_position=64"):
    trainer.validate_data_config(config)
  config.data.positions = "pose(max_position=512)"
  trainer.validate_data_config(config)


class _Stream:
  """Random windows of a repeating byte stream (no segment ids)."""

  def __init__(self, seq_len, batch):
    text = ("def add(a, b):\n    return a + b\n\n" * 40).encode()
    self.stream = np.frombuffer(text, np.uint8).astype(np.int32)
    self.seq_len, self.batch_size = seq_len, batch

  def batch(self, step):
    rng = np.random.default_rng([0, step])
    starts = rng.integers(0, len(self.stream) - self.seq_len - 1,
                          self.batch_size)
    rows = np.stack([self.stream[s:s + self.seq_len + 1] for s in starts])
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "weights": np.ones((self.batch_size, self.seq_len), np.float32)}

  def state(self, step):
    del step
    return {"kind": "stream"}


def test_training_with_pose_positions_learns(tmp_path):
  config = configs.base_config()
  config.model.update(vocab_size=256, d_model=32, num_layers=1, num_heads=2,
                      mlp_dim=64)
  config.update(train_len=32, batch_size=4, train_steps=20, warmup_steps=2,
                log_every=5, checkpoint_every=20, learning_rate=1e-2)
  config.data.positions = "pose(max_position=256)"
  source = data.PositionSampling(_Stream(32, 4), data.position_sampler(
      config.data.positions), seed=0)
  batch = source.batch(0)
  assert batch["positions"].max() > 31      # past the row length
  result = trainer.train(config, str(tmp_path), source=source)
  losses = [r["loss"] for r in result.metrics]
  assert losses[0] > math.log(256) - 0.5
  assert losses[-1] < 0.6 * losses[0]
