"""Zero-shot RoPE scaling and inference-mask sweeps: variants share the
trained weights and change the logits only where they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax import attention
from extrapolax.attention import core
from extrapolax.attention import layer as attn_layer
from extrapolax.experiments import records
from extrapolax.experiments.evaluators import mask_sweep
from extrapolax.experiments.evaluators import rope_scaling
from extrapolax.experiments.evaluators import variants
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig

TINY = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=2,
            mlp_dim=64, max_len=16, implementation="xla")
TOKENS = np.random.default_rng(0).integers(0, 256, 300).astype(np.int32)
X = jnp.asarray(TOKENS[None, :40])


def tiny(*specs, **kwargs):
  config = ModelConfig(attention=tuple(specs) or (AttentionSpec(),),
                       **{**TINY, **kwargs})
  return DecoderLM(config, rngs=nnx.Rngs(0))


ROPE = tiny()


def logits(model):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, X))[0]


BASE = logits(ROPE)


def test_rebuild_shares_parameters():
  variant = variants.with_rope_scaling(
      ROPE, variants.rope_scaling_dict("yarn", 4.0, 16), train_len=16)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(ROPE)),
                  jax.tree_util.tree_leaves(nnx.state(variant))):
    assert a is b
  assert variant.config.attention[0].rope_scaling["rope_type"] == "yarn"
  assert ROPE.config.attention[0].rope_scaling is None


def test_rebuild_refuses_a_different_parameter_tree():
  with pytest.raises(ValueError, match="parameter tree"):
    variants.rebuild(ROPE, ROPE.config.replace(d_model=64))


def test_linear_factor_one_equals_the_original():
  variant = variants.with_rope_scaling(
      ROPE, variants.rope_scaling_dict("linear", 1.0, 16), train_len=16)
  np.testing.assert_array_equal(logits(variant), BASE)


@pytest.mark.parametrize("method", variants.ROPE_SCALINGS)
def test_scaling_changes_logits_only_past_position_zero(method):
  # Position 0 is never rotated and attends only to itself (the attention
  # factor cancels in a one-key softmax); every later position moves.
  variant = variants.with_rope_scaling(
      ROPE, variants.rope_scaling_dict(method, 4.0, 8), train_len=8)
  got = logits(variant)
  np.testing.assert_allclose(got[0], BASE[0], rtol=1e-5, atol=1e-5)
  assert (np.abs(got[1:] - BASE[1:]).max(-1) > 1e-4).all()


def test_dynamic_is_the_identity_up_to_its_training_length():
  variant = variants.with_rope_scaling(
      ROPE, variants.rope_scaling_dict("dynamic", 4.0, 40), train_len=40)
  np.testing.assert_allclose(logits(variant), BASE, rtol=1e-5, atol=1e-5)
  assert rope_scaling.matched_factor("dynamic", 64, 16) == 1.0
  assert rope_scaling.matched_factor("yarn", 64, 16) == 4.0
  assert rope_scaling.matched_factor("yarn", 8, 16) == 1.0


def test_matched_dynamic_equals_matched_static_ntk():
  # X has 40 tokens: dynamic at factor 1 over M = 8 is NTK at factor 5.
  dynamic = variants.with_rope_scaling(
      ROPE, variants.rope_scaling_dict("dynamic", 1.0, 8), train_len=8)
  ntk = variants.with_rope_scaling(
      ROPE, variants.rope_scaling_dict("ntk", 5.0, 8), train_len=8)
  np.testing.assert_allclose(logits(dynamic), logits(ntk), rtol=1e-4,
                             atol=1e-4)


def test_scaling_leaves_nope_layers_alone():
  hybrid = tiny(AttentionSpec(), AttentionSpec(position="nope"))
  variant = variants.with_rope_scaling(
      hybrid, variants.rope_scaling_dict("linear", 2.0, 16), train_len=16)
  specs = variant.config.attention
  assert specs[0].rope_scaling["factor"] == 2.0 and specs[1] == (
      AttentionSpec(position="nope"))
  assert variants.describe(variant) == dict(
      pe="rope+nope", scaling="linear", scale=2.0, mask="causal")
  with pytest.raises(ValueError, match="no RoPE layer"):
    variants.with_rope_scaling(tiny(AttentionSpec(position="alibi")),
                               {"rope_type": "linear", "factor": 2.0},
                               train_len=16)


def test_rope_scaling_sweep_records():
  labels = dict(model="rope-tiny", seed=1, step=5)
  out = rope_scaling.rope_scaling_sweep(
      ROPE, TOKENS, methods=("none", "linear"), factors=("matched",),
      lengths=(16, 32), max_tokens=32, labels=labels)
  out += rope_scaling.rope_scaling_sweep(
      ROPE, TOKENS, methods=("linear",), factors=(2.0,), lengths=(32,),
      max_tokens=32, labels=labels)
  for r in out:
    assert records.make_record(**r) == r
    assert r["experiment"] == "rope_scaling" and r["model"] == "rope-tiny"
    assert (r["seed"], r["step"]) == (1, 5)
  table = {(r["variant"], r["eval_len"]): r for r in out}
  assert len(table) == len(out) == 5
  assert table[("rope-tiny linear x2", 32)]["scale"] == 2.0
  assert table[("rope-tiny linear matched", 16)]["scale"] == 1.0
  assert table[("rope-tiny linear matched", 32)]["scale"] == 2.0
  assert table[("rope-tiny none", 32)]["scaling"] == "none"
  assert table[("rope-tiny linear x2", 32)]["scaling"] == "linear"
  # Matched linear at 1x is the unscaled model; x2 at 2x is the same
  # variant as matched there.
  assert table[("rope-tiny linear matched", 16)]["value"] == pytest.approx(
      table[("rope-tiny none", 16)]["value"], rel=1e-6)
  assert table[("rope-tiny linear x2", 32)]["value"] == pytest.approx(
      table[("rope-tiny linear matched", 32)]["value"], rel=1e-6)
  assert table[("rope-tiny linear x2", 32)]["value"] != pytest.approx(
      table[("rope-tiny none", 32)]["value"], rel=1e-6)


def test_rope_scaling_sweep_rejects_bad_names():
  with pytest.raises(ValueError, match="longrope"):
    rope_scaling.rope_scaling_sweep(ROPE, TOKENS, methods=("longrope",))
  with pytest.raises(ValueError, match="factors"):
    rope_scaling.rope_scaling_sweep(ROPE, TOKENS, factors=(0,))


def test_masks_match_causal_where_every_key_is_visible():
  window, sinks = 16, 2
  slide = logits(mask_sweep.mask_variant(ROPE, "sliding_window",
                                         window=window, num_sinks=sinks))
  lam = logits(mask_sweep.mask_variant(ROPE, "lambda", window=window,
                                       num_sinks=sinks))
  ceiling = mask_sweep.mask_variant(ROPE, "lambda_ceiling", window=window,
                                    num_sinks=sinks)
  capped = logits(ceiling)
  changed = lambda a, b: np.abs(a - b).max(-1) > 1e-4
  # Row i sees keys i - 15 .. i in the window: all of them while i < 16.
  np.testing.assert_allclose(slide[:window], BASE[:window], atol=1e-5)
  assert changed(slide[window:], BASE[window:]).all()
  # Lambda adds the 2 sinks: rows 16 and 17 still see every key.
  np.testing.assert_allclose(lam[:window + sinks], BASE[:window + sinks],
                             atol=1e-5)
  assert changed(lam[window + sinks:], BASE[window + sinks:]).all()
  # The ceiling scores a sink at distance min(i - j, 16): row 16's sink 0
  # is already at 16, so only rows >= 17 change.
  np.testing.assert_allclose(capped[:window + 1], lam[:window + 1],
                             atol=1e-5)
  assert changed(capped[window + 1:], lam[window + 1:]).all()
  assert all(b.attn.position.distance_ceiling == window
             for b in ceiling.blocks)
  assert isinstance(ROPE.blocks[0].attn.position, attn_layer.Rope) and (
      ROPE.blocks[0].attn.position.distance_ceiling is None)


def test_implementation_chosen_at_call_time_keeps_the_distance_ceiling():
  """use_implementation switches every layer's implementation, no rebuild;
  the spec's ceiling stays."""
  window, sinks = 16, 2
  ceiling = mask_sweep.mask_variant(ROPE, "lambda_ceiling", window=window,
                                    num_sinks=sinks)
  assert all(s.distance_ceiling == window for s in ceiling.config.attention)
  seen = []
  original = core.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return original(*args, implementation=implementation, **kwargs)

  core.dot_product_attention = spy
  try:
    with attention.use_implementation("xla"):
      dense = logits(ceiling)
    with attention.use_implementation("xla_chunked"):
      chunked = logits(ceiling)
  finally:
    core.dot_product_attention = original
  names = [getattr(i, "name", i) for i in seen]
  assert "xla" in names and "xla_chunked" in names, names
  np.testing.assert_allclose(chunked, dense, atol=1e-5)
  with pytest.raises(ValueError, match="unknown implementation"):
    with attention.use_implementation("xla_chunkd"):
      pass


