"""Synthetic tasks and the passkey prompt, checked by recomputing answers."""

import re

import numpy as np
import pytest

from extrapolax.experiments import data


def _answer(example):
  return "".join(c for c, m in zip(example.text, example.answer_mask) if m)


def _samples(name, lengths=(1, 2, 5, 17, 64), per_length=6, **params):
  task = data.get_task(name, **params)
  rng = np.random.default_rng(0)
  for length in lengths:
    for _ in range(per_length):
      example = task.sample(rng, length)
      assert example.tokens.dtype == np.int32
      assert example.answer_mask.dtype == bool
      assert example.tokens.shape == example.answer_mask.shape
      assert bytes(example.tokens.astype(np.uint8)).decode() == example.text
      assert len(example.tokens) <= task.max_tokens(length)
      yield length, example


@pytest.mark.parametrize("name,flip", [("copy", False), ("reverse", True)])
def test_copy_and_reverse(name, flip):
  for length, ex in _samples(name):
    match = re.fullmatch(r"([a-z]+)=([a-z]+)\n", ex.text)
    assert match, ex.text
    source, output = match.groups()
    assert len(source) == length
    assert output == (source[::-1] if flip else source)
    assert _answer(ex) == output + "\n"


@pytest.mark.parametrize("reversed_digits", [False, True])
def test_addition(reversed_digits):
  seen_carry_out = False
  for length, ex in _samples("addition", reversed_digits=reversed_digits):
    match = re.fullmatch(r"(\d+)\+(\d+)=(\d+)\n", ex.text)
    assert match, ex.text
    a, b, c = (s[::-1] if reversed_digits else s for s in match.groups())
    assert len(a) == len(b) == length
    assert int(a) + int(b) == int(c)
    assert length == 1 or a[0] != "0" and b[0] != "0"
    assert _answer(ex) == match.group(3) + "\n"
    seen_carry_out |= len(c) > length
  assert seen_carry_out


def test_parity():
  for length, ex in _samples("parity"):
    match = re.fullmatch(r"([01]+)=([01])\n", ex.text)
    assert match and len(match.group(1)) == length
    assert int(match.group(2)) == match.group(1).count("1") % 2
    assert _answer(ex) == match.group(2) + "\n"


def test_associative_recall():
  for length, ex in _samples("associative_recall"):
    match = re.fullmatch(r"((?:[a-z]\d)+)\?([a-z])=(\d)\n", ex.text)
    assert match, ex.text
    pairs, query, value = match.groups()
    assert len(pairs) == 2 * length
    table = {}
    for i in range(0, len(pairs), 2):
      table[pairs[i]] = pairs[i + 1]           # later bindings win
    assert query in table and table[query] == value
    assert _answer(ex) == value + "\n"


def test_flip_flop():
  ops = []
  for length, ex in _samples("flip_flop", lengths=(2, 3, 10, 50)):
    assert re.fullmatch(r"(?:[wir][01])+", ex.text) and len(ex.text) == (
        2 * length)
    assert ex.text[0] == "w" and ex.text[-2] == "r"
    memory, graded = None, []
    for i in range(0, len(ex.text), 2):
      op, bit = ex.text[i], ex.text[i + 1]
      ops.append(op)
      if op == "w":
        memory = bit
      elif op == "r":
        assert bit == memory
        graded.append(i + 1)
    np.testing.assert_array_equal(np.flatnonzero(ex.answer_mask), graded)
  counts = {op: ops.count(op) for op in "wir"}
  assert counts["i"] > counts["w"] and counts["i"] > counts["r"]
  with pytest.raises(ValueError, match="length must be an int >= 2"):
    data.get_task("flip_flop").sample(np.random.default_rng(0), 1)


def test_multiplication():
  seen_short = False
  for length, ex in _samples("multiplication"):
    match = re.fullmatch(r"([01]+)\*([01]+)=([01]+)\n", ex.text)
    assert match, ex.text
    a, b, c = match.groups()
    assert len(a) == len(b) == length and not c.endswith("0")
    value = lambda bits: int(bits[::-1], 2)    # little-endian
    assert value(a) >= 1 and value(b) >= 1
    assert value(a) * value(b) == value(c)
    assert _answer(ex) == c + "\n"
    seen_short |= len(c) < 2 * length
  assert seen_short


def test_sorting():
  for length, ex in _samples("sorting"):
    match = re.fullmatch(r"([0-4]+)=([0-4]+)\n", ex.text)
    assert match and len(match.group(1)) == length
    assert match.group(2) == "".join(sorted(match.group(1)))
    assert _answer(ex) == match.group(2) + "\n"
  ex = data.get_task("sorting", vocab_size=10).sample(
      np.random.default_rng(0), 200)
  assert set(ex.text[:200]) == set("0123456789")
  with pytest.raises(ValueError, match="vocab_size must lie in"):
    data.get_task("sorting", vocab_size=11)


def test_duplicate_string():
  for length, ex in _samples("duplicate_string"):
    match = re.fullmatch(r"([ab]+)=([ab]+)\n", ex.text)
    assert match and len(match.group(1)) == length
    assert match.group(2) == match.group(1) * 2
    assert _answer(ex) == match.group(2) + "\n"


