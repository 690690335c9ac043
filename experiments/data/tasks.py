"""Synthetic length-generalisation tasks and the passkey prompt, byte level.

Every task writes ASCII text, so its tokens are bytes (vocab 256) and a
byte-level language model can learn it. ``task.sample(rng, length)`` draws
one example of size ``length`` (the task's own size: symbols to copy,
digits per operand, bits, key-value pairs, instructions); the number of
tokens grows with it (``task.max_tokens(length)`` bounds it). The example's
``answer_mask`` marks the graded tokens; a model predicts token t from the
tokens before it.

=======================  =====================================  ===========
task                     text (length n)                        answer
=======================  =====================================  ===========
copy                     ``s=s\\n``, s: n letters a-z            ``s\\n``
reverse                  ``s=r\\n``, r: s reversed               ``r\\n``
addition                 ``a+b=c\\n``, a, b: n digits each      ``c\\n``
                         (``reversed_digits``: all numbers
                         least significant digit first)
parity                   ``bits=p\\n``, n bits, p = sum mod 2    ``p\\n``
associative_recall       ``k1v1...knvn?q=v\\n``: keys a-z drawn   ``v\\n``
                         with replacement, values 0-9; q is a
                         key of the list, v its latest value
flip_flop                ``w1i0...r1``: n instructions, w then   bits after
                         (n - 2) of w / i / r with probabilities ``r``
                         (1-p)/2, p, (1-p)/2, then r; ``r`` is
                         followed by the last written bit
multiplication           ``a*b=c\n``, a, b: n bits each, least  ``c\n``
                         significant first; c = a * b, the same
                         order, no high zeros
sorting                  ``s=t\n``, s: n digits 0-4, t sorted   ``t\n``
duplicate_string         ``s=ss\n``, s: n letters of a, b       ``ss\n``
modular_arithmetic       ``1+2*3=2\n``: n digits 0-4, n - 1 of  ``r\n``
                         + - *; r the value mod 5 (* first)
even_pairs               ``s=e\n``, s: n letters of a, b; e = 1  ``e\n``
                         iff ab and ba occur an even number of
                         times in total
first                    ``bits=b\n``, n bits, b the first one   ``b\n``
=======================  =====================================  ===========

The last six are the tasks of Deletang et al. (2023) that the Randomized PE
paper (Ruoss et al., 2023) trains (binary multiplication, bucket sort,
duplicate string, modular arithmetic (simple), even pairs) and Chiang &
Cholak's FIRST, as byte text; sizes count symbols (operands: bits each)
rather than Deletang's total input length.

``passkey_prompt`` builds the Landmark-Attention passkey prompt (REFERENCE.md)
with an exact number of tokens.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import string
from typing import Any, Optional, Sequence

import numpy as np

from . import packing as packing_lib

__all__ = ["TaskExample", "Task", "get_task", "TASK_NAMES", "passkey_prompt",
           "short_passkey_prompt", "short_passkey_min_tokens",
           "examples_to_batch",
           "PASSKEY_INSTRUCTION", "PASSKEY_FILLER", "PASSKEY_QUESTION"]

_LETTERS = string.ascii_lowercase

Segments = Sequence[tuple[str, bool]]      # (text, graded?) pieces


@dataclasses.dataclass(frozen=True, eq=False)
class TaskExample:
  """One example: int32 tokens [L], bool answer_mask [L], and its text."""
  tokens: np.ndarray
  answer_mask: np.ndarray
  text: str


def _check_length(task: "Task", length) -> int:
  if not isinstance(length, (int, np.integer)) or length < task.min_length:
    raise ValueError(f"task {task.name!r}: length must be an int >= "
                     f"{task.min_length}, got {length!r}")
  return int(length)


class Task(abc.ABC):
  """A seeded generator of examples whose size is ``length``."""

  name: str = ""
  min_length: int = 1

  def params(self) -> dict[str, Any]:
    """Keyword arguments that ``get_task(self.name, **params)`` takes."""
    return {}

  @abc.abstractmethod
  def _segments(self, rng: np.random.Generator, length: int) -> Segments:
    """The example's text as (text, is_answer) pieces."""

  @abc.abstractmethod
  def max_tokens(self, length: int) -> int:
    """An upper bound on the tokens of an example of size ``length``."""

  def sample(self, rng: np.random.Generator, length: int) -> TaskExample:
    """One example of size ``length`` drawn from ``rng``."""
    length = _check_length(self, length)
    segments = self._segments(rng, length)
    text = "".join(t for t, _ in segments)
    tokens = np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)
    mask = np.concatenate([np.full(len(t), graded, bool)
                           for t, graded in segments])
    return TaskExample(tokens=tokens, answer_mask=mask, text=text)

  def max_length_for(self, num_tokens: int) -> int:
    """The largest size whose examples always fit in ``num_tokens``."""
    if self.max_tokens(self.min_length) > num_tokens:
      raise ValueError(f"task {self.name!r}: even length {self.min_length} "
                       f"needs {self.max_tokens(self.min_length)} tokens > "
                       f"{num_tokens}")
    low, high = self.min_length, self.min_length
    while self.max_tokens(high) <= num_tokens:
      low, high = high, 2 * high
    while high - low > 1:
      mid = (low + high) // 2
      low, high = (mid, high) if self.max_tokens(mid) <= num_tokens else (
          low, mid)
    return low

  def batch(self, rng: np.random.Generator, batch: int, length: int, *,
            width: Optional[int] = None) -> packing_lib.PackedBatch:
    """``batch`` examples of size ``length``, right-padded to ``width``
    (default: the longest); weights mark the answer targets."""
    examples = [self.sample(rng, length) for _ in range(batch)]
    return examples_to_batch(examples, width=width)

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
    return f"{type(self).__name__}({args})"


