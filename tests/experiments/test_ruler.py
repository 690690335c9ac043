"""RULER-style tasks: exact lengths, evidence where the depth says, answers
a solver recomputes from the prompt text alone, seeded draws; the
evaluator's scoring against a solver that reads the prompts (right: 1.0,
one token wrong: 0.0), and the ``ruler`` plug-in end to end in a study."""

import collections
import json
import os
import re

import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import configs
from extrapolax.experiments import evals
from extrapolax.experiments import extrapolation
from extrapolax.experiments import records
from extrapolax.experiments.data import get_tokenizer
from extrapolax.experiments.data import ruler
from extrapolax.experiments.evaluators import ruler as ruler_eval
from extrapolax.models import DecoderLM, ModelConfig

BYTES = get_tokenizer("byte")
TINY = dict(vocab_size=256, d_model=32, num_layers=1, num_heads=2,
            mlp_dim=64, max_len=64)


class WordTokenizer:
  """A stand-in for a subword tokenizer: letter runs, digit runs of up to
  three, single other characters; a BOS it adds itself; a chat template."""
  add_bos, bos_id = True, 1

  def __init__(self):
    self.vocab = {}

  def encode(self, text, add_bos=None):
    pieces = re.findall(r"[A-Za-z]+|\d{1,3}|.", text, re.S)
    ids = [self.vocab.setdefault(p, 2 + len(self.vocab) % 250)
           for p in pieces]
    return ([self.bos_id] if add_bos is not False else []) + ids

  def apply_chat_template(self, messages, add_generation_prompt):
    assert add_generation_prompt
    return f"<user>{messages[0]['content']}<end><assistant>"


# --- A solver: the answer from the prompt's text alone. ---

NEEDLE = r"\nThe special magic number for (\w+) is: (\d+)\.\n"
STATEMENT = r"\nVAR ([A-Z]+) = (VAR ([A-Z]+)|\d+)\.\n"


def solve(text: str) -> str:
  """The answer a prompt asks for, recomputed from its text."""
  if text.startswith("Some special magic"):
    asked = re.search(r"special magic numbers? for (\w+)\?", text)[1]
    values = [v for k, v in re.findall(NEEDLE, text) if k == asked]
    if "What is the special" in text:
      assert len(values) == 1
    return " " + ", ".join(values)
  if text.startswith("Memorize and track"):
    value = re.search(r"assigned the value (\d+)\?", text)[1]
    equal, order = {value}, []
    for name, rhs, source in re.findall(STATEMENT, text):
      if rhs == value or source in equal:
        equal.add(name)
        order.append(name)
    return " " + " ".join(order)
  if text.startswith("Below is a numbered list"):
    k = int(re.search(r"What are the (\d+) most common", text)[1])
    words = re.findall(r"\d+\. (\w+)\n", text)
    counts = collections.Counter(words)
    ranked = counts.most_common()
    assert ranked[k - 1][1] > (ranked[k][1] if len(ranked) > k else 0)
    top = {w for w, _ in ranked[:k]}
    return " " + ", ".join(dict.fromkeys(w for w in words if w in top))
  if text.startswith("Extract the value"):
    obj = json.loads(text[text.index("{"):text.index("}") + 1])
    return obj[re.search(r'Key: "(\w+)"', text)[1]]
  raise AssertionError(f"unknown prompt {text[:40]!r}")


# --- The generators. ---


@pytest.mark.parametrize("task", ruler.RULER_TASKS)
@pytest.mark.parametrize("num_tokens", [450, 1001])
def test_exact_length_and_solver_recovers_the_answer(task, num_tokens):
  for depth in (0.0, 0.3, 1.0):
    ex = ruler.ruler_prompt(task, num_tokens, depth,
                            np.random.default_rng(7), BYTES)
    assert ex.prompt.shape == (num_tokens,) and ex.prompt.dtype == np.int32
    text = BYTES.decode(ex.prompt)
    assert solve(text) == ex.answer_text
    np.testing.assert_array_equal(ex.answer, BYTES.encode(ex.answer_text))
  # A subword tokenizer with a BOS, and under a chat template: still exact.
  words = WordTokenizer()
  for chat in (False, True):
    ex = ruler.ruler_prompt(task, num_tokens, 0.5, np.random.default_rng(1),
                            words, chat=chat)
    assert len(ex.prompt) == num_tokens
    assert ex.prompt[0] == (words.encode("<", add_bos=False)[0] if chat
                            else words.bos_id)
    if chat:
      tail = words.encode("<end><assistant>Answer:", add_bos=False)
      np.testing.assert_array_equal(ex.prompt[-len(tail):], tail)


