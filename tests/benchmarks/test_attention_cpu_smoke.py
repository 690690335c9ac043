"""Smoke test of benchmarks/attention_cpu.py at a tiny length (T = 256)."""

import dataclasses
import json

import pytest

from tests import benchmarks


@pytest.fixture(scope="module")
def bench():
  return benchmarks.load("attention_cpu")


_TINY = ["--quick", "--lengths", "256", "--block_q", "64", "--block_k", "64"]


def test_quick_run_in_subprocesses(bench, tmp_path):
  out = tmp_path / "bench.json"
  payload = bench.main(_TINY + ["--masks", "causal", "--passes", "fwd",
                                "--out", str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk["records"] == payload["records"]
  machine = on_disk["machine"]
  assert machine["cpu_count"] >= 1 and machine["jax_version"]
  assert machine["devices"]

  records = {r["implementation"]: r for r in on_disk["records"]}
  assert sorted(records) == ["xla", "xla_chunked"]
  for r in records.values():
    assert (r["mask"], r["length"], r["pass"]) == ("causal", 256, "fwd")
    assert "skipped" not in r and "error" not in r, r
    assert r["time_s"] > 0 and r["runs"] >= 1 and r["compile_s"] > 0
    assert r["xla_memory_bytes"] > 0
    assert r["rss_growth_mb"] >= 0
    assert r["gflops_dense_equivalent"] > 0 and r["gflops_visited"] > 0
  dense, chunked = records["xla"], records["xla_chunked"]
  assert dense["visited_fraction"] == 1.0
  # 4 x 4 blocks of 64, causal: 10 of 16 pairs are non-empty.
  assert chunked["visited_fraction"] == pytest.approx(10 / 16)
  assert (chunked["block_q"], chunked["block_k"]) == (64, 64)
  # Dense holds 4 x 256 x 256 float32 logits; chunked only 64 x 64 blocks.
  assert chunked["xla_memory_bytes"] < dense["xla_memory_bytes"]


def test_budgets_skip_with_reasons(bench, tmp_path):
  out = tmp_path / "bench.json"
  bench.main(_TINY + ["--masks", "packed", "--passes", "fwd_bwd",
                      "--no_subprocess", "--memory_budget_gb", "1e-6",
                      "--out", str(out)])
  records = json.loads(out.read_text())["records"]
  assert [r["implementation"] for r in records] == ["xla", "xla_chunked"]
  dense, chunked = records
  assert dense["skipped"].startswith("dense logits would need")
  assert "time_s" not in dense
  assert chunked["pass"] == "fwd_bwd" and chunked["time_s"] > 0
  assert 0 < chunked["chunked_visited_fraction"] < 1
  assert "segment_ids" in chunked["mask_detail"]


def test_time_budget_extrapolates(bench):
  cfg = bench.Config(implementation="xla_chunked", mask="causal",
                     length=2048, pass_="fwd")
  history = {cfg.key(): [(1024, 1.0, 0.5)]}
  reason = bench.skip_reason(cfg, 0.5, history, memory_budget_gb=8.0,
                             time_budget_s=5.0)
  assert reason is not None and "estimated 4 s per run" in reason
  assert bench.skip_reason(cfg, 0.5, history, memory_budget_gb=8.0,
                           time_budget_s=100.0) is None
  # Time that grew 8x per doubling is extrapolated as T^3, not T^2.
  history = {cfg.key(): [(512, 0.125, 0.5), (1024, 1.0, 0.5)]}
  reason = bench.skip_reason(cfg, 0.5, history, memory_budget_gb=8.0,
                             time_budget_s=10.0)
  assert "estimated 8 s per run" in reason and "T^3.0 growth" in reason
  dense = bench.Config(implementation="xla", mask="causal", length=16384,
                       pass_="fwd")
  # 4 heads x 16384^2 float32 = 4.3 GB of logits, x3 > 8 GB.
  assert "4.3 GB" in bench.skip_reason(dense, 1.0, {}, 8.0, 1e9)
  small = dataclasses.replace(dense, length=8192)
  assert bench.skip_reason(small, 1.0, {}, 8.0, 1e9) is None
