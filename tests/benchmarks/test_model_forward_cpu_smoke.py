"""Smoke test of benchmarks/model_forward_cpu.py --bound at T = 256, one
layer: the rows, the bound's arithmetic and the attention-skipped model."""

import json

import numpy as np
import pytest

from tests import benchmarks


@pytest.fixture(scope="module")
def bench():
  return benchmarks.load("model_forward_cpu")


def test_bound_is_rest_plus_attentions_matmul_limit(bench, tmp_path):
  out = tmp_path / "bench.json"
  rows, bound = bench.main(["--length", "256", "--layers", "1", "--bound",
                            "--repeats", "1", "--out", str(out)])
  assert [r["variant"] for r in rows] == [
      "new", "rest (attention skipped)", "limit (attention's products only)"]
  assert json.loads(out.read_text())["bound"] == bound
  assert bound["bound_s"] == pytest.approx(
      rows[1]["time_best_s"] + rows[2]["time_best_s"])
  # One 256 x 256 block pair (causal, T = 256), 9 heads, head_dim 64.
  assert bound["attention_flops"] == 4 * 9 * 256 * 256 * 64
  assert bound["bound_vs"]["new"] == pytest.approx(
      bound["bound_s"] / rows[0]["time_best_s"])


def test_skipped_attention_returns_each_heads_values(bench):
  import jax  # pylint: disable=import-outside-toplevel
  from extrapolax import attention  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, 8, 6, 4))
  k = jax.random.normal(keys[1], (1, 8, 2, 4))
  v = jax.random.normal(keys[2], (1, 8, 2, 4))
  out = attention.dot_product_attention(
      q, k, v, mask=attention.Causal(), implementation=bench._skip_attention())
  np.testing.assert_allclose(out, np.repeat(np.asarray(v), 3, axis=2),
                             rtol=1e-6)


def test_real_weights_run_on_real_text(bench):
  pytest.importorskip("gguf")
  from extrapolax.experiments.data import corpora  # pylint: disable=import-outside-toplevel
  from extrapolax.models import load_tokenizer  # pylint: disable=import-outside-toplevel
  model, tokens = bench._real_model(300)
  assert model.config.num_layers == 30 and model.config.num_heads == 9
  assert tokens.shape == (1, 300)
  text = load_tokenizer("smollm2-135m-instruct").decode(tokens[0].tolist())
  assert text and text in corpora.load_corpus("python_stdlib").documents[0]
  with pytest.raises(SystemExit):       # --layers is the random model's
    bench.main(["--weights", "smollm2", "--layers", "2"])
