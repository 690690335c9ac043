"""RULER-style long-context tasks with an exact token count and depth.

RULER (Hsieh et al., 2024) asks more of a long context than one passkey:
several needles, one of them asked for; several values under one key, all
of them asked for; a chain of variable assignments to follow; the most
common words of a long list. ``ruler_prompt(task, num_tokens, depth, rng,
tokenizer)`` writes one example of ``task`` in exactly ``num_tokens``
tokens, the graded evidence placed at ``depth``, and returns the answer a
model should continue the prompt with. The text is ASCII, so the byte
tokenizer gives a byte-level trained model the same task a loaded model
gets through its own tokenizer; the pieces are encoded separately and
concatenated (``tasks.piece_encoder``), so the count is exact for any
tokenizer.

==================  ====================================  ====================
task                the prompt                            answer
==================  ====================================  ====================
niah_multikey       ``num_keys`` needles "The special     the asked key's
                    magic number for KEY is: VALUE." in   value (7 digits)
                    the filler; one key asked
niah_multivalue     ``num_values`` needles with one key   all its values,
                    and distinct values                   ", "-joined, in text
                                                          order
variable_tracking   "VAR A = 12345.", then "VAR B = VAR   the chain's names,
                    A." ... (``num_hops`` hops), plus     space-joined, in
                    ``num_chains - 1`` distractor chains  chain order
common_words        a numbered word list: ``num_common``  the common words,
                    words ``common_freq`` times each,     ", "-joined, in order
                    the others ``uncommon_freq`` times    of first appearance
kv_retrieval        a JSON object of 8-character hex      the value (8 hex
                    keys and values; one key asked        characters)
==================  ====================================  ====================

Depth (a fraction in [0, 1]) places the evidence among the filler tokens as
the passkey prompt does (0: right after the instruction, 1: right before the
question): the asked needle (multikey), the first value (multivalue, the
others at random depths), the chain's first assignment (variable tracking:
its hops follow at random depths between it and the end), the asked pair
(kv_retrieval: its index among the pairs). The other needles sit at random
depths. ``common_words`` has no depth (``TASKS_WITH_DEPTH``).

Keys and words are pseudo-words of consonant-vowel syllables (a supply that
never runs out, readable by any tokenizer); the filler is the passkey
prompt's. The wording follows RULER's templates, shortened so that a
prompt with four needles fits in about 300 bytes; the sizes default to
RULER's (4 keys, 4 values, 4 hops) except common_words (3 words x 6, others
x 2, for the lengths a CPU runs).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import tasks as tasks_lib

__all__ = ["RULER_TASKS", "TASKS_WITH_DEPTH", "RulerExample", "ruler_prompt",
           "task_params"]

RULER_TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking",
               "common_words", "kv_retrieval")
TASKS_WITH_DEPTH = ("niah_multikey", "niah_multivalue", "variable_tracking",
                    "kv_retrieval")

_DEFAULTS = {
    "niah_multikey": dict(num_keys=4),
    "niah_multivalue": dict(num_values=4),
    "variable_tracking": dict(num_hops=4, num_chains=1),
    "common_words": dict(num_common=3, common_freq=6, uncommon_freq=2),
    "kv_retrieval": dict(),
}

_NIAH_HEAD = ("Some special magic numbers are hidden in the following text. "
              "Memorize them.\n")
_VT_HEAD = ("Memorize and track the chains of variable assignment in the "
            "following text.\n")
_CW_HEAD = ("Below is a numbered list of words. Some appear more often than "
            "others. Memorize the ones that appear most often.\n")
_KV_HEAD = ("Extract the value corresponding to the specified key in the "
            "JSON object below.\nJSON data:\n{")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True, eq=False)
class RulerExample:
  """One example.

  Attributes:
    prompt: int32 [num_tokens], the prompt's token ids.
    answer: int32 ids of the answer continuation (it starts with a space
      where the prompt ends in a word).
    answer_text: the answer as text (``answer`` decodes to it).
    evidence: token offsets in ``prompt`` where the graded evidence starts
      (the needles or statements the answer comes from, in text order; the
      asked pair for kv_retrieval; empty for common_words).
  """
  prompt: np.ndarray
  answer: np.ndarray
  answer_text: str
  evidence: tuple


def task_params(task: str, **params) -> dict:
  """The task's parameters: its defaults updated by ``params``.

  Raises:
    ValueError: an unknown task, parameter or a value out of range.
  """
  if task not in _DEFAULTS:
    raise ValueError(f"unknown RULER task {task!r}; allowed: {RULER_TASKS}")
  unknown = sorted(set(params) - set(_DEFAULTS[task]))
  if unknown:
    raise ValueError(f"RULER task {task!r} does not take {unknown}; its "
                     f"parameters: {sorted(_DEFAULTS[task])}")
  out = dict(_DEFAULTS[task], **params)
  for name, value in out.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{task}: {name}={value!r} must be an int >= 1")
  if task == "common_words" and out["uncommon_freq"] >= out["common_freq"]:
    raise ValueError(f"common_words: uncommon_freq={out['uncommon_freq']} "
                     f"must be < common_freq={out['common_freq']}")
  return out


def _words(rng: np.random.Generator, n: int, *, syllables=(2, 3, 4)
           ) -> list[str]:
  """``n`` distinct pseudo-words of consonant-vowel syllables."""
  out: dict[str, None] = {}
  while len(out) < n:
    count = int(rng.choice(syllables))
    out["".join(_CONSONANTS[rng.integers(len(_CONSONANTS))]
                + _VOWELS[rng.integers(len(_VOWELS))]
                for _ in range(count))] = None
  return list(out)


def _distinct(n: int, draw) -> list[str]:
  """``n`` distinct values of ``draw()``, in first-drawn order."""
  out: dict[str, None] = {}
  while len(out) < n:
    out[draw()] = None
  return list(out)


def _number(rng: np.random.Generator, digits: int) -> str:
  return str(rng.integers(10**(digits - 1), 10**digits))


def _names(rng: np.random.Generator, n: int) -> list[str]:
  return _distinct(n, lambda: "".join(
      chr(ord("A") + int(i)) for i in rng.integers(0, 26, 5)))


def _hex(rng: np.random.Generator) -> str:
  return "".join("0123456789abcdef"[int(i)] for i in rng.integers(0, 16, 8))


def _haystack(encode, num_tokens: int, head, tail,
              needles: Sequence[tuple[np.ndarray, float]]
              ) -> tuple[np.ndarray, list[int]]:
  """head + filler with ``needles`` ((ids, depth)) + tail, exactly
  ``num_tokens`` long; the needles' start offsets, in the given order.
  Needles at the same filler offset keep their given order."""
  budget = num_tokens - len(head) - len(tail) - sum(len(n) for n, _ in
                                                     needles)
  if budget < 0:
    raise ValueError(f"num_tokens={num_tokens} is too small: the prompt "
                     f"without filler takes {num_tokens - budget} tokens")
  unit = encode(tasks_lib.PASSKEY_FILLER + " ")
  filler = np.tile(unit, budget // max(1, len(unit)) + 1)[:budget]
  cuts = [int(round(depth * budget)) for _, depth in needles]
  order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
  pieces, at, done, starts = [head], len(head), 0, [0] * len(needles)
  for i in order:
    pieces.append(filler[done:cuts[i]])
    at += cuts[i] - done
    done = cuts[i]
    starts[i] = at
    pieces.append(needles[i][0])
    at += len(needles[i][0])
  pieces += [filler[done:], tail]
  return np.concatenate(pieces).astype(np.int32), starts


def _niah_multikey(rng, encode, num_tokens, depth, num_keys):
  keys = _words(rng, num_keys)
  values = _distinct(num_keys, lambda: _number(rng, 7))
  needles = [(encode(f"\nThe special magic number for {k} is: {v}.\n"),
              depth if i == 0 else float(rng.random()))
             for i, (k, v) in enumerate(zip(keys, values))]
  tail = encode(f"\nWhat is the special magic number for {keys[0]}? The "
                f"special magic number for {keys[0]} is")
  return needles, tail, [values[0]], ", "


def _niah_multivalue(rng, encode, num_tokens, depth, num_values):
  key = _words(rng, 1)[0]
  values = _distinct(num_values, lambda: _number(rng, 7))
  depths = [depth] + [float(d) for d in rng.random(num_values - 1)]
  needles = [(encode(f"\nThe special magic number for {key} is: {v}.\n"),
              d) for v, d in zip(values, depths)]
  tail = encode(f"\nWhat are all the special magic numbers for {key}? The "
                f"special magic numbers for {key} are")
  return needles, tail, values, ", "


def _variable_tracking(rng, encode, num_tokens, depth, num_hops, num_chains):
  names = _names(rng, num_chains * (num_hops + 1))
  values = _distinct(num_chains, lambda: _number(rng, 5))
  needles = []
  for c in range(num_chains):
    chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
    if c == 0:
      hops = sorted(depth + (1.0 - depth) * float(x)
                    for x in rng.random(num_hops))
      depths = [depth] + hops
    else:
      depths = sorted(float(x) for x in rng.random(num_hops + 1))
    lines = [f"VAR {chain[0]} = {values[c]}."] + [
        f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
    needles += [(encode(f"\n{line}\n"), d) for line, d in zip(lines, depths)]
  tail = encode(f"\nQuestion: Which variables are assigned the value "
                f"{values[0]}? Answer: {num_hops + 1} variables are assigned "
                f"the value {values[0]}, they are:")
  return needles, tail, names[:num_hops + 1], " "


def _common_words(rng, encode, num_tokens, head, num_common, common_freq,
                  uncommon_freq):
  """The numbered list fills the room left by head and tail; spaces pad the
  last tokens (fewer than one more uncommon word's)."""
  tail = encode(f"\nQuestion: What are the {num_common} most common words "
                f"in the list? Answer: The {num_common} most common words "
                "are:")
  room = num_tokens - len(head) - len(tail)
  cost = {}       # word -> tokens of one of its entries (without the number)

  def entry(word):
    if word not in cost:
      cost[word] = len(encode(f"{word}\n"))
    return cost[word]

  numbers = []    # tokens of the entry numbers "1. ", "2. ", ...

  def number_tokens(count):
    while len(numbers) < count:
      numbers.append(len(encode(f"{len(numbers) + 1}. ")))
    return sum(numbers[:count])

  # Common and uncommon words come from one pool, so they are distinct.
  pool = _words(rng, num_common + 64)
  common, uncommon = pool[:num_common], []
  used = sum(entry(w) for w in common) * common_freq
  if used + number_tokens(num_common * common_freq) > room:
    raise ValueError(
        f"num_tokens={num_tokens} is too small for common_words: "
        f"{num_common} words x {common_freq} need "
        f"{used + number_tokens(num_common * common_freq)} tokens, "
        f"{room} left")
  while True:
    if len(pool) <= num_common + len(uncommon):
      pool += [w for w in _words(rng, len(pool)) if w not in set(pool)]
      continue
    word = pool[num_common + len(uncommon)]
    count = (num_common * common_freq
             + (len(uncommon) + 1) * uncommon_freq)
    if used + entry(word) * uncommon_freq + number_tokens(count) > room:
      break
    uncommon.append(word)
    used += entry(word) * uncommon_freq
  listed = common * common_freq + uncommon * uncommon_freq
  listed = [listed[i] for i in rng.permutation(len(listed))]
  pieces = [head]
  for i, word in enumerate(listed):
    pieces += [encode(f"{i + 1}. "), encode(f"{word}\n")]
  body = sum(len(p) for p in pieces[1:])
  pad = encode(" ")
  if len(pad) != 1:
    raise ValueError("common_words pads with the token of ' ', which this "
                     "tokenizer does not encode as one token")
  pieces += [np.tile(pad, room - body), tail]
  first_seen = list(dict.fromkeys(w for w in listed if w in common))
  return np.concatenate(pieces).astype(np.int32), ", ".join(first_seen)


def _kv_retrieval(rng, encode, num_tokens, depth, head):
  """Pairs fill the room left by head and the question; spaces pad the
  last tokens (fewer than one more pair's). The asked pair is the
  ``round(depth * (pairs - 1))``-th."""
  tail_of = lambda key: encode(f"}}\nKey: \"{key}\"\nThe value associated "
                               "with the specified key is: \"")
  room = num_tokens - len(head) - len(tail_of("00000000"))
  seen, pairs, used = set(), [], 0
  while True:
    key, value = _hex(rng), _hex(rng)
    if key in seen:
      continue
    seen.add(key)
    piece = encode(("" if not pairs else ", ") + f"\"{key}\": \"{value}\"")
    if used + len(piece) > room:
      break
    pairs.append((key, value, piece))
    used += len(piece)
  if not pairs:
    raise ValueError(f"num_tokens={num_tokens} is too small for "
                     "kv_retrieval: not even one key-value pair fits")
  asked = int(round(depth * (len(pairs) - 1)))
  key, value, _ = pairs[asked]
  tail = tail_of(key)
  gap = num_tokens - len(head) - used - len(tail)
  while gap < 0 and len(pairs) > asked + 1:   # the key took more tokens
    gap += len(pairs.pop()[2])
  if gap < 0:
    raise ValueError(f"num_tokens={num_tokens} is too small for "
                     "kv_retrieval: the question does not fit")
  pad = encode(" ")
  if len(pad) != 1:
    raise ValueError("kv_retrieval pads with the token of ' ', which this "
                     "tokenizer does not encode as one token")
  start = len(head) + sum(len(p) for _, _, p in pairs[:asked])
  prompt = np.concatenate([head] + [p for _, _, p in pairs]
                          + [np.tile(pad, gap)[:gap], tail])
  return prompt.astype(np.int32), value, start


def ruler_prompt(task: str, num_tokens: int, depth, rng: np.random.Generator,
                 tokenizer, *, chat: bool = False, **params) -> RulerExample:
  """One example of ``task`` in exactly ``num_tokens`` tokens.

  Args:
    task: one of RULER_TASKS.
    num_tokens: the prompt's length in tokens (the answer not counted).
    depth: where the evidence sits, a fraction in [0, 1]; None (or any
      value) for common_words, which has none.
    rng: the example's random draws.
    tokenizer: anything with ``encode`` (``add_bos`` / ``bos_id`` as
      ``models.load_tokenizer`` has; ``apply_chat_template`` for ``chat``).
    chat: frame the prompt as one user message of the tokenizer's chat
      template, the assistant's turn opened with "Answer:" (the template's
      tokens count towards ``num_tokens``).
    **params: the task's sizes (``task_params``).

  Returns:
    A RulerExample.

  Raises:
    ValueError: an unknown task or parameter, a depth outside [0, 1], or
      ``num_tokens`` too small for the task's fixed text.
  """
  params = task_params(task, **params)
  if task in TASKS_WITH_DEPTH:
    if depth is None or not 0.0 <= float(depth) <= 1.0:
      raise ValueError(f"{task}: depth must lie in [0, 1], got {depth!r}")
    depth = float(depth)
  if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
    raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
  encode, bos = tasks_lib.piece_encoder(tokenizer)
  opening, closing = np.zeros(0, np.int32), np.zeros(0, np.int32)
  if chat:
    opening, closing = tasks_lib.chat_frame(tokenizer, assistant="Answer:")
    bos = np.zeros(0, np.int32)
  frame = lambda ids: np.concatenate([bos, opening, ids]).astype(np.int32)
  close = lambda ids: np.concatenate([ids, closing]).astype(np.int32)
  if task == "common_words":
    prompt, answer = _common_words(rng, encode, num_tokens - len(closing),
                                   frame(encode(_CW_HEAD, first=not chat)),
                                   **params)
    prompt = close(prompt)
    evidence = ()
  elif task == "kv_retrieval":
    head = frame(encode(_KV_HEAD, first=not chat))
    prompt, answer, start = _kv_retrieval(
        rng, encode, num_tokens - len(closing), depth, head)
    prompt = close(prompt)
    evidence = (start,)
    return RulerExample(prompt=prompt, answer=encode(answer),
                        answer_text=answer, evidence=evidence)
  else:
    build = dict(niah_multikey=_niah_multikey,
                 niah_multivalue=_niah_multivalue,
                 variable_tracking=_variable_tracking)[task]
    # The first needles carry the answer's parts.
    needles, tail, parts, joiner = build(rng, encode, num_tokens, depth,
                                         **params)
    head = frame(encode(_VT_HEAD if task == "variable_tracking"
                        else _NIAH_HEAD, first=not chat))
    prompt, starts = _haystack(encode, num_tokens, head, close(tail),
                               needles)
    evidence = tuple(sorted(starts[:len(parts)]))
    # In text order (needles at one filler offset keep their order).
    answer = joiner.join(p for _, p in sorted(zip(starts, parts)))
  return RulerExample(prompt=prompt, answer=encode(" " + answer),
                      answer_text=" " + answer, evidence=evidence)
