"""Smoke test of benchmarks/context_parallel.py at a tiny length (T = 256)."""

import json

from tests import benchmarks


def test_tiny_run_writes_records(tmp_path):
  bench = benchmarks.load("context_parallel")
  out = tmp_path / "cp.json"
  payload = bench.main(["--lengths", "256", "--masks", "window,lambda",
                        "--passes", "fwd", "--repeats", "1", "--block_q",
                        "32", "--block_k", "32", "--out", str(out)])
  assert json.loads(out.read_text())["records"] == payload["records"]
  records = {(r["implementation"], r["mask"]): r for r in payload["records"]}
  assert len(records) == 6
  for r in records.values():
    assert "error" not in r, r
    assert r["time_s"] > 0 and r["device_memory_bytes"] > 0
    assert r["context"] == 8
  # SlidingWindow(L): two ring steps, one exchange of k, v and positions.
  window = records[("ring", "window")]
  assert window["ring_steps"] == 2 and 0 < window["collective_permutes"] <= 3
  assert records[("ring", "lambda")]["separate_sinks"] == 16
  assert records[("single", "window")]["collective_permutes"] == 0
