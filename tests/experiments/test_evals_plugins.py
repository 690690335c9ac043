"""Evaluator plug-ins: a user's evaluator from an outside module (this one)
runs through ``config.evals``, its records and report section land in
results.jsonl and report.md; a crash between appending records and marking
the evaluation done does not duplicate them on the rerun; the newcomer
path of the mains (help, config help, one-line errors)."""

import glob
import os
import subprocess
import sys

import pytest

from extrapolax.experiments import configs
from extrapolax.experiments import evals
from extrapolax.experiments import extrapolation
from extrapolax.experiments import records
from extrapolax.experiments import report


# --- A user's evaluators, as they would write them in their own module. ---


def token_count(model, documents, settings, labels):
  """A plain function: one record per length, the generic report."""
  del model
  total = sum(len(d) for d in documents)
  return [records.make_record(
      **labels, pe=labels["model"], scaling="none", scale=1.0,
      mask="causal", train_len=settings["train_len"], eval_len=length,
      mode=None, stride=None, task=None, metric="documents_tokens",
      value=float(total), n_tokens=total) for length in settings["lengths"]]


def _validate(settings, study):
  lengths = tuple(settings.get("lengths", ()))
  if not lengths or min(lengths) < 1:
    raise ValueError(f"lengths={lengths!r} must be positive integers")
  return dict(lengths=lengths, train_len=int(study.train.train_len))


def _report(group, out_dir, all_records):
  del out_dir, all_records
  return "## my check\n\n" + report.length_table(group, "documents_tokens")


MY_EVALUATOR = evals.Evaluator(name="my_check", run=token_count,
                               validate=_validate, report=_report,
                               help={"lengths": "lengths to record"})


def _study(**evaluations):
  config = configs.get_config("extrapolation.py:quick")
  config.unlock()
  config.variants = "rope"
  for name in list(config.evals.keys()):
    del config.evals[name]
  for name, entry in evaluations.items():
    config.evals[name] = entry
  return config


README = os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                      "README.md")


def test_user_evaluator_runs_from_config(tmp_path, monkeypatch):
  here = __name__
  # experiments/README.md's complete example, saved as my_evals.py.
  text = open(README, encoding="utf-8").read()
  example = text.split("save as `my_evals.py`", 1)[1].split("```python\n", 1)[
      1].split("```", 1)[0]
  (tmp_path / "my_evals.py").write_text(example)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = _study(
      length=dict(type="length", models="", multiples=(1,), max_tokens=64),
      mine=dict(type=f"{here}:MY_EVALUATOR", models="rope", lengths=(16, 32)),
      plain=dict(type=f"{here}:token_count", models=""),
      prefix=dict(type="my_evals:PREFIX_LOSS", models="", prefix=8))
  config.evals.plain.lengths = (16,)
  config.evals.plain.train_len = 16
  workdir = str(tmp_path / "study")
  result = extrapolation.run_study(config, workdir)
  assert sorted(result.evaluated) == ["length/rope", "mine/rope",
                                      "plain/rope", "prefix/rope"]
  got = records.read(os.path.join(workdir, "results.jsonl"))
  mine = [r for r in got if r["experiment"] == "mine"]
  assert [r["eval_len"] for r in mine] == [16, 32]
  assert all(r["value"] > 0 and r["step"] == 4 for r in mine)
  assert {r["experiment"] for r in got} == {"length", "mine", "plain",
                                            "prefix"}
  text = open(result.report).read()
  assert "## Prefix loss" in text
  assert "## my check" in text and "| eval length | rope |" in text
  # The plain function gets the generic section (a table and a plot).
  assert "## plain: documents_tokens" in text
  assert os.path.isfile(os.path.join(workdir, "plain_documents_tokens.png"))
  # The printed summary asks the same evaluators.
  assert "## my check" in extrapolation.summary_tables(got, result.types)
  # Re-reported from the workdir alone (config.json names the types).
  again = tmp_path / "again"
  report.write_report(workdir, str(again))
  assert "## my check" in open(again / "report.md").read()
  # TensorBoard: the evaluation scalars sit beside the training runs'.
  events = b"".join(open(p, "rb").read() for p in glob.glob(
      os.path.join(workdir, "events.out.tfevents.*")))
  assert b"eval/mine/rope/documents_tokens_L32" in events
  assert b"eval/length/rope/perplexity_nonoverlap_L16" in events
  # A rerun skips everything.
  result = extrapolation.run_study(config, workdir)
  assert result.evaluated == [] and len(result.records) == len(got)


