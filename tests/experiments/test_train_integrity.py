"""Nothing lost, nothing silently wrong: damaged and incomplete checkpoints,
a swapped config.json, two runs on one workdir, torn metrics lines."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from extrapolax.experiments import checkpoints
from extrapolax.experiments import runlog
from extrapolax.experiments import trainer
from extrapolax.experiments import workdir_lock
from extrapolax.models import checkpoint_files
from tests.experiments.test_train_loop import StreamSource, _config, _params
from tests.experiments.test_train_loop import _stream


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished 6-step run with checkpoints 3 and 6 (copy before damage)."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  result = trainer.train(_config(), workdir, source=StreamSource(_stream()))
  return workdir, result


@pytest.fixture
def workdir(run, tmp_path):
  return shutil.copytree(run[0], tmp_path / "w")


def _largest(folder):
  files = [p for p in glob.glob(os.path.join(folder, "**"), recursive=True)
           if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def _rel(workdir, path, step):
  return os.path.relpath(path, os.path.join(workdir, "checkpoints", str(step)))


def test_every_step_has_a_manifest_of_its_files(workdir):
  assert checkpoints.steps(workdir) == ([3, 6], [])
  folder = os.path.join(workdir, "checkpoints", "6")
  with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  on_disk = {os.path.relpath(os.path.join(d, f), folder)
             for d, _, fs in os.walk(folder) for f in fs}
  assert on_disk == set(manifest["files"]) | {"manifest.json"}
  assert "data/metadata" in manifest["files"]
  assert manifest["config"]["model"]["pe"] == "rope"
  assert "train_steps" not in manifest["config"]   # it may change on resume


def test_flipped_byte_in_params_is_refused(workdir):
  path = _largest(os.path.join(workdir, "checkpoints", "6", "params"))
  _flip_byte(path)
  message = (rf"damaged checkpoint .*checkpoints/6: "
             rf"{_rel(workdir, path, 6)} fails its checksum")
  with pytest.raises(checkpoint_files.CheckpointError, match=message):
    trainer.load_model(workdir)
  with pytest.raises(checkpoint_files.CheckpointError, match=message):
    trainer.train(_config(train_steps=9), workdir,
                  source=StreamSource(_stream()))
  trainer.load_model(workdir, step=3)       # the other step is intact


@pytest.mark.parametrize("victim", ["opt_state", "data/metadata"])
def test_truncated_file_is_named(workdir, victim):
  path = os.path.join(workdir, "checkpoints", "6", victim)
  path = path if os.path.isfile(path) else _largest(path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(checkpoint_files.CheckpointError, match=(
      rf"{_rel(workdir, path, 6)} has \d+ bytes, \d+ when saved "
      r"\(truncated\)")):
    trainer.load_model(workdir)


def test_missing_file_is_named(workdir):
  os.remove(os.path.join(workdir, "checkpoints", "6", "data", "metadata"))
  with pytest.raises(ValueError, match=r"data/metadata is missing"):
    trainer.load_model(workdir)


@pytest.mark.parametrize("damage", ["empty", "no_manifest"])
def test_incomplete_newer_step_is_skipped(run, workdir, damage, caplog):
  folder = os.path.join(workdir, "checkpoints", "6")
  if damage == "empty":       # a newer step folder with nothing in it
    shutil.rmtree(folder)
    os.makedirs(os.path.join(workdir, "checkpoints", "9"))
  else:                       # killed after orbax, before the manifest
    os.remove(os.path.join(folder, "manifest.json"))
  os.makedirs(os.path.join(workdir, "checkpoints",
                           "12.orbax-checkpoint-tmp-1234", "params"))
  newest = 9 if damage == "empty" else 6
  with caplog.at_level(logging.WARNING):
    model, _ = trainer.load_model(workdir)
  assert f"checkpoints/{newest}" in caplog.text and "incomplete" in caplog.text
  three, _ = trainer.load_model(workdir, step=3)
  for a, b in zip(_params(model), _params(three)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(checkpoint_files.IncompleteCheckpointError,
                     match=rf"checkpoints/{newest} has no manifest.json"):
    trainer.load_model(workdir, step=newest)

  # A resume removes it, continues from step 3 and ends where the
  # uninterrupted run did.
  again = StreamSource(_stream())
  resumed = trainer.train(_config(), workdir, source=again)
  assert again.calls == [3, 4, 5]
  assert checkpoints.steps(workdir) == ([3, 6], [])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
  assert resumed.metrics[:3] == run[1].metrics[:3]     # kept as they were
  for key in ("loss", "grad_norm", "lr"):                # bit for bit
    assert [r[key] for r in resumed.metrics] == [
        r[key] for r in run[1].metrics], key
  for a, b in zip(_params(resumed.model), _params(run[1].model)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_older_step_left_by_an_interrupted_removal_is_cleared(workdir):
  # Pruning removes a step's manifest first: a kill there leaves it
  # incomplete. The newest step still loads; a resume clears the leftover.
  os.remove(os.path.join(workdir, "checkpoints", "3", "manifest.json"))
  trainer.load_model(workdir)
  again = StreamSource(_stream())
  trainer.train(_config(train_steps=9), workdir, source=again)
  assert again.calls == [6, 7, 8]
  assert checkpoints.steps(workdir) == ([6, 9], [])


def test_config_of_another_model_with_the_same_shapes_is_refused(workdir):
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["model"]["pe"] = "alibi"        # rope -> alibi: the same arrays
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(checkpoint_files.CheckpointError, match=(
      r"config.json is not the config checkpoint 6 was saved with "
      r"\(model.pe: 'rope' -> 'alibi'\); put back the run's own config.json")):
    trainer.load_model(workdir)
  with pytest.raises(ValueError, match="model.pe: 'rope' -> 'alibi'"):
    trainer.train(_config(**{"model.pe": "alibi"}), workdir,
                  source=StreamSource(_stream()))
  # Fields a resume may change do not count.
  config["model"]["pe"], config["train_steps"] = "rope", 60
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  trainer.load_model(workdir)


def test_checkpoints_are_pruned_only_after_the_new_manifest(tmp_path):
  config = _config(train_steps=6, checkpoint_every=1, keep_checkpoints=2)
  trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  assert checkpoints.steps(str(tmp_path)) == ([5, 6], [])


# ----------------------------------------------------------------------------
# One run per workdir.

_HOLDER = textwrap.dedent("""
    import sys, time
    from extrapolax.experiments import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
      print("held", flush=True)
      time.sleep(120)
