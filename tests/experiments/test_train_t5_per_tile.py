"""A T5-bias model's train step evaluates its bias per tile (xla_chunked).

The train step of a one-layer T5-bias decoder LM at T = 4096 (2 heads), with
the library's ``trainer.make_train_step``: on xla_chunked, which takes the
bias as ``position_bias`` and computes it per 512 x 512 block, XLA's
temporaries stay below half of one dense [1, N, T, T] float32 bias; the
same step with the bias materialised (xla_chunked served a dense ``bias``)
holds at least that whole bias. Three real steps on the per-tile path give
a finite, decreasing loss. benchmarks/t5_train_cpu.py runs the same step at
16k-64k tokens.
"""


import jax
import numpy as np
import pytest

from extrapolax.attention import core

from tests import benchmarks

T, N = 4096, 2


@pytest.fixture(scope="module")
def bench():
  return benchmarks.load("t5_train_cpu")


def test_train_step_holds_no_dense_bias(bench):
  args = bench.parse_args(["--lengths", str(T), "--num_heads", str(N),
                           "--kv_heads", "1"])
  step, params, opt_state = bench.build_step(bench.model_config(args, T),
                                             args.learning_rate)
  tokens = bench.stdlib_bytes(T + 1)
  batch = dict(tokens=tokens[None, :T], targets=tokens[None, 1:],
               weights=np.ones((1, T), np.float32))
  temp = lambda c: bench.compiled_memory(c)["temp"]
  tiled = step.lower(params, opt_state, batch).compile()
  # Lowered and compiled inside the block: the executable keeps it.
  dense_step, _, _ = bench.build_step(bench.model_config(args, T),
                                      args.learning_rate)
  with core.use_implementation(bench.dense_bias_chunked()):
    dense = dense_step.lower(params, opt_state, batch).compile()
  one_bias = N * T * T * 4                  # [1, N, T, T] float32, 128 MiB
  assert temp(tiled) < one_bias // 2, (temp(tiled), temp(dense))
  assert temp(dense) >= one_bias, temp(dense)

  losses = []
  for i in range(3):
    params, opt_state, metrics = tiled(params, opt_state, batch)
    losses.append(float(jax.block_until_ready(metrics["loss"])))
  assert np.all(np.isfinite(losses)), losses
  assert losses[0] > losses[1] > losses[2], losses