def test_bad_user_settings_are_named():
  config = _study(mine=dict(type=f"{__name__}:MY_EVALUATOR", models="",
                            lengths=(0,)))
  with pytest.raises(ValueError, match=r"config.evals.mine: lengths=\(0,\)"):
    extrapolation.validate_config(config)
  config = _study(mine=dict(type=f"{__name__}:NO_SUCH", models=""))
  with pytest.raises(ValueError, match="has no Evaluator or function"):
    extrapolation.validate_config(config)


def test_crash_before_marking_done_does_not_duplicate(tmp_path, monkeypatch):
  config = _study(
      length=dict(type="length", models="", multiples=(1, 2), max_tokens=64),
      mine=dict(type=f"{__name__}:MY_EVALUATOR", models="", lengths=(16,)))
  workdir = str(tmp_path / "study")
  real = extrapolation._write_done  # pylint: disable=protected-access
  calls = []

  def crash_on_second(*args):
    calls.append(1)
    if len(calls) == 2:     # the second evaluation appended, not marked
      raise RuntimeError("killed")
    real(*args)

  monkeypatch.setattr(extrapolation, "_write_done", crash_on_second)
  with pytest.raises(RuntimeError, match="killed"):
    extrapolation.run_study(config, workdir)
  monkeypatch.setattr(extrapolation, "_write_done", real)
  result = extrapolation.run_study(config, workdir)
  assert result.evaluated == ["mine/rope"]
  keys = [(r["experiment"], r["metric"], r["eval_len"], r.get("position"))
          for r in result.records]
  assert len(keys) == len(set(keys)), "duplicated records"
  assert sum(k[0] == "mine" for k in keys) == 1


# --- The newcomer path of the mains. ---


def _python_m(module, *args, cwd):
  return subprocess.run(
      [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
      text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("module", ["extrapolax.experiments.extrapolation",
                                    "extrapolax.experiments.train"])
def test_help_and_one_line_errors(module, tmp_path):
  done = _python_m(module, "--help", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "usage:" in done.stdout and "--config_help" in done.stdout
  assert "FATAL" not in done.stdout + done.stderr

  study = module.endswith("extrapolation")
  config = "extrapolation.py:quick" if study else "tiny.py"
  field = "train.model" if study else "model"
  done = _python_m(module, f"--config={config}", "--config_help",
                   cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"--config.{field}.d_model=32" in done.stdout or (
      f"--config.{field}.d_model=64" in done.stdout)
  assert "  --config.seed=0" in done.stdout or study
  if study:
    lines = done.stdout.splitlines()
    at = lines.index("  --config.evals.length.max_tokens=512")
    assert "scored tokens per length" in lines[at + 1]

  done = _python_m(module, f"--config={config}",
                   f"--config.{field}.d_modle=128",
                   f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert done.returncode == 1
  first = done.stderr.strip().splitlines()[0]
  assert f"--config.{field}.d_modle" in first
  assert f"did you mean --config.{field}.d_model" in first
  assert "Traceback" not in done.stderr

  if study:   # the default config (no --config) loads its overrides early
    done = _python_m(module, f"--config.{field}.d_modle=128",
                     f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"did you mean --config.{field}.d_model" in done.stderr

  (tmp_path / "afile").write_text("x")
  done = _python_m(module, f"--config={config}",
                   f"--workdir={tmp_path / 'afile'}", cwd=tmp_path)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("error: --workdir=")
  assert "is a file" in done.stderr and "Traceback" not in done.stderr


def test_builtin_evaluators_check_their_settings():
  study = configs.get_config("extrapolation.py:quick")
  assert evals.get("perplexity") is evals.get("length")
  assert evals.names()[:5] == ("length", "perplexity", "rope_scaling", "mask",
                               "passkey")
  with pytest.raises(ValueError, match=r"unknown settings \['multiple'\]"):
    evals.get("length").validate({"multiple": (1,)}, study)
  assert evals.get("passkey").validate({"lengths": ()}, study) is None
  with pytest.raises(ValueError, match="task=None: name a task"):
    evals.get("algorithmic").validate({"lengths": (8,), "train_len": 16},
                                      study)
  checked = evals.get("algorithmic").validate(
      {"task": "copy", "lengths": "8,16", "train_len": 8}, study)
  assert checked["lengths"] == (8, 16)
  # models="none" and passkey without lengths: nothing to run.
  study.evals.mask.models = "none"
  study.evals.passkey.lengths = ()
  names = [e.name for e in extrapolation.evaluations(study)]
  assert names == ["length/rope", "rope_scaling/rope", "length/alibi"]
