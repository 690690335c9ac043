"""The zoo's hybrids of released models and the recent position / softmax
methods: each builds with its per-layer pattern, trains a step, and decodes
with the KV cache exactly like the full forward."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from extrapolax.attention import masks
from extrapolax.models import AttentionSpec, zoo
from extrapolax.models.generate import CachePolicy, generate

NEW = ("irope", "gemma3", "qk-norm", "rope-sinks", "harpe", "p-rope",
       "ssmax", "head-scale")


def test_patterns_follow_the_released_models():
  irope = zoo.config("irope-tiny")              # max_len 64: chunk 16
  assert irope.num_layers == 4 and zoo.config("irope-small").num_layers == 8
  positions = [irope.layer_spec(i).position for i in range(4)]
  assert positions == ["rope", "rope", "rope", "nope"]   # NoPE every 4th
  assert irope.layer_spec(0).to_mask() == masks.Causal() & masks.Chunked(16)
  assert irope.layer_spec(0).qk_norm and not irope.layer_spec(3).qk_norm
  temp = irope.layer_spec(3).to_temperature()
  assert (temp.name, temp.floor_scale, temp.attn_scale) == ("llama4", 16, 0.1)
  gemma = zoo.config("gemma3-tiny")
  assert gemma.num_layers == 6
  bases = [gemma.layer_spec(i).rope_base for i in range(6)]
  windows = [gemma.layer_spec(i).window for i in range(6)]
  assert bases == [1e4] * 5 + [1e6] and windows == [16] * 5 + [None]
  assert all(gemma.layer_spec(i).qk_norm for i in range(6))
  assert zoo.config("qk-norm-tiny").attention[0].qk_norm
  sinks = zoo.config("rope-sinks-tiny")
  assert sinks.num_layers == 2 and sinks.attention == (
      AttentionSpec(sink_logits=True),)
  assert [block.attn.sinks.shape for block in zoo.create(
      "rope-sinks-tiny").blocks] == [(4,), (4,)]   # one logit per query head
  for name in NEW:
    info = zoo.info(f"{name}-tiny")
    assert not info.shipped and not info.card["trained"]
    assert info.card["build"].endswith(f"zoo_build {name}-tiny")


@pytest.mark.parametrize("name", NEW)
def test_preset_trains_a_step_and_decodes_like_the_forward(name):
  model = zoo.create(f"{name}-tiny", seed=0, max_len=32)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)
  before, grads = jax.value_and_grad(loss)(params)
  assert all(np.isfinite(np.asarray(g)).all()
             for g in jax.tree_util.tree_leaves(grads))
  updates, state = optimizer.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  assert float(loss(params)) < float(before)
  model = nnx.merge(graphdef, params)
  want = np.asarray(model(tokens))
  for kwargs in (dict(use_prefill=False), {}):
    _, got, _ = generate(model, tokens, 1, policy=CachePolicy.full(25),
                         return_logits=True, **kwargs)
    np.testing.assert_allclose(np.asarray(got)[:, :24], want, rtol=2e-4,
                               atol=2e-4, err_msg=str(kwargs))