def examples_to_batch(examples: Sequence[TaskExample], *,
                      width: Optional[int] = None) -> packing_lib.PackedBatch:
  """One example per row: segment 1, positions from 0, weights = answer
  mask of the target (token t + 1), zeros in padding."""
  longest = max(len(e.tokens) for e in examples)
  width = longest if width is None else width
  if longest > width:
    raise ValueError(f"an example has {longest} tokens > width {width}")
  shape = (len(examples), width)
  tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  weights = np.zeros(shape, np.float32)
  for row, example in enumerate(examples):
    n = len(example.tokens)
    tokens[row, :n] = example.tokens
    targets[row, :n - 1] = example.tokens[1:]
    weights[row, :n - 1] = example.answer_mask[1:]
    segment_ids[row, :n] = 1
    positions[row, :n] = np.arange(n)
  return packing_lib.PackedBatch(tokens=tokens, targets=targets,
                                 segment_ids=segment_ids, positions=positions,
                                 weights=weights)


def _letters(rng: np.random.Generator, n: int) -> str:
  return "".join(_LETTERS[i] for i in rng.integers(0, 26, n))


def _digits(rng: np.random.Generator, n: int) -> str:
  """n random digits, the first nonzero when n > 1."""
  digits = rng.integers(0, 10, n)
  if n > 1:
    digits[0] = rng.integers(1, 10)
  return "".join(str(d) for d in digits)


class Copy(Task):
  name = "copy"

  def _segments(self, rng, length):
    s = _letters(rng, length)
    return [(s + "=", False), (s + "\n", True)]

  def max_tokens(self, length):
    return 2 * length + 2


class Reverse(Task):
  name = "reverse"

  def _segments(self, rng, length):
    s = _letters(rng, length)
    return [(s + "=", False), (s[::-1] + "\n", True)]

  def max_tokens(self, length):
    return 2 * length + 2


class Addition(Task):
  """n-digit + n-digit; ``reversed_digits`` writes every number least
  significant digit first (the carry then flows left to right)."""
  name = "addition"

  def __init__(self, reversed_digits: bool = False):
    self.reversed_digits = bool(reversed_digits)

  def params(self):
    return {"reversed_digits": self.reversed_digits}

  def _segments(self, rng, length):
    a, b = _digits(rng, length), _digits(rng, length)
    total = str(int(a) + int(b))
    if self.reversed_digits:
      a, b, total = a[::-1], b[::-1], total[::-1]
    return [(f"{a}+{b}=", False), (total + "\n", True)]

  def max_tokens(self, length):
    return 3 * length + 4


class Parity(Task):
  name = "parity"

  def _segments(self, rng, length):
    bits = rng.integers(0, 2, length)
    return [("".join(map(str, bits)) + "=", False),
            (f"{bits.sum() % 2}\n", True)]

  def max_tokens(self, length):
    return length + 3


class AssociativeRecall(Task):
  name = "associative_recall"

  def _segments(self, rng, length):
    keys = rng.integers(0, 26, length)
    values = rng.integers(0, 10, length)
    query = keys[rng.integers(0, length)]
    answer = values[np.flatnonzero(keys == query)[-1]]
    pairs = "".join(f"{_LETTERS[k]}{v}" for k, v in zip(keys, values))
    return [(f"{pairs}?{_LETTERS[query]}=", False), (f"{answer}\n", True)]

  def max_tokens(self, length):
    return 2 * length + 5


