"""Smoke test of benchmarks/sinks_kernels_cpu.py at T = 128: the Pallas
kernels visit the same blocks with and without learned sinks."""

import json

import pytest

from tests import benchmarks


@pytest.fixture(scope="module")
def bench():
  return benchmarks.load("sinks_kernels_cpu")


def test_quick_run_same_blocks_with_and_without_sinks(bench, tmp_path):
  out = tmp_path / "bench.json"
  payload = bench.main(["--quick", "--masks", "causal,lambda", "--out",
                        str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk["rows"] == payload["rows"]
  rows = {(r["kernel"], r["mask"]): r for r in on_disk["rows"]}
  assert sorted(rows) == [("pallas_gpu", "causal"), ("pallas_gpu", "lambda"),
                          ("pallas_tpu", "causal"), ("pallas_tpu", "lambda")]
  for key, r in rows.items():
    assert r["same_kernel_config"] and r["same_kernel_inputs"], key
    assert r["same_blocks"], key
    for kind in ("fwd", "dq", "dkv"):
      # The kernels skip what the classifier calls empty, sinks or not.
      assert r[f"{kind}_visited_none"] == r[f"{kind}_visited_sinks"] == (
          r[f"{kind}_classifier"]), (key, kind)
      assert r[f"{kind}_visited_sinks"] < r[f"{kind}_grid"], (key, kind)
    # The sinks did change the output, and the kernels' output with them
    # is the xla oracle's.
    assert r["sinks_change_output_max_abs"] > 0.05, key
    assert r["max_abs_err_vs_xla_sinks"] < 1e-5, key
    assert r["max_abs_err_vs_xla_none"] < 1e-5, key
  # 4 x 4 blocks of 32, causal: 10 of 16 pairs per head (4 heads).
  assert rows[("pallas_gpu", "causal")]["fwd_visited_sinks"] == 40
  # Lambda(4, 32) visits fewer blocks than causal.
  assert rows[("pallas_gpu", "lambda")]["fwd_visited_sinks"] < 40
  assert rows[("pallas_gpu", "causal")]["merge_elements"] == 128 * 4 * 32


def test_unknown_kernel_is_named(bench, tmp_path):
  with pytest.raises(ValueError, match=r"--kernels: \['cudnn'\] not in"):
    bench.main(["--quick", "--kernels", "cudnn", "--out",
                str(tmp_path / "x.json")])