def _filler_before(text: str, start: int, pattern: str) -> tuple[int, int]:
  """(filler characters before ``start``, all filler characters): the
  text between the instruction and the question, needles removed."""
  head_end = text.index("\n") + 1
  question = max(text.rfind("\nWhat"), text.rfind("\nQuestion"))
  before = re.sub(pattern, "", text[head_end:start])
  total = re.sub(pattern, "", text[head_end:question])
  return len(before), len(total)


@pytest.mark.parametrize("task,pattern", [
    ("niah_multikey", NEEDLE), ("niah_multivalue", NEEDLE),
    ("variable_tracking", STATEMENT)])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.6, 1.0])
def test_evidence_sits_at_its_depth(task, pattern, depth):
  ex = ruler.ruler_prompt(task, 700, depth, np.random.default_rng(3), BYTES)
  text = BYTES.decode(ex.prompt)
  # The asked evidence: the needle of the asked key (multikey), the value
  # line given the depth (multivalue), the chain's first assignment.
  if task == "niah_multikey":
    asked = re.search(r"number for (\w+)\?", text)[1]
    start = text.index(f"\nThe special magic number for {asked} is")
    assert start in ex.evidence
  elif task == "niah_multivalue":
    starts = [m.start() for m in re.finditer(NEEDLE, text)]
    assert list(ex.evidence) == starts
    start = None
  else:
    value = re.search(r"assigned the value (\d+)\?", text)[1]
    start = text.index(f"= {value}.\n") - len("\nVAR XXXXX ")
    assert ex.evidence[0] == start
    # The hops follow the first assignment.
    assert all(s > start for s in ex.evidence[1:])
  if start is not None:
    before, total = _filler_before(text, start, pattern)
    assert before == round(depth * total)
  else:   # one of the values sits at the depth
    fractions = [_filler_before(text, s, pattern) for s in starts]
    assert any(b == round(depth * t) for b, t in fractions)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_kv_asked_pair_index_follows_depth(depth):
  ex = ruler.ruler_prompt("kv_retrieval", 800, depth,
                          np.random.default_rng(5), BYTES)
  text = BYTES.decode(ex.prompt)
  obj = json.loads(text[text.index("{"):text.index("}") + 1])
  keys = list(obj)
  asked = re.search(r'Key: "(\w+)"', text)[1]
  assert keys.index(asked) == round(depth * (len(keys) - 1))
  assert text[ex.evidence[0]:].lstrip(", ").startswith(f'"{asked}": ')


def test_seeds_sizes_and_errors():
  for task in ruler.RULER_TASKS:
    a, b, c = (ruler.ruler_prompt(task, 600, 0.5, np.random.default_rng(s),
                                  BYTES) for s in (0, 1, 0))
    assert not np.array_equal(a.prompt, b.prompt)
    np.testing.assert_array_equal(a.prompt, c.prompt)
  ex = ruler.ruler_prompt("niah_multivalue", 900, 0.5,
                          np.random.default_rng(0), BYTES, num_values=6)
  assert len(ex.answer_text.split(", ")) == 6 and len(ex.evidence) == 6
  ex = ruler.ruler_prompt("variable_tracking", 900, 0.2,
                          np.random.default_rng(0), BYTES, num_hops=2,
                          num_chains=3)
  text = BYTES.decode(ex.prompt)
  assert len(re.findall(STATEMENT, text)) == 9
  assert solve(text) == ex.answer_text and len(ex.answer_text.split()) == 3
  with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
    ruler.ruler_prompt("niah", 600, 0.5, np.random.default_rng(0), BYTES)
  with pytest.raises(ValueError, match=r"does not take \['num_values'\]"):
    ruler.task_params("niah_multikey", num_values=2)
  with pytest.raises(ValueError, match="uncommon_freq=6 must be < "):
    ruler.task_params("common_words", uncommon_freq=6)
  with pytest.raises(ValueError, match="depth must lie in"):
    ruler.ruler_prompt("kv_retrieval", 600, 1.5, np.random.default_rng(0),
                       BYTES)
  for task in ruler.RULER_TASKS:
    with pytest.raises(ValueError, match="num_tokens=100 is too small"):
      ruler.ruler_prompt(task, 100, 0.5, np.random.default_rng(0), BYTES)


