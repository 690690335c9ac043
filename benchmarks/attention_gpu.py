r"""GPU benchmark and hardware check of the Pallas flash-attention kernels.

Two parts, both on the machine's first GPU:

``--check``: the ``pallas_gpu`` kernel (real Triton lowering, not interpret
mode) against the dense XLA oracle run in float32 at the highest matmul
precision, on random inputs: forward, log-sum-exp and the gradients of q, k,
v (and ALiBi slopes / far q, k), for every mask, packed segments, ALiBi, soft
cap, grouped-query, T != S and ragged lengths, in float32 and bfloat16; plus
the skipping proof (the kernels' loop-trip counters equal the classifier's
non-empty block counts). Reports ||got - want|| / ||want|| per array.

``--bench``: forward and forward+backward time (median of ``--reps`` timed
runs after warm-up, ``jax.block_until_ready``) for masks causal, window
(SlidingWindow(T/8)), lambda (Lambda(4, T/8)), packed (random documents of
mean length T/16, causal) and alibi (ALiBi + causal), T = 2k..32k, head dim
64 and 128, bfloat16, batch x T = ``--tokens`` tokens, 2048 / head_dim query
heads. Implementations: pallas_gpu, xla (dense), xla_chunked, cudnn where it
can express the mask (jax.nn.dot_product_attention), JAX's bundled Pallas
Triton attention (jax.experimental.pallas.ops.gpu.attention.mha: causal and
segment ids only) and tokamax when it is installed. TFLOP/s are given three
ways: on the mask's visible pairs (forward 4 H per pair, backward 2.5x), on
the blocks the kernel visits (the classifier's non-empty blocks at the
forward block sizes; the same for every implementation, so it is the work a
block-skipping kernel must do), and on the dense equivalent (4 B N T S H).

Usage on a GPU machine, from the repository root:
  python benchmarks/attention_gpu.py --check --bench --out DIR
Writes DIR/attention_gpu_check.json and DIR/attention_gpu.json (rewritten
after every configuration) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax import attention as xa
from extrapolax.attention import masks
from extrapolax.pallas_kernels import flash_gpu
from extrapolax.pallas_kernels import tiles


def _device_info():
  d = jax.devices()[0]
  return dict(device=getattr(d, "device_kind", str(d)),
              platform=d.platform, jax=jax.__version__,
              python=platform.python_version(),
              date=datetime.datetime.now().isoformat(timespec="seconds"))


def packed_segments(rng, batch, length, mean_len):
  rows = []
  for _ in range(batch):
    ids, doc = [], 0
    while len(ids) < length:
      ids += [doc] * max(1, int(rng.exponential(mean_len)))
      doc += 1
    rows.append(ids[:length])
  return jnp.asarray(np.asarray(rows, np.int32))


# ----------------------------------------------------------------------------
# Check.

CHECKS = [
    # (name, kwargs)
    ("none", dict()),
    ("causal", dict(mask=masks.Causal())),
    ("causal_T<S", dict(t=300, s=1000, mask=masks.Causal())),
    ("causal_T>S_empty_rows", dict(t=700, s=333, mask=masks.Causal())),
    ("window", dict(mask=masks.SlidingWindow(100))),
    ("lambda_far", dict(mask=masks.Lambda(4, 128), far=128)),
    ("chunked", dict(mask=masks.Causal() & masks.Chunked(96))),
    ("prefix_lm", dict(mask=masks.PrefixLM(200))),
    ("packed", dict(mask=masks.Causal(), packed=60.0)),
    ("packed_short", dict(mask=masks.Causal(), packed=5.0)),
    ("alibi", dict(mask=masks.Causal(), alibi=True)),
    ("alibi_bidir_gqa", dict(n=8, k=2, alibi=True)),
    ("soft_cap", dict(mask=masks.Causal(), soft_cap=3.0)),
    ("mqa_hd96", dict(n=8, k=1, h=96, mask=masks.Causal())),
    ("everything", dict(t=777, s=901, n=6, k=2, mask=masks.Lambda(8, 200),
                        packed=150.0, alibi=True, soft_cap=5.0, far=200)),
]


def make_inputs(seed, *, b=2, t=1000, s=None, n=4, k=2, h=64, mask=None,
                packed=None, alibi=False, soft_cap=None, far=None):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  args = dict(q=f(b, t, n, h), k=f(b, s, k, h), v=f(b, s, k, h))
  kw = dict(mask=mask, logits_soft_cap=soft_cap)
  if packed:
    seg = packed_segments(rng, b, s, packed)
    kw["segment_ids"] = (seg[:, s - t:] if t <= s else jnp.concatenate(
        [jnp.full((b, t - s), -1, jnp.int32), seg], 1), seg)
  if alibi:
    args["slopes"] = xa.alibi_slopes(n)[None] * jnp.asarray(
        rng.uniform(0.5, 2.0, size=(1, n)), jnp.float32)
  if far:
    args["far_q"] = f(b, t, n, h)
    args["far_k"] = f(b, s, k, h)
    kw["far_window"] = far
  return args, kw


def attention_fn(implementation, kw):
  def fn(d):
    return xa.dot_product_attention(
        d["q"], d["k"], d["v"], alibi_slopes=d.get("slopes"),
        far_query=d.get("far_q"), far_key=d.get("far_k"),
        implementation=implementation, return_residuals=True, **kw)
  return fn


def outputs_and_grads(fn, d, seed=7):
  out, lse = fn(d)
  rng = np.random.default_rng(seed)
  d_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  d_lse = jnp.asarray(rng.normal(size=lse.shape), jnp.float32)

  def loss(d):
    o, l = fn(d)
    l = jnp.where(jnp.isfinite(l), l, 0.0)
    return jnp.sum(o.astype(jnp.float32) * d_out) + jnp.sum(l * d_lse)

  return out, lse, jax.grad(loss)(d)


def rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if np.isnan(got).any():
    return float("nan")
  both = np.isneginf(got) & np.isneginf(want)
  got, want = np.where(both, 0, got), np.where(both, 0, want)
  if not (np.isfinite(got).all() and np.isfinite(want).all()):
    return float("inf")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def run_check(out_dir):
  records = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for i, (name, kwargs) in enumerate(CHECKS):
      d, kw = make_inputs(100 + i, **kwargs)
      cast = {key: (x if key == "slopes" else x.astype(dtype))
              for key, x in d.items()}
      rec = dict(name=name, dtype=jnp.dtype(dtype).name)
      try:
        got = jax.jit(functools.partial(
            outputs_and_grads, attention_fn("pallas_gpu", kw)))(cast)
        # The oracle in float32 at full precision on the same rounded inputs.
        up = {key: x.astype(jnp.float32) for key, x in cast.items()}
        with jax.default_matmul_precision("highest"):
          want = jax.jit(functools.partial(
              outputs_and_grads, attention_fn("xla", kw)))(up)
        rec["out"] = rel_err(got[0], want[0])
        rec["lse"] = rel_err(got[1], want[1])
        for key in got[2]:
          rec["d" + key] = rel_err(got[2][key], want[2][key])
        rec["ok"] = all(v <= (2e-5 if dtype == jnp.float32 else 2e-2)
                        for key, v in rec.items() if key[:1] in "old"
                        and isinstance(v, float))
      except Exception as e:  # pylint: disable=broad-except
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
      records.append(rec)
      print(json.dumps(rec), flush=True)
  records += check_skipping()
  with open(os.path.join(out_dir, "attention_gpu_check.json"), "w") as f:
    json.dump(dict(info=_device_info(), records=records), f, indent=1)
  return records


def check_skipping():
  """Loop-trip counters of the compiled kernels == classifier counts."""
  out = []
  rng = np.random.default_rng(0)
  b, t, n, k, h = 2, 2048, 4, 2, 64
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.bfloat16)
  kk = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.bfloat16)
  v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  blocks = flash_gpu.BlockSizes()
  for name, mask, seg in (
      ("packed", masks.Causal(), packed_segments(rng, b, t, t / 16)),
      ("window", masks.SlidingWindow(t // 8), None)):
    static = flash_gpu.make_static(
        mask=mask, scale=h ** -0.5, soft_cap=None, far_window=None,
        has_segments=seg is not None, has_slopes=False, has_far=False,
        q_len=t, kv_len=t, num_kv_heads=k, block_sizes=blocks,
        interpret=False)
    counts = jax.jit(functools.partial(flash_gpu.visit_counts, static))(
        q, kk, v, pos, pos, seg, seg)
    rec = dict(name=f"skipping_{name}")
    for kind, (bq, bk, tr) in dict(
        fwd=(blocks.block_q, blocks.block_k, False),
        dq=(blocks.block_q_dq, blocks.block_k_dq, False),
        dkv=(blocks.block_q_dkv, blocks.block_k_dkv, True)).items():
      labels = masks.classify_blocks(mask, q_len=t, kv_len=t, block_q=bq,
                                     block_k=bk, q_segment_ids=seg,
                                     kv_segment_ids=seg)
      if tr:
        labels = jnp.swapaxes(labels, 1, 2)
      want = np.asarray(tiles.visited_blocks(labels))       # [B, rows]
      got = np.asarray(counts[kind])                          # [B, N, rows]
      rec[kind] = bool((got == want[:, None, :]).all())
      rec[kind + "_visited"] = int(got.sum())
      rec[kind + "_total"] = int(b * n * labels.shape[1] * labels.shape[2])
    rec["ok"] = rec["fwd"] and rec["dq"] and rec["dkv"]
    print(json.dumps(rec), flush=True)
    out.append(rec)
  return out


# ----------------------------------------------------------------------------
# Benchmark.

MASKS = ("causal", "window", "lambda", "packed", "alibi")


def bench_inputs(mask_name, t, h, tokens, seed=0):
  b = max(1, tokens // t)
  n = 2048 // h
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  q, k, v = f(b, t, n, h), f(b, t, n, h), f(b, t, n, h)
  seg, slopes = None, None
  mask = {"causal": masks.Causal(), "window": masks.SlidingWindow(t // 8),
          "lambda": masks.Lambda(4, t // 8), "packed": masks.Causal(),
          "alibi": masks.Causal()}[mask_name]
  if mask_name == "packed":
    seg = packed_segments(rng, b, t, t / 16)
  if mask_name == "alibi":
    slopes = xa.alibi_slopes(n)
  return (q, k, v), dict(mask=mask, segment_ids=seg, alibi_slopes=slopes)


def visible_pairs(kw, b, t):
  """Visible (query, key) pairs summed over the batch, block-wise exact."""
  mask = kw["mask"]
  seg = kw["segment_ids"]
  total = 0
  step = 2048
  pos = np.arange(t)
  for lo in range(0, t, step):
    qp = jnp.asarray(pos[lo:lo + step])[:, None]
    vis = mask(qp, jnp.asarray(pos)[None, :])
    if seg is None:
      total += b * int(vis.sum())
    else:
      same = seg[:, lo:lo + step, None] == seg[:, None, :]
      total += int((vis[None] & same).sum())
  return total


def visited_fraction(kw, t, blocks):
  labels = masks.classify_blocks(
      kw["mask"], q_len=t, kv_len=t, block_q=blocks.block_q,
      block_k=blocks.block_k, q_segment_ids=kw["segment_ids"],
      kv_segment_ids=kw["segment_ids"])
  return float(jnp.mean(labels != masks.EMPTY))


def bundled_pallas(mask_name, kw, scale):
  """JAX's own Pallas Triton flash attention (causal + segment ids only)."""
  if mask_name not in ("causal", "packed"):
    return None
  from jax.experimental.pallas.ops.gpu import attention as jax_attention  # pylint: disable=g-import-not-at-top
  seg = kw["segment_ids"]

  def fn(q, k, v):
    return jax_attention.mha(q, k, v, seg, sm_scale=scale, causal=True)
  return fn


