"""The decoder LM and its config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig, num_params

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
            num_kv_heads=2, mlp_dim=64, max_len=64)

VARIANTS = {
    "rope": ModelConfig(**TINY),
    "nope": ModelConfig(attention=(AttentionSpec(position="nope"),), **TINY),
    "alibi": ModelConfig(attention=(AttentionSpec(position="alibi"),), **TINY),
    "t5": ModelConfig(attention=(AttentionSpec(
        position="t5", t5_num_buckets=8, t5_max_distance=32),), **TINY),
    "kerple": ModelConfig(attention=(AttentionSpec(position="kerple"),),
                          **TINY),
    "fire": ModelConfig(attention=(AttentionSpec(position="fire"),), **TINY),
    "sinusoidal": ModelConfig(attention=(AttentionSpec(position="nope"),),
                              absolute="sinusoidal", **TINY),
    "learned": ModelConfig(attention=(AttentionSpec(position="nope"),),
                           absolute="learned", tie_embeddings=False, **TINY),
    "hybrid": ModelConfig(attention=(
        AttentionSpec(mask="sliding_window", window=4),
        AttentionSpec(position="nope")), **TINY),
    "lambda_yarn": ModelConfig(attention=(AttentionSpec(
        mask="lambda", num_sinks=2, window=6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 64}),), **TINY),
}


def tokens(b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_builds_under_eval_shape(name):
  config = VARIANTS[name]
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(x.size for x in leaves) == num_params(
      DecoderLM(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_row_equals_documents_alone(name):
  model = DecoderLM(VARIANTS[name], rngs=nnx.Rngs(0))
  lengths = [7, 3, 11]
  docs = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(docs, axis=1)
  seg = np.repeat(np.arange(3), lengths)[None]
  pos = np.concatenate([np.arange(n) for n in lengths])[None]
  got = model(packed, positions=pos, segment_ids=seg)
  want = jnp.concatenate([model(d) for d in docs], axis=1)
  assert got.dtype == jnp.float32 and got.shape == (1, 21, 64)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("name", ["rope", "alibi", "hybrid", "learned"])
def test_causal(name):
  model = DecoderLM(VARIANTS[name], rngs=nnx.Rngs(1))
  a = tokens(2, 12)
  b = a.at[:, 8:].set((a[:, 8:] + 1) % 64)
  la, lb = np.asarray(model(a)), np.asarray(model(b))
  np.testing.assert_allclose(la[:, :8], lb[:, :8], rtol=1e-6, atol=1e-6)
  assert np.abs(la[:, 8:] - lb[:, 8:]).max() > 1e-4


def test_hybrid_layers_follow_the_pattern():
  model = DecoderLM(VARIANTS["hybrid"], rngs=nnx.Rngs(0))
  from extrapolax.attention import layer, masks   # pylint: disable=import-outside-toplevel
  assert isinstance(model.blocks[0].attn.position, layer.Rope)
  assert model.blocks[0].attn.mask == masks.SlidingWindow(4)
  assert isinstance(model.blocks[1].attn.position, layer.NoPE)
  assert model.blocks[1].attn.mask == masks.Causal()


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = VARIANTS["rope"].replace(dtype="bfloat16")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  t = tokens(2, 16)
  low = model(t)
  high = DecoderLM(VARIANTS["rope"], rngs=nnx.Rngs(0))(t)
  assert low.dtype == jnp.float32
  assert np.abs(np.asarray(low) - np.asarray(high)).max() < 0.1
  assert np.abs(np.asarray(low) - np.asarray(high)).max() > 0


def test_learned_absolute_cannot_run_past_its_table():
  model = DecoderLM(VARIANTS["learned"], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="past the learned table"):
    model(tokens(1, 65))


def test_trains_one_step():
  model = DecoderLM(VARIANTS["rope"], rngs=nnx.Rngs(0))
  t = tokens(2, 16)

  def loss(m):
    logits = m(t[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, t[:, 1:, None], -1).mean()

  before = loss(model)
  grads = nnx.grad(loss)(model)
  params = nnx.state(model, nnx.Param)
  new = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params,
                               nnx.state(grads, nnx.Param))
  nnx.update(model, new)
  assert loss(model) < before


def test_config_json_round_trip():
  for config in VARIANTS.values():
    again = ModelConfig.from_json(config.to_json())
    assert again == config
  assert ModelConfig.from_json(VARIANTS["lambda_yarn"].to_json()).attention[
      0].rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("make,match", [
    (lambda: ModelConfig(num_heads=4, num_kv_heads=3),
     "num_heads=4 must be a multiple of num_kv_heads=3"),
    (lambda: ModelConfig(d_model=30, num_heads=4), "d_model=30"),
    (lambda: ModelConfig(absolute="rotary"), "absolute must be one of"),
    (lambda: ModelConfig(dtype="float16"), "dtype must be one of"),
    (lambda: ModelConfig(attention=()), "non-empty tuple"),
    (lambda: AttentionSpec(position="xpos"), "position must be one of"),
    (lambda: AttentionSpec(mask="sliding_window"),
     "mask 'sliding_window' needs window"),
    (lambda: AttentionSpec(window=8),
     "window=8 is not a parameter of mask 'causal'"),
    (lambda: AttentionSpec(mask="slidng_window(8)"),
     "did you mean 'sliding_window'"),
    (lambda: AttentionSpec(position="alibi", t5_num_buckets=8),
     "t5_num_buckets=8 needs position='t5'"),
    (lambda: AttentionSpec(logits_soft_cap=float("inf")),
     "logits_soft_cap must be a finite number"),
    (lambda: AttentionSpec(position="alibi", rope_scaling={"factor": 2.0}),
     "needs position='rope'"),
    (lambda: ModelConfig(attention=(AttentionSpec(
        rope_scaling={"rope_type": "magic"}),)), "magic"),
    (lambda: ModelConfig.from_dict({"layers": 3}), r"unknown ModelConfig fields \['layers'\]"),
    # Issue 15 item 7: these built (and head_dim=0 ran).
    (lambda: ModelConfig(head_dim=0), "head_dim must be >= 1, got 0"),
    (lambda: ModelConfig(norm_eps=-1e-6), "norm_eps must be a finite number > 0"),
    (lambda: ModelConfig(norm_eps=0.0), "norm_eps must be a finite number > 0"),
    (lambda: ModelConfig(norm_eps=float("nan")), "norm_eps must be a finite number, got nan"),
    (lambda: ModelConfig(norm_eps=float("inf")), "norm_eps must be a finite number, got inf"),
])
def test_bad_config_raises(make, match):
  with pytest.raises(ValueError, match=match):
    make()