# --- The evaluator. ---


def solver_argmax(corrupt=False):
  """An argmax function that solves each row's prompt: at the answer
  positions it predicts the solver's answer (its last token off by one
  with ``corrupt``); elsewhere token 0."""

  def argmax(batch):
    out = np.zeros(batch.shape, np.int32)
    for row, tokens in enumerate(np.asarray(batch)):
      text = BYTES.decode(tokens).rstrip("\x00")
      ends = [text.rfind(s) + len(s) for s in
              (" is", " are", "they are:", "words are:",
               'with the specified key is: "')]
      end = max(ends)
      answer = BYTES.encode(solve(text[:end]))
      if corrupt:
        answer[-1] += 1
      out[row, end - 1:end - 1 + len(answer)] = answer
    return out

  return argmax


def test_scoring_a_solver_and_a_near_miss():
  model = DecoderLM(ModelConfig(**TINY), rngs=nnx.Rngs(0))
  kwargs = dict(tasks=ruler.RULER_TASKS, lengths=(400, 520), depths=(0.0, 1.0),
                trials=2, labels=dict(model="rope-tiny", seed=0, step=1))
  right = ruler_eval.ruler_accuracy(model, logits_fn=solver_argmax(),
                                    **kwargs)
  wrong = ruler_eval.ruler_accuracy(
      model, logits_fn=solver_argmax(corrupt=True), **kwargs)
  # 4 depth tasks x 2 lengths x 2 depths + common_words x 2 lengths.
  assert len(right) == len(wrong) == 18
  assert [r["value"] for r in right] == [1.0] * 18
  assert [r["value"] for r in wrong] == [0.0] * 18
  cwe = [r for r in right if r["task"] == "common_words"]
  assert [r["depth"] for r in cwe] == [None, None]
  for r in right:
    assert records.make_record(**r) == r
    assert r["metric"] == "ruler_accuracy" and r["n_trials"] == 2
  # n_tokens: the graded answer bytes, as the generator writes them.
  first = right[0]
  rng = np.random.default_rng([0, 0, 400, 0])
  want = sum(len(ruler.ruler_prompt("niah_multikey", 400, 0.0, rng,
                                    BYTES).answer) for _ in range(2))
  assert (first["task"], first["eval_len"], first["depth"],
          first["n_tokens"]) == ("niah_multikey", 400, 0.0, want)


def test_evaluator_on_a_model_and_its_tokenizer():
  """The loaded-model path: a subword tokenizer with a BOS, the model's
  own forward; and the plug-in's tokenizer setting (passkey's)."""
  model = DecoderLM(ModelConfig(**TINY), rngs=nnx.Rngs(1))
  out = ruler_eval.ruler_accuracy(
      model, tasks=("kv_retrieval", "common_words"), lengths=(300,),
      depths=(0.5,), trials=2, tokenizer=WordTokenizer(),
      implementation="xla")
  assert [(r["task"], r["value"]) for r in out] == [
      ("kv_retrieval", 0.0), ("common_words", 0.0)]
  study = configs.get_config("extrapolation.py:quick")
  with pytest.raises(ValueError, match="tokenizer='model' needs"):
    evals.get("ruler").validate({"lengths": (300,), "tokenizer": "model"},
                                study)
  with study.unlocked():
    study.model_source = "some-zoo-model"
  checked = evals.get("ruler").validate(
      {"lengths": "300,600", "tasks": "kv_retrieval", "num_keys": None},
      study)
  assert checked["tokenizer"] == "some-zoo-model"
  assert checked["lengths"] == (300, 600)
  assert checked["tasks"] == ("kv_retrieval",)