class FlipFlop(Task):
  """Flip-flop language (Liu et al., 2023): ``length`` instructions, the
  first a write, the last a read; ``ignore_prob`` of the others ignore."""
  name = "flip_flop"
  min_length = 2

  def __init__(self, ignore_prob: float = 0.8):
    if not 0.0 <= ignore_prob <= 1.0:
      raise ValueError(f"ignore_prob must lie in [0, 1], got {ignore_prob}")
    self.ignore_prob = float(ignore_prob)

  def params(self):
    return {"ignore_prob": self.ignore_prob}

  def _segments(self, rng, length):
    p_other = (1.0 - self.ignore_prob) / 2
    middle = rng.choice(3, size=length - 2,
                        p=[p_other, self.ignore_prob, p_other])
    ops = ["w"] + ["wir"[i] for i in middle] + ["r"]
    segments, memory, pending = [], None, ""
    for op in ops:
      if op == "r":
        segments += [(pending + "r", False), (memory, True)]
        pending = ""
      else:
        bit = str(rng.integers(0, 2))
        memory = bit if op == "w" else memory
        pending += op + bit
    return segments

  def max_tokens(self, length):
    return 2 * length


# --- Deletang et al. (2023), "Neural networks and the Chomsky hierarchy",
# the tasks of the Randomized PE paper (Ruoss et al., 2023); FIRST from
# Chiang & Cholak (2022).


class Multiplication(Task):
  """Binary multiplication, little-endian (Deletang et al.): two n-bit
  numbers in [1, 2^n) written with exactly n bits, least significant bit
  first; the product little-endian without trailing (high) zeros."""
  name = "multiplication"

  def _segments(self, rng, length):
    def number() -> str:     # n little-endian bits, not all zero
      while True:
        bits = "".join(str(b) for b in rng.integers(0, 2, length))
        if "1" in bits:
          return bits
    a, b = number(), number()
    product = int(a[::-1], 2) * int(b[::-1], 2)
    return [(f"{a}*{b}=", False), (bin(product)[2:][::-1] + "\n", True)]

  def max_tokens(self, length):
    return 4 * length + 3


class Sorting(Task):
  """Bucket sort (Deletang et al.): n tokens of 0..vocab_size-1, the answer
  the same tokens in increasing order."""
  name = "sorting"

  def __init__(self, vocab_size: int = 5):
    if not 2 <= vocab_size <= 10:
      raise ValueError(f"vocab_size must lie in [2, 10], got {vocab_size}")
    self.vocab_size = int(vocab_size)

  def params(self):
    return {"vocab_size": self.vocab_size}

  def _segments(self, rng, length):
    tokens = rng.integers(0, self.vocab_size, length)
    text = lambda t: "".join(str(d) for d in t)
    return [(text(tokens) + "=", False), (text(np.sort(tokens)) + "\n", True)]

  def max_tokens(self, length):
    return 2 * length + 2


class DuplicateString(Task):
  """Duplicate string (Deletang et al.): n symbols of {a, b}; the answer the
  string twice."""
  name = "duplicate_string"

  def _segments(self, rng, length):
    s = "".join("ab"[i] for i in rng.integers(0, 2, length))
    return [(s + "=", False), (s + s + "\n", True)]

  def max_tokens(self, length):
    return 3 * length + 2


class ModularArithmetic(Task):
  """Modular arithmetic, simple (Deletang et al.): n numbers of 0..modulus-1
  joined by n - 1 operators of +, -, *; the answer the value modulo
  ``modulus``, * before + and - (``1-1-1`` is -1 = 4 mod 5)."""
  name = "modular_arithmetic"

  def __init__(self, modulus: int = 5):
    if not 2 <= modulus <= 10:
      raise ValueError(f"modulus must lie in [2, 10], got {modulus}")
    self.modulus = int(modulus)

  def params(self):
    return {"modulus": self.modulus}

  def _segments(self, rng, length):
    numbers = rng.integers(0, self.modulus, length)
    ops = ["+-*"[i] for i in rng.integers(0, 3, length - 1)]
    text = str(numbers[0]) + "".join(f"{o}{n}" for o, n in
                                     zip(ops, numbers[1:]))
    # Sum of products: each + or - starts a signed term.
    total, term = 0, int(numbers[0])
    for op, n in zip(ops, numbers[1:]):
      if op == "*":
        term *= int(n)
      else:
        total += term
        term = int(n) if op == "+" else -int(n)
    return [(text + "=", False),
            (f"{(total + term) % self.modulus}\n", True)]

  def max_tokens(self, length):
    return 2 * length + 2


