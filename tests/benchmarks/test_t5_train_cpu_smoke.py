"""Smoke test of benchmarks/t5_train_cpu.py at a tiny length (T = 256)."""

import importlib.util
import json
import os
import sys

import numpy as np

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                       "benchmarks", "t5_train_cpu.py")


def test_tiny_run(tmp_path):
  spec = importlib.util.spec_from_file_location("t5_train_cpu", _SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench
  spec.loader.exec_module(bench)
  out = tmp_path / "bench.json"
  payload = bench.main(["--lengths", "128", "256", "--steps", "2",
                        "--no_subprocess", "--out", str(out)])
  assert json.loads(out.read_text())["rows"] == payload["rows"]
  assert [r["length"] for r in payload["rows"]] == [128, 256]
  for r in payload["rows"]:
    assert len(r["losses"]) == len(r["step_s"]) == 2
    assert np.all(np.isfinite(r["losses"]))
    assert r["loss_finite_and_decreasing"], r["losses"]
    assert r["memory"]["temp"] > 0 and r["peak_rss"] > 0
    assert r["dense_bias_memory"]["temp"] > 0
  assert "| 256 |" in payload["table"]
