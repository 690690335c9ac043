"""GGUF SentencePiece BPE tokenizers (``tokenizer.ggml.model == "llama"``).

The vocabulary is learned here by a small BPE over a fixed text (pieces
scored by merge order, SentencePiece-style ``\u2581`` word starts, the 256
``<0xNN>`` byte tokens), written to a GGUF with scores and no merges, as
llama.cpp's converter writes Llama 2 / Mistral files. Ours is held to
``llama_cpp_spm`` below, llama.cpp's ``llm_tokenizer_spm`` restated (merge
the best-scored adjacent pair, leftmost on ties; bytes for what is left
unknown; a space before each stretch of text that starts the input or
follows a special token), and to transformers' GGUF tokenizer on the same
file wherever the two runtimes agree.
"""

import collections
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from extrapolax.models import load_tokenizer  # pylint: disable=g-import-not-at-top
from extrapolax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

SPACE = "\u2581"
CORPUS = (
    "The model reads the text one piece at a time. Attention looks back "
    "over every earlier piece; positions tell it how far back each one is. "
    "Trained on short texts, many models fail on longer ones, and the "
    "methods in this library change the positions, the mask or the scale "
    "so that they read further than they were trained. def forward(self, "
    "tokens):\n    return self.head(self.blocks(self.embed(tokens)))\n")
UNKNOWN, CONTROL, USER_DEFINED, BYTE = 2, 3, 4, 6
TEXTS = [
    "The model reads the text.",
    "Attention looks back over every earlier piece",
    "  two leading spaces and   three inside",
    " one leading space, trailing space ",
    "tabs\tand\nnew lines\n\n",
    "def f(x):\n    return x * 2\n",
    "caf\u00e9 na\u00efve \u65e5\u672c \U0001F642 \u00fcber",   # byte fallback
    "special </s> inside <s> the text <unk> and <tool> too",
    "</s>", "a</s>", "<s>b<tool>",
    "",
    " ",
    "Zzyzx qqq",
]