def cudnn_fn(mask_name, kw, scale):
  if mask_name not in ("causal", "window"):
    return None
  window = None
  if mask_name == "window":
    window = (kw["mask"].window - 1, 0)

  def fn(q, k, v):
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, local_window_size=window,
        implementation="cudnn")
  return fn


def tokamax_fn(mask_name, kw, scale):
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if mask_name not in ("causal", "window"):
    return None
  window = None if mask_name == "causal" else (kw["mask"].window - 1, 0)

  def fn(q, k, v):
    return tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                         local_window_size=window)
  return fn


TUNE_FWD = [  # (block_q, block_k, num_warps, num_stages)
    (128, 64, None, 2), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3),
    (64, 64, 4, 2), (128, 64, 8, 3)]
TUNE_BWD = [  # (block_q_dq, block_k_dq, block_q_dkv, block_k_dkv, warps, st)
    (64, 64, 64, 64, None, 2), (64, 64, 64, 64, 4, 2),
    (128, 64, 64, 128, 8, 2), (64, 32, 32, 64, 4, 2), (64, 64, 64, 64, 4, 3),
    (128, 32, 32, 128, 8, 2)]
BEST = {}   # head_dim -> flash_gpu.BlockSizes chosen by --tune


def run_tune(out_dir, t=16384, tokens=32768, reps=10):
  """Times block-size candidates on causal T=16k; the fastest is used."""
  records = []
  for h in (128, 64):
    args, kw = bench_inputs("causal", t, h, tokens)
    fwd_best = None
    for bq, bk, w, st in TUNE_FWD:
      blocks = flash_gpu.BlockSizes(block_q=bq, block_k=bk, num_warps=w,
                                    num_stages=st)
      try:
        sec, _ = time_fn(ours(xa.PallasGpu(block_sizes=blocks), kw), args,
                         reps, False)
      except Exception as e:  # pylint: disable=broad-except
        print("tune fwd failed", blocks, e, flush=True)
        continue
      records.append(dict(H=h, T=t, pass_="fwd", blocks=str(blocks),
                          ms=sec * 1e3))
      print(json.dumps(records[-1]), flush=True)
      if fwd_best is None or sec < fwd_best[0]:
        fwd_best = (sec, blocks)
    best = fwd_best[1]
    bwd_best = None
    for bqq, bkq, bqk, bkk, w, st in TUNE_BWD:
      blocks = dataclasses.replace(
          best, block_q_dq=bqq, block_k_dq=bkq, block_q_dkv=bqk,
          block_k_dkv=bkk, num_warps_bwd=w, num_stages_bwd=st)
      try:
        sec, _ = time_fn(ours(xa.PallasGpu(block_sizes=blocks), kw), args,
                         reps, True)
      except Exception as e:  # pylint: disable=broad-except
        print("tune bwd failed", blocks, e, flush=True)
        continue
      records.append(dict(H=h, T=t, pass_="fwd_bwd", blocks=str(blocks),
                          ms=sec * 1e3))
      print(json.dumps(records[-1]), flush=True)
      if bwd_best is None or sec < bwd_best[0]:
        bwd_best = (sec, blocks)
    BEST[h] = bwd_best[1]
    print("best", h, BEST[h], flush=True)
  with open(os.path.join(out_dir, "attention_gpu_tune.json"), "w") as f:
    json.dump(dict(info=_device_info(), records=records,
                   best={str(h): str(b) for h, b in BEST.items()}), f,
              indent=1)


