"""Real tokenizers on the ``tokenizers`` library: from GGUF metadata, from a
Hugging Face ``tokenizer.json``, or by zoo name.

``load_tokenizer(path_or_name)`` returns a :class:`Tokenizer` with
``encode(text) -> list[int]``, ``decode(ids) -> str``, ``bos_id``, ``eos_id``
and ``chat_template`` (the file's Jinja template string, or None).

GGUF byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is rebuilt the way
llama.cpp runs it: the vocabulary and merges from the metadata; control
tokens (``token_type`` 3) as special added tokens and user-defined ones (4)
as added tokens, both matched whole; the pre-tokenizer is llama.cpp's list of
split regexes for ``tokenizer.ggml.pre`` (``llama-vocab.cpp``), each applied
in turn, then the GPT-2 byte mapping. ``encode`` adds BOS only when the file
says ``tokenizer.ggml.add_bos_token``.

GGUF SentencePiece BPE (``tokenizer.ggml.model == "llama"``: Llama 1/2,
Mistral, TinyLlama, Vicuna ...) is rebuilt the way llama.cpp runs it
(``llm_tokenizer_spm``): spaces become ``▁``; one ``▁`` goes before
the text and after each special token unless the file says
``tokenizer.ggml.add_space_prefix`` false; adjacent pieces merge best score
first; a character the vocabulary lacks falls back to its UTF-8 bytes
(``<0xNN>`` tokens). Files without ``tokenizer.ggml.merges`` get them from
the scores: every split of a token into two vocabulary tokens, ranked by the
token's score (ties: the longer left piece, then the longer right one; llama.cpp
takes the leftmost pair, which differs only where two splits of one token
are live at once). ``encode`` adds BOS unless the file says
``add_bos_token`` false, as llama.cpp does.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

__all__ = ["PRE_TOKENIZERS", "Tokenizer", "load_tokenizer"]

_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
         r"|\s+(?!\S)")
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
           r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
          r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> llama.cpp's split regexes, applied in order.
PRE_TOKENIZERS = {
    "default": (_GPT2,), "gpt2": (_GPT2,), "gpt-2": (_GPT2,),
    "mpt": (_GPT2,), "olmo": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2), "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2), "command-r": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2), "exaone": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,), "llama-bpe": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,), "dbrx": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}
# llama.cpp takes a whole word from the vocabulary before merging for these.
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")
# token_type: llama.cpp matches UNKNOWN and CONTROL tokens written in the
# text as special tokens, USER_DEFINED ones as plain added tokens.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tokenizers are built on the tokenizers package: "
                      "pip install 'extrapolax[gguf]'") from e
  return tokenizers


class Tokenizer:
  """A ``tokenizers.Tokenizer`` with the model's special ids.

  Attributes:
    backend: the ``tokenizers.Tokenizer``.
    bos_id, eos_id: special ids (None when unknown).
    add_bos: whether ``encode`` prepends ``bos_id`` by default.
    chat_template: the Jinja chat template string, or None.
  """

  def __init__(self, backend, *, bos_id: Optional[int] = None,
               eos_id: Optional[int] = None, add_bos: bool = False,
               chat_template: Optional[str] = None):
    self.backend = backend
    self._continuation = _UNSET   # see _continuation_of
    self.bos_id, self.eos_id = bos_id, eos_id
    self.add_bos = add_bos
    self.chat_template = chat_template
    if add_bos and bos_id is None:
      raise ValueError("add_bos=True needs a bos_id")

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: Optional[bool] = None,
             continues: bool = False) -> list[int]:
    """Token ids of ``text`` (special tokens written in it are matched).

    ``continues=True``: ``text`` follows earlier text of the same prompt, so
    a SentencePiece tokenizer (GGUF or tokenizer.json) puts no dummy space
    before it (one goes before the start of a text only, and after special
    tokens as usual); byte-level BPE adds none either way. Encoding a prompt
    in pieces, the first piece has ``continues=False``.
    """
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    if continues and self._continuation is _UNSET:
      self._continuation = _continuation_of(self.backend)
    if continues and self._continuation is not None:
      # No space before the text itself, but one after each special token
      # in it, as on the whole text: the part up to the first added token
      # without the prefix, the rest as usual.
      plain, added = self._continuation
      found = added.search(text) if added is not None else None
      cut = found.start() if found else len(text)
      ids = (plain.encode(text[:cut], add_special_tokens=False).ids
             + self.backend.encode(text[cut:], add_special_tokens=False).ids)
    else:
      ids = self.backend.encode(text, add_special_tokens=False).ids
    if self.add_bos if add_bos is None else add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no bos_id")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], *,
             skip_special_tokens: bool = False) -> str:
    """The text of ``ids`` (special tokens kept unless skipped)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} are outside the vocabulary "
                       f"[0, {self.vocab_size})")
    return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, *,
                          add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` ([{"role": ..., "content": ...}])
    under the file's chat template (rendered by jinja2, sandboxed)."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    try:
      from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("chat templates are rendered by jinja2: "
                        "pip install jinja2") from e
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                lstrip_blocks=True)
    token = lambda i: None if i is None else self.backend.id_to_token(i)
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=token(self.bos_id), eos_token=token(self.eos_id))

  def __repr__(self):
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id})")


_UNSET = object()


def _continuation_of(backend):
  """(a copy of ``backend`` without SentencePiece's dummy prefix space, a
  regex of its added tokens) for text that continues earlier text, or None
  when ``backend`` adds no such space. The space comes from a ``Prepend``
  normalizer (llama.cpp's behaviour, Llama 2's tokenizer.json) or a
  ``Metaspace`` pre-tokenizer that prepends (newer tokenizer.json files)."""
  spec = json.loads(backend.to_str())
  changed = False

  def strip(node, kind):
    nonlocal changed
    if not isinstance(node, dict):
      return node
    if node.get("type") == "Sequence":
      key = "normalizers" if kind == "normalizer" else "pretokenizers"
      parts = [strip(n, kind) for n in node.get(key, [])]
      return dict(node, **{key: [n for n in parts if n is not None]})
    if kind == "normalizer" and node.get("type") == "Prepend":
      changed = True
      return None
    if (kind == "pre_tokenizer" and node.get("type") == "Metaspace"
        and node.get("prepend_scheme", "always") != "never"):
      changed = True
      return dict(node, prepend_scheme="never")
    return node

  for kind in ("normalizer", "pre_tokenizer"):
    spec[kind] = strip(spec.get(kind), kind)
  if not changed:
    return None
  added = sorted((t["content"] for t in spec.get("added_tokens", [])),
                 key=len, reverse=True)
  plain = _tokenizers().Tokenizer.from_str(json.dumps(spec))
  return plain, (re.compile("|".join(map(re.escape, added))) if added
                 else None)


def _merges_from_scores(tokens, scores):
  """SentencePiece BPE merges implied by a scored vocabulary: each split of
  a token into two vocabulary tokens, best token score first."""
  vocab = {t: i for i, t in enumerate(tokens)}
  ranked = []
  for index, (token, score) in enumerate(zip(tokens, scores)):
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        ranked.append(((-float(score), -len(left), -len(right), index,
                        vocab[left], vocab[right]), (left, right)))
  ranked.sort(key=lambda item: item[0])
  return [pair for _, pair in ranked]


def _byte_level(tk, meta, tokens):
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; "
                     f"supported: {tuple(PRE_TOKENIZERS)}")
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  bpe = tk.models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES)
  backend = tk.Tokenizer(bpe)
  backend.pre_tokenizer = tk.pre_tokenizers.Sequence(
      [tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated")
       for r in PRE_TOKENIZERS[pre]]
      + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                     use_regex=False)])
  backend.decoder = tk.decoders.ByteLevel()
  return backend, False


def _sentencepiece(tk, meta, tokens):
  if meta.get("tokenizer.ggml.merges") is not None:
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  elif meta.get("tokenizer.ggml.scores") is not None:
    scores = list(meta["tokenizer.ggml.scores"])
    if len(scores) != len(tokens):
      raise ValueError(f"GGUF tokenizer.ggml.scores has {len(scores)} "
                       f"entries for {len(tokens)} tokens")
    merges = _merges_from_scores(tokens, scores)
  else:
    raise ValueError("GGUF tokenizer.ggml.model='llama' needs "
                     "tokenizer.ggml.scores or tokenizer.ggml.merges")
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = tk.Tokenizer(tk.models.BPE(vocab, merges, fuse_unk=True,
                                       byte_fallback=True))
  # llama.cpp (and SentencePiece's dummy prefix) put one space before each
  # stretch of text that starts the input or follows a special token, even
  # one that starts with spaces: a normalizer does that, as Llama 2's own
  # tokenizer.json does. (transformers' GGUF conversion uses Metaspace
  # instead, which adds none before a leading space or after a special
  # token.)
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  backend.normalizer = tk.normalizers.Sequence(
      ([tk.normalizers.Prepend("\u2581")] if prefix else [])
      + [tk.normalizers.Replace(" ", "\u2581")])
  steps = [tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(),
           tk.decoders.Fuse()]
  if prefix:
    steps.append(tk.decoders.Strip(content=" ", left=1))
  backend.decoder = tk.decoders.Sequence(steps)
  return backend, True


# tokenizer.ggml.model -> (builder, what it is).
_GGUF_MODELS = {"gpt2": (_byte_level, "byte-level BPE"),
                "llama": (_sentencepiece, "SentencePiece BPE")}


def from_gguf_metadata(meta) -> Tokenizer:
  """A Tokenizer from a GGUF file's ``tokenizer.*`` metadata."""
  tk = _tokenizers()
  model = meta.get("tokenizer.ggml.model")
  if model not in _GGUF_MODELS:
    raise ValueError(
        f"GGUF tokenizer.ggml.model={model!r} is not supported; supported: "
        + ", ".join(f"{k!r} ({v[1]})" for k, v in _GGUF_MODELS.items()))
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  if len(set(tokens)) != len(tokens):
    raise ValueError("GGUF tokenizer.ggml.tokens has duplicate tokens")
  backend, bos_by_default = _GGUF_MODELS[model][0](tk, meta, tokens)
  special = [tk.AddedToken(t, special=True, normalized=False)
             for t, k in zip(tokens, types) if k in (_UNKNOWN, _CONTROL)]
  user = [tk.AddedToken(t, special=False, normalized=False)
          for t, k in zip(tokens, types) if k == _USER_DEFINED]
  backend.add_special_tokens(special)
  backend.add_tokens(user)
  if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError("GGUF tokenizer: added tokens changed the vocabulary "
                     "size (a control token missing from the vocabulary?)")
  get = lambda k: None if meta.get(k) is None else int(meta[k])
  bos_id = get("tokenizer.ggml.bos_token_id")
  return Tokenizer(backend, bos_id=bos_id,
                   eos_id=get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token",
                                         bos_by_default and bos_id is not None
                                         )),
                   chat_template=meta.get("tokenizer.chat_template"))


def _from_tokenizer_json(path: str) -> Tokenizer:
  tk = _tokenizers()
  folder = os.path.dirname(path)
  backend = tk.Tokenizer.from_file(path)
  ids = {}
  config_file = os.path.join(folder, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_file):
    with open(config_file) as fh:
      config = json.load(fh)
  for name in ("bos", "eos"):
    token = config.get(f"{name}_token")
    if isinstance(token, dict):
      token = token.get("content")
    ids[name] = None if token is None else backend.token_to_id(token)
  template = config.get("chat_template")
  return Tokenizer(backend, bos_id=ids["bos"], eos_id=ids["eos"],
                   add_bos=bool(config.get("add_bos_token", False))
                   and ids["bos"] is not None,
                   chat_template=template if isinstance(template, str)
                   else None)


def load_tokenizer(path_or_name) -> Tokenizer:
  """A tokenizer from a GGUF file, a tokenizer.json (or its folder), or a
  real model's zoo name (e.g. "smollm2-135m-instruct").

  Raises:
    ValueError: nothing tokenizer-like at ``path_or_name``, or a tokenizer
      kind that is not supported.
  """
  from . import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  from . import pretrained  # pylint: disable=g-import-not-at-top

  text = os.fspath(path_or_name)
  path = os.path.expanduser(text)
  if text in pretrained.MODELS and not os.path.exists(path):
    path = pretrained.gguf_path(text)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"no tokenizer.json in {text!r}")
  if not os.path.isfile(path):
    raise ValueError(
        f"{text!r} is neither a GGUF file, a tokenizer.json (or a folder "
        f"with one) nor a real model name in {tuple(pretrained.MODELS)}")
  with open(path, "rb") as fh:
    magic = fh.read(4)
  if magic == b"GGUF":
    return from_gguf_metadata(gguf_lib.read_metadata(path))
  return _from_tokenizer_json(path)
