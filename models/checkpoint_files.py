"""Checksummed checkpoint directories: one manifest, written last.

Every checkpoint the project writes (the zoo's ``save_pretrained`` and the
trainer's ``WORKDIR/checkpoints/<step>/``) ends with a ``manifest.json`` that
lists the size and sha256 of each file saved, written atomically (a
temporary file, fsync, rename) after everything else. So:

  * no manifest: the save never finished (an incomplete checkpoint);
  * a file missing, shorter, longer or with other bytes than listed: a
    damaged checkpoint, named by its file before any reader (orbax,
    tensorstore, json) sees it.

Both errors are :class:`CheckpointError` (a ValueError), one line naming the
file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Iterable, Mapping

__all__ = ["MANIFEST", "CheckpointError", "IncompleteCheckpointError",
           "file_digest", "json_sha256", "describe_files", "check_files",
           "write_json_atomic", "write_manifest", "read_manifest",
           "innermost_line"]

MANIFEST = "manifest.json"
ALGORITHMS = ("sha256", "crc32")    # crc32: zoo manifests of version 1


class CheckpointError(ValueError):
  """A damaged checkpoint; the message names the file."""


class IncompleteCheckpointError(CheckpointError):
  """A checkpoint directory without its manifest: the save never finished."""


def file_digest(path: str, algorithm: str = "sha256") -> str:
  """Hex digest of a file's bytes (``algorithm``: sha256, or crc32)."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"checksum algorithm {algorithm!r} is not one of "
                     f"{ALGORITHMS}")
  crc, sha = 0, hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      if algorithm == "crc32":
        crc = zlib.crc32(chunk, crc)
      else:
        sha.update(chunk)
  return f"{crc & 0xFFFFFFFF:08x}" if algorithm == "crc32" else sha.hexdigest()


def json_sha256(data: Any) -> str:
  """sha256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
  text = json.dumps(data, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_files(root: str, names: Iterable[str] = None, *,
                   skip: Iterable[str] = (MANIFEST,)) -> dict[str, dict]:
  """{path relative to root ('/'-separated): {size, sha256}}.

  Every file under ``root`` (except the top-level names in ``skip``), or
  only ``names`` when given.
  """
  if names is None:
    skip = set(skip)
    names = sorted(
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        for d, _, files in os.walk(root) for f in files)
    names = [n for n in names if n not in skip]
  out = {}
  for name in names:
    path = os.path.join(root, *name.split("/"))
    out[name] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
  return out


def check_files(root: str, files: Mapping[str, Mapping[str, Any]], *,
                where: str, owner=None) -> None:
  """Raises CheckpointError unless every listed file is there, unchanged.

  Args:
    root: the folder the names are relative to.
    files: {name: {size, sha256 (or crc32)}}, as ``describe_files`` gave.
    where: the checkpoint, for the message ("damaged checkpoint {where}:").
    owner: optional name -> text put after the file's name in the message
      (e.g. which array it holds).
  """
  for name, entry in files.items():
    path = os.path.join(root, *name.split("/"))
    label = f"{name} ({owner(name)})" if owner else name
    prefix = f"damaged checkpoint {where}: {label}"
    algorithm = "crc32" if "crc32" in entry else "sha256"
    if not os.path.isfile(path):
      raise CheckpointError(f"{prefix} is missing")
    size = os.path.getsize(path)
    if size != int(entry["size"]):
      state = "truncated" if size < int(entry["size"]) else "grown"
      raise CheckpointError(f"{prefix} has {size} bytes, {entry['size']} when "
                            f"saved ({state})")
    if file_digest(path, algorithm) != entry[algorithm]:
      raise CheckpointError(f"{prefix} fails its checksum ({algorithm}: its "
                            "bytes changed since it was saved)")


def write_json_atomic(path: str, data) -> None:
  """Writes JSON (or a string) to a temporary file, fsyncs, renames."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(data if isinstance(data, str) else json.dumps(
        data, indent=2, sort_keys=True))
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  """Writes ``directory/manifest.json`` last and atomically (and fsyncs the
  folder, so the rename itself survives a power cut)."""
  write_json_atomic(os.path.join(directory, MANIFEST), dict(manifest))
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def read_manifest(directory: str, *, fmt: str, versions: Iterable[int],
                  hint: str = "save it again") -> dict:
  """The manifest of ``directory``, checked for format and version.

  Raises:
    IncompleteCheckpointError: there is no manifest.json.
    CheckpointError: it cannot be read, or is not a ``fmt`` manifest of one
      of ``versions``.
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise IncompleteCheckpointError(
        f"incomplete checkpoint: {directory} has no {MANIFEST} (saving was "
        f"interrupted, or not every file was copied); {hint}")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"damaged checkpoint: cannot read {path}: "
                          f"{e}") from e
  versions = tuple(versions)
  if not isinstance(manifest, dict) or manifest.get("format") != fmt or (
      manifest.get("version") not in versions):
    raise CheckpointError(
        f"damaged checkpoint: {path} is not an {fmt} manifest of version "
        f"{' or '.join(map(str, versions))}")
  files = manifest.get("files")
  ok = isinstance(files, dict) and all(
      isinstance(v, dict) and isinstance(v.get("size"), int)
      and any(isinstance(v.get(a), str) for a in ALGORITHMS)
      for v in files.values())
  if not ok:
    raise CheckpointError(f"damaged checkpoint: {path} is malformed (its "
                          "'files' must map names to a size and a checksum)")
  return manifest


def innermost_line(error: BaseException) -> str:
  """The innermost cause's first line (tensorstore's, not orbax's wrapper)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip()
  return (text.splitlines()[0] if text else type(error).__name__)[:400]
