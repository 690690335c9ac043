"""A user's mistake raises ValueError naming the bad value and what is allowed."""

import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks


def arr(*shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)


Q, K, V = arr(2, 8, 4, 16), arr(2, 8, 2, 16), arr(2, 8, 2, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(query=arr(8, 4, 16)), r"query must be 4-D .*\(8, 4, 16\)"),
    (dict(value=arr(2, 9, 2, 16)), r"key \(2, 8, 2, 16\) and value \(2, 9, 2, 16\)"),
    (dict(key=arr(3, 8, 2, 16), value=arr(3, 8, 2, 16)), "query batch 2 != key batch 3"),
    (dict(key=arr(2, 8, 2, 8), value=arr(2, 8, 2, 8)), "head_dim 16 != key head_dim 8"),
    (dict(key=arr(2, 8, 3, 16), value=arr(2, 8, 3, 16)), "N=4 .* K=3"),
    (dict(query=arr(2, 8, 4, 16, dtype=jnp.int32)), "query must be a floating"),
    (dict(implementation="flash"), "unknown implementation 'flash'"),
    (dict(mask="causal"), "got 'causal'"),
    (dict(segment_ids=np.zeros((2, 7), np.int32)), r"shape \(2, 8\) or \(8,\), got \(2, 7\)"),
    (dict(segment_ids=np.zeros((2, 8))), "integer array, got dtype float"),
    (dict(segment_ids=(np.zeros((2, 8), np.int32),)), "pair"),
    (dict(alibi_slopes=jnp.ones(3)), r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(3,\)"),
    (dict(bias=arr(2, 4, 8, 9)), r"bias shape \(2, 4, 8, 9\) does not broadcast .*axis S"),
    (dict(bias=arr(1, 1, 2, 4, 8, 8)), "bias must broadcast"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap must be a finite number > 0, got 0.0"),
    (dict(logits_soft_cap=-1), "-1"),
    (dict(scale="big"), "scale must be a real number, got 'big'"),
    (dict(query_positions=np.arange(8)), "both query_positions and key_positions"),
    (dict(query_positions=np.arange(7), key_positions=np.arange(8)), r"got \(7,\)"),
    (dict(far_query=Q), "far_query, far_key and far_window go together"),
    (dict(far_query=Q, far_key=K, far_window=0), "far_window must be >= 1, got 0"),
    (dict(far_query=Q[:, :4], far_key=K, far_window=3), r"far_query must have shape \(2, 8, 4, 16\)"),
])
def test_bad_input_raises_value_error(kwargs, match):
  args = dict(query=Q, key=K, value=V)
  for name in ("query", "key", "value"):
    if name in kwargs:
      args[name] = kwargs.pop(name)
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(args["query"], args["key"], args["value"],
                                    **kwargs)


def test_single_segment_array_needs_equal_lengths():
  with pytest.raises(ValueError, match="T == S .*T=4, S=8"):
    attention.dot_product_attention(Q[:, :4], K, V,
                                    segment_ids=np.zeros((2, 4), np.int32))


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_chunked_block_sizes_validated(bad):
  with pytest.raises(ValueError, match="block_q"):
    attention.XlaChunked(block_q=bad)


def test_chunked_schedule_validated():
  with pytest.raises(ValueError, match="schedule.*'hosted'"):
    attention.XlaChunked(schedule="hosted")


def test_classifier_needs_both_segment_arrays():
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    masks.classify_blocks(None, q_len=4, kv_len=4, block_q=2, block_k=2,
                          q_segment_ids=np.zeros((1, 4), np.int32))


# Issue 15 item 6: one validation of the scalar arguments for every
# implementation (xla gave NaN for scale=nan, xla_chunked finite numbers;
# logits_soft_cap=inf gave all NaN; NaN slopes passed silently).
IMPLS = ["xla", "xla_chunked"]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(logits_soft_cap=float("inf")),
     "logits_soft_cap must be a finite number, got inf"),
    (dict(logits_soft_cap=float("nan")),
     "logits_soft_cap must be a finite number, got nan"),
    (dict(alibi_slopes=jnp.array([0.5, jnp.nan, 0.1, 0.2])),
     "alibi_slopes must be finite"),
    (dict(alibi_slopes=jnp.array([0.5, jnp.inf, 0.1, 0.2])),
     "alibi_slopes must be finite"),
])
def test_scalars_validated_for_every_implementation(kwargs, match,
                                                    implementation):
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(Q, K, V, implementation=implementation,
                                    **kwargs)


def test_traced_slopes_still_run_under_jit():
  import jax  # pylint: disable=g-import-not-at-top
  slopes = attention.alibi_slopes(4)
  out = jax.jit(lambda s: attention.dot_product_attention(
      Q, K, V, alibi_slopes=s, implementation="xla"))(slopes)
  assert np.all(np.isfinite(np.asarray(out)))


# Issue 15 item 7: empty sequences and head_dim 0 gave ZeroDivisionError /
# IndexError deep inside the implementations.
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("shapes,match", [
    (((2, 0, 4, 16), (2, 8, 2, 16), (2, 8, 2, 16)), "T=0 and key length S=8"),
    (((2, 8, 4, 16), (2, 0, 2, 16), (2, 0, 2, 16)), "T=8 and key length S=0"),
    (((2, 8, 4, 0), (2, 8, 2, 0), (2, 8, 2, 0)), "head_dim must be >= 1"),
    (((2, 8, 4, 16), (2, 8, 2, 16), (2, 8, 2, 0)),
     "value head_dim 0"),
])
def test_empty_shapes_refused(shapes, match, implementation):
  q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(q, k, v, implementation=implementation)
