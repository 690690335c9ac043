"""Fine-tuning from a checkpoint (experiments.finetune, configs/finetune.py).

A tiny RoPE model trained at 16 tokens is continued at 64 with Position
Interpolation: it starts from the checkpoint's weights (its first loss is
the zero-shot PI model's loss on the same batch, recomputed here in
float64) and after a few steps beats zero-shot PI at 64.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import checkpoints
from extrapolax.experiments import configs
from extrapolax.experiments import data
from extrapolax.experiments import evaluators
from extrapolax.experiments import finetune
from extrapolax.experiments import trainer
from extrapolax.experiments.evaluators import variants

BASE_LEN, NEW_LEN = 16, 64


def _small(config, cache_dir):
  config.model.d_model = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.model.mlp_dim = 64
  config.data.cache_dir = cache_dir
  config.log_every = 1
  return config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(workdir, cache_dir) of a tiny RoPE run trained at 16 tokens."""
  root = tmp_path_factory.mktemp("finetune")
  cache = str(root / "data")
  config = _small(configs.get_config(
      f"tiny.py:steps=250,train_len={BASE_LEN},batch_size=16"), cache)
  config.warmup_steps = 10
  config.checkpoint_every = 250
  config.log_every = 50
  workdir = str(root / "base")
  trainer.train(config, workdir)
  return workdir, cache


def _finetune_config(base, arg=""):
  workdir, cache = base
  config = configs.get_config(
      f"finetune.py:init_from={workdir},method=pi,factor=4{arg}")
  config.data.cache_dir = cache
  config.log_every = 1
  return config


def _nll(model, batch) -> float:
  """The weighted mean next-token NLL of a batch, softmax in float64."""
  logits = np.asarray(model(batch["tokens"]), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.asarray(batch["targets"])
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  weights = np.asarray(batch["weights"], np.float64)
  return float((nll * weights).sum() / weights.sum())


def test_config_sets_length_scaling_and_batch(base):
  config = _finetune_config(base, ",steps=3")
  assert config.train_len == NEW_LEN and config.batch_size == 4  # 16 * 16/64
  assert json.loads(config.model.rope_scaling) == {"rope_type": "linear",
                                                   "factor": 4.0}
  assert config.init_from == base[0] and config.init_from_optimizer == "reset"
  yarn = finetune.scaling("ntk_by_parts", 4.0, 16)["rope_scaling"]
  assert yarn["rope_type"] == "yarn" and yarn["attention_factor"] == 1.0
  assert yarn["original_max_position_embeddings"] == 16
  assert finetune.scaling("abf", 4.0, 16, base=10000.0) == {
      "rope_scaling": None, "rope_base": 1e6}


@pytest.mark.slow   # about 30 s on the 2-core CPU
def test_first_loss_is_the_zero_shot_loss_then_pi_beats_zero_shot(
    base, tmp_path):
  config = _finetune_config(base, ",steps=30,learning_rate=0.003")
  workdir = str(tmp_path / "pi")
  result = trainer.train(config, workdir)
  first = result.metrics[0]
  assert first["step"] == 1

  # The zero-shot PI model: the checkpoint's weights, linear x4 at 64.
  model, _ = trainer.load_model(base[0])
  zero_shot = variants.with_rope_scaling(
      model, {"rope_type": "linear", "factor": 4.0}, train_len=BASE_LEN)
  saved = trainer.read_config(workdir)
  batch = trainer.make_source(saved, workdir).batch(0)
  assert np.asarray(batch["tokens"]).shape == (4, NEW_LEN)
  expected = _nll(zero_shot, batch)
  np.testing.assert_allclose(first["loss"], expected, rtol=2e-5)
  # Not a fresh model: a fresh one starts near ln(256) = 5.5.
  assert expected < 4.0

  # After 30 steps at 64 tokens, PI fine-tuning beats zero-shot PI there
  # (measured: 33.96 vs 36.04; deterministic on the CPU).
  documents = data.eval_documents(saved, workdir)
  ppl = {}
  for name, m in (("zero_shot", zero_shot), ("tuned", result.model)):
    (record,) = evaluators.perplexity_vs_length(
        m, documents, train_len=BASE_LEN, lengths=(NEW_LEN,),
        max_tokens=4096, position_buckets=0)
    ppl[name] = record["value"]
  assert ppl["tuned"] < 0.97 * ppl["zero_shot"], ppl

  # A resume continues from the fine-tune's own checkpoint, not init_from.
  config.train_steps = 32
  again = trainer.train(config, workdir)
  assert again.step == 32
  assert [m["step"] for m in again.metrics] == list(range(1, 33))
  assert again.metrics[:30] == result.metrics


def test_keep_restores_the_moments_and_restarts_the_schedule(base):
  config = _finetune_config(base, ",steps=3,optimizer=keep")
  prepared = trainer._prepare(config)  # pylint: disable=protected-access
  _, params = trainer.init_params(prepared)
  optimizer = trainer.make_optimizer(prepared)
  fresh = optimizer.init(params)
  params, kept = finetune.initial_state(prepared, params,
                                        optimizer.init(params))
  # The base checkpoint's optimizer state, read back independently.
  base_config = trainer.read_config(base[0])
  _, base_params = trainer.init_params(base_config)
  template = trainer.make_optimizer(base_config).init(base_params)
  manager = checkpoints.open_manager(base[0])
  try:
    stored = checkpoints.restore(manager, 250, {
        "opt_state": jax.tree.leaves(template)})["opt_state"]
  finally:
    checkpoints.close(manager)
  leaves = jax.tree.leaves(kept)
  # clip state, adam (count, mu..., nu...), schedule count: the moments
  # and adam's count are the checkpoint's; the schedule count restarts.
  counts = [i for i, x in enumerate(leaves) if np.ndim(x) == 0]
  assert len(counts) == 2
  assert int(leaves[counts[0]]) == 250 and int(leaves[counts[-1]]) == 0
  for i, (got, want) in enumerate(zip(leaves, stored)):
    if i != counts[-1]:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  mus = [x for x in leaves if np.ndim(x) >= 2]
  assert any(np.abs(np.asarray(m)).max() > 0 for m in mus)
  # The weights are the checkpoint's.
  model, _ = trainer.load_model(base[0])
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(params)),
                  jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # reset: the fresh state as it was.
  config.init_from_optimizer = "reset"
  prepared = trainer._prepare(config)  # pylint: disable=protected-access
  _, params = trainer.init_params(prepared)
  _, reset = finetune.initial_state(prepared, params, fresh)
  for a, b in zip(jax.tree.leaves(reset), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_from_a_zoo_checkpoint_folder(base, tmp_path):
  folder = trainer.export_pretrained(base[0], str(tmp_path / "zoo"))
  config = _finetune_config(base, ",steps=1")
  config.init_from = folder
  prepared = trainer._prepare(config)  # pylint: disable=protected-access
  _, params = trainer.init_params(prepared)
  params, _ = finetune.initial_state(prepared, params, None)
  model, _ = trainer.load_model(base[0])
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(params)),
                  jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.init_from_optimizer = "keep"
  with pytest.raises(ValueError, match=r"'keep' needs a training workdir"):
    trainer.validate_config(config)