def ours(implementation, kw):
  def fn(q, k, v):
    return xa.dot_product_attention(q, k, v, implementation=implementation,
                                    **kw)
  return fn


def time_fn(fn, args, reps, grad):
  if grad:
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
  else:
    f = jax.jit(fn)
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compile_s


def run_bench(out_dir, lengths, head_dims, mask_names, impls, tokens, reps,
              dense_limit_gb, chunked_max_t, time_limit_s):
  path = os.path.join(out_dir, "attention_gpu.json")
  records = []
  if os.path.exists(path):
    records = json.load(open(path))["records"]
  done = {(r["impl"], r["mask"], r["T"], r["H"], r["pass"]) for r in records}
  start = time.time()
  blocks = flash_gpu.BlockSizes()
  for h in head_dims:
    for t in lengths:
      for mask_name in mask_names:
        if time.time() - start > time_limit_s:
          print("time limit reached; stopping", flush=True)
          return records
        args, kw = bench_inputs(mask_name, t, h, tokens)
        b, n = args[0].shape[0], args[0].shape[2]
        scale = h ** -0.5
        pairs = visible_pairs(kw, b, t) * n
        frac = visited_fraction(kw, t, blocks)
        impl_gpu = ("pallas_gpu" if h not in BEST else
                    xa.PallasGpu(block_sizes=BEST[h]))
        candidates = {
            "pallas_gpu": ours(impl_gpu, kw),
            "xla": ours("xla", kw) if b * n * t * t * 4 * 3 <=
                   dense_limit_gb * 1e9 else None,
            "xla_chunked": ours("xla_chunked", kw) if t <= chunked_max_t
                           else None,
            "cudnn": cudnn_fn(mask_name, kw, scale),
            "jax_pallas": bundled_pallas(mask_name, kw, scale),
            "tokamax": tokamax_fn(mask_name, kw, scale),
        }
        for impl in impls:
          fn = candidates.get(impl)
          if fn is None:
            continue
          for grad in (False, True):
            pname = "fwd_bwd" if grad else "fwd"
            if (impl, mask_name, t, h, pname) in done:
              continue
            rec = dict(impl=impl, mask=mask_name, T=t, H=h, B=b, N=n,
                       dtype="bfloat16", **{"pass": pname})
            if impl == "pallas_gpu":
              rec["blocks"] = str(BEST.get(h, flash_gpu.BlockSizes()))
            try:
              sec, compile_s = time_fn(fn, args, reps, grad)
              mult = 3.5 if grad else 1.0
              useful = 4.0 * h * pairs * mult
              visited = 4.0 * h * b * n * t * t * frac * mult
              dense = 4.0 * h * b * n * t * t * mult
              rec.update(ms=sec * 1e3, compile_s=compile_s,
                         tflops_useful=useful / sec / 1e12,
                         tflops_visited=visited / sec / 1e12,
                         tflops_dense_equiv=dense / sec / 1e12,
                         visited_block_fraction=frac)
            except Exception as e:  # pylint: disable=broad-except
              rec["error"] = f"{type(e).__name__}: {e}"[:500]
            records.append(rec)
            print(json.dumps(rec), flush=True)
            with open(path, "w") as f:
              json.dump(dict(info=_device_info(), records=records), f,
                        indent=1)
  return records


