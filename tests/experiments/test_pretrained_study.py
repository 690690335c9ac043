"""The study main on a loaded model (config.model_source): a tiny random
Llama GGUF with a byte-level BPE tokenizer and a ChatML template
(models.gguf.write_random_llama), run end to end by experiments/configs/pretrained.py:smoke;
and each variant the study builds changes only what it should."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from extrapolax.experiments import extrapolation  # pylint: disable=g-import-not-at-top
from extrapolax.experiments import records as records_lib  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.configs import pretrained as pretrained_config  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.data import long_documents  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.data import tasks  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.evaluators import passkey as passkey_lib  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.evaluators import mask_sweep  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.evaluators import variants  # pylint: disable=g-import-not-at-top
from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
from extrapolax.models import load_gguf, load_tokenizer  # pylint: disable=g-import-not-at-top

CONTEXT = 64
D, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64


def write_tiny_gguf(path, seed=0):
  """The library's random tiny Llama GGUF (context 64, ChatML template)."""
  return gguf_lib.write_random_llama(path, context=CONTEXT, d_model=D,
                                     layers=LAYERS, heads=HEADS,
                                     kv_heads=KV_HEADS, ffn=FFN, seed=seed)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
  return load_gguf(tiny_gguf)


def _logits(model, tokens):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens)))


def _tokens(length=3 * CONTEXT, seed=1):
  return np.random.RandomState(seed).randint(0, 256, (1, length))


def test_tokenizer_from_the_tiny_gguf(tiny_gguf):
  tokenizer = load_tokenizer(tiny_gguf)
  ids = tokenizer.encode("def f(x):\n  return x")
  assert ids == list(b"def f(x):\n  return x")
  assert tokenizer.decode(ids) == "def f(x):\n  return x"


def test_join_documents():
  texts = ["a" * 5, "", "b" * 3, "c" * 10, "d" * 2]
  docs = long_documents.join_documents(texts, lambda t: list(t.encode()),
                                       min_tokens=8)
  assert [len(d) for d in docs] == [5 + 2 + 3, 10]   # "\n\n" joins
  assert bytes(docs[0].tolist()) == b"aaaaa\n\nbbb"
  assert len(long_documents.join_documents(
      texts, lambda t: list(t.encode()), min_tokens=8, max_tokens=1)) == 1
  with pytest.raises(ValueError, match="min_tokens"):
    long_documents.join_documents(texts, list, min_tokens=0)


@pytest.mark.parametrize("method", variants.ROPE_SCALINGS)
def test_factor_one_scalings_equal_none(tiny, method):
  tokens = _tokens(CONTEXT)
  want = _logits(tiny, tokens)
  build = lambda factor: variants.with_rope_scaling(
      tiny, variants.rope_scaling_dict(method, factor, CONTEXT),
      train_len=CONTEXT)
  np.testing.assert_allclose(_logits(build(1.0), tokens), want, rtol=1e-5,
                             atol=1e-5)
  if method == "dynamic":   # the same inside the context, scaled past it
    np.testing.assert_allclose(_logits(build(4.0), tokens), want, rtol=1e-5,
                               atol=1e-5)
    longer = _tokens(3 * CONTEXT)
    assert np.abs(_logits(build(1.0), longer)
                  - _logits(tiny, longer)).max() > 1e-3
  else:
    assert np.abs(_logits(build(4.0), tokens) - want).max() > 1e-3


def test_masks_and_self_extend_change_only_what_they_should(tiny):
  tokens = _tokens()
  n = tokens.shape[1]
  want = _logits(tiny, tokens)
  same = lambda entry, window: _logits(mask_sweep.mask_variant(
      tiny, entry, window=window, num_sinks=4), tokens)
  # A window / band covering every key is plain causal.
  for entry in ("causal", "sliding_window", "lambda", "lambda+ceiling",
                "causal+self_extend(1, 8)", "causal+self_extend(4, 256)"):
    np.testing.assert_allclose(same(entry, n), want, rtol=1e-5, atol=1e-5,
                               err_msg=entry)
  # Shorter windows change only positions past the window.
  for entry in ("sliding_window", "lambda", "lambda+ceiling",
                "causal+self_extend(4, 16)"):
    got = same(entry, 16)
    np.testing.assert_allclose(got[:, :16], want[:, :16], rtol=1e-5,
                               atol=1e-5, err_msg=entry)
    assert np.abs(got[:, 16:] - want[:, 16:]).max() > 1e-3, entry
  # The ceiling only changes sink keys farther than the band (16): from
  # query 17 on.
  lam, ceil = same("lambda", 16), same("lambda+ceiling", 16)
  np.testing.assert_allclose(ceil[:, :17], lam[:, :17], rtol=1e-5, atol=1e-5)
  assert np.abs(ceil[:, 17:] - lam[:, 17:]).max() > 1e-4


