"""The tensorstore token store and build_store's caching."""

import json
import os

import numpy as np
import pytest

from extrapolax.experiments import data


def test_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50_000, n) for n in (7, 0, 1, 300, 42)]
  meta = {"corpus": "unit", "nested": {"a": [1, 2]}}
  path = str(tmp_path / "store")
  created = data.TokenStore.create(path, docs, metadata=meta)
  store = data.TokenStore.open(path)
  for s in (created, store):
    assert s.num_documents == 5 and s.num_tokens == 350
    np.testing.assert_array_equal(s.offsets, [0, 7, 7, 8, 308, 350])
    assert s.offsets.dtype == np.int64
    assert s.metadata == meta
    for i, doc in enumerate(docs):
      got = s.document(i)
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, doc)
  flat = np.concatenate(docs)
  np.testing.assert_array_equal(store.tokens(), flat)
  np.testing.assert_array_equal(store.tokens(5, 100), flat[5:100])
  np.testing.assert_array_equal(store.document(-1), docs[-1])
  index = rng.integers(0, 350, (3, 4))
  np.testing.assert_array_equal(store.gather(index), flat[index])
  np.testing.assert_array_equal(store.document_lengths, [7, 0, 1, 300, 42])
  # On disk: zarr arrays plus metadata.json.
  assert sorted(os.listdir(path)) == ["metadata.json", "offsets", "tokens"]
  with open(os.path.join(path, "metadata.json"), encoding="utf-8") as f:
    assert json.load(f)["num_tokens"] == 350
  assert [p for p in os.listdir(tmp_path) if p != "store"] == []


def test_errors_and_overwrite(tmp_path):
  path = str(tmp_path / "store")
  data.TokenStore.create(path, [[1, 2, 3]])
  with pytest.raises(ValueError, match="overwrite=True"):
    data.TokenStore.create(path, [[4]])
  data.TokenStore.create(path, [[4], [5, 6]], overwrite=True)
  store = data.TokenStore.open(path)
  assert store.num_documents == 2
  np.testing.assert_array_equal(store.tokens(), [4, 5, 6])
  with pytest.raises(ValueError, match="document index 2"):
    store.document(2)
  with pytest.raises(ValueError, match="start <= stop"):
    store.tokens(2, 1)
  with pytest.raises(ValueError, match="1-D integer"):
    data.TokenStore.create(str(tmp_path / "x"), [[0.5]])
  with pytest.raises(ValueError, match="fit int32"):
    data.TokenStore.create(str(tmp_path / "x"), [[2**40]])
  with pytest.raises(ValueError, match="not a token store"):
    data.TokenStore.open(str(tmp_path))
  empty = data.TokenStore.create(str(tmp_path / "empty"), [])
  assert empty.num_documents == 0 and empty.num_tokens == 0


def _folder_corpus(tmp_path, texts):
  folder = tmp_path / "corpus"
  folder.mkdir(exist_ok=True)
  for i, text in enumerate(texts):
    (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
  return data.load_corpus(str(folder))


def test_build_store_splits_and_caches(tmp_path):
  texts = [f"document {i}: " + "abcdefgh"[i % 8] * (50 + 10 * i)
           for i in range(12)]
  corpus = _folder_corpus(tmp_path, texts)
  tokenizer = data.get_tokenizer("byte")
  root = tmp_path / "stores"
  stores = {split: data.build_store(
      data.default_store_path(str(root), corpus.name, "byte", split),
      corpus, tokenizer, split=split, eval_fraction=0.25, split_seed=1)
            for split in ("train", "eval", "all")}
  train_docs, eval_docs = data.split_documents(corpus, eval_fraction=0.25,
                                               seed=1)
  for split, docs in (("train", train_docs), ("eval", eval_docs),
                      ("all", corpus.documents)):
    store = stores[split]
    assert store.num_documents == len(docs)
    assert [tokenizer.decode(store.document(i))
            for i in range(len(docs))] == list(docs)
    meta = store.metadata
    assert meta["corpus_sha256"] == corpus.info["sha256"]
    assert meta["tokenizer"] == "byte" and meta["split"] == split
  assert len({s.path for s in stores.values()}) == 3
  # Cached: the same request reuses the folder without rewriting it.
  header = os.path.join(stores["train"].path, "metadata.json")
  before = os.stat(header).st_mtime_ns
  again = data.build_store(stores["train"].path, corpus, "byte",
                           split="train", eval_fraction=0.25, split_seed=1)
  assert os.stat(header).st_mtime_ns == before
  assert again.num_tokens == stores["train"].num_tokens
  # A different split seed (or changed text) rebuilds it.
  reseeded = data.build_store(stores["train"].path, corpus, "byte",
                              split="train", eval_fraction=0.25, split_seed=2)
  assert reseeded.metadata["split_seed"] == 2
  assert reseeded.metadata["document_indices"] == data.split_indices(
      [len(t) for t in texts], eval_fraction=0.25, seed=2)[0]
  changed = _folder_corpus(tmp_path, texts[:-1] + ["edited"])
  rebuilt = data.build_store(stores["all"].path, changed, "byte", split="all")
  assert rebuilt.metadata["corpus_sha256"] == changed.info["sha256"]
  assert rebuilt.num_documents == 12
  assert tokenizer.decode(rebuilt.document(11)) == "edited"


def test_build_store_refuses_foreign_folders(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not a token store"):
    data.build_store(str(tmp_path / "mine"), "pydoc_topics", split="all")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match="split must be"):
    data.build_store(str(tmp_path / "s"), "pydoc_topics", split="test")


def test_eval_documents_of_a_run_and_a_study(tmp_path):
  """The public route to a run's held-out documents: the store the
  evaluators read, for a training config (WORKDIR/data) and a study."""
  from extrapolax.experiments import configs  # pylint: disable=g-import-not-at-top
  config = configs.get_config("tiny.py")
  run = data.eval_documents(config, workdir=str(tmp_path / "run"))
  assert run and all(d.dtype.kind == "i" and d.ndim == 1 for d in run)
  assert os.path.isdir(tmp_path / "run" / "data")
  study = configs.get_config("extrapolation.py:quick")
  again = data.eval_documents(study, workdir=str(tmp_path / "study"))
  assert [len(d) for d in again] == [len(d) for d in run]
  with pytest.raises(ValueError, match="pass workdir="):
    data.eval_documents(config)
