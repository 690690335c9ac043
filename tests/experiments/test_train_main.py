"""The absl entry point end to end: config files, overrides, the real data
path (default corpus -> token store -> TrainSource), resume, errors."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags

from extrapolax.experiments import checkpoints
from extrapolax.experiments import train
from extrapolax.experiments import trainer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir,
                                    os.pardir))
# A model small enough to compile fast; the flags are the ones a user types.
SMALL = ["--config.model.d_model=32", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.mlp_dim=64", "--config.train_len=32",
         "--config.batch_size=4"]


def _main(args):
  """Runs train.main in this process as ``python -m ... args`` would."""
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)      # override flags a previous parse defined
  argv = ["train"] + list(args)
  old_argv, sys.argv = sys.argv, argv   # config_flags reads sys.argv
  try:
    train.main(train._parse_flags(argv))  # pylint: disable=protected-access
  finally:
    sys.argv = old_argv


def test_train_main_end_to_end_overrides_and_resume(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  args = ["--config=experiments/configs/tiny.py:pe=alibi,steps=4",
          f"--workdir={workdir}", "--config.log_every=2",
          "--config.checkpoint_every=2", "--config.learning_rate=0.01"] + SMALL
  _main(args)
  assert "trained 4 steps" in capsys.readouterr().out
  files = set(os.listdir(workdir))
  assert {"config.json", "metrics.jsonl", "checkpoints", "data"} <= files
  assert any(f.startswith("events.out.tfevents") for f in files)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["model"]["pe"] == "alibi"          # from the :ARGS
  assert config["model"]["d_model"] == 32          # from --config.*
  assert config["train_steps"] == 4 and config["learning_rate"] == 0.01
  assert config["model"]["vocab_size"] == 256      # the byte tokenizer's
  assert config["data"]["corpus"] == "python_stdlib"
  assert os.listdir(os.path.join(workdir, "data")) == [
      "python_stdlib_byte_train"]
  first = trainer.read_metrics(workdir)
  assert [r["step"] for r in first] == [1, 2, 4]

  # The same command with more steps resumes from checkpoint 4.
  _main(args + ["--config.train_steps=8"])
  records = trainer.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 4, 6, 8]
  assert records[:3] == first
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")),
                key=int) == ["4", "6", "8"]
  assert records[-1]["loss"] < records[0]["loss"]
  model, loaded = trainer.load_model(workdir)
  assert loaded.model.pe == "alibi" and loaded.train_steps == 8
  assert model.config.attention[0].position == "alibi"

  # Another model in the same workdir is refused, naming the change.
  with pytest.raises(SystemExit, match=r"model.pe: 'alibi' -> 'rope'"):
    _main(args + ["--config.model.pe=rope"])


def test_train_main_errors_name_the_value_or_step(tmp_path):
  base = ["--config=experiments/configs/tiny.py:steps=6"] + SMALL
  with pytest.raises(SystemExit, match=r"config.model.pe='foo' is not one"):
    _main(base + [f"--workdir={tmp_path / 'a'}", "--config.model.pe=foo"])
  with pytest.raises(SystemExit, match=r"config.data.packing='zip'"):
    _main(base + [f"--workdir={tmp_path / 'b'}", "--config.data.packing=zip"])
  with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step \d"):
    _main(base + [f"--workdir={tmp_path / 'c'}", "--config.grad_clip=0",
                  "--config.learning_rate=1e30", "--config.warmup_steps=0"])


def test_task_training_uses_the_task_source(tmp_path):
  workdir = str(tmp_path / "copy")
  _main(["--config=experiments/configs/tiny.py:steps=3", f"--workdir={workdir}",
         "--config.data.task=copy", "--config.checkpoint_every=3"] + SMALL)
  assert "data" not in os.listdir(workdir)          # no corpus, no store
  manager = checkpoints.open_manager(workdir)
  try:
    state = checkpoints.restore(manager, 3, {"data": None})["data"]
  finally:
    manager.close()
  assert state["step"] == 3 and state["seed"] == 0
  assert state["source"]["kind"] == "task" and state["source"]["task"] == "copy"
  for r in trainer.read_metrics(workdir):     # answers only: a few per row
    assert r["loss"] > 0 and 0 < r["target_tokens"] < 0.8 * 4 * 32


def test_python_m_entry_point_from_another_folder(tmp_path):
  """`python -m extrapolax.experiments.train --config=tiny.py` outside the
  repository: the config file is found in the installed package."""
  workdir = tmp_path / "cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "extrapolax.experiments.train",
       "--config=tiny.py:pe=nope,steps=2", f"--workdir={workdir}",
       "--config.data.corpus=pydoc_topics"] + SMALL,
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "trained 2 steps" in done.stdout
  assert [r["step"] for r in trainer.read_metrics(str(workdir))] == [1, 2]
  assert json.load(open(workdir / "config.json"))["model"]["pe"] == "nope"