@pytest.mark.parametrize("entry", ["causal+self_extend(0, 8)",
                                   "causal+self_extend(2)"])
def test_bad_self_extend_entries(entry):
  with pytest.raises(ValueError, match="self_extend"):
    mask_sweep.check_entries([entry], window=8)


def _smoke(tiny_gguf):
  return pretrained_config.get_config(
      f"smoke,model={tiny_gguf},train_len={CONTEXT}")


def test_study_main_on_a_tiny_gguf(tiny_gguf, tmp_path):
  config = _smoke(tiny_gguf)
  result = extrapolation.run_study(config, tmp_path)
  assert result.trained == [] and not os.path.exists(tmp_path / "runs")
  assert sorted(result.evaluated) == ["length/model", "mask/model",
                                      "passkey/model", "passkey_greedy/model",
                                      "rope_scaling/model"]
  records = records_lib.read(os.fspath(tmp_path / "results.jsonl"))
  for r in records:
    records_lib.make_record(**r)   # valid fields
    assert r["model"] == "model" and r["step"] == 0
  ppl = [r for r in records if r["metric"] == "perplexity"]
  assert all(np.isfinite(r["value"]) and r["n_tokens"] > 0 for r in ppl)
  length = {r["eval_len"] for r in ppl if r["experiment"] == "length"}
  assert length == {16, 64, 128}
  masks = {r["mask"] for r in ppl if r["experiment"] == "mask"}
  assert len(masks) == 6 and any("self_extend(2, 8)" in m for m in masks)
  # STRING (shift 40 < 128) re-scores the far pairs: not the causal number.
  string = [r["value"] for r in ppl if r["experiment"] == "mask"
            and "string(40, 8)" in r["mask"]]
  plain = [r["value"] for r in ppl if r["experiment"] == "mask"
           and r["mask"] == "causal"]
  assert len(string) == 1 and abs(string[0] - plain[0]) > 1e-4 * plain[0]
  scalings = {records_lib.variant_label(r) for r in ppl
              if r["experiment"] == "rope_scaling"}
  assert len(scalings) == 6
  positions = {r["experiment"] for r in records
               if r["metric"] == "position_nll"}
  assert positions == {"length", "mask", "rope_scaling"}   # every arm's
  # The causal mask entry and the unscaled model are the length column.
  causal = [r["value"] for r in ppl if r["experiment"] == "mask"
            and r["mask"] == "causal"]
  base = [r["value"] for r in ppl if r["experiment"] == "length"
          and r["eval_len"] == 128]
  np.testing.assert_allclose(causal, base, rtol=1e-5)
  # The chat-framed passkey grid: both variants, every length and depth
  # (teacher-forced); greedy at one depth, with the answers it decoded.
  keys = [r for r in records if r["metric"] == "passkey_accuracy"]
  forced = {(r["mask"], r["eval_len"], r["depth"]): r["value"] for r in keys
            if r["experiment"] == "passkey"}
  greedy = {(r["mask"], r["eval_len"], r["depth"]): r for r in keys
            if r["experiment"] == "passkey_greedy"}
  assert {k[1] for k in forced} == {384, 512} and len(forced) == 2 * 2 * 3
  assert len({k[0] for k in forced}) == 2
  assert greedy.keys() <= forced.keys() and len(greedy) == 2 * 2
  for k, r in greedy.items():
    assert r["decode"] == "greedy" and len(r["answers"]) == r["n_trials"]
  report = open(result.report, encoding="utf-8").read()
  assert "perplexity" in report.lower() and "self_extend" in report
  assert "passkey_greedy" in report and "What greedy decoding said" in report
  assert os.path.isfile(tmp_path / "passkey_passkey_accuracy_passkey.png")
  assert os.path.isfile(tmp_path / "mask_position_nll_nonoverlap.png")
  # The documents were tokenized by the model's tokenizer and cached.
  assert [n for n in os.listdir(tmp_path / "data")
          if n.startswith("long_documents_")]
  # A rerun reuses every finished evaluation.
  again = extrapolation.run_study(config, tmp_path)
  assert again.evaluated == [] and len(again.skipped) == 5
  assert len(records_lib.read(os.fspath(tmp_path / "results.jsonl"))) == len(
      records)
  # Changing a setting reruns only that evaluation.
  config.evals.mask.num_sinks = 2
  third = extrapolation.run_study(config, tmp_path)
  assert third.evaluated == ["mask/model"]
  saved = json.load(open(tmp_path / "config.json", encoding="utf-8"))
  assert saved["model_source"] == tiny_gguf