def test_plugin_settings_are_checked():
  study = configs.get_config("extrapolation.py:quick")
  get = evals.get("ruler")
  assert get.validate({"lengths": ()}, study) is None
  assert evals.get("ruler").help and ruler.RULER_TASKS == (
      evals.get("ruler").validate({"lengths": (450,)}, study)["tasks"])
  for settings, message in [
      ({"lengths": (450,), "tasks": "niah"}, r"\['niah'\] not in"),
      ({"lengths": (450,), "depths": (2,)}, "depths=.* must be fractions"),
      ({"lengths": (450,), "tasks": "kv_retrieval", "num_hops": 2},
       "num_hops=2 sets variable_tracking, which is not in tasks"),
      ({"lengths": (450,), "num_keys": 0}, "num_keys"),
      ({"lengths": (320, 450)},
       "lengths: niah_multikey at 320 bytes: num_tokens=320 is too small"),
      ({"lengths": (450,), "lenghts": 1}, r"unknown settings \['lenghts'\]")]:
    with pytest.raises(ValueError, match=message):
      get.validate(settings, study)
  checked = get.validate({"lengths": (450,), "num_hops": 2, "num_common": 2},
                         study)
  assert checked["task_params"] == {"variable_tracking": {"num_hops": 2},
                                    "common_words": {"num_common": 2}}


def test_ruler_in_a_study_end_to_end(tmp_path):
  config = configs.get_config("extrapolation.py:quick")
  config.unlock()
  config.variants = "rope"
  for name in list(config.evals.keys()):
    del config.evals[name]
  config.evals.ruler = dict(type="ruler", models="", lengths=(384, 448),
                            depths=(0.0, 1.0), trials=1, tokenizer="byte",
                            num_common=2, common_freq=4)
  workdir = str(tmp_path / "study")
  result = extrapolation.run_study(config, workdir)
  assert result.evaluated == ["ruler/rope"]
  got = records.read(os.path.join(workdir, "results.jsonl"))
  assert len(got) == 4 * 2 * 2 + 2
  assert {r["task"] for r in got} == set(ruler.RULER_TASKS)
  assert all(r["experiment"] == "ruler" and 0.0 <= r["value"] <= 1.0
             for r in got)
  text = open(result.report).read()
  for task in ruler.RULER_TASKS:
    assert f"## ruler: ruler_accuracy on {task}" in text
    assert os.path.isfile(os.path.join(
        workdir, f"ruler_ruler_accuracy_{task}.png"))
  assert "rope, by depth:" in text and "| length \\ depth | 0 | 1 |" in text
  summary = extrapolation.summary_tables(got, result.types)
  assert "## ruler: variable_tracking accuracy (mean over depths)" in summary


def test_a_loaded_model_with_its_tokenizer_and_chat_template(tmp_path):
  """The ``tokenizer="model"`` path: a GGUF Llama and its own tokenizer
  (ChatML template), prompts framed as one user message."""
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  from extrapolax.models import load_gguf, load_tokenizer  # pylint: disable=g-import-not-at-top
  path = gguf_lib.write_random_llama(tmp_path / "tiny.gguf", context=64,
                                     d_model=32, layers=1, heads=2,
                                     kv_heads=1, ffn=64, seed=0)
  tokenizer = load_tokenizer(path)
  ex = ruler.ruler_prompt("niah_multikey", 500, 0.5, np.random.default_rng(0),
                          tokenizer, chat=True)
  text = tokenizer.decode(ex.prompt)
  assert len(ex.prompt) == 500
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n"
                         "<|im_start|>user\nSome special magic numbers")
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\nAnswer:")
  out = ruler_eval.ruler_accuracy(
      load_gguf(path), tasks=("niah_multikey", "kv_retrieval"),
      lengths=(500,), depths=(0.5,), trials=2, tokenizer=tokenizer,
      chat=True, train_len=64, implementation="xla")
  assert [(r["task"], r["n_trials"], r["value"]) for r in out] == [
      ("niah_multikey", 2, 0.0), ("kv_retrieval", 2, 0.0)]
