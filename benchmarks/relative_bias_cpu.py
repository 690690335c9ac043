r"""CPU benchmark: T5 / Kerple / FIRE biases per tile against a dense bias.

For each scheme and length T = S (causal, B=1), in one process:

* ``tile``: ``dot_product_attention(position_bias=..., implementation=
  XlaChunked())``: the bias computed on each visited block, forward and
  backward (memory linear in T);
* ``dense``: the same bias materialised as a dense [1, N, T, S] float32
  ``bias`` (what the layer did before ``position_bias``), then the same
  xla_chunked call reading it block by block (memory quadratic in T).

Passes: ``fwd`` and ``fwd_bwd`` (gradient of ``out.sum()`` with respect to
q, k, v and the bias parameters; for dense, through the materialised bias).
Memory is XLA's own estimate of the compiled function (``memory_analysis``:
temporaries + arguments + outputs), taken before running; a dense case
whose estimate exceeds ``--dense_limit_gb`` (default 8) is not run. Times
are the median (and best) of ``--repeats`` runs after one compiling run;
``--memory_only`` compiles and reports memory without running (for the
lengths where the shared CPU would take too long).

Usage, from the repository root::

  python benchmarks/relative_bias_cpu.py --lengths 4096 8192 16384
  python benchmarks/relative_bias_cpu.py --lengths 32768 65536 --memory_only

Prints a markdown table; writes JSON (default
``benchmarks/results/relative_bias_cpu.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from extrapolax.attention import core, masks  # noqa: E402
from extrapolax.attention import relative_bias as rb  # noqa: E402
from extrapolax.attention.xla_chunked import XlaChunked  # noqa: E402

SCHEMES = ("t5", "kerple", "fire")


def make_bias(scheme, heads, rng):
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  if scheme == "t5":
    return rb.T5BucketBias(0.1 * f(32, heads), max_distance=128)
  if scheme == "kerple":
    return rb.KerpleBias(jnp.ones(heads), jnp.full(heads, 0.5))
  return rb.FireBias(f(1, 32), f(32), 0.2 * f(32, heads), f(heads),
                     jnp.asarray(0.1), jnp.asarray(512.0))


def _time(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def build(path, pass_, impl, t):
  """The jitted function of one (path, pass) pair."""
  mask = masks.Causal()

  def attn(q, k, v, pb):
    if path == "tile":
      return core.dot_product_attention(q, k, v, mask=mask, position_bias=pb,
                                        implementation=impl)
    qp, kp = masks.default_positions(t, t)
    bias = pb.tile(qp[None], kp[None])
    return core.dot_product_attention(q, k, v, mask=mask, bias=bias,
                                      implementation=impl)

  if pass_ == "fwd":
    return jax.jit(attn)
  return jax.jit(jax.grad(lambda *a: attn(*a).sum(), argnums=(0, 1, 2, 3)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[4096, 8192, 16384])
  parser.add_argument("--schemes", nargs="+", default=list(SCHEMES),
                      choices=SCHEMES)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dense_limit_gb", type=float, default=8.0)
  parser.add_argument("--memory_only", action="store_true")
  parser.add_argument("--out", default=os.path.join(
      ROOT, "benchmarks", "results", "relative_bias_cpu.json"))
  args = parser.parse_args(argv)
  impl = XlaChunked()
  rows = []
  load_before = os.getloadavg()
  for t in args.lengths:
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q = f(1, t, args.heads, args.head_dim)
    k = f(1, t, args.kv_heads, args.head_dim)
    v = f(1, t, args.kv_heads, args.head_dim)
    for scheme in args.schemes:
      pb = make_bias(scheme, args.heads, rng)
      for pass_ in ("fwd", "fwd_bwd"):
        for path in ("tile", "dense"):
          fn = build(path, pass_, impl, t)
          ma = fn.lower(q, k, v, pb).compile().memory_analysis()
          mem = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
                 + ma.output_size_in_bytes)
          row = dict(scheme=scheme, length=t, pass_=pass_, path=path,
                     memory_bytes=int(mem), median_s=None, best_s=None)
          if not args.memory_only and mem <= args.dense_limit_gb * 2**30:
            _time(fn, q, k, v, pb)                      # compile
            times = [_time(fn, q, k, v, pb) for _ in range(args.repeats)]
            row.update(median_s=statistics.median(times), best_s=min(times))
          rows.append(row)
          print(json.dumps(row), flush=True)
  load = os.getloadavg()
  print(f"\njax {jax.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cpus, load before {load_before[0]:.2f}, after "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; causal, B=1, "
        f"N={args.heads}, K={args.kv_heads}, H={args.head_dim}, float32, "
        f"blocks 512 x 512, {args.repeats} repeats")
  print("| scheme | T | pass | tile s (best) | tile MB | dense s (best) | "
        "dense MB |")
  print("|---|---|---|---|---|---|---|")
  fmt = lambda r: ("-" if r["median_s"] is None
                   else f"{r['median_s']:.3f} ({r['best_s']:.3f})")
  for tile, dense in zip(rows[0::2], rows[1::2]):
    print(f"| {tile['scheme']} | {tile['length']} | {tile['pass_']} | "
          f"{fmt(tile)} | {tile['memory_bytes'] / 1e6:.0f} | {fmt(dense)} | "
          f"{dense['memory_bytes'] / 1e6:.0f} |")
  with open(args.out, "w") as fh:
    json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(), jax=jax.__version__, load_before=load_before,
                   load_after=load, args=vars(args), rows=rows), fh,
              indent=1)
  return rows


if __name__ == "__main__":
  main()