class EvenPairs(Task):
  """Even pairs (Deletang et al.): n symbols of {a, b}; the answer 1 if the
  number of ``ab`` and ``ba`` substrings is even (the first symbol equals
  the last), else 0."""
  name = "even_pairs"

  def _segments(self, rng, length):
    s = "".join("ab"[i] for i in rng.integers(0, 2, length))
    changes = sum(x != y for x, y in zip(s, s[1:]))
    return [(s + "=", False), (f"{int(changes % 2 == 0)}\n", True)]

  def max_tokens(self, length):
    return length + 3


class First(Task):
  """FIRST (Chiang & Cholak, 2022): n bits; the answer the first bit."""
  name = "first"

  def _segments(self, rng, length):
    bits = "".join(str(b) for b in rng.integers(0, 2, length))
    return [(bits + "=", False), (bits[0] + "\n", True)]

  def max_tokens(self, length):
    return length + 3


_TASKS = {cls.name: cls for cls in (Copy, Reverse, Addition, Parity,
                                    AssociativeRecall, FlipFlop,
                                    Multiplication, Sorting, DuplicateString,
                                    ModularArithmetic, EvenPairs, First)}
TASK_NAMES = tuple(_TASKS)


def get_task(name: str, **params) -> Task:
  """The task ``name`` (one of TASK_NAMES), with its keyword parameters
  (addition: reversed_digits; flip_flop: ignore_prob; sorting: vocab_size;
  modular_arithmetic: modulus)."""
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; allowed: {TASK_NAMES}")
  try:
    return _TASKS[name](**params)
  except TypeError as e:
    raise ValueError(f"task {name!r} does not take {params}: {e}") from e


# ----------------------------------------------------------------------------
# Passkey retrieval (Landmark Attention; reused by PI and YaRN).

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find "
    "it and memorize them. I will quiz you about the important information "
    "there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
                  "Here we go. There and back again.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


PASSKEY_ASSISTANT = "The pass key is"
_SLOT = "\x00passkey-content\x00"


def _takes_continues(tokenizer) -> bool:
  """Whether ``tokenizer.encode`` takes ``continues=`` (a text that follows
  earlier text: no SentencePiece dummy space before it)."""
  try:
    return "continues" in inspect.signature(tokenizer.encode).parameters
  except (TypeError, ValueError):
    return False


def piece_encoder(tokenizer):
  """``(text, first=False) -> int32 ids`` without a BOS token, and the ids a
  prompt starts with (the tokenizer's BOS when it adds one, else none).

  Prompt builders encode their pieces separately with it and concatenate
  them, so a prompt's length is exact for any tokenizer (for bytes the ids
  are those of the joined text). A piece that starts the prompt's text
  passes ``first=True``; the others are encoded as continuations, so a
  SentencePiece tokenizer puts its dummy space before the first one only,
  as it would on the whole prompt.
  """
  takes = _takes_continues(tokenizer)
  bos = bool(getattr(tokenizer, "add_bos", False))

  def encode(text, first=False):
    kwargs = dict(add_bos=False) if bos else {}
    if takes:
      kwargs["continues"] = not first
    return np.asarray(tokenizer.encode(text, **kwargs), np.int32)

  if bos:
    return encode, np.asarray([tokenizer.bos_id], np.int32)
  return encode, np.zeros(0, np.int32)


