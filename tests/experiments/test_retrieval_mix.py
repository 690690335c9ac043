"""The short passkey prompt and the task-mixed corpus (data.RetrievalMix)."""

import re

import ml_collections
import numpy as np
import pytest

from extrapolax.experiments import configs
from extrapolax.experiments import data
from extrapolax.experiments import extrapolation
from extrapolax.experiments import study_finetune
from extrapolax.experiments import trainer
from extrapolax.experiments.data import tasks

from .test_data_packing import _named_docs

BYTES = data.get_tokenizer("byte")


def _text(ids) -> str:
  return bytes(np.asarray(ids, np.uint8)).decode("ascii")


def _expected_prompt(num_tokens, depth, key) -> str:
  """The prompt recomputed with string operations (bytes = characters)."""
  needle, question = f"key={key}. ", "\nkey="
  budget = num_tokens - len(needle) - len(question)
  filler = ((tasks.PASSKEY_FILLER + " ") * (budget // 10 + 2))[:budget]
  before = int(round(depth * budget))
  return filler[:before] + needle + filler[before:] + question


@pytest.mark.parametrize("num_tokens, depth, key", [
    (16, 0.0, "12345"), (16, 1.0, "99999"), (64, 0.5, "31800"),
    (300, 0.25, "7"), (513, 1.0, "40404")])
def test_short_prompt_is_exact_and_recomputed(num_tokens, depth, key):
  prompt, answer = data.short_passkey_prompt(num_tokens, depth, key, BYTES)
  assert prompt.dtype == np.int32 and len(prompt) == num_tokens
  assert _text(prompt) == _expected_prompt(num_tokens, depth, key)
  assert _text(answer) == key
  # The key is the only continuation of "key=" before the question.
  assert re.findall(r"key=(\w*)", _text(prompt)) == [key, ""]
  assert tasks.short_passkey_min_tokens(len(key), BYTES) == len(key) + 11


def test_short_prompt_errors():
  with pytest.raises(ValueError, match="num_tokens=15 is too small.*16"):
    data.short_passkey_prompt(15, 0.5, "12345", BYTES)
  with pytest.raises(ValueError, match="depth must lie in"):
    data.short_passkey_prompt(64, 1.5, "12345", BYTES)
  with pytest.raises(ValueError, match="key must be"):
    data.short_passkey_prompt(64, 0.5, "12 45", BYTES)


@pytest.fixture(name="source")
def _source(tmp_path):
  store = data.TokenStore.create(str(tmp_path / "s"),
                                 _named_docs([400, 90, 700, 33]),
                                 metadata={"corpus": "named"})
  return data.TrainSource(store, seq_len=64, batch_size=8, seed=3)


def test_mix_replaces_the_last_rows_with_graded_examples(source):
  mix = data.RetrievalMix(source, fraction=0.25, seq_len=64, seed=3)
  assert mix.rows == 2
  for step in (0, 5):
    inner, batch = source.batch(step), mix.batch(step)
    for k in inner:   # the text rows are the source's
      assert np.array_equal(batch[k][:6], inner[k][:6])
    for row in (6, 7):
      tokens = batch["tokens"][row]
      n = int((batch["segment_ids"][row] == 1).sum())
      text = _text(tokens[:n])
      key = re.match(r".*key=(\d{5})\. .*\nkey=(\d{5})$", text, re.S)
      assert key and key.group(1) == key.group(2)   # asked = needle
      assert 21 <= n <= 64 and not tokens[n:].any()
      # Graded: exactly the key's 5 targets, which are the key's bytes.
      graded = np.flatnonzero(batch["weights"][row])
      assert list(graded) == list(range(n - 6, n - 1))
      assert _text(batch["targets"][row][graded]) == key.group(2)
      assert list(batch["positions"][row][:n]) == list(range(n))
  # A pure function of (seed, step, row); rows=(lo, hi) is the slice.
  again = data.RetrievalMix(source, fraction=0.25, seq_len=64, seed=3)
  part = again.batch(5, rows=(5, 8))
  for k in part:
    assert np.array_equal(part[k], mix.batch(5)[k][5:8])
  assert not np.array_equal(mix.batch(1)["tokens"][7],
                            mix.batch(2)["tokens"][7])
  assert mix.state(4) == dict(source.state(4), retrieval={
      "fraction": 0.25, "rows": 2, "key_digits": 5, "seed": 3,
      "prompt": "short_passkey"})


def test_mix_errors(source):
  with pytest.raises(ValueError, match=r"fraction=0 must be .* \(0, 1\]"):
    data.RetrievalMix(source, fraction=0, seq_len=64)
  with pytest.raises(ValueError, match="seq_len=20 is too short.*21"):
    data.RetrievalMix(source, fraction=0.5, seq_len=20)
  config = configs.get_config("tiny.py")
  config.unlock()
  config.data.retrieval_mix = 1.5
  with pytest.raises(ValueError, match=r"data.retrieval_mix=1.5 must be"):
    trainer.validate_config(config)


def test_continue_finetune_with_retrieval_mix():
  study = configs.get_config("extrapolation.py:seeds=0")
  entry = study.finetunes.rope_passkey
  assert entry.method == "continue" and entry.factor == 1
  train = study_finetune.train_config(study, "rope_passkey", "/tmp/w", None,
                                      extrapolation.variant_config)
  assert train.data.retrieval_mix == entry.retrieval_mix > 0
  assert train.train_len == 64 and train.batch_size == 16
  assert train.model.rope_scaling is None and train.model.rope_base == 10000
  assert train.init_from == "/tmp/w/runs/rope"
  assert study_finetune.base_of(study, "rope_passkey") == "rope"
  assert study_finetune.base_of(study, "rope") is None
  for change, message in (
      (dict(retrieval_mix=2), r"rope_passkey.retrieval_mix=2 must be"),
      (dict(factor=0.5), r"rope_passkey.factor=0.5 must be a number >= 1")):
    bad = configs.get_config("extrapolation.py:seeds=0")
    entries = bad.finetunes.to_dict()
    entries["rope_passkey"].update(change)
    bad.finetunes = ml_collections.ConfigDict(entries)
    with pytest.raises(ValueError, match=message):
      extrapolation.validate_config(bad)


def test_passkey_summary_mean_and_spread_over_seeds():
  from extrapolax.experiments import evals, records  # pylint: disable=import-outside-toplevel
  def record(seed, depth, value, eval_len=64):
    return records.make_record(
        model="rope_passkey", pe="rope", scaling="none", scale=1.0,
        mask="causal", train_len=64, eval_len=eval_len, mode=None,
        stride=None, task="passkey", metric="passkey_accuracy", value=value,
        n_tokens=40, seed=seed, step=300, depth=depth, n_trials=8,
        experiment="passkey", base="rope")
  # Seed 0: depths 1.0 and 0.5 -> 0.75; seed 1: 0.25 and 0.25 -> 0.25;
  # mean 0.5, sample std sqrt(((0.25)^2 * 2) / 1) = 0.354.
  got = [record(0, 0.0, 1.0), record(0, 1.0, 0.5), record(1, 0.0, 0.25),
         record(1, 1.0, 0.25), record(0, 0.0, 0.0, 128),
         record(0, 1.0, 0.0, 128), record(1, 0.0, 0.0, 128),
         record(1, 1.0, 0.0, 128)]
  text = evals.get("passkey").summary(got, got)
  assert "| 64 (train) | 0.50 ± 0.35 |" in text
  assert "| 128 | 0.00 ± 0.00 |" in text
  assert "(mean ± sample std over n=2 seeds)" in text
