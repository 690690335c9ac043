r"""CPU benchmark: xla_chunked as a fraction of the machine's matmul rate.

For every (mask, length T = S, head_dim, dtype) this measures, in one process
and interleaved (limit, forward, forward+backward, repeated ``--repeats``
times; best and median kept, since the 2-core machine is shared):

* ``limit``: the batched-matmul rate for the block shapes xla_chunked uses:
  a jitted loop over as many block pairs as the mask visits, each doing the
  two products of an attention block in the same layout (``[B, K, G * bq,
  H] x [B, K, bk, H]`` then ``[B, K, G * bq, bk] x [B, K, bk, Hv]``, float32
  accumulation) and nothing else;
* ``fwd``: ``dot_product_attention(..., implementation=XlaChunked())``;
* ``fwd_bwd``: the gradient of ``out.sum()`` with respect to q, k and v.

FLOPs count only the block pairs ``masks.classify_blocks`` labels non-empty
(one label per pair for the whole batch, as XlaChunked visits them):
``4 * B * N * bq * bk * H`` per pair forward, 3.5x that forward+backward
(the backward's five products plus the forward's two). Each rate is also
given as a fraction of ``limit``. ``paired`` is the median over rounds of
each variant's time over the first variant's (this checkout's
``XlaChunked()``) in the same round: the steadier comparison on a shared
machine whose speed drifts between rounds.

``--baseline REV`` also runs xla_chunked as it was at git revision REV
(loaded from ``git show REV:attention/xla_chunked.py`` into a private
module; the registry is left alone), side by side in the same process.

Usage, from the repository root::

  python benchmarks/attention_limit_cpu.py --quick
  python benchmarks/attention_limit_cpu.py --lengths 16384 --masks causal \
      --head_dims 64 --dtypes float32 --baseline 9198b1d

Prints a markdown table; writes JSON (default
``benchmarks/results/attention_limit_cpu.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results",
                           "attention_limit_cpu.json")
ALL_MASKS = ("causal", "window", "lambda", "packed")
_BACKWARD_FACTOR = 3.5   # forward + backward FLOPs over forward FLOPs


def load_xla_chunked(rev: str):
  """``XlaChunked`` as it was at git revision ``rev`` (a private module)."""
  from extrapolax.attention import core  # pylint: disable=import-outside-toplevel
  src = subprocess.run(["git", "-C", ROOT, "show",
                        f"{rev}:attention/xla_chunked.py"],
                       capture_output=True, text=True, check=True).stdout
  name = f"extrapolax.attention._xla_chunked_{rev.replace('-', '_')}"
  mod = types.ModuleType(name)
  mod.__package__ = "extrapolax.attention"
  sys.modules[name] = mod
  saved = dict(core._REGISTRY)  # pylint: disable=protected-access
  exec(compile(src, f"{rev}:attention/xla_chunked.py", "exec"), mod.__dict__)  # pylint: disable=exec-used
  core._REGISTRY.clear()  # pylint: disable=protected-access
  core._REGISTRY.update(saved)  # pylint: disable=protected-access
  return mod.XlaChunked


def machine_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
      for line in fh:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return dict(cpu=cpu, cpus=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, devices=[str(d) for d in jax.devices()],
              load_before=os.getloadavg(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"))


def packed_segment_ids(length, mean_len, seed=0):
  """int32 [1, length]: documents of geometric lengths (mean ``mean_len``)."""
  rng = np.random.default_rng(seed)
  ids, doc = [], 0
  while len(ids) < length:
    ids.extend([doc] * int(rng.geometric(min(1.0, 1.0 / mean_len))))
    doc += 1
  return np.asarray([ids[:length]], np.int32)


def workload(mask_name, length):
  """(mask, segment ids or None) as attention_cpu.py defines them."""
  from extrapolax.attention import masks  # pylint: disable=import-outside-toplevel
  window = max(1, length // 8)
  if mask_name == "causal":
    return masks.Causal(), None
  if mask_name == "window":
    return masks.SlidingWindow(window), None
  if mask_name == "lambda":
    return masks.Lambda(16, window), None
  if mask_name == "packed":
    return masks.Causal(), packed_segment_ids(length, length / 16)
  raise ValueError(f"unknown mask {mask_name!r}; expected one of {ALL_MASKS}")


def visited_pairs(mask, seg, length, bq, bk) -> int:
  from extrapolax.attention import masks  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  labels = np.asarray(masks.classify_blocks(
      mask, q_len=length, kv_len=length, block_q=bq, block_k=bk,
      q_segment_ids=None if seg is None else jnp.asarray(seg),
      kv_segment_ids=None if seg is None else jnp.asarray(seg)))
  return int(np.any(labels != masks.EMPTY, axis=0).sum())


def matmul_limit_fn(pairs, b, kv_heads, groups, bq, bk, h, dtype):
  """A jitted loop of ``pairs`` block-pair products (no softmax)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  nb = 8
  key = jax.random.PRNGKey(1)
  q = jax.random.normal(key, (nb, b, kv_heads, groups * bq, h), dtype)
  k = jax.random.normal(key, (nb, b, kv_heads, bk, h), dtype)

  def run(q, k):
    def body(c, acc):
      i, j = c % nb, (c * 3 + 1) % nb
      qi = jax.lax.dynamic_index_in_dim(q, i, 0, False)
      kj = jax.lax.dynamic_index_in_dim(k, j, 0, False)
      s = jnp.einsum("bkqh,bksh->bkqs", qi, kj,
                     preferred_element_type=jnp.float32)
      o = jnp.einsum("bkqs,bksh->bkqh", s.astype(dtype), kj,
                     preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_index_in_dim(
          acc, jax.lax.dynamic_index_in_dim(acc, i, 0, False) + o, i, 0)
    return jax.lax.fori_loop(0, pairs, body,
                             jnp.zeros(q.shape, jnp.float32))

  fn = jax.jit(run)
  return lambda: fn(q, k)


def attention_fns(impl, mask, seg, length, heads, kv_heads, h, dtype):
  """(forward, forward+backward) closures on random inputs."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from extrapolax import attention  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, length, heads, h), dtype)
  k = jax.random.normal(keys[1], (1, length, kv_heads, h), dtype)
  v = jax.random.normal(keys[2], (1, length, kv_heads, h), dtype)
  segs = None if seg is None else jnp.asarray(seg)

  def fwd(q, k, v):
    return attention.dot_product_attention(
        q, k, v, mask=mask, segment_ids=segs, implementation=impl)

  grad = jax.jit(jax.grad(lambda q, k, v: fwd(q, k, v).astype(
      jnp.float32).sum(), argnums=(0, 1, 2)))
  fwd = jax.jit(fwd)
  return (lambda: fwd(q, k, v)), (lambda: grad(q, k, v))


def _time(fn) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure(args, mask_name, length, h, dtype_name, variants) -> list[dict]:
  """Rows for one (mask, length, head_dim, dtype): limit and every variant."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(dtype_name)
  mask, seg = workload(mask_name, length)
  groups = args.heads // args.kv_heads
  runs = {}
  for label, impl in variants:
    bq, bk = impl.block_sizes(h, dtype) if hasattr(
        impl, "block_sizes") else (impl.block_q, impl.block_k)
    bq, bk = min(bq, length), min(bk, length)
    pairs = visited_pairs(mask, seg, length, bq, bk)
    flops = 4.0 * args.heads * bq * bk * h * pairs
    if ("limit", bq, bk) not in runs:
      runs[("limit", bq, bk)] = dict(
          fn=matmul_limit_fn(pairs, 1, args.kv_heads, groups, bq, bk, h,
                             dtype), flops=flops, pairs=pairs, times=[])
    fwd, fwd_bwd = attention_fns(impl, mask, seg, length, args.heads,
                                 args.kv_heads, h, dtype)
    for pass_, fn, factor in (("fwd", fwd, 1.0),
                              ("fwd_bwd", fwd_bwd, _BACKWARD_FACTOR)):
      if pass_ in args.passes:
        runs[(label, pass_)] = dict(fn=fn, flops=flops * factor, pairs=pairs,
                                    times=[], limit=("limit", bq, bk),
                                    blocks=(bq, bk))
  for run in runs.values():      # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(run["fn"]())
    run["first_s"] = time.perf_counter() - start
  for _ in range(args.repeats):   # interleaved: the load hits all alike
    for run in runs.values():
      run["times"].append(_time(run["fn"]))
  rows = []
  for key, run in runs.items():
    if key[0] == "limit":
      continue
    limit = runs[run["limit"]]
    # Round by round against the first variant (this checkout's default),
    # timed back to back with it: steadier than best against best on a
    # machine whose speed drifts.
    ref = runs[(variants[0][0], key[1])]["times"]
    paired = statistics.median(a / b for a, b in zip(run["times"], ref))
    rate = run["flops"] / min(run["times"]) / 1e9
    limit_rate = limit["flops"] / min(limit["times"]) / 1e9
    rows.append(dict(
        implementation=key[0], pass_=key[1], mask=mask_name, length=length,
        head_dim=h, dtype=dtype_name, heads=args.heads,
        kv_heads=args.kv_heads, block_q=run["blocks"][0],
        block_k=run["blocks"][1], pairs=run["pairs"],
        time_best_s=min(run["times"]),
        time_median_s=statistics.median(run["times"]),
        times_s=run["times"], gflops=rate, limit_gflops=limit_rate,
        limit_times_s=limit["times"], fraction=rate / limit_rate,
        paired_vs_first=paired, load=os.getloadavg()))
  return rows


def format_table(rows) -> str:
  lines = ["| impl | mask | T | H | dtype | blocks | pass | time best (s) | "
           "median (s) | GFLOP/s | limit GFLOP/s | fraction | paired |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['implementation']} | {r['mask']} | {r['length']} | "
        f"{r['head_dim']} | {r['dtype']} | {r['block_q']}x{r['block_k']} | "
        f"{r['pass_']} | {r['time_best_s']:.3f} | {r['time_median_s']:.3f} "
        f"| {r['gflops']:.1f} | {r['limit_gflops']:.1f} | "
        f"{r['fraction']:.2f} | {r['paired_vs_first']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small: T 1024 and 2048, causal, H 64, float32")
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[4096, 8192, 16384, 32768, 65536])
  parser.add_argument("--masks", nargs="+", default=list(ALL_MASKS),
                      choices=ALL_MASKS)
  parser.add_argument("--head_dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
  parser.add_argument("--passes", nargs="+", default=["fwd", "fwd_bwd"],
                      choices=["fwd", "fwd_bwd"])
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=4)
  parser.add_argument("--blocks", nargs="+", default=[],
                      help="extra XlaChunked block shapes, e.g. 256x512")
  parser.add_argument("--dense", action="store_true",
                      help="also run the dense xla path (for the auto order)")
  parser.add_argument("--baseline", default=None,
                      help="also run xla_chunked from this git revision")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.quick:
    args.lengths, args.masks = [1024, 2048], ["causal"]
    args.head_dims, args.dtypes = [64], ["float32"]

  from extrapolax.attention import XlaChunked  # pylint: disable=import-outside-toplevel
  variants = [("xla_chunked", XlaChunked())]
  for shape in args.blocks:
    bq, bk = (int(x) for x in shape.split("x"))
    variants.append((f"xla_chunked {bq}x{bk}", XlaChunked(bq, bk)))
  if args.dense:
    from extrapolax.attention import Xla  # pylint: disable=import-outside-toplevel
    dense = Xla()
    dense.block_sizes = lambda h, dtype: (1 << 30, 1 << 30)  # one block
    variants.append(("xla", dense))
  if args.baseline:
    old = load_xla_chunked(args.baseline)
    variants.append((f"xla_chunked@{args.baseline}", old()))

  info = machine_info()
  print(f"# {info['cpu']}, {info['cpus']} CPUs, jax {info['jax']}, load "
        f"{info['load_before']}", flush=True)
  rows = []
  for length in args.lengths:
    for mask_name in args.masks:
      for h in args.head_dims:
        for dtype_name in args.dtypes:
          new = measure(args, mask_name, length, h, dtype_name, variants)
          rows.extend(new)
          print(format_table(new).split("\n", 2)[2], flush=True)
          os.makedirs(os.path.dirname(args.out), exist_ok=True)
          with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(dict(machine=info, argv=sys.argv[1:], rows=rows), fh,
                      indent=1)
  print(format_table(rows))
  return rows


if __name__ == "__main__":
  main()
