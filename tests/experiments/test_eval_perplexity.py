"""Perplexity vs length: window arithmetic against hand-computed values,
and a tiny random DecoderLM through the evaluator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import configs, modeling, records
from extrapolax.experiments.evaluators import perplexity
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig

V = 8


def fake_logits(inputs):
  """Logit p for the stream's true next token ((x + 1) % V) at index p.

  So the NLL at window index p is log(1 + (V - 1) e^-p), and only if the
  targets are the inputs shifted by one.
  """
  inputs = np.asarray(inputs)
  b, length = inputs.shape
  logits = np.zeros((b, length, V), np.float32)
  for p in range(length):
    logits[np.arange(b), p, (inputs[:, p] + 1) % V] = p
  return logits


def nll_at(p):
  return math.log(1 + (V - 1) * math.exp(-p))


NLL_FN = perplexity.logits_nll_fn(fake_logits)
STREAM = np.arange(11) % V


def test_nonoverlap_hand_computed():
  # 11 tokens, L = 4: windows at 0 and 4 (a third would need token 12).
  score = perplexity.score_stream(NLL_FN, STREAM, 4, mode="nonoverlap",
                                  batch_size=3)
  assert score.n_tokens == 8 and score.n_windows == 2
  np.testing.assert_array_equal(score.position_count, [2, 2, 2, 2])
  want = math.exp(sum(nll_at(p) for p in range(4)) / 4)
  assert score.perplexity == pytest.approx(want, rel=1e-6)
  np.testing.assert_allclose(score.position_nll,
                             [nll_at(p) for p in range(4)], rtol=1e-6)


def test_sliding_hand_computed():
  # L = 4, S = 2: windows at 0 (scores 4), 2, 4, 6 (2 new tokens each):
  # all 10 predictable tokens, the later ones at window indices 2 and 3.
  score = perplexity.score_stream(NLL_FN, STREAM, 4, mode="sliding",
                                  stride=2, batch_size=2)
  assert score.n_tokens == 10 and score.n_windows == 4
  np.testing.assert_array_equal(score.position_count, [1, 1, 4, 4])
  total = (nll_at(0) + nll_at(1) + nll_at(2) + nll_at(3) +
           3 * (nll_at(2) + nll_at(3)))
  assert score.perplexity == pytest.approx(math.exp(total / 10), rel=1e-6)


def test_sliding_stride_one_scores_every_token_with_full_context():
  score = perplexity.score_stream(NLL_FN, STREAM, 4, mode="sliding",
                                  stride=1)
  assert score.n_tokens == 10
  np.testing.assert_array_equal(score.position_count, [1, 1, 1, 7])


def test_documents_and_token_cap():
  docs = [np.arange(5), np.arange(3), np.arange(9)]
  plan = perplexity.plan_windows([5, 3, 9], 4, mode="nonoverlap")
  assert plan == [(0, 0, 0), (2, 0, 0), (2, 4, 0)]
  assert perplexity.score_stream(NLL_FN, docs, 4).n_tokens == 12
  # The cap stops after the window that reaches it.
  assert perplexity.score_stream(NLL_FN, docs, 4,
                                 max_tokens=5).n_tokens == 8
  assert perplexity.plan_windows([11], 4, mode="sliding", stride=2,
                                 max_tokens=6) == [(0, 0, 0), (0, 2, 2)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="overlap"), "mode"),
    (dict(mode="sliding"), "stride"),
    (dict(mode="sliding", stride=5), "stride"),
    (dict(mode="nonoverlap", stride=2), "stride"),
])
def test_bad_mode_or_stride(kwargs, match):
  with pytest.raises(ValueError, match=match):
    perplexity.score_stream(NLL_FN, STREAM, 4, **kwargs)


def test_too_short_stream_is_refused():
  with pytest.raises(ValueError, match="longest document has 11"):
    perplexity.score_stream(NLL_FN, STREAM, 11)


TINY = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=2,
            mlp_dim=64, max_len=16)


def tiny(spec=AttentionSpec(), **kwargs):
  return DecoderLM(ModelConfig(attention=(spec,), **{**TINY, **kwargs}),
                   rngs=nnx.Rngs(0))


TOKENS = np.random.default_rng(0).integers(0, 256, 400).astype(np.int32)


def direct_nonoverlap_ppl(model, tokens, length, windows):
  """The plain model (dense xla attention), window by window."""
  dense = DecoderLM(model.config.replace(implementation="xla"),
                    rngs=nnx.Rngs(1))
  nnx.update(dense, nnx.state(model))
  chunks = tokens[:windows * length + 1]
  inputs = chunks[:-1].reshape(windows, length)
  targets = chunks[1:].reshape(windows, length)
  logp = jax.nn.log_softmax(nnx.jit(lambda m, x: m(x))(dense, inputs))
  total = -float(jnp.take_along_axis(logp, targets[..., None], -1).sum())
  return math.exp(total / (windows * length))


MODEL = tiny()


def test_tiny_model_records():
  out, scores = perplexity.perplexity_vs_length(
      MODEL, TOKENS, lengths=(16, 48), modes=("nonoverlap", "sliding"),
      stride=8, max_tokens=128, position_buckets=4,
      labels=dict(model="rope-tiny", seed=3, step=7), return_scores=True)
  ppl = [r for r in out if r["metric"] == "perplexity"]
  assert [(r["mode"], r["eval_len"]) for r in ppl] == [
      ("nonoverlap", 16), ("nonoverlap", 48), ("sliding", 16),
      ("sliding", 48)]
  for r in out:
    assert records.make_record(**r) == r
    assert (r["model"], r["pe"], r["seed"], r["step"]) == (
        "rope-tiny", "rope", 3, 7)
    assert r["train_len"] == 16 and r["experiment"] == "length"
  assert all(r["stride"] == 8 for r in ppl if r["mode"] == "sliding")
  # The cap: 8 windows of 16, 3 of 48 (the first >= 128), 128 // 8 - 1
  # sliding windows after the first.
  assert [r["n_tokens"] for r in ppl] == [128, 144, 128, 128]
  # The chunked, batched evaluator equals the plain dense model.
  for r, windows in zip(ppl[:2], (8, 3)):
    want = direct_nonoverlap_ppl(MODEL, TOKENS, r["eval_len"], windows)
    assert r["value"] == pytest.approx(want, rel=1e-4)
  # Loss per position: the longest length, 4 buckets covering its tokens.
  buckets = [r for r in out if r["metric"] == "position_nll"]
  assert all(r["mode"] == "nonoverlap" for r in buckets)
  assert [(r["position"], r["position_end"]) for r in buckets] == [
      (0, 12), (12, 24), (24, 36), (36, 48)]
  assert [r["n_tokens"] for r in buckets] == [36] * 4
  score = scores[("nonoverlap", 48)]
  mean = sum(r["value"] * r["n_tokens"] for r in buckets) / 144
  assert mean == pytest.approx(score.mean_nll, rel=1e-6)
  # Read directly: {length: perplexity} per mode.
  table = perplexity.perplexity_table(out)
  assert table == {16: ppl[0]["value"], 48: ppl[1]["value"]}
  assert perplexity.perplexity_table(out, mode="sliding") == {
      16: ppl[2]["value"], 48: ppl[3]["value"]}
  with pytest.raises(ValueError, match="mode='both' is not one of"):
    perplexity.perplexity_table(out, mode="both")
  other = [dict(r, model="alibi") for r in out]
  with pytest.raises(ValueError, match="pass variant="):
    perplexity.perplexity_table(out + other)
  assert perplexity.perplexity_table(out + other, variant="rope-tiny") == (
      table)


def test_learned_absolute_past_its_table_is_nan():
  model = tiny(AttentionSpec(position="nope"), absolute="learned")
  out = perplexity.perplexity_vs_length(model, TOKENS, lengths=(16, 32),
                                        max_tokens=32, position_buckets=0)
  assert math.isfinite(out[0]["value"]) and out[0]["n_tokens"] == 32
  assert math.isnan(out[1]["value"]) and out[1]["n_tokens"] == 0
  assert out[0]["pe"] == "learned"


def test_default_lengths():
  assert perplexity.default_lengths(128) == (128, 256, 512, 1024, 2048)


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 devices (tests/conftest.py)")
def test_context_parallel_evaluation_equals_one_device(monkeypatch):
  """Lengths split over 8 (and 2 x 4) devices score like one device, and
  attention really ran context-parallel."""
  from extrapolax.attention import context_parallel  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments import sharding  # pylint: disable=import-outside-toplevel
  config = configs.get_config("tiny.py:pe=alibi,train_len=32")
  config.model.vocab_size = 256
  config.model.mask = "sliding_window"
  config.model.window = 24
  model = modeling.create_model(config, nnx.Rngs(3))
  tokens = np.random.default_rng(0).integers(0, 256, 2000).astype(np.int32)
  kwargs = dict(lengths=(64, 128), max_tokens=512, tokens_per_batch=512,
                position_buckets=0, labels={"model": "m"})
  base = perplexity.perplexity_vs_length(model, tokens, **kwargs)
  calls = []
  original = context_parallel.ContextParallel.__call__
  monkeypatch.setattr(context_parallel.ContextParallel, "__call__",
                      lambda self, request: calls.append(1) or original(
                          self, request))
  for sizes in (dict(context=8), dict(data=2, context=4)):
    calls.clear()
    got = perplexity.perplexity_vs_length(
        model, tokens, mesh=sharding.make_mesh(sizes), **kwargs)
    assert calls, sizes
    for a, b in zip(got, base):
      assert (a["eval_len"], a["n_tokens"]) == (b["eval_len"], b["n_tokens"])
      np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5)
  with pytest.raises(ValueError, match=r"lengths \[60\] are not divisible"):
    perplexity.perplexity_vs_length(model, tokens, lengths=(60,),
                                    mesh=sharding.make_mesh(dict(context=8)))
