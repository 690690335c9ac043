"""The algorithmic study config through the study main: task-trained
variants, the algorithmic evaluator inside and past the training range,
randomized positions reaching the training batches."""

import os

import numpy as np
import pytest

from extrapolax.experiments import configs
from extrapolax.experiments import data
from extrapolax.experiments import extrapolation
from extrapolax.experiments import records
from extrapolax.experiments import trainer


def test_config_sizes_and_randomized_positions(tmp_path):
  config = configs.get_config("algorithmic_study.py:task=reverse")
  extrapolation.validate_config(config)
  entry = config.evals.algorithmic
  largest = data.get_task("reverse").max_length_for(64)
  assert entry.train_len == largest == 31
  assert entry.lengths == (8, 16, 31, 46, 62, 93, 124)
  assert config.train.data.get("positions", "plain") == "plain"
  assert "positions" not in config.evals.algorithmic
  assert config.seeds == (0, 1, 2)
  randomized = configs.get_config(
      "algorithmic_study.py:task=reverse,randomized")
  max_position = 2 * data.get_task("reverse").max_tokens(124)
  positions = f"randomized(max_position={max_position})"
  # Trained and evaluated with randomized positions, as Ruoss et al.
  assert randomized.train.data.positions == positions
  assert randomized.evals.algorithmic.positions == positions
  old = configs.get_config("algorithmic_study.py:task=reverse,randomized,"
                           "max_position=1000,plain_eval,seeds=0")
  assert old.train.data.positions == "randomized(max_position=1000)"
  assert "positions" not in old.evals.algorithmic and old.seeds == ()
  with pytest.raises(ValueError, match="add randomized"):
    configs.get_config("algorithmic_study.py:plain_eval")
  train = extrapolation.variant_config(randomized, "rope", str(tmp_path))
  batch = trainer.make_source(train, str(tmp_path)).batch(0)
  positions = np.asarray(batch["positions"])
  rows = np.asarray(batch["segment_ids"]) > 0
  assert positions[rows].max() > 64        # beyond the row's length
  for row in range(positions.shape[0]):
    assert np.all(np.diff(positions[row][rows[row]]) > 0)
  # A study that trains on a task cannot score held-out text.
  config.evals.length = dict(type="length", models="", multiples=(1,),
                             max_tokens=64)
  with pytest.raises(ValueError, match=r"the evaluations \['length'\] score "
                     "held-out documents"):
    extrapolation.validate_config(config)


def test_quick_study_end_to_end(tmp_path):
  config = configs.get_config("algorithmic_study.py:task=first,quick")
  workdir = str(tmp_path / "study")
  result = extrapolation.run_study(config, workdir)
  assert sorted(result.evaluated) == ["algorithmic/alibi", "algorithmic/rope"]
  got = records.read(os.path.join(workdir, "results.jsonl"))
  lengths = config.evals.algorithmic.lengths
  assert len(got) == 2 * 2 * len(lengths)
  assert {r["eval_len"] for r in got} == set(lengths)
  assert max(lengths) > config.evals.algorithmic.train_len
  assert all(r["task"] == "first" and r["train_len"] == 61 for r in got)
  text = open(result.report).read()
  assert "## algorithmic: sequence_accuracy on first" in text
  assert "Training range: lengths 1..61." in text
