"""The study main end to end (a few training steps, two variants, short
lengths): records, report, printed tables, a rerun that trains nothing, and
the config checks."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np

import pytest

from extrapolax.experiments import configs
from extrapolax.experiments import extrapolation
from extrapolax.experiments import records
from extrapolax.experiments import report
from extrapolax.experiments import seeds
from extrapolax.experiments import trainer

# The quick study with the variants in another order (a comma-separated
# override); the flags are the ones a user types.
ARGS = ["--config=extrapolation.py:quick", "--config.variants=alibi,rope"]


def _main(args, capsys):
  extrapolation.main(extrapolation.parse_flags(["extrapolation"] + args))
  return capsys.readouterr().out


def _run_state(workdir):
  """What a retraining would change: metrics and checkpoint steps."""
  out = {}
  for variant in ("alibi", "rope"):
    run = os.path.join(workdir, "runs", variant)
    out[variant] = (trainer.read_metrics(run),
                    sorted(os.listdir(os.path.join(run, "checkpoints"))))
  return out


def test_study_end_to_end_then_rerun_reuses_everything(tmp_path, capsys):
  workdir = str(tmp_path / "study")
  out = _main(ARGS + [f"--workdir={workdir}"], capsys)

  # Printed: the perplexity tables (variants in the configured order) and
  # the passkey summary.
  assert "## length: perplexity (nonoverlap)" in out
  assert "| eval length | alibi | rope |" in out
  assert ("| eval length | rope | rope linear matched | rope yarn matched |"
          in out)
  assert "rope lambda(sinks=4, window=16)" in out
  assert "## passkey: accuracy (mean over depths)" in out
  assert "trained 2 model(s) ['alibi', 'rope']" in out

  # Every point is a valid record; each evaluation ran on the trained step.
  results = records.read(os.path.join(workdir, "results.jsonl"))
  by_experiment = {}
  for r in results:
    by_experiment.setdefault(r["experiment"], []).append(r)
  assert set(by_experiment) == {"length", "rope_scaling", "mask", "passkey"}
  ppl = [r for r in by_experiment["length"] if r["metric"] == "perplexity"]
  assert sorted((r["model"], r["eval_len"]) for r in ppl) == [
      ("alibi", 16), ("alibi", 64), ("rope", 16), ("rope", 64)]
  for r in results:
    assert r["step"] == 4 and r["seed"] == 0 and r["train_len"] == 16
  for r in ppl:
    assert r["pe"] == r["model"] and r["mode"] == "nonoverlap"
    assert 1.0 < r["value"] < 256 * 2 and r["n_tokens"] >= 512
  scaled = by_experiment["rope_scaling"]
  assert {(r["scaling"], r["eval_len"], r["scale"]) for r in scaled} == {
      ("linear", 16, 1.0), ("linear", 64, 4.0), ("yarn", 16, 1.0),
      ("yarn", 64, 4.0)}
  assert {r["mask"] for r in by_experiment["mask"]} == {
      "lambda(sinks=4, window=16)"}
  (passkey,) = by_experiment["passkey"]
  assert passkey["model"] == "rope" and passkey["eval_len"] == 32
  assert 0.0 <= passkey["value"] <= 1.0 and passkey["n_trials"] == 2
  assert all(math.isfinite(r["value"]) for r in results)

  # The workdir: study config, one run per variant, report and plots.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["variants"] == "alibi,rope"
  assert sorted(os.listdir(os.path.join(workdir, "runs"))) == ["alibi", "rope"]
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  assert "## length: perplexity (nonoverlap)" in text
  assert "![" in text and "length_perplexity_nonoverlap.png" in text
  assert os.path.getsize(
      os.path.join(workdir, "length_perplexity_nonoverlap.png")) > 1000
  assert re.search(r"\| 32 \| [01]\.", out)     # the (short) passkey row

  # The same command again: nothing trained, nothing re-evaluated.
  before = _run_state(workdir)
  out = _main(ARGS + [f"--workdir={workdir}"], capsys)
  assert ("trained 0 model(s) [], reused 2; ran 0 evaluation(s), skipped 5"
          in out)
  assert "| eval length | alibi | rope |" in out
  assert _run_state(workdir) == before
  assert len(records.read(os.path.join(workdir, "results.jsonl"))) == len(
      results)

  # A changed mask setting re-runs only the mask sweep (still no training).
  out = _main(ARGS + [f"--workdir={workdir}", "--config.evals.mask.num_sinks=2"],
              capsys)
  assert "trained 0 model(s)" in out and "ran 1 evaluation(s)" in out
  assert "rope lambda(sinks=2, window=16)" in out
  assert _run_state(workdir) == before
  new = records.read(os.path.join(workdir, "results.jsonl"))[len(results):]
  assert {r["mask"] for r in new} == {"lambda(sinks=2, window=16)"}

  # A changed training field: the trainer refuses the workdir, naming it.
  with pytest.raises(SystemExit, match=r"model.d_model: 32 -> 48"):
    _main(ARGS + [f"--workdir={workdir}", "--config.train.model.d_model=48"],
          capsys)

  # Re-report from the records alone.
  assert report.main(["--workdir", workdir, "--out_dir",
                      str(tmp_path / "again")]) == 0
  assert "| eval length | alibi | rope |" in capsys.readouterr().out
  assert os.path.isfile(tmp_path / "again" / "report.md")

  # `python -m` from another folder: absl's main, the packaged config by
  # name; the finished study is reused.
  done = subprocess.run(
      [sys.executable, "-m", "extrapolax.experiments.extrapolation",
       f"--workdir={workdir}"] + ARGS + ["--config.evals.mask.num_sinks=2"],
      cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "trained 0 model(s) [], reused 2; ran 0 evaluation(s)" in done.stdout
  assert "rope: trained (step 4) and evaluated; reusing" in done.stderr
  assert _run_state(workdir) == before

  # The perplexity evaluations on 8 devices (each window split over them,
  # context-parallel attention): only they rerun (not passkey), with the
  # same numbers.
  if jax.device_count() >= 8:
    before_cp = records.read(os.path.join(workdir, "results.jsonl"))
    out = _main(ARGS + [f"--workdir={workdir}", "--config.evals.mask.num_sinks=2",
                        "--config.evals.length.context_devices=8",
                        "--config.evals.rope_scaling.context_devices=8",
                        "--config.evals.mask.context_devices=8"], capsys)
    assert "trained 0 model(s)" in out and "ran 4 evaluation(s)" in out
    again = records.read(os.path.join(workdir, "results.jsonl"))[
        len(before_cp):]
    key = lambda r: (r["experiment"], r["model"], r.get("variant"),
                     r.get("scaling"), r.get("mask"), r["eval_len"])
    old = {key(r): r for r in before_cp if r["metric"] == "perplexity"}
    new = [r for r in again if r["metric"] == "perplexity"]
    assert {r["experiment"] for r in new} == {"length", "rope_scaling",
                                              "mask"}
    for r in new:
      np.testing.assert_allclose(r["value"], old[key(r)]["value"], rtol=1e-5,
                                 err_msg=str(key(r)))
      assert r["n_tokens"] == old[key(r)]["n_tokens"]


def test_default_config_is_the_study():
  args = extrapolation.parse_flags(["extrapolation", "--workdir=/tmp/x"])
  config = args.config
  variants = extrapolation.split_names(config.variants)
  assert {"nope", "sinusoidal", "rope", "alibi", "t5"} <= set(variants)
  assert tuple(config.evals.length.multiples) == (1, 2, 4, 8, 16)
  assert config.evals.rope_scaling.models == "rope"
  assert {"linear", "dynamic", "yarn", "llama3"} <= set(
      extrapolation.split_names(config.evals.rope_scaling.methods))
  assert "lambda" in extrapolation.split_names(config.evals.mask.masks)
  extrapolation.validate_config(config)
  names = [e.name for e in extrapolation.evaluations(config)]
  assert [n for n in names if n.startswith("length/")] == [
      f"length/{v}" for v in variants + tuple(config.finetunes.keys())]
  assert "rope_scaling/rope" in names and "mask/rope" in names
  train = extrapolation.variant_config(config, "alibi", "/tmp/x")
  assert train.model.pe == "alibi" and train.data.cache_dir == "/tmp/x/data"
  assert config.train.model.pe == "rope"   # the shared config is untouched
  with pytest.raises(Exception, match="workdir"):
    extrapolation.parse_flags(["extrapolation"])


def test_bad_config_argument_is_one_line(capsys):
  # ml_collections wraps an error raised while loading the config file in
  # its traceback; the main prints the flag and the error's own line.
  with pytest.raises(SystemExit):
    extrapolation._flags_parser([  # pylint: disable=protected-access
        "extrapolation", "--config=experiments/configs/pretrained.py:quickk",
        "--workdir=/tmp/x"])
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 2
  assert ("pretrained.py:quickk: ValueError: unknown config argument "
          "'quickk'") in err.splitlines()[0]


@pytest.mark.parametrize("override, message", [
    ({"variants": "rope,bogus"}, r"\['bogus'\] not in"),
    ({"variants": "rope,rope"}, "repeats a name"),
    ({"variants": ""}, "config.variants is empty"),
    ({"evals.rope_scaling.models": "nope"},
     r"evals.rope_scaling.models='nope': \['nope'\] not in the variants"),
    ({"evals.rope_scaling.models": "alibi"},
     r"evals.rope_scaling: .*no RoPE layer"),
    ({"evals.rope_scaling.methods": "linear,pi"}, r"\['pi'\] not in"),
    ({"evals.rope_scaling.factors": "matched,big"}, "neither a number"),
    ({"evals.mask.masks": "window"},
     r"evals.mask: mask sweep entry 'window': mask must be one of"),
    ({"evals.length.multiples": (1, 0)}, "evals.length: multiples"),
    ({"evals.length.context_devices": 0}, "evals.length: context_devices"),
    ({"evals.mask.context_devices": 64}, r"context_devices=64 but only"),
    ({"evals.passkey.models": "nope"}, r"evals.passkey.models"),
    ({"evals.passkey.depths": (0.5, 2.0)}, r"evals.passkey: depths"),
    ({"evals.passkey.type": "bogus"}, r"evals.passkey: .*'bogus' is not one"),
    ({"evals.length.type": "no_such_module_xyz:fn"}, r"cannot import"),
    ({"train.model.mlp_dim": 0}, "mlp_dim"),
    ({"train.data.task": "copy"}, "the study models text"),
])
def test_bad_config_values_are_named(override, message):
  config = configs.get_config("extrapolation.py:quick")
  for path, value in override.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    extrapolation.validate_config(config)


def test_two_seeds_end_to_end_then_rerun_reuses(tmp_path, capsys):
  workdir = str(tmp_path / "seeds")
  args = ["--config=extrapolation.py:quick", "--config.variants=rope",
          "--config.seeds=0,1", "--config.evals.rope_scaling.models=none",
          "--config.evals.mask.models=none",
          "--config.evals.passkey.models=none", f"--workdir={workdir}"]
  out = _main(args, capsys)
  assert "trained 2 model(s) ['rope/seed0', 'rope/seed1']" in out
  runs = os.path.join(workdir, "runs", "rope")
  assert sorted(os.listdir(runs)) == ["seed0", "seed1"]
  for seed in (0, 1):
    with open(os.path.join(runs, f"seed{seed}", "config.json")) as f:
      assert json.load(f)["seed"] == seed

  results = records.read(os.path.join(workdir, "results.jsonl"))
  ppl = {(r["seed"], r["eval_len"]): r["value"] for r in results
         if r["metric"] == "perplexity"}
  assert sorted(ppl) == [(0, 16), (0, 64), (1, 16), (1, 64)]
  assert ppl[(0, 16)] != ppl[(1, 16)]      # two seeds, two models
  # The table: mean ± sample std of the two seeds, and n.
  for length in (16, 64):
    pair = np.array([ppl[(0, length)], ppl[(1, length)]])
    label = f"{length}" + (" (train)" if length == 16 else "")
    assert (f"| {label} | {pair.mean():.2f} ± {pair.std(ddof=1):.2f} |"
            in out)
  assert "(mean ± sample std over n=2 seeds)" in out
  with open(os.path.join(workdir, "report.md")) as f:
    assert "n=2 seeds" in f.read()
  assert os.path.getsize(
      os.path.join(workdir, "length_perplexity_nonoverlap.png")) > 1000
  with open(os.path.join(workdir, "evaluations.json")) as f:
    assert sorted(json.load(f)["evaluations"]) == [
        "length/rope/seed0", "length/rope/seed1"]

  # Again: both seeds reused, nothing re-evaluated, no new record.
  out = _main(args, capsys)
  assert ("trained 0 model(s) [], reused 2; ran 0 evaluation(s), skipped 2"
          in out)
  assert len(records.read(os.path.join(workdir, "results.jsonl"))) == len(
      results)

  # A third seed trains and evaluates only that one.
  out = _main([a.replace("0,1", "0,1,2") for a in args], capsys)
  assert "trained 1 model(s) ['rope/seed2']" in out
  assert "ran 1 evaluation(s), skipped 2" in out
  assert "n=3 seeds" in out


@pytest.mark.parametrize("value, message", [
    ((0, 0), r"config.seeds=\(0, 0\): a tuple of distinct"),
    ((-1,), r"config.seeds=\(-1,\)"),
    (0, r"config.seeds=0: a tuple"),
    ("0,1", r"config.seeds='0,1'"),
])
def test_bad_seeds_are_named(value, message):
  config = configs.get_config("extrapolation.py:quick")
  with config.ignore_type():   # a config file may set any type
    config.seeds = value
  with pytest.raises(ValueError, match=message):
    extrapolation.validate_config(config)


def test_seeds_count_and_zoo_refusal():
  config = configs.get_config("extrapolation.py:quick,seed=3,seeds=2")
  assert tuple(config.seeds) == (3, 4)
  with pytest.raises(ValueError, match="seeds=-1: a count"):
    configs.get_config("extrapolation.py:quick,seeds=-1")
  with config.ignore_type():   # an int count in a config file
    config.seeds = 3
  assert seeds.study_seeds(config) == (3, 4, 5)
  assert seeds.run_dir("/w", "rope", 4) == "/w/runs/rope/seed4"
  assert seeds.run_dir("/w", "rope", None) == "/w/runs/rope"
  config = configs.get_config("extrapolation.py:quick,from_zoo")
  config.seeds = (0, 1)
  with pytest.raises(ValueError, match=r"config.seeds=\(0, 1\) with "
                     r"config.from_zoo=True"):
    extrapolation.validate_config(config)


def _finetune_study():
  config = configs.get_config("extrapolation.py:quick")
  config.variants = "rope"
  config.evals.mask.models = "none"
  config.evals.passkey.models = "none"
  config.finetunes = ml_collections.ConfigDict()
  config.finetunes.rope_pi4 = dict(base="rope", method="pi", factor=4,
                                   steps=3, learning_rate=1e-3)
  return config


def test_finetuned_variant_beside_zero_shot(tmp_path):
  workdir = str(tmp_path / "ft")
  result = extrapolation.run_study(_finetune_study(), workdir)
  assert result.trained == ["rope", "rope_pi4"]
  saved = trainer.read_config(os.path.join(workdir, "runs", "rope_pi4"))
  assert saved.init_from == os.path.join(workdir, "runs", "rope")
  assert saved.train_len == 64 and saved.train_steps == 3
  assert json.loads(saved.model.rope_scaling) == {"rope_type": "linear",
                                                  "factor": 4.0}
  ppl = {(r["model"], r["eval_len"]): r for r in result.records
         if r["experiment"] == "length" and r["metric"] == "perplexity"}
  # Both measured at the study's lengths (multiples of its train_len).
  assert sorted(ppl) == [("rope", 16), ("rope", 64), ("rope_pi4", 16),
                         ("rope_pi4", 64)]
  assert ppl[("rope_pi4", 64)]["step"] == 3
  assert ppl[("rope_pi4", 64)]["value"] != ppl[("rope", 64)]["value"]
  text = open(result.report).read()
  assert "rope_pi4" in text and "rope linear matched" in text
  again = extrapolation.run_study(_finetune_study(), workdir)
  assert again.trained == [] and again.evaluated == []


@pytest.mark.parametrize("change, message", [
    (dict(base="alibi"), r"finetunes.rope_pi4.base='alibi' must be one of"),
    (dict(method="pip"), r"finetunes.rope_pi4.method='pip' must be one of"),
    (dict(factor=1), r"finetunes.rope_pi4.factor=1 must be a number > 1"),
    (dict(steps=0), r"finetunes.rope_pi4.steps=0 must be a number > 0"),
    (dict(lr=1.0), r"finetunes.rope_pi4: unknown settings \['lr'\]"),
])
def test_bad_finetunes_are_named(change, message):
  config = _finetune_study()
  entry = config.finetunes.rope_pi4.to_dict()
  entry.update(change)
  config.finetunes = ml_collections.ConfigDict({"rope_pi4": entry})
  with pytest.raises(ValueError, match=message):
    extrapolation.validate_config(config)


def test_default_config_is_the_main_job():
  """3 seeds for the core comparison, the RoPE sweeps on one seed, PI and
  YaRN fine-tunes to 4x beside their zero-shot versions, and a model
  trained on short passkey examples scored at 0.5x to 8x."""
  config = configs.get_config("extrapolation.py")
  extrapolation.validate_config(config)
  assert tuple(config.seeds) == (0, 1, 2)
  assert extrapolation.split_names(config.variants) == (
      "nope", "sinusoidal", "learned", "rope", "alibi", "t5")
  assert config.evals.rope_scaling.seeds == "0"
  assert config.evals.mask.seeds == "0"
  assert config.evals.length.get("seeds") is None
  methods = {f.method: f for f in config.finetunes.values()}
  for method in ("pi", "yarn"):
    assert methods[method].base == "rope" and methods[method].factor == 4
  assert set(config.evals.rope_scaling.methods.split(",")) >= {"linear",
                                                               "yarn"}
  retrieval = [n for n, f in config.finetunes.items()
               if f.get("retrieval_mix")]
  assert retrieval == ["rope_passkey"]
  assert config.evals.passkey.prompt == "short"
  assert config.evals.passkey.models == ""
  assert config.train.train_len in config.evals.passkey.lengths
  assert max(config.evals.passkey.lengths) == 8 * config.train.train_len
  # The train recipe is the zoo's (from_zoo reads the shipped weights).
  zoo = configs.get_config("extrapolation.py:from_zoo")
  assert zoo.seeds == () and not zoo.finetunes
  extrapolation.validate_config(zoo)


def test_seeds_per_evaluation_finetune_bases_and_retrieval(tmp_path):
  config = configs.get_config("extrapolation.py:quick,seeds=2")
  config.variants = "rope"
  config.finetunes = ml_collections.ConfigDict(dict(
      rope_pi4=dict(base="rope", method="pi", factor=4, steps=2,
                    learning_rate=1e-3),
      rope_passkey=dict(base="rope", method="continue", factor=2, steps=2,
                        retrieval_mix=0.5)))
  config.evals.mask.models = "none"
  config.evals.passkey.models = "rope_passkey"
  workdir = str(tmp_path / "study")
  result = extrapolation.run_study(config, workdir)
  assert sorted(result.trained) == sorted(
      f"{v}/seed{s}" for v in ("rope", "rope_pi4", "rope_passkey")
      for s in (0, 1))
  by = {}
  for r in result.records:
    by.setdefault(r["experiment"], []).append(r)
  assert {r["seed"] for r in by["rope_scaling"]} == {0}   # seeds="0"
  assert {(r["model"], r["seed"]) for r in by["length"]} == {
      (m, s) for m in ("rope", "rope_pi4", "rope_passkey") for s in (0, 1)}
  assert {r.get("base") for r in by["length"]} == {None, "rope"}
  assert {(r["model"], r["base"], r["eval_len"], r["seed"])
          for r in by["passkey"]} == {("rope_passkey", "rope", 32, 0),
                                      ("rope_passkey", "rope", 32, 1)}
  saved = trainer.read_config(seeds.run_dir(workdir, "rope_passkey", 1))
  assert saved.data.retrieval_mix == 0.5 and saved.train_len == 32
  assert saved.init_from == seeds.run_dir(workdir, "rope", 1)
  assert saved.model.rope_scaling is None
  # The PI fine-tune sits beside the zero-shot scalings (not the passkey
  # model, which has no scaling).
  text = extrapolation.summary_tables(result.records, result.types)
  section = text[text.index("## rope_scaling"):]
  header = section.splitlines()[4]
  assert "rope_pi4 linear x4" in header and "rope linear matched" in header
  assert "rope_passkey" not in header
  with pytest.raises(ValueError, match=r"evals.mask: seeds='5' must name "
                     r"seeds of config.seeds=\(0, 1\)"):
    config.evals.mask.seeds = "5"
    extrapolation.validate_config(config)