def learn_vocab(text, merges=120):
  """A SentencePiece-style BPE vocabulary: (pieces, scores) with the best
  (earliest) merge scored highest and single characters below every
  merge."""
  words = collections.Counter(SPACE + w for w in text.split())
  split = {w: list(w) for w in words}
  chars = sorted({c for w in words for c in w})
  learned = []
  for _ in range(merges):
    pairs = collections.Counter()
    for w, n in words.items():
      for a, b in zip(split[w], split[w][1:]):
        pairs[a, b] += n
    if not pairs:
      break
    (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
    learned.append(a + b)
    for w in words:
      s, out, i = split[w], [], 0
      while i < len(s):
        if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
          out.append(a + b)
          i += 2
        else:
          out.append(s[i])
          i += 1
      split[w] = out
  learned = list(dict.fromkeys(p for p in learned if p not in chars))
  pieces = learned + chars
  scores = [-float(i) for i in range(len(learned))] + [
      -1000.0 - i for i in range(len(chars))]
  return pieces, scores


def write_spm_gguf(path, *, add_space_prefix=None, add_bos=None,
                   with_merges=False):
  pieces, scores = learn_vocab(CORPUS)
  tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
            + pieces + ["<tool>"])
  all_scores = [0.0] * 259 + scores + [0.0]
  types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [1] * len(pieces) + [
      USER_DEFINED]
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_head_count_kv(2)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(tokens)
  writer.add_token_scores(all_scores)
  writer.add_token_types(types)
  if with_merges:
    writer.add_token_merges(
        [" ".join(m) for m in tokenizer_lib._merges_from_scores(  # pylint: disable=protected-access
            tokens, all_scores)])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  if add_space_prefix is not None:
    writer.add_add_space_prefix(add_space_prefix)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  writer.add_tensor("token_embd.weight",
                    np.zeros((len(tokens), 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


def _theirs(path):
  return transformers.AutoTokenizer.from_pretrained(
      str(path.parent), gguf_file=path.name)


def llama_cpp_spm(text, meta):
  """llama.cpp's SentencePiece tokenization of ``text`` (no BOS)."""
  tokens = meta["tokenizer.ggml.tokens"]
  scores = meta["tokenizer.ggml.scores"]
  types = meta["tokenizer.ggml.token_type"]
  prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
  vocab = {t: i for i, t in enumerate(tokens)}
  specials = sorted((t for t, k in zip(tokens, types)
                     if k in (UNKNOWN, CONTROL, USER_DEFINED)),
                    key=len, reverse=True)
  out, after_special = [], True
  for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
    if part in specials:
      out.append(vocab[part])
      after_special = True
      continue
    if not part:
      continue
    symbols = list(((" " if prefix and after_special else "") + part)
                   .replace(" ", SPACE))
    while True:
      best = None                       # (score, position): leftmost wins
      for i in range(len(symbols) - 1):
        merged = symbols[i] + symbols[i + 1]
        if merged in vocab and (best is None or
                                scores[vocab[merged]] > best[0]):
          best = (scores[vocab[merged]], i)
      if best is None:
        break
      i = best[1]
      symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    for piece in symbols:
      out.extend([vocab[piece]] if piece in vocab else
                 [vocab[f"<0x{b:02X}>"] for b in piece.encode()])
    after_special = False
  return out


def test_ids_equal_llama_cpp_and_text_round_trips(spm_file):
  from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  meta = gguf_lib.read_metadata(spm_file)
  ours = load_tokenizer(spm_file)
  assert (ours.bos_id, ours.eos_id) == (1, 2)
  merged = 0
  for text in TEXTS:
    ids = ours.encode(text, add_bos=False)
    assert ids == llama_cpp_spm(text, meta), repr(text)
    if "<" not in text:
      assert ours.decode(ids) == text, repr(text)
    merged += sum(len(ours.backend.id_to_token(i)) > 1 for i in ids
                  if i >= 259)
  assert merged > 20                  # the merges are exercised


def test_ids_equal_transformers_where_the_runtimes_agree(spm_file):
  ours, theirs = load_tokenizer(spm_file), _theirs(spm_file)
  agree = [t for t in TEXTS if not t.startswith(" ") and "<" not in t]
  assert len(agree) >= 6
  for text in agree:
    ids = ours.encode(text, add_bos=False)
    assert ids == theirs.encode(text, add_special_tokens=False), repr(text)
    assert ours.decode(ids) == theirs.decode(ids) == text, repr(text)
  # Where they differ, ours is llama.cpp's: a space before a leading one.
  spelled = lambda ids: "".join(ours.backend.id_to_token(i) for i in ids)
  assert spelled(ours.encode("  two", add_bos=False)) == SPACE * 3 + "two"
  assert spelled(theirs.encode("  two", add_special_tokens=False)
                 ) == SPACE * 2 + "two"
  # Characters the vocabulary lacks come out as their UTF-8 bytes.
  ids = ours.encode("\u65e5", add_bos=False)
  assert [ours.backend.id_to_token(i) for i in ids][-3:] == [
      "<0xE6>", "<0x97>", "<0xA5>"]
  # Written special and user-defined tokens stay whole.
  assert ours.encode("</s><tool>", add_bos=False)[-2:] == [2, ours.vocab_size - 1]


def test_bos_by_default_as_llama_cpp_and_transformers(spm_file, tmp_path):
  ours, theirs = load_tokenizer(spm_file), _theirs(spm_file)
  text = "The model reads the text."
  assert ours.add_bos and ours.encode(text)[0] == 1
  assert ours.encode(text) == theirs.encode(text)
  off = load_tokenizer(write_spm_gguf(tmp_path / "nobos.gguf", add_bos=False))
  assert off.encode(text) == ours.encode(text)[1:]


def test_merges_from_scores_equal_transformers(spm_file):
  from transformers.tokenization_utils_base import generate_merges  # pylint: disable=g-import-not-at-top
  from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  meta = gguf_lib.read_metadata(spm_file)
  tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
  ours = tokenizer_lib._merges_from_scores(tokens, scores)  # pylint: disable=protected-access
  theirs = generate_merges({t: i for i, t in enumerate(tokens)},
                           dict(zip(tokens, scores)))
  assert len(ours) > 100 and ours == [tuple(m) for m in theirs]


def test_written_merges_and_derived_ones_tokenize_alike(spm_file, tmp_path):
  written = load_tokenizer(write_spm_gguf(tmp_path / "m.gguf",
                                          with_merges=True))
  derived = load_tokenizer(spm_file)
  for text in TEXTS:
    assert written.encode(text) == derived.encode(text), repr(text)


def test_no_space_prefix_when_the_file_says_so(spm_file, tmp_path):
  plain = load_tokenizer(write_spm_gguf(tmp_path / "np.gguf",
                                        add_space_prefix=False))
  prefixed = load_tokenizer(spm_file)
  token = lambda tok, text: tok.backend.id_to_token(
      tok.encode(text, add_bos=False)[0])
  assert token(prefixed, "The model").startswith(SPACE)
  assert not token(plain, "The model").startswith(SPACE)
  for text in TEXTS:
    if "<" not in text:
      assert plain.decode(plain.encode(text, add_bos=False)) == text


def test_unsupported_or_incomplete_files_are_one_line_errors(tmp_path):
  from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  meta = gguf_lib.read_metadata(write_spm_gguf(tmp_path / "e.gguf"))
  with pytest.raises(ValueError, match=r"tokenizer.ggml.model='t5' is not "
                     r"supported; supported: 'gpt2' \(byte-level BPE\), "
                     r"'llama' \(SentencePiece BPE\)"):
    tokenizer_lib.from_gguf_metadata(dict(meta, **{
        "tokenizer.ggml.model": "t5"}))
  no_scores = {k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"}
  with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
    tokenizer_lib.from_gguf_metadata(no_scores)
  with pytest.raises(ValueError, match="has 3 entries for"):
    tokenizer_lib.from_gguf_metadata(dict(meta, **{
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0]}))


def test_continuations_get_no_dummy_space(spm_file):
  tok = load_tokenizer(spm_file)
  spelled = lambda ids: "".join(tok.backend.id_to_token(i) for i in ids)
  assert spelled(tok.encode("model reads", add_bos=False)) == (
      SPACE + "model" + SPACE + "reads")
  assert spelled(tok.encode("model reads", add_bos=False, continues=True)
                 ) == "model" + SPACE + "reads"
  # Special tokens written in a continuation still match whole, and the text
  # after one gets its space, as in the whole text.
  whole = tok.encode("model reads</s>the text<tool>model", add_bos=False)
  assert spelled(whole) == "".join([
      SPACE, "model", SPACE, "reads</s>", SPACE, "the", SPACE, "text<tool>",
      SPACE, "model"])
  piece = tok.encode("the text<tool>model", add_bos=False, continues=True)
  assert spelled(piece) == "the" + SPACE + "text<tool>" + SPACE + "model"
  assert piece[-2:] == whole[-2:]


def test_prompt_pieces_join_like_one_text(spm_file):
  from extrapolax.experiments.data import ruler, tasks  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer(spm_file)
  prompt, answer = tasks.passkey_prompt(300, 0.5, "12345", tok)
  assert prompt[0] == tok.bos_id and len(prompt) == 300
  text = tok.decode(list(prompt) + list(answer), skip_special_tokens=True)
  # One space before the text (dropped by decode), none added per piece.
  assert text.startswith(tasks.PASSKEY_INSTRUCTION + "\n")
  assert "  " not in text and " \n" not in text
  assert text.endswith(tasks.PASSKEY_QUESTION + " 12345")
  # (common_words pads with spaces and kv_retrieval indents its JSON.)
  for task in ("niah_multikey", "niah_multivalue", "variable_tracking"):
    example = ruler.ruler_prompt(task, 400, 0.5, np.random.default_rng(0),
                                 tok)
    text = tok.decode(example.prompt, skip_special_tokens=True)
    assert "  " not in text and " \n" not in text, task


def test_random_llama_with_a_sentencepiece_tokenizer(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from extrapolax.experiments.data import tasks  # pylint: disable=g-import-not-at-top
  from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  from extrapolax.models import load_gguf  # pylint: disable=g-import-not-at-top
  path = gguf_lib.write_random_llama(tmp_path / "spm.gguf", tokenizer="llama")
  tok, model = load_tokenizer(path), load_gguf(path)
  assert tok.vocab_size == model.config.vocab_size == 261
  text = "Hello  world\n caf\u00e9"
  ids = tok.encode(text)
  assert ids[:2] == [1, 259] and tok.decode(ids[1:]) == text
  prompt, answer = tasks.passkey_prompt(400, 0.5, "42", tok, chat=True)
  assert tok.decode(list(prompt) + list(answer), skip_special_tokens=True
                    ).endswith("assistant\nThe pass key is 42")
  logits = np.asarray(model(jnp.asarray([prompt[:64]])))
  assert logits.shape == (1, 64, 261) and np.isfinite(logits).all()
  with pytest.raises(ValueError, match="tokenizer='t5'; allowed: 'gpt2'"):
    gguf_lib.write_random_llama(tmp_path / "x.gguf", tokenizer="t5")


@pytest.mark.parametrize("space", ["prepend", "metaspace"])
def test_tokenizer_json_continuations(spm_file, tmp_path, space):
  """A SentencePiece tokenizer.json (Llama 2's Prepend normalizer, or a
  newer file's Metaspace pre-tokenizer) encodes pieces like the whole text;
  a byte-level one is left as it is."""
  import json  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  backend = tokenizers.Tokenizer.from_str(
      load_tokenizer(spm_file).backend.to_str())
  if space == "metaspace":
    backend.normalizer = None
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first", split=False)
  backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
      bos_token="<s>", eos_token="</s>", add_bos_token=True)))
  tok = load_tokenizer(tmp_path)
  assert tok.add_bos and tok.bos_id == 1
  for first, rest in [("The model", " reads the text."),
                      ("The model", " reads</s>the text<tool> model")]:
    assert (tok.encode(first) + tok.encode(rest, add_bos=False,
                                           continues=True)
            == tok.encode(first + rest)), (first, rest)
  assert tok.encode("the", continues=True) != tok.encode("the")
  byte_level = load_tokenizer(gguf_lib.write_random_llama(
      tmp_path / "bpe.gguf"))
  text = " lead and\n trail "
  assert byte_level.encode(text, continues=True) == byte_level.encode(text)
  assert tokenizer_lib._continuation_of(byte_level.backend) is None  # pylint: disable=protected-access
