"""The methods study config (configs/methods_study.py): rope, rope-sinks
and irope through the study main, perplexity vs length for each and the
inference-mask sweep for rope and rope-sinks."""

import math
import os

import numpy as np
import pytest

from extrapolax.experiments import configs
from extrapolax.experiments import extrapolation
from extrapolax.experiments import modeling
from extrapolax.experiments import records
from extrapolax.experiments import trainer
from extrapolax.models import AttentionSpec


def test_config_names_the_comparisons():
  config = configs.get_config("methods_study.py")
  extrapolation.validate_config(config)
  assert config.variants == "rope,rope-sinks,irope"
  assert config.seeds == (0, 1, 2) and config.train.train_len == 64
  assert sorted(config.evals) == ["length", "mask"]
  assert config.evals.length.multiples == (1, 2, 3, 4, 8, 16)
  assert config.evals.mask.models == "rope,rope-sinks"
  # Each variant differs from rope in the method alone (irope in its
  # released pattern, which repeats whole: 4 layers).
  got = {v: modeling.model_config(extrapolation.variant_config(config, v, ""))
         for v in ("rope", "rope-sinks", "irope")}
  assert got["rope"].attention == (AttentionSpec(),)
  assert got["rope-sinks"].attention == (AttentionSpec(sink_logits=True),)
  assert got["rope-sinks"].num_layers == got["rope"].num_layers == 2
  assert [s.position for s in got["irope"].attention] == ["rope"] * 3 + [
      "nope"]
  assert got["irope"].attention[0].chunk == 16 and got["irope"].num_layers == 4
  quick = configs.get_config("methods_study.py:quick")
  assert quick.seeds == () and quick.train.train_len == 16
  assert configs.get_config("methods_study.py:quick,seeds=2").seeds == (0, 1)
  with pytest.raises(ValueError, match="unknown config argument 'sinks'"):
    configs.get_config("methods_study.py:sinks")


def test_quick_study_end_to_end(tmp_path):
  config = configs.get_config("methods_study.py:quick")
  workdir = str(tmp_path / "study")
  result = extrapolation.run_study(config, workdir)
  assert sorted(result.trained) == ["irope", "rope", "rope-sinks"]
  got = records.read(os.path.join(workdir, "results.jsonl"))
  ppl = [r for r in got if r["metric"] == "perplexity"]
  assert sorted((r["experiment"], r["model"], r["eval_len"])
                for r in ppl) == sorted(
      [("length", v, n) for v in ("rope", "rope-sinks", "irope")
       for n in (16, 32)] +
      [("mask", v, n) for v in ("rope", "rope-sinks") for n in (16, 32)])
  assert {r["mask"] for r in ppl if r["experiment"] == "mask"} == {
      "sliding_window(16)"}
  for r in ppl:
    assert r["step"] == 4 and r["train_len"] == 16
    assert math.isfinite(r["value"]) and 1.0 < r["value"] < 512
  # Loss per position of the longest length, for each variant.
  assert {r["model"] for r in got if r["metric"] == "position_nll"} == {
      "rope", "rope-sinks", "irope"}
  # The sinks are trained parameters: they moved from their zero init.
  model, _ = trainer.load_model(os.path.join(workdir, "runs", "rope-sinks"))
  sinks = np.stack([np.asarray(b.attn.sinks[...]) for b in model.blocks])
  assert sinks.shape == (2, 4) and np.abs(sinks).max() > 1e-4
  rope, _ = trainer.load_model(os.path.join(workdir, "runs", "rope"))
  assert all(b.attn.sinks is None for b in rope.blocks)
  text = open(result.report).read()
  # irope's column names its chunked layers' mask.
  assert ("| eval length | rope | rope-sinks | irope chunked(4)+causal |"
          in text)
  assert ("| rope sliding_window(16) | rope-sinks sliding_window(16) |"
          in text)
