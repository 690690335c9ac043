"""Smoke test of benchmarks/context_parallel.py at a tiny length (T = 256)."""

import importlib.util
import json
import os
import sys

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                       "benchmarks", "context_parallel.py")


def test_tiny_run_writes_records(tmp_path):
  spec = importlib.util.spec_from_file_location("context_parallel_bench",
                                                _SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench
  spec.loader.exec_module(bench)
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
