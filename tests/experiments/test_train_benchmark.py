"""Smoke test of benchmarks/train_cpu.py (one pe, a few steps)."""

import importlib.util
import json
import os

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                       "benchmarks", "train_cpu.py")


def test_quick_benchmark_writes_records_and_table(tmp_path):
  spec = importlib.util.spec_from_file_location("train_cpu", _SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "train_cpu.json"
  # The step part only: trainer.train on the real data path is covered by
  # test_train_main.py.
  payload = bench.main(["--quick", "--dtypes", "float32", "--steps", "2",
                        "--no_train", "--out", str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk["records"] == payload["records"]
  assert on_disk["machine"]["cpu_count"] >= 1
  (step,) = on_disk["records"]
  assert (step["kind"], step["pe"], step["dtype"]) == ("step", "rope",
                                                       "float32")
  assert step["tokens_per_sec"] > 0 and step["compile_s"] > 0
  assert len(step["step_ms_all"]) == 2
  assert step["batch_size"] * step["train_len"] == 16 * 128
  assert abs(step["tokens_per_sec"] * step["step_ms"] / 1e3 - 2048) < 1e-6
  assert step["step_ms"] <= step["step_ms_median"]
  assert "| step | rope | float32 | 16 x 128 |" in on_disk["table"]
