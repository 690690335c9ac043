"""The zoo's shipped weights: cards, reproduction, the build, the wheel."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from extrapolax.experiments import configs
from extrapolax.experiments import data as data_lib
from extrapolax.experiments import modeling
from extrapolax.experiments import trainer
from extrapolax.experiments import zoo_build
from extrapolax.experiments.evaluators import perplexity as perplexity_lib
from extrapolax.models import zoo
from extrapolax.models import zoo_cards

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = [n for n in zoo.presets() if zoo.info(n).shipped]
BASES = zoo_build.base_presets(TINY)
TINY_BYTES = 15 * 2**20


@pytest.fixture(autouse=True)
def _packaged_only(monkeypatch, tmp_path):
  """Only the shipped checkpoints (no ~/.cache, no $EXTRAPOLAX_CHECKPOINTS)."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv(zoo.CHECKPOINTS_ENV, raising=False)


def _card(name):
  card = zoo.info(name).card
  assert card["trained"], card
  return card


def test_every_tiny_preset_ships_a_card_from_one_recipe():
  assert len(BASES) == 10 and set(os.listdir(zoo_cards.PACKAGED_DIR)) == set(
      BASES)
  recipe = _card("rope-tiny")["recipe"]
  assert recipe["train_len"] == 64 and recipe["train_steps"] == 1000
  assert recipe["batch_size"] == 16 and recipe["seed"] == 0
  for name in TINY:
    card = _card(name)
    assert card["preset"] == name and card["recipe"] == recipe, name
    assert card["checkpoint"] == os.path.join(
        zoo_cards.PACKAGED_DIR, zoo.info(name).weights_from)
    assert card["tokens_seen"] == 1000 * 16 * 64
    assert 0.5 < card["final_loss"] < 3.0, (name, card["final_loss"])
    assert sorted(card["perplexity"], key=int) == [
        str(m * 64) for m in (1, 2, 4, 8, 16)]
    assert sorted(card["passkey_accuracy"]) == ["256", "512"]


def test_cards_show_the_studys_extrapolation():
  alibi = _card("alibi-tiny")["perplexity"]
  assert alibi["256"] <= 1.15 * alibi["64"], alibi
  # sinusoidal breaks once past the training length, and keeps degrading
  sinusoidal = _card("sinusoidal-tiny")["perplexity"]
  assert sinusoidal["128"] > 1.5 * sinusoidal["64"], sinusoidal
  values = [sinusoidal[str(m * 64)] for m in (1, 2, 4, 8, 16)]
  assert values == sorted(values), sinusoidal
  # the learned table cannot run past train_len: no number, not a guess
  assert _card("learned-tiny")["perplexity"]["128"] is None


@pytest.fixture(scope="module")
def eval_documents(tmp_path_factory):
  config = configs.get_config("zoo.py:preset=rope-tiny")
  config.data.cache_dir = str(tmp_path_factory.mktemp("data"))
  return data_lib.eval_documents(config)


@pytest.mark.parametrize("name", TINY)
def test_card_perplexity_is_reproduced_by_the_evaluator(name, eval_documents):
  card = _card(name)
  settings = card["eval"]
  assert settings["num_documents"] == len(eval_documents)
  lengths = [64, 256] if name != "learned-tiny" else [64]
  records = perplexity_lib.perplexity_vs_length(
      zoo.from_pretrained(name), eval_documents, lengths=lengths,
      max_tokens=settings["max_tokens"],
      tokens_per_batch=settings["tokens_per_batch"],
      implementation=settings["implementation"], position_buckets=0)
  for length, value in perplexity_lib.perplexity_table(records).items():
    assert value == pytest.approx(card["perplexity"][str(length)],
                                  rel=0.01), (name, length)


def test_zoo_md_is_the_cards_table_and_the_readme_links_it():
  text = (ROOT / "models" / "ZOO.md").read_text()
  assert text == zoo_build.table([zoo_cards.PACKAGED_DIR])
  assert len([l for l in text.splitlines()
              if l.startswith("| ") and "-tiny |" in l
              and "not shipped" not in l]) == len(TINY)
  assert "models/ZOO.md" in (ROOT / "README.md").read_text()


def test_table_flag_keeps_the_shipped_presets_shipped(tmp_path):
  out = tmp_path / "ZOO.md"
  assert zoo_build.main(["--table", str(out),
                         "--out", str(tmp_path / "empty")]) == 0
  assert out.read_text() == zoo_build.table([zoo_cards.PACKAGED_DIR])


def test_preset_field_trains_the_presets_architecture():
  config = configs.get_config("tiny.py")
  config.train_len = 64
  config.model.preset = "hybrid-tiny"
  assert modeling.model_config(config) == zoo.config("hybrid-tiny")
  config.model.d_model = 128
  with pytest.raises(ValueError, match=r"config.model.d_model=128 disagrees "
                     r"with config.model.preset='hybrid-tiny' \(d_model=64\)"):
    modeling.model_config(config)
  config.model.d_model = 64
  config.model.mask = "sliding_window"
  with pytest.raises(ValueError, match="the preset sets the attention"):
    modeling.model_config(config)
  config.model.mask = "causal"
  config.model.preset = "alibi-tinyy"
  with pytest.raises(ValueError, match=r"preset='alibi-tinyy'.*alibi-tiny"):
    modeling.model_config(config)


