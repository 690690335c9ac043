"""Passkey retrieval and algorithmic accuracy: grading arithmetic against
hand-computed values, and a tiny random DecoderLM through both."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import records
from extrapolax.experiments.evaluators import algorithmic
from extrapolax.experiments.evaluators import passkey
from extrapolax.models import DecoderLM, ModelConfig, generate

TINY = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=2,
            mlp_dim=64, max_len=32)
MODEL = DecoderLM(ModelConfig(**TINY), rngs=nnx.Rngs(0))


class Bytes:
  name, vocab_size = "byte", 256

  def encode(self, text):
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


def filler_prompt(num_tokens, depth, key, tokenizer):
  """A byte prompt of exactly num_tokens with the key line at depth."""
  line = f" The pass key is {key}. "
  tail = " The pass key is"
  room = num_tokens - len(line) - len(tail)
  before = int(round(depth * room))
  text = "g" * before + line + "s" * (room - before) + tail
  return tokenizer.encode(text), tokenizer.encode(" " + key)


def test_greedy_continuations_equal_kv_cache_generation():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, n).astype(np.int32) for n in (12, 9, 12)]
  got = passkey.greedy_continuations(MODEL, prompts, 4, batch_size=2)
  # Prompts of one length share a generate call.
  want = np.asarray(generate(MODEL, jnp.asarray(np.stack(prompts[::2])), 4))
  np.testing.assert_array_equal(got[::2], want[:, 12:])
  want = np.asarray(generate(MODEL, jnp.asarray(prompts[1][None]), 4))
  np.testing.assert_array_equal(got[1], want[0, 9:])


@pytest.mark.parametrize("decode", passkey.DECODES)
def test_passkey_grading_against_known_continuations(decode):
  # The key asked for is the model's own greedy continuation at depth 0,
  # that continuation with its last token changed at depth 0.5 (a right
  # prefix is not enough) and with its first token changed at depth 1.
  depths = (0.0, 0.5, 1.0)
  prompts = np.stack([filler_prompt(40, d, "00000", Bytes())[0]
                      for d in depths])
  continuations = np.asarray(generate(MODEL, jnp.asarray(prompts), 3))[:, -3:]

  def rigged(num_tokens, depth, key, tokenizer):
    del num_tokens, key, tokenizer
    i = depths.index(depth)
    key_ids = continuations[i].copy()
    if i:
      key_ids[-1 if i == 1 else 0] += 1
    return prompts[i], key_ids % 256

  out = passkey.passkey_retrieval(
      MODEL, lengths=(40,), depths=depths, trials=2, tokenizer=Bytes(),
      prompt_fn=rigged, decode=decode, labels=dict(model="rope-tiny"))
  assert [(r["depth"], r["value"], r["n_trials"], r["n_tokens"])
          for r in out] == [(0.0, 1.0, 2, 6), (0.5, 0.0, 2, 6),
                            (1.0, 0.0, 2, 6)]


def test_passkey_records_from_a_random_model():
  out = passkey.passkey_retrieval(
      MODEL, lengths=(32, 64), depths=(0.0, 1.0), trials=2,
      tokenizer=Bytes(), prompt_fn=filler_prompt,
      labels=dict(model="rope-tiny", seed=0, step=1))
  assert [(r["eval_len"], r["depth"]) for r in out] == [
      (32, 0.0), (32, 1.0), (64, 0.0), (64, 1.0)]
  for r in out:
    assert records.make_record(**r) == r
    assert r["metric"] == "passkey_accuracy" and r["task"] == "passkey"
    assert r["value"] in (0.0, 0.5, 1.0) and r["n_tokens"] == 2 * 6
    assert r["train_len"] == 32 and r["experiment"] == "passkey"
  with pytest.raises(ValueError, match="depths"):
    passkey.passkey_retrieval(MODEL, lengths=(32,), depths=(1.5,),
                              tokenizer=Bytes(), prompt_fn=filler_prompt)
  with pytest.raises(ValueError, match="beam"):
    passkey.passkey_retrieval(MODEL, lengths=(32,), decode="beam",
                              tokenizer=Bytes(), prompt_fn=filler_prompt)


def fake_logits(predictions):
  """Logits whose argmax at each position is ``predictions`` there."""

  def logits_fn(batch):
    out = np.zeros(batch.shape + (16,), np.float32)
    b, t = batch.shape
    pred = np.zeros((b, t), int)
    pred[:len(predictions), :predictions.shape[1]] = predictions
    np.put_along_axis(out, pred[..., None], 1.0, axis=-1)
    return out

  return logits_fn


def test_grading_hand_computed():
  tokens = [np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3])]
  masks = [np.array([0, 0, 1, 1, 1], bool), np.array([0, 1, 1], bool)]
  # Predictions at t are for token t + 1: example 0 gets 3 and 5 right and
  # 4 wrong; example 1 gets both answers right.
  predictions = np.array([[9, 3, 7, 5, 0], [2, 3, 0, 0, 0]])
  correct, graded = algorithmic.grade_examples(
      fake_logits(predictions), tokens, masks, batch_size=4)
  np.testing.assert_array_equal(correct, [2, 2])
  np.testing.assert_array_equal(graded, [3, 2])


@dataclasses.dataclass
class Example:
  tokens: np.ndarray
  answer_mask: np.ndarray


class Copy:
  """"abc=abc": answers are the copy after '='."""
  name = "copy"

  def sample(self, rng, length):
    body = rng.integers(97, 123, length).astype(np.int32)
    tokens = np.concatenate([body, [61], body]).astype(np.int32)
    mask = np.zeros(len(tokens), bool)
    mask[length + 1:] = True
    return Example(tokens, mask)


def test_algorithmic_records_match_a_direct_evaluation():
  out = algorithmic.algorithmic_accuracy(
      MODEL, Copy(), lengths=(4, 8), train_len=4, train_min_len=1,
      num_examples=6, batch_size=4, labels=dict(model="rope-tiny"))
  assert [(r["eval_len"], r["metric"]) for r in out] == [
      (4, "sequence_accuracy"), (4, "token_accuracy"),
      (8, "sequence_accuracy"), (8, "token_accuracy")]
  for r in out:
    assert records.make_record(**r) == r
    assert (r["task"], r["train_len"], r["train_min_len"]) == ("copy", 4, 1)
    assert r["n_trials"] == 6 and r["experiment"] == "algorithmic"
  # The same examples through the plain model.
  rng = np.random.default_rng([0, 8])
  examples = [Copy().sample(rng, 8) for _ in range(6)]
  batch = np.stack([e.tokens for e in examples])
  predicted = np.asarray(nnx.jit(lambda m, x: m(x))(MODEL, batch)).argmax(-1)
  mask = np.stack([e.answer_mask for e in examples])[:, 1:]
  hit = (predicted[:, :-1] == batch[:, 1:]) & mask
  assert out[3]["n_tokens"] == mask.sum() == 48
  assert out[3]["value"] == pytest.approx(hit.sum() / mask.sum())
  assert out[2]["value"] == pytest.approx(
      np.mean(hit.sum(1) == mask.sum(1)))


def test_defaults_use_the_data_package():
  # Byte tokenizer and REFERENCE.md's passkey template; tasks by name.
  from extrapolax.experiments import data   # pylint: disable=import-outside-toplevel
  prompt, key_ids = data.passkey_prompt(320, 0.5, "12345",
                                        data.get_tokenizer("byte"))
  assert len(prompt) == 320 and bytes(key_ids.astype(np.uint8)) == b" 12345"
  out = passkey.passkey_retrieval(MODEL, lengths=(320,), depths=(0.5,),
                                  trials=2)
  assert out[0]["eval_len"] == 320 and out[0]["n_tokens"] == 2 * 6
  out = algorithmic.algorithmic_accuracy(MODEL, "copy", lengths=(4,),
                                         train_len=4, num_examples=4)
  assert out[0]["task"] == "copy" and out[0]["n_trials"] == 4
  rng = np.random.default_rng([0, 4])     # the evaluator's examples
  examples = [data.get_task("copy").sample(rng, 4) for _ in range(4)]
  assert out[0]["n_tokens"] == sum(e.answer_mask[1:].sum() for e in examples)


# -- the Deletang et al. tasks, scored by a solver that reads the question ----

DELETANG_TASKS = ("multiplication", "sorting", "duplicate_string",
                  "modular_arithmetic", "even_pairs", "first")


def _solve(task, question):
  """The answer (with its newline) to ``question`` ("...="), recomputed."""
  s = question[:-1]
  if task == "multiplication":
    a, b = s.split("*")
    answer = bin(int(a[::-1], 2) * int(b[::-1], 2))[2:][::-1]
  elif task == "sorting":
    answer = "".join(sorted(s))
  elif task == "duplicate_string":
    answer = s + s
  elif task == "modular_arithmetic":
    answer = str(eval(s) % 5)  # pylint: disable=eval-used
  elif task == "even_pairs":
    answer = str(int(sum(s[i:i + 2] in ("ab", "ba")
                         for i in range(len(s) - 1)) % 2 == 0))
  else:
    answer = s[0]
  return answer + "\n"


def _solver_fn(task, corrupt):
  """tokens [B, T] -> predictions [B, T]: the solver's answer after "=",
  its first token changed with ``corrupt``."""

  def predict(batch):
    out = np.zeros(batch.shape, np.int32)
    for row, tokens in enumerate(np.asarray(batch)):
      text = bytes(tokens.astype(np.uint8)).decode().rstrip("\x00")
      end = text.index("=") + 1
      answer = np.frombuffer(_solve(task, text[:end]).encode(), np.uint8)
      answer = answer.astype(np.int32)
      if corrupt:
        answer[0] += 1
      out[row, end - 1:end - 1 + len(answer)] = answer
    return out

  return predict


@pytest.mark.parametrize("task", DELETANG_TASKS)
def test_deletang_tasks_scored_by_a_solver(task, monkeypatch):
  for corrupt in (False, True):
    monkeypatch.setattr(algorithmic, "model_logits_fn",
                        lambda model, implementation, c=corrupt:
                        _solver_fn(task, c))
    out = algorithmic.algorithmic_accuracy(
        MODEL, task, lengths=(3, 9), train_len=3, num_examples=5)
    seq = [r["value"] for r in out if r["metric"] == "sequence_accuracy"]
    tok = [r for r in out if r["metric"] == "token_accuracy"]
    if not corrupt:
      assert seq == [1.0, 1.0] and [r["value"] for r in tok] == [1.0, 1.0]
    else:   # one wrong token per example
      assert seq == [0.0, 0.0]
      for r in tok:
        assert r["value"] == pytest.approx(1 - r["n_trials"] / r["n_tokens"])


def test_algorithmic_config_trains_the_new_tasks(tmp_path):
  from extrapolax.experiments import configs  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments import trainer  # pylint: disable=import-outside-toplevel
  for task in DELETANG_TASKS:
    config = configs.get_config(f"algorithmic.py:task={task},train_len=32")
    trainer.validate_config(config)
    batch = trainer.make_source(config, str(tmp_path)).batch(0)
    tokens, weights = np.asarray(batch["tokens"]), np.asarray(
        batch["weights"])
    for row in range(4):
      text = bytes(tokens[row].astype(np.uint8)).decode().split("\x00")[0]
      question = text[:text.index("=") + 1]
      answer = _solve(task, question)
      assert text == question + answer
      assert weights[row].sum() == len(answer)
  config = configs.get_config("algorithmic.py:task=modular_arithmetic,"
                              "steps=2,train_len=32,batch_size=4")
  config.model.num_layers = 1
  result = trainer.train(config, str(tmp_path / "run"))
  assert result is not None
  losses = [r["loss"] for r in trainer.read_metrics(str(tmp_path / "run"))]
  assert losses and all(np.isfinite(losses))


def test_algorithmic_randomized_positions_reach_the_model():
  # Ruoss et al. evaluate with randomized positions: each example reads at
  # a sorted random subset of [0, max_position), drawn from (seed, length).
  rng = np.random.default_rng([0, 8])
  examples = [Copy().sample(rng, 8) for _ in range(6)]
  out = algorithmic.algorithmic_accuracy(
      MODEL, Copy(), lengths=(8,), train_len=4, num_examples=6,
      batch_size=4, positions="randomized(max_position=200)")
  position_rng = np.random.default_rng([0, 8, 1])
  drawn = [np.sort(position_rng.choice(200, size=17, replace=False))
           for _ in examples]
  assert all(p[-1] > 17 for p in drawn)     # not 0..16
  batch = np.stack([e.tokens for e in examples])
  mask = np.stack([e.answer_mask for e in examples])[:, 1:]

  def accuracy(positions):
    logits = nnx.jit(lambda m, x, p: m(x, positions=p))(
        MODEL, batch, jnp.asarray(np.stack(positions), jnp.int32))
    hit = (np.asarray(logits).argmax(-1)[:, :-1] == batch[:, 1:]) & mask
    return hit.sum() / mask.sum()

  assert out[1]["value"] == pytest.approx(accuracy(drawn))
  assert accuracy(drawn) != pytest.approx(accuracy([np.arange(17)] * 6))
  # Plain positions stay the default, and the positions reach the logits.
  seen = []

  def recording(tokens, positions=None):
    seen.append(positions)
    return np.zeros(tokens.shape + (4,), np.float32)

  algorithmic.grade_examples(recording, [np.arange(1, 4)], [np.ones(3, bool)])
  algorithmic.grade_examples(recording, [np.arange(1, 4), np.arange(1, 3)],
                             [np.ones(3, bool), np.ones(2, bool)],
                             positions=[np.array([2, 5, 9]),
                                        np.array([0, 7])])
  assert seen[0] is None
  np.testing.assert_array_equal(seen[1], [[2, 5, 9], [0, 7, 8]])
  with pytest.raises(ValueError, match="does not fit max_position=10"):
    algorithmic.algorithmic_accuracy(
        MODEL, Copy(), lengths=(8,), train_len=4, num_examples=2,
        positions="randomized(max_position=10)")


def test_algorithmic_entry_checks_its_positions():
  from extrapolax.experiments import evals  # pylint: disable=import-outside-toplevel
  validate = evals.get("algorithmic").validate
  entry = {"task": "copy", "lengths": "8,124", "train_len": 31}
  assert "positions" not in validate(entry, None)      # plain by default
  assert validate(dict(entry, positions="randomized(max_position=250)"),
                  None)["positions"] == "randomized(max_position=250)"
  with pytest.raises(ValueError, match=r"lengths \[124\] can exceed "
                     "max_position=249"):
    validate(dict(entry, positions="randomized(max_position=249)"), None)
  with pytest.raises(ValueError, match="algorithmic positions: .*'shuffled'"):
    validate(dict(entry, positions="shuffled"), None)