def test_modular_arithmetic():
  values = set()
  for length, ex in _samples("modular_arithmetic", per_length=20):
    match = re.fullmatch(r"([0-4](?:[-+*][0-4])*)=([0-4])\n", ex.text)
    assert match, ex.text
    expression, result = match.groups()
    assert len(expression) == 2 * length - 1
    # Python's own precedence and modulo (of a negative number too).
    assert eval(expression) % 5 == int(result)  # pylint: disable=eval-used
    assert _answer(ex) == result + "\n"
    values.add(result)
  assert values == set("01234")
  ex = data.get_task("modular_arithmetic", modulus=7).sample(
      np.random.default_rng(3), 30)
  expression, result = ex.text.strip().split("=")
  assert eval(expression) % 7 == int(result)  # pylint: disable=eval-used


def test_even_pairs_and_first():
  answers = set()
  for length, ex in _samples("even_pairs"):
    match = re.fullmatch(r"([ab]+)=([01])\n", ex.text)
    assert match and len(match.group(1)) == length
    s = match.group(1)
    pairs = sum(s[i:i + 2] in ("ab", "ba") for i in range(len(s) - 1))
    assert int(match.group(2)) == (pairs % 2 == 0) == (s[0] == s[-1])
    answers.add(match.group(2))
  assert answers == {"0", "1"}
  for length, ex in _samples("first"):
    match = re.fullmatch(r"([01]+)=([01])\n", ex.text)
    assert match and len(match.group(1)) == length
    assert match.group(2) == match.group(1)[0]
    assert _answer(ex) == match.group(2) + "\n"


def test_tasks_are_seeded_and_batched():
  for name in data.TASK_NAMES:
    task = data.get_task(name)
    one = task.sample(np.random.default_rng(7), 12)
    two = task.sample(np.random.default_rng(7), 12)
    assert one.text == two.text
    assert data.get_task(name, **task.params()).params() == task.params()
    rng = np.random.default_rng(1)
    examples = [task.sample(rng, 12) for _ in range(5)]
    batch = task.batch(np.random.default_rng(1), 5, 12)
    width = max(len(e.tokens) for e in examples)
    assert batch["tokens"].shape == (5, width)
    for row, ex in enumerate(examples):
      n = len(ex.tokens)
      np.testing.assert_array_equal(batch["tokens"][row][:n], ex.tokens)
      np.testing.assert_array_equal(batch["targets"][row][:n - 1],
                                    ex.tokens[1:])
      np.testing.assert_array_equal(batch["weights"][row][:n - 1],
                                    ex.answer_mask[1:])
      assert not batch["weights"][row][n - 1:].any()
      assert (batch["segment_ids"][row] > 0).sum() == n
    assert task.max_tokens(task.max_length_for(100)) <= 100 < task.max_tokens(
        task.max_length_for(100) + 1)
  wide = data.get_task("copy").batch(np.random.default_rng(0), 2, 3, width=40)
  assert wide["tokens"].shape == (2, 40)
  with pytest.raises(ValueError, match="unknown task"):
    data.get_task("sort")
  with pytest.raises(ValueError, match="does not take"):
    data.get_task("copy", alphabet="ab")
  with pytest.raises(ValueError, match="length must be"):
    data.get_task("copy").sample(np.random.default_rng(0), 0)


# -- passkey -------------------------------------------------------------------

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")


@pytest.mark.parametrize("num_tokens", [250, 1000, 4097])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt(num_tokens, depth):
  tokenizer = data.get_tokenizer("byte")
  prompt, key_ids = data.passkey_prompt(num_tokens, depth, "40213", tokenizer)
  assert prompt.dtype == np.int32 and len(prompt) == num_tokens
  assert tokenizer.decode(key_ids) == " 40213"
  text = tokenizer.decode(prompt)
  lines = text.split("\n")
  assert lines[0] == ("There is an important info hidden inside a lot of "
                      "irrelevant text. Find it and memorize them. I will quiz "
                      "you about the important information there.")
  assert lines[2] == ("The pass key is 40213. Remember it. 40213 is the pass "
                      "key.")
  assert lines[4] == "What is the pass key? The pass key is"
  assert len(lines) == 5
  before, after = lines[1], lines[3]
  repeated = " ".join([FILLER] * (num_tokens // len(FILLER) + 2))
  assert repeated.startswith(before) and repeated.startswith(after)
  budget = len(before) + len(after)
  assert len(before) == round(depth * budget)


def test_passkey_prompt_errors():
  tokenizer = data.get_tokenizer("byte")
  with pytest.raises(ValueError, match="too small"):
    data.passkey_prompt(100, 0.5, "1", tokenizer)
  with pytest.raises(ValueError, match="depth"):
    data.passkey_prompt(500, 1.5, "1", tokenizer)
  with pytest.raises(ValueError, match="key"):
    data.passkey_prompt(500, 0.5, "", tokenizer)