@pytest.mark.slow
def test_build_of_one_preset_writes_a_loadable_checkpoint_and_card(
    tmp_path, eval_documents):
  out, runs = tmp_path / "out", tmp_path / "runs"
  assert zoo_build.main(["alibi-tiny", "--steps", "3", "--out", str(out),
                         "--workdir", str(runs), "--max-tokens", "256",
                         "--table", str(tmp_path / "ZOO.md")]) == 0
  model = zoo.from_pretrained(str(out / "alibi-tiny"))
  card = zoo_cards.card("alibi-tiny", "alibi-tiny", [str(out)])
  assert card["trained"] and card["tokens_seen"] == 3 * 16 * 64
  assert card["recipe"]["train_steps"] == 3 and card["eval"]["max_tokens"] == (
      256)
  assert all(math.isfinite(v) for v in card["perplexity"].values())
  assert zoo_cards.fingerprint_matches(zoo_cards.fingerprint(model),
                                       card["fingerprint"], rtol=1e-5)
  # the run's own model gives the same logits as the exported checkpoint
  run_model, _ = trainer.load_model(str(runs / "alibi-tiny-3"))
  tokens = zoo_cards.fingerprint_tokens(64)
  np.testing.assert_array_equal(np.asarray(run_model(tokens)),
                                np.asarray(model(tokens)))
  assert "| alibi-tiny | alibi |" in (tmp_path / "ZOO.md").read_text()
  with pytest.raises(SystemExit):
    zoo_build.main(["--steps", "3"])


_CHECK_INSTALLED = """
import json, os, sys
from extrapolax.models import zoo, zoo_cards
assert zoo.__file__.startswith(sys.argv[1]), zoo.__file__
out = {}
for name in json.loads(sys.argv[2]):
  card = zoo.info(name).card
  got = zoo_cards.fingerprint(zoo.from_pretrained(name))
  out[name] = [card["checkpoint"], zoo_cards.fingerprint_matches(
      got, card["fingerprint"])]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_installed_wheel_loads_every_tiny_preset_offline(tmp_path):
  # Built from a copy: setuptools writes build/ into the source folder, and
  # test_packaging builds a wheel from the checkout at the same time.
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.py", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for folder in ("common", "attention", "pallas_kernels", "models",
                 "experiments"):
    shutil.copytree(ROOT / folder, source / folder,
                    ignore=shutil.ignore_patterns("__pycache__", ".*.saving-*"))
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
       "--no-build-isolation", "-w", str(tmp_path), str(source)],
      check=True, cwd=tmp_path)
  wheel, = tmp_path.glob("extrapolax-*.whl")
  shipped = [i for i in zipfile.ZipFile(wheel).infolist()
             if "/pretrained/" in i.filename or i.filename.endswith("ZOO.md")]
  assert sum(i.compress_size for i in shipped) < TINY_BYTES
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-index", "--target", str(target), str(wheel)],
                 check=True, cwd=tmp_path)
  env = {k: v for k, v in os.environ.items()
         if k not in (zoo.CHECKPOINTS_ENV, "PYTHONPATH")}
  env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(target),
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _CHECK_INSTALLED, str(target), json.dumps(TINY)],
      check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
  loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert sorted(loaded) == sorted(TINY)
  for name, (checkpoint, matches) in loaded.items():
    assert checkpoint.startswith(str(target)), (name, checkpoint)
    assert matches, name


def test_study_runs_from_the_zoos_weights_without_training(tmp_path):
  from extrapolax.experiments import extrapolation  # pylint: disable=import-outside-toplevel
  config = configs.get_config("extrapolation.py:from_zoo")
  config.variants = "rope,alibi"
  config.evals.length.multiples = (1, 4)
  config.evals.length.max_tokens = 512
  for name in ("rope_scaling", "mask", "passkey"):
    config.evals[name].models = "none"
  result = extrapolation.run_study(config, str(tmp_path / "study"))
  assert result.trained == [] and result.reused == ["rope", "alibi"]
  assert not (tmp_path / "study" / "runs").exists()
  ppl = {(r["model"], r["eval_len"]): r for r in result.records
         if r["metric"] == "perplexity"}
  assert sorted(ppl) == [("alibi", 64), ("alibi", 256), ("rope", 64),
                         ("rope", 256)]
  assert ppl[("alibi", 64)]["step"] == 1000
  config.train.train_steps = 10
  with pytest.raises(ValueError, match=r"config.from_zoo: the study trains "
                     r"'rope' with train_steps=10 but rope-tiny was trained "
                     r"with train_steps=1000"):
    extrapolation.validate_config(config)
