"""Smoke test of benchmarks/relative_bias_cpu.py at a tiny length."""

import json

from tests import benchmarks


def test_tiny_run(tmp_path):
  bench = benchmarks.load("relative_bias_cpu")
  out = tmp_path / "bench.json"
  # A limit of 4 MiB: at T = 128 the cheaper cases run and the others are
  # skipped (as dense ones past 8 GB in the real run).
  rows = bench.main(["--lengths", "128", "--repeats", "1", "--heads", "2",
                     "--kv_heads", "1", "--head_dim", "8",
                     "--dense_limit_gb", str(4 / 1024), "--out", str(out)])
  assert json.loads(out.read_text())["rows"] == rows
  assert len(rows) == 3 * 2 * 2          # schemes x passes x paths
  ran = [row["median_s"] is not None for row in rows]
  for row, r in zip(rows, ran):
    assert row["memory_bytes"] > 0
    assert r == (row["memory_bytes"] <= 4 * 2**20), row
    assert not r or row["best_s"] > 0
  assert any(ran) and not all(ran)