@pytest.mark.parametrize("field,value,match", [
    ("model_source", "/no/such/model.gguf", "model_source"),
    ("variants", "a,b", "variants"),
    ("train.data.corpora", "no_such_corpus", "corpora"),
    ("train.data.min_doc_tokens", 0, "min_doc_tokens"),
    ("evals.mask.position_buckets", -1, "position_buckets"),
])
def test_bad_source_config(tiny_gguf, field, value, match):
  config = _smoke(tiny_gguf)
  target = config
  *parents, last = field.split(".")
  for p in parents:
    target = target[p]
  target[last] = value
  with pytest.raises(ValueError, match=match):
    extrapolation.validate_config(config)


def test_chat_passkey_prompt_on_the_tiny_tokenizer(tiny_gguf):
  tokenizer = load_tokenizer(tiny_gguf)
  prompt, key = tasks.passkey_prompt(400, 0.5, "31415", tokenizer, chat=True)
  assert len(prompt) == 400 and bytes(key.tolist()) == b" 31415"
  text = tokenizer.decode(prompt)
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n"
                         "<|im_start|>user\nThere is an important info")
  assert text.endswith("What is the pass key?<|im_end|>\n"
                       "<|im_start|>assistant\nThe pass key is")
  assert text.count("The pass key is 31415. Remember it.") == 1
  plain, _ = tasks.passkey_prompt(400, 0.5, "31415", tokenizer)
  assert tokenizer.decode(plain).endswith("What is the pass key? The pass "
                                          "key is")
  with pytest.raises(ValueError, match="too small"):
    tasks.passkey_prompt(200, 0.5, "31415", tokenizer, chat=True)


def test_passkey_greedy_by_prefill_equals_teacher_forced(tiny):
  """The KV-cache greedy path and one teacher-forced forward agree on every
  trial, for the model and its Self-Extend variant."""
  for model in (tiny, mask_sweep.mask_variant(
      tiny, "causal+self_extend(2, 8)", window=CONTEXT, num_sinks=0)):
    prompts = [np.random.RandomState(i).randint(0, 256, 150).astype(np.int32)
               for i in range(3)]
    got = passkey_lib.greedy_by_prefill(model, prompts, 4, batch_size=2)
    want = passkey_lib.greedy_continuations(model, prompts, 4, batch_size=2)
    np.testing.assert_array_equal(got, want)


def test_passkey_settings_errors(tiny_gguf):
  config = _smoke(tiny_gguf)
  for field, value, match in (("decode", "beam", "decode"),
                              ("trials", 0, "trials"),
                              ("masks", "no_such_mask", "no_such_mask")):
    bad = _smoke(tiny_gguf)
    bad.evals.passkey[field] = value
    with pytest.raises(ValueError, match=match):
      extrapolation.validate_config(bad)
  config.model_source = None
  from extrapolax.experiments.evals import passkey as passkey_eval  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="model_source"):
    passkey_eval._tokenizer_setting(dict(tokenizer="model"), config)  # pylint: disable=protected-access


def test_head_in_chunks_equals_the_whole_head(tiny, monkeypatch):
  from extrapolax.experiments.evaluators import perplexity  # pylint: disable=g-import-not-at-top
  tokens = _tokens(2 * CONTEXT + 1)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  whole = np.asarray(perplexity.model_nll_fn(tiny)(inputs, targets))
  monkeypatch.setattr(perplexity, "HEAD_CHUNK_LOGITS",
                      tiny.config.vocab_size * 24)   # 24 -> chunks of 16
  chunked = np.asarray(perplexity.model_nll_fn(tiny)(inputs, targets))
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  # The passkey's teacher-forced argmax, in chunks, equals the logits'.
  from extrapolax.experiments.evaluators import algorithmic  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(
      np.asarray(algorithmic.model_argmax_fn(tiny)(inputs)),
      _logits(tiny, inputs).argmax(-1))
  logp = np.asarray(jax.nn.log_softmax(_logits(tiny, inputs)))
  np.testing.assert_allclose(
      whole, -np.take_along_axis(logp, targets[..., None], -1)[..., 0],
      rtol=1e-5, atol=1e-5)
