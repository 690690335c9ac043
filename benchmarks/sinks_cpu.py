r"""CPU benchmark: the cost of learned attention sinks (``sink_logits=``) in
xla_chunked.

One process, interleaved: for each length, xla_chunked without and with
``sink_logits`` (one random logit per query head), forward and
forward+backward (gradient of ``out.sum()`` with respect to q, k, v and the
sinks when given); ``--repeats`` rounds, best and median kept (the 2-core
machine is shared).

Usage, from the repository root::

  python benchmarks/sinks_cpu.py --lengths 8192

Prints a markdown table; writes JSON (default
``benchmarks/results/sinks_cpu.json``).
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
from extrapolax.attention.xla_chunked import XlaChunked  # noqa: E402


def _time(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(
      ROOT, "benchmarks", "results", "sinks_cpu.json"))
  args = parser.parse_args()
  impl = XlaChunked()
  rows = []
  for t in args.lengths:
    r = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
    q = f(1, t, args.heads, args.head_dim)
    k = f(1, t, args.kv_heads, args.head_dim)
    v = f(1, t, args.kv_heads, args.head_dim)
    sinks = f(args.heads)

    def attn(q, k, v, s):
      return core.dot_product_attention(q, k, v, mask=masks.Causal(),
                                        sink_logits=s, implementation=impl)

    fns = {
        ("none", "fwd"): jax.jit(lambda q, k, v, s: attn(q, k, v, None)),
        ("sinks", "fwd"): jax.jit(attn),
        ("none", "fwd_bwd"): jax.jit(jax.grad(
            lambda q, k, v, s: attn(q, k, v, None).sum(), argnums=(0, 1, 2))),
        ("sinks", "fwd_bwd"): jax.jit(jax.grad(
            lambda q, k, v, s: attn(q, k, v, s).sum(), argnums=(0, 1, 2, 3))),
    }
    times = {key: [] for key in fns}
    for fn in fns.values():
      _time(fn, q, k, v, sinks)            # compile
    for _ in range(args.repeats):
      for key, fn in fns.items():
        times[key].append(_time(fn, q, k, v, sinks))
    for pass_ in ("fwd", "fwd_bwd"):
      base = statistics.median(times[("none", pass_)])
      with_ = statistics.median(times[("sinks", pass_)])
      rows.append(dict(length=t, pass_=pass_, none_median_s=base,
                       sinks_median_s=with_,
                       none_best_s=min(times[("none", pass_)]),
                       sinks_best_s=min(times[("sinks", pass_)]),
                       ratio_median=with_ / base))
  load = os.getloadavg()
  print(f"jax {jax.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cpus, load {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; causal, B=1, N={args.heads}, K={args.kv_heads}, "
        f"H={args.head_dim}, float32")
  print("| T | pass | no sinks median s (best) | sinks median s (best) | "
        "ratio |")
  print("|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['length']} | {row['pass_']} | {row['none_median_s']:.3f} "
          f"({row['none_best_s']:.3f}) | {row['sinks_median_s']:.3f} "
          f"({row['sinks_best_s']:.3f}) | {row['ratio_median']:.3f} |")
  with open(args.out, "w") as fh:
    json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(), jax=jax.__version__, load=load,
                   args=vars(args), rows=rows), fh, indent=1)


if __name__ == "__main__":
  main()