def test_mask_labels():
  labels = [variants.describe(mask_sweep.mask_variant(
      ROPE, m, window=16, num_sinks=2))["mask"] for m in mask_sweep.MASKS]
  assert labels == ["causal", "sliding_window(16)",
                    "lambda(sinks=2, window=16)",
                    "lambda(sinks=2, window=16)+ceiling(16)"]
  with pytest.raises(ValueError, match="stripes"):
    mask_sweep.mask_variant(ROPE, "stripes", window=16, num_sinks=2)
  with pytest.raises(ValueError, match="RoPE"):
    mask_sweep.mask_variant(tiny(AttentionSpec(position="alibi")),
                            "lambda_ceiling", window=8, num_sinks=2)


def test_mask_sweep_records():
  out = mask_sweep.perplexity_with_masks(
      ROPE, TOKENS, masks=("causal", "lambda"), num_sinks=2,
      lengths=(32,), max_tokens=32, labels=dict(model="rope-tiny"))
  for r in out:
    assert records.make_record(**r) == r
    assert r["experiment"] == "mask" and r["scaling"] == "none"
    assert r["model"] == "rope-tiny"
  value = {(r["mask"], r["eval_len"]): r["value"] for r in out}
  assert len(value) == len(out) == 2
  lam = "lambda(sinks=2, window=16)"
  assert value[(lam, 32)] != pytest.approx(value[("causal", 32)], rel=1e-5)
