"""The manifest helper shared by the zoo and the trainer's checkpoints."""

import json
import os

import pytest

from extrapolax.models import checkpoint_files as cf


@pytest.fixture
def folder(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(b"\x00\x01" * 100)
  (tmp_path / "config.json").write_text('{"pe": "rope"}\n')
  cf.write_manifest(str(tmp_path), {
      "format": "test", "version": 1,
      "files": cf.describe_files(str(tmp_path))})
  return tmp_path


def _check(folder):
  manifest = cf.read_manifest(str(folder), fmt="test", versions=(1,))
  cf.check_files(str(folder), manifest["files"], where=str(folder))


def test_manifest_lists_every_file_but_itself(folder):
  manifest = json.loads((folder / "manifest.json").read_text())
  assert sorted(manifest["files"]) == ["a/x.bin", "config.json"]
  assert manifest["files"]["a/x.bin"]["size"] == 200
  assert not [n for n in os.listdir(folder) if ".tmp" in n]
  _check(folder)


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]),
     r"a/x.bin has 199 bytes, 200 when saved \(truncated\)"),
    (lambda p: p.write_bytes(p.read_bytes() + b"!"),
     r"a/x.bin has 201 bytes, 200 when saved \(grown\)"),
    (lambda p: p.write_bytes(b"\x00\x02" + p.read_bytes()[2:]),
     r"a/x.bin fails its checksum \(sha256"),
    (lambda p: p.unlink(), r"a/x.bin is missing"),
])
def test_damage_is_named(folder, damage, message):
  damage(folder / "a" / "x.bin")
  with pytest.raises(cf.CheckpointError, match="damaged checkpoint .*: "
                     + message):
    _check(folder)


def test_incomplete_and_malformed_manifests(folder):
  (folder / "manifest.json").write_text('{"format": "test", "version": 1, '
                                        '"files": {"a": {"size": 1}}}')
  with pytest.raises(cf.CheckpointError, match="is malformed"):
    _check(folder)
  (folder / "manifest.json").write_text('{"format": "test", "vers')
  with pytest.raises(cf.CheckpointError, match="cannot read .*manifest.json"):
    _check(folder)
  with pytest.raises(cf.CheckpointError, match="not an other manifest of "
                     "version 1"):
    (folder / "manifest.json").write_text('{"format": "test", "version": 1}')
    cf.read_manifest(str(folder), fmt="other", versions=(1,))
  (folder / "manifest.json").unlink()
  with pytest.raises(cf.IncompleteCheckpointError, match="has no "
                     "manifest.json"):
    _check(folder)


def test_json_sha256_is_canonical():
  assert cf.json_sha256({"a": 1, "b": [1, 2]}) == cf.json_sha256(
      {"b": [1, 2], "a": 1})
  assert cf.json_sha256({"a": 1}) != cf.json_sha256({"a": 2})
