"""KV-cache decoding equals the full forward, and streams in bounded memory."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig
from extrapolax.models.generate import CachePolicy, generate

generate_lib = importlib.import_module("extrapolax.models.generate")

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
            num_kv_heads=2, mlp_dim=64, max_len=32)


def model_of(*specs, **kwargs):
  config = ModelConfig(attention=tuple(specs) or (AttentionSpec(),),
                       **{**TINY, **kwargs})
  return DecoderLM(config, rngs=nnx.Rngs(0))


def tokens(b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


def decoded_logits(model, prompt, policy):
  _, logits, _ = generate(model, prompt, 1, policy=policy, return_logits=True)
  return np.asarray(logits)


CASES = {
    "rope": (AttentionSpec(),),
    "alibi": (AttentionSpec(position="alibi"),),
    "t5": (AttentionSpec(position="t5", t5_num_buckets=8,
                         t5_max_distance=16),),
    "hybrid_window": (AttentionSpec(mask="sliding_window", window=5),
                      AttentionSpec(position="nope")),
    "yarn": (AttentionSpec(rope_scaling={
        "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 8}),),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_cache_equals_full_forward(name):
  model = model_of(*CASES[name])
  prompt = tokens(2, 20)
  want = np.asarray(model(prompt))
  got = decoded_logits(model, prompt, CachePolicy.full(21))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dynamic_ntk_is_exact_at_every_length():
  # Dynamic NTK's frequencies depend on the current length: step p equals the
  # full forward over the first p + 1 tokens, because keys are cached before
  # RoPE and re-rotated every step. One layer: deeper layers' cached keys come
  # from hidden states computed at an earlier length, which no cache can
  # revise (transformers' cache has the same property).
  model = model_of(AttentionSpec(
      rope_scaling={"rope_type": "dynamic", "factor": 2.0},
      rope_max_position_embeddings=8), num_layers=1)
  prompt = tokens(2, 20)
  # Step by step (a prefilled chunk uses one length's frequencies, as the
  # full forward does).
  _, got, _ = generate(model, prompt, 1, policy=CachePolicy.full(21),
                       return_logits=True, use_prefill=False)
  got = np.asarray(got)
  for p in (3, 7, 8, 12, 19):
    want = np.asarray(model(prompt[:, :p + 1]))[:, -1]
    np.testing.assert_allclose(got[:, p], want, rtol=1e-4, atol=1e-4)
  # Past max_position_embeddings the frequencies really change.
  whole = np.asarray(model(prompt))
  assert np.abs(got[:, 12] - whole[:, 12]).max() > 1e-4


def test_learned_absolute_decodes_like_forward():
  model = model_of(AttentionSpec(position="nope"), absolute="learned")
  prompt = tokens(1, 16)
  np.testing.assert_allclose(
      decoded_logits(model, prompt, CachePolicy.full(17)),
      np.asarray(model(prompt)), rtol=1e-4, atol=1e-4)


def test_window_cache_equals_window_model_everywhere():
  # A model whose every layer sees 6 keys needs only a 6-slot rolling cache.
  model = model_of(AttentionSpec(mask="sliding_window", window=6))
  prompt = tokens(2, 30)
  np.testing.assert_allclose(
      decoded_logits(model, prompt, CachePolicy.window(6)),
      np.asarray(model(prompt)), rtol=1e-4, atol=1e-4)


def test_lm_infinite_cache_equals_lambda_model_everywhere():
  spec = AttentionSpec(mask="lambda", num_sinks=2, window=5)
  model = model_of(spec)
  prompt = tokens(2, 30)
  policy = CachePolicy.sinks(2, 5, reposition=False)
  np.testing.assert_allclose(decoded_logits(model, prompt, policy),
                             np.asarray(model(prompt)), rtol=1e-4, atol=1e-4)


def test_streaming_llm_cache_is_exact_within_its_capacity():
  model = model_of(AttentionSpec())
  prompt = tokens(1, 24)
  policy = CachePolicy.sinks(4, 8)          # capacity 12
  got = decoded_logits(model, prompt, policy)
  want = np.asarray(model(prompt))
  np.testing.assert_allclose(got[:, :12], want[:, :12], rtol=1e-4, atol=1e-4)
  assert np.abs(got[:, 12:] - want[:, 12:]).max() > 1e-4   # evicted tokens


@pytest.mark.parametrize("policy", [CachePolicy.window(8),
                                    CachePolicy.sinks(4, 12)], ids=repr)
def test_streams_8x_past_training_length_with_a_fixed_cache(policy):
  model = model_of(AttentionSpec())     # trained length 32
  prompt = tokens(1, 4)
  out, logits, cache = generate(model, prompt, 8 * 32, policy=policy,
                                return_logits=True)
  assert out.shape == (1, 4 + 256)
  assert np.isfinite(np.asarray(logits)).all()
  for layer in cache["layers"]:
    assert layer["k"].shape == (1, policy.capacity, 2, 8)
    assert layer["v"].shape == (1, policy.capacity, 2, 8)
  assert cache["slot_pos"].shape == (1, policy.capacity)
  assert int(cache["slot_pos"].max()) == 4 + 256 - 2


def test_sampling():
  model = model_of(AttentionSpec())
  prompt = tokens(2, 5)
  greedy = generate(model, prompt, 6)
  assert (generate(model, prompt, 6, temperature=1.0, top_k=1) == greedy).all()
  a = generate(model, prompt, 6, temperature=1.0, rng=jax.random.key(3))
  b = generate(model, prompt, 6, temperature=1.0, rng=jax.random.key(3))
  assert (a == b).all() and (a[:, :5] == prompt).all()
  # Greedy continuation = argmax of the full forward, step by step.
  logits = model(greedy[:, :-1])
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 4:], -1)),
                                np.asarray(greedy[:, 5:]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=1.0, top_k=0), "top_k must be in"),
    (dict(policy=CachePolicy.full(4)), "do not fit a full cache of 4"),
    (dict(prefill_chunk=0), "prefill_chunk must be None or an integer"),
])
def test_generate_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate(model_of(AttentionSpec()), tokens(1, 3), 4, **kwargs)


# Prefill: (case, policy, prompt length); prompts longer than a window or
# sinks cache included.
PREFILL = {
    "rope_full": ("rope", None, 20),
    "alibi_full": ("alibi", None, 20),
    "yarn_full": ("yarn", None, 20),
    "hybrid_window_full": ("hybrid_window", None, 20),
    "window_model_window_cache": ("window", CachePolicy.window(6), 30),
    "lambda_model_lm_infinite": ("lambda", CachePolicy.sinks(
        2, 5, reposition=False), 30),
    "causal_model_window_cache": ("rope", CachePolicy.window(8), 20),
    "streaming_llm": ("rope", CachePolicy.sinks(4, 8), 20),
}
_PREFILL_SPECS = dict(CASES, window=(AttentionSpec(
    mask="sliding_window", window=6),), **{"lambda": (AttentionSpec(
        mask="lambda", num_sinks=2, window=5),)})


@pytest.mark.parametrize("name", sorted(PREFILL))
def test_prefill_equals_token_by_token(name):
  case, policy, length = PREFILL[name]
  model = model_of(*_PREFILL_SPECS[case])
  prompt = tokens(2, length)
  runs = [generate(model, prompt, 4, policy=policy, return_logits=True,
                   **kw) for kw in (dict(use_prefill=False), {},
                                    dict(prefill_chunk=7))]
  (want_tokens, want_logits, want_cache), *prefilled = runs
  for got_tokens, got_logits, got_cache in prefilled:
    np.testing.assert_array_equal(np.asarray(got_tokens),
                                  np.asarray(want_tokens))
    np.testing.assert_allclose(np.asarray(got_logits),
                               np.asarray(want_logits), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got_cache["slot_pos"]),
                                  np.asarray(want_cache["slot_pos"]))
    for got, want in zip(got_cache["layers"], want_cache["layers"]):
      np.testing.assert_allclose(np.asarray(got["k"]), np.asarray(want["k"]),
                                 rtol=1e-4, atol=1e-4)


def test_prefill_greedy_equals_full_forward_argmax():
  model = model_of(AttentionSpec())
  prompt = tokens(2, 12)
  out = generate(model, prompt, 6)
  logits = model(out[:, :-1])
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 11:], -1)),
                                np.asarray(out[:, 12:]))


def test_long_prompt_is_not_fed_step_by_step(monkeypatch):
  # A 4096-token prompt: one prefill forward, then one decode step per new
  # token (counted calls of the compiled step), not 4096 steps.
  calls = []
  make_step = generate_lib._step_fn  # pylint: disable=protected-access

  def counting(*args):
    step = make_step(*args)
    return lambda *a: calls.append(1) or step(*a)

  monkeypatch.setattr(generate_lib, "_step_fn", counting)
  model = model_of(AttentionSpec(), num_layers=1, max_len=4096)
  out = generate(model, tokens(1, 4096), 3, prefill_chunk=2048)
  assert out.shape == (1, 4099) and len(calls) == 2
  assert generate_lib.prefill_length(model, CachePolicy.window(64), 4096) == 64


def test_second_generate_reuses_the_compiled_step(monkeypatch):
  made = []
  make = generate_lib._make_step  # pylint: disable=protected-access
  monkeypatch.setattr(generate_lib, "_make_step",
                      lambda *a: made.append(1) or make(*a))
  model = model_of(AttentionSpec())
  for _ in range(2):
    generate(model, tokens(1, 3), 3)
  assert len(made) == 1


# Issue 15 item 8: each of these decoded NaN logits, returned the prompt, or
# failed with "not enough values to unpack".
@pytest.mark.parametrize("prompt,steps,kwargs,match", [
    (jnp.array([[1, 64, 2]]), 2, {},
     r"token id 64 is outside the vocabulary \[0, 64\)"),
    (jnp.array([[1, -1, 2]]), 2, {}, "token id -1 is outside"),
    (tokens(1, 3), -3, {}, "steps must be >= 0, got -3"),
    (tokens(1, 3), 2.0, {}, "steps must be an integer"),
    (tokens(1, 3)[0], 2, {}, r"prompt must be an int array \[batch, "
     r"prompt_len\], got int32\[3\]"),
    (tokens(1, 3).astype(jnp.float32), 2, {}, "prompt must be an int array"),
    (tokens(1, 3), 2, dict(temperature=float("nan")),
     "temperature must be a finite number, got nan"),
])
def test_generate_refuses_bad_input(prompt, steps, kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate(model_of(AttentionSpec()), prompt, steps, **kwargs)


def test_generate_learned_positions_past_the_table():
  model = model_of(AttentionSpec(position="nope"), absolute="learned")
  with pytest.raises(ValueError, match="past the learned table"):
    generate(model, tokens(1, 30), 4)     # positions up to 32 >= max_len 32
  assert generate(model, tokens(1, 30), 3).shape == (1, 33)   # up to 31


def test_generate_zero_steps_returns_the_prompt():
  prompt = tokens(1, 3)
  np.testing.assert_array_equal(
      np.asarray(generate(model_of(AttentionSpec()), prompt, 0)),
      np.asarray(prompt))


def test_gemma_style_model_decodes_like_forward():
  """Sandwich norms, GeGLU, scaled embeddings and both soft caps: the
  KV-cache decode (token by token and prefilled) gives the forward's
  logits."""
  model = model_of(
      AttentionSpec(mask="sliding_window", window=6, logits_soft_cap=2.0),
      AttentionSpec(logits_soft_cap=2.0), post_norms=True,
      mlp_activation="gelu_tanh", scale_embeddings=True,
      final_logit_soft_cap=1.5)
  prompt = tokens(2, 20)
  want = np.asarray(model(prompt))
  assert np.abs(want).max() < 1.5   # the final cap holds
  got = decoded_logits(model, prompt, CachePolicy.full(21))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  stepped, prefilled = [generate(model, prompt, 3, return_logits=True,
                                 use_prefill=p)[1] for p in (False, True)]
  np.testing.assert_allclose(np.asarray(prefilled), np.asarray(stepped),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field,value,match", [
    ("mlp_activation", "relu", "mlp_activation"),
    ("post_norms", 1, "post_norms must be a bool"),
    ("final_logit_soft_cap", -1.0, "final_logit_soft_cap"),
])
def test_gemma_fields_refuse_bad_values(field, value, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{field: value})