@pytest.mark.parametrize("change, message", [
    ({"model.d_model": 48},
     r"config.model.d_model=48 but config.init_from=.* has d_model=32"),
    ({"model.num_layers": 2}, r"config.model.num_layers=2 but"),
])
def test_shape_changes_are_refused(base, tmp_path, change, message):
  config = _finetune_config(base, ",steps=1")
  for path, value in change.items():
    node, leaf = config.model, path.split(".")[1]
    node[leaf] = value
  with pytest.raises(ValueError, match=message) as info:
    trainer.train(config, str(tmp_path / "bad"))
  assert "\n" not in str(info.value)


def test_learned_table_of_another_length_is_refused(base, tmp_path):
  workdir, cache = base
  config = _small(configs.get_config(
      f"tiny.py:pe=learned,steps=2,train_len={BASE_LEN},batch_size=2"), cache)
  learned = str(tmp_path / "learned")
  trainer.train(config, learned)
  del workdir
  config = trainer.read_config(learned)   # the same run, twice as long
  config.train_len = 2 * BASE_LEN
  config.init_from = learned
  with pytest.raises(ValueError, match=r"has shape \(16, 32\) there but "
                     r"\(32, 32\) in this run"):
    trainer.train(config, str(tmp_path / "learned_ft"))


@pytest.mark.parametrize("fields, message", [
    ({"init_from_optimizer": "bogus"},
     r"init_from_optimizer='bogus' must be one of \('reset', 'keep'\)"),
    ({"init_from": None, "init_from_optimizer": "keep"},
     r"'keep' needs config.init_from"),
    ({"init_from": "/no/such/run"}, r"is neither a training workdir"),
])
def test_bad_fields_are_named(base, fields, message):
  config = _finetune_config(base, ",steps=1")
  for name, value in fields.items():
    with config.ignore_type():
      config[name] = value
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(config)
  with pytest.raises(ValueError, match="method 'pip' must be one of"):
    finetune.scaling("pip", 4.0, 16)
  assert os.path.isdir(base[0])