def chat_frame(tokenizer, assistant: str = PASSKEY_ASSISTANT
               ) -> tuple[np.ndarray, np.ndarray]:
  """The chat template's token ids before and after one user message (the
  generation prompt included), and the assistant's opening words."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}],
                                       add_generation_prompt=True)
  if text.count(_SLOT) != 1:
    raise ValueError("the chat template does not place the user message "
                     "once; cannot frame a prompt with it")
  before, after = text.split(_SLOT)
  # The template writes the BOS token itself when the model wants one. The
  # text after the message continues the prompt (no SentencePiece space).
  encode = lambda t, **kw: np.asarray(
      tokenizer.encode(t, add_bos=False, **kw) if t else [], np.int32)
  more = dict(continues=True) if _takes_continues(tokenizer) else {}
  return encode(before), encode(after + assistant, **more)


def passkey_prompt(num_tokens: int, depth: float, key: str,
                   tokenizer, *, chat: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A passkey prompt of exactly ``num_tokens`` tokens and the answer.

  The text is the instruction line, filler (PASSKEY_FILLER repeated with
  spaces, cut to fit), the line "The pass key is KEY. Remember it. KEY is
  the pass key.", more filler, and the question, joined by newlines as in
  Landmark Attention's run_test.py. ``depth`` is the fraction of the filler
  tokens placed before the key line (0: right after the instruction, 1:
  right before the question). The pieces are tokenized separately and
  concatenated, so the count is exact for any tokenizer (for bytes the ids
  are those of the joined text).

  ``chat``: for an instruct model, the same text as one user message under
  the tokenizer's chat template (``tokenizer.apply_chat_template``), the
  question ending "What is the pass key?", and the assistant's turn opened
  with "The pass key is" (the template's own tokens count towards
  ``num_tokens``).

  Args:
    num_tokens: prompt length in tokens.
    depth: in [0, 1].
    key: the pass key (e.g. a 5-digit number as a string).
    tokenizer: anything with ``encode`` (and ``apply_chat_template`` for
      ``chat``).
    chat: frame the prompt with the chat template.

  Returns:
    (prompt_ids int32 [num_tokens], key_ids int32): key_ids encode " KEY",
    the continuation a model should generate after "The pass key is".
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
  key = str(key)
  if not key or "\n" in key:
    raise ValueError(f"key must be a non-empty single line, got {key!r}")
  # Pieces without BOS; the prompt's own BOS once, below.
  encode, bos = piece_encoder(tokenizer)
  head = encode(PASSKEY_INSTRUCTION + "\n", first=not chat)
  needle = encode(f"\nThe pass key is {key}. Remember it. {key} is the pass "
                  "key.\n")
  if chat:
    opening, closing = chat_frame(tokenizer)
    question = PASSKEY_QUESTION[:-len(PASSKEY_ASSISTANT)].rstrip()
    head = np.concatenate([opening, head])
    tail = np.concatenate([encode("\n" + question), closing])
  else:
    head = np.concatenate([bos, head]).astype(np.int32)
    tail = encode("\n" + PASSKEY_QUESTION)
  budget = num_tokens - len(head) - len(needle) - len(tail)
  if budget < 0:
    raise ValueError(f"num_tokens={num_tokens} is too small: the prompt "
                     f"without filler takes {num_tokens - budget} tokens")
  unit = encode(PASSKEY_FILLER + " ")
  filler = np.tile(unit, budget // max(1, len(unit)) + 1)[:budget]
  before = int(round(depth * budget))
  prompt = np.concatenate(
      [head, filler[:before], needle, filler[:budget - before], tail])
  return prompt.astype(np.int32), encode(" " + key)


# ----------------------------------------------------------------------------
# A passkey prompt short enough to train on (``data.RetrievalMix``).

def short_passkey_prompt(num_tokens: int, depth: float, key: str,
                         tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """A compact passkey prompt of exactly ``num_tokens`` tokens and the answer.

  The text is PASSKEY_FILLER (repeated with spaces, cut to fit) with the
  needle "key=KEY. " placed after ``depth`` of the filler tokens, then the
  question "\nkey=": ``short_passkey_min_tokens`` (16 bytes with a 5-digit
  key) instead of the Landmark prompt's 247, so a model with a 64-token
  context can be trained on it and scored inside its training length, then
  past it. The filler holds no "=" and no digit, so the key is the only
  continuation of "key=" in the prompt. Pieces are encoded separately, as in
  ``passkey_prompt``.

  Returns:
    (prompt_ids int32 [num_tokens], key_ids int32): key_ids encode KEY (no
    leading space: the question ends with "=").
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
  key = str(key)
  if not key or not key.isalnum():
    raise ValueError(f"key must be a non-empty alphanumeric string, got "
                     f"{key!r}")
  encode, bos = piece_encoder(tokenizer)
  needle = encode(f"key={key}. ")
  tail = encode("\nkey=")
  budget = num_tokens - len(bos) - len(needle) - len(tail)
  if budget < 0:
    raise ValueError(f"num_tokens={num_tokens} is too small: the short "
                     f"passkey prompt without filler takes "
                     f"{num_tokens - budget} tokens")
  unit = encode(PASSKEY_FILLER + " ")
  filler = np.tile(unit, budget // max(1, len(unit)) + 1)[:budget]
  before = int(round(depth * budget))
  prompt = np.concatenate(
      [bos, filler[:before], needle, filler[before:budget], tail])
  return prompt.astype(np.int32), encode(key)


def short_passkey_min_tokens(key_digits: int, tokenizer) -> int:
  """The shortest ``short_passkey_prompt`` (no filler) for a key of
  ``key_digits`` digits."""
  encode, bos = piece_encoder(tokenizer)
  return (len(bos) + len(encode(f"key={'9' * key_digits}. "))
          + len(encode("\nkey=")))