def print_table(records):
  print("\n| impl | mask | H | T | pass | ms | TFLOP/s useful | visited | "
        "dense-eq |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in records:
    if "ms" not in r:
      print(f"| {r['impl']} | {r['mask']} | {r['H']} | {r['T']} | "
            f"{r['pass']} | error | | | |")
      continue
    print(f"| {r['impl']} | {r['mask']} | {r['H']} | {r['T']} | {r['pass']} "
          f"| {r['ms']:.2f} | {r['tflops_useful']:.0f} | "
          f"{r['tflops_visited']:.0f} | {r['tflops_dense_equiv']:.0f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true")
  p.add_argument("--bench", action="store_true")
  p.add_argument("--tune", action="store_true")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--lengths", type=int, nargs="+",
                 default=[2048, 4096, 8192, 16384, 32768])
  p.add_argument("--head_dims", type=int, nargs="+", default=[128, 64])
  p.add_argument("--masks", nargs="+", default=list(MASKS))
  p.add_argument("--impls", nargs="+", default=[
      "pallas_gpu", "cudnn", "jax_pallas", "tokamax", "xla", "xla_chunked"])
  p.add_argument("--tokens", type=int, default=32768)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--dense_limit_gb", type=float, default=40.0)
  p.add_argument("--chunked_max_t", type=int, default=8192)
  p.add_argument("--time_limit_s", type=float, default=480.0)
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  print(json.dumps(_device_info()), flush=True)
  if a.check:
    recs = run_check(a.out)
    bad = [r["name"] + "/" + r.get("dtype", "") for r in recs
           if not r.get("ok")]
    print("check failures:", bad, flush=True)
  if a.tune:
    run_tune(a.out)
  if a.bench:
    recs = run_bench(a.out, a.lengths, a.head_dims, a.masks, a.impls,
                     a.tokens, a.reps, a.dense_limit_gb, a.chunked_max_t,
                     a.time_limit_s)
    print_table(recs)
  return 0


if __name__ == "__main__":
  sys.exit(main())
