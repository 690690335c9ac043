"""Smoke test of benchmarks/t5_train_cpu.py at a tiny length (T = 256)."""

import json

import numpy as np

from tests import benchmarks


def test_tiny_run(tmp_path):
  bench = benchmarks.load("t5_train_cpu")
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