""")


@pytest.fixture
def held(tmp_path):
  """Another process holding tmp_path/w's lock."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)],
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert proc.stdout.readline().strip() == "held"
    yield str(workdir), proc.pid
  finally:
    proc.kill()
    proc.wait()


def test_second_run_on_a_workdir_is_refused(held):
  workdir, pid = held
  with pytest.raises(workdir_lock.WorkdirLockedError, match=(
      rf"{workdir} is in use by another run \(pid {pid} on host .*; lock "
      r"file .*\.lock\); wait for it to finish")):
    trainer.train(_config(), workdir, source=StreamSource(_stream()))
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_train_main_refuses_a_held_workdir_in_one_line(held):
  workdir, pid = held
  proc = subprocess.run(
      [sys.executable, "-m", "extrapolax.experiments.train",
       "--config=experiments/configs/tiny.py:steps=2", f"--workdir={workdir}"],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: {workdir} is in use by another run (pid {pid} ")
  assert "Traceback" not in proc.stderr


def test_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
  with open(tmp_path / ".lock", "w", encoding="utf-8") as f:
    json.dump({"pid": 999999, "host": "gone", "started": "then"}, f)
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
    with open(tmp_path / ".lock", encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError):   # same process
      with workdir_lock.hold(str(tmp_path)):
        pass
  assert "taking over the lock" in caplog.text and "pid 999999" in caplog.text
  assert (tmp_path / ".lock").read_text() == ""     # released cleanly


# ----------------------------------------------------------------------------
# metrics.jsonl after a crash.


def test_resume_drops_repeated_and_torn_metrics_lines(run, workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  lines = open(path, encoding="utf-8").read().splitlines()
  # Two runs appended step 2 twice; a kill cut the last line in half.
  torn = "\n".join(lines[:2] + lines[1:]) + "\n" + lines[5][:17]
  with open(path, "w", encoding="utf-8") as f:
    f.write(torn)
  assert [r["step"] for r in runlog.read_metrics(workdir)] == [
      1, 2, 2, 3, 4, 5, 6]
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:8: not a JSON line"):
    runlog.read_metrics(workdir)
  with open(path, "w", encoding="utf-8") as f:
    f.write(torn)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  resumed = trainer.train(_config(), workdir, source=StreamSource(_stream()))
  assert resumed.metrics[:3] == run[1].metrics[:3]
  assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]


def test_full_disk_is_one_error_and_the_rerun_resumes(tmp_path, monkeypatch):
  """Issue 15 item 9: the OS refusing a checkpoint write (ENOSPC) ends the
  run with one error naming the folder; the partial step and orbax's
  temporary folders are gone; after "freeing space" the same command
  resumes and finishes with the same final parameters."""
  import errno  # pylint: disable=import-outside-toplevel
  config = _config(train_steps=6, checkpoint_every=3)
  describe = checkpoint_files.describe_files
  calls = []

  def full_disk(directory):
    calls.append(directory)
    if directory.endswith(os.path.join("checkpoints", "6")):
      os.makedirs(os.path.join(os.path.dirname(directory),
                               "6.orbax-checkpoint-tmp-1"), exist_ok=True)
      raise OSError(errno.ENOSPC, "No space left on device", directory)
    return describe(directory)

  monkeypatch.setattr(checkpoint_files, "describe_files", full_disk)
  with pytest.raises(checkpoints.CheckpointWriteError) as info:
    trainer.train(config, str(tmp_path), source=StreamSource(_stream()))
  message = str(info.value)
  assert "\n" not in message and "No space left on device" in message
  assert os.path.join(str(tmp_path), "checkpoints", "6") in message
  assert "resume from step 3" in message
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  monkeypatch.setattr(checkpoint_files, "describe_files", describe)
  resumed = trainer.train(config, str(tmp_path),
                          source=StreamSource(_stream()))
  whole = trainer.train(config, str(tmp_path / "whole"),
                        source=StreamSource(_stream()))
  assert resumed.step == 6
  for a, b in zip(_params(resumed.model), _params(whole.model)):
    np.testing.assert_array_equal(a, b)
