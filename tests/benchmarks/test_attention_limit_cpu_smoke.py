"""Smoke test of benchmarks/attention_limit_cpu.py at T = 256: the rows, each
rate as a fraction of its block shape's matmul limit, and the paired ratio
against the first variant."""

import json

import pytest

from tests import benchmarks


def test_rows_fractions_and_paired_ratios(tmp_path):
  bench = benchmarks.load("attention_limit_cpu")
  out = tmp_path / "bench.json"
  rows = bench.main(["--lengths", "256", "--masks", "causal", "--head_dims",
                     "16", "--dtypes", "float32", "--blocks", "128x64",
                     "--repeats", "2", "--out", str(out)])
  assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
  got = {(r["implementation"], r["pass_"]): r for r in rows}
  assert sorted(got) == [(impl, p) for impl in ("xla_chunked",
                                                "xla_chunked 128x64")
                         for p in ("fwd", "fwd_bwd")]
  for (impl, pass_), r in got.items():
    assert r["fraction"] == pytest.approx(r["gflops"] / r["limit_gflops"])
    paired = [a / b for a, b in zip(r["times_s"],
                                    got[("xla_chunked", pass_)]["times_s"])]
    assert r["paired_vs_first"] == pytest.approx(sorted(paired)[0] / 2
                                                 + sorted(paired)[1] / 2)
    if impl == "xla_chunked":
      assert r["paired_vs_first"] == 1.0
  # T = 256, causal: default blocks clamp to one 256 x 256 pair; 128 x 64
  # visits the 2 x 4 grid's lower triangle and diagonal blocks (6 pairs).
  assert got[("xla_chunked", "fwd")]["pairs"] == 1
  assert got[("xla_chunked 128x64", "fwd")]["pairs"] == 6
