r"""CPU benchmark: the papers' sparse masks, skipped blocks and xla_chunked time.

For every mask and length T = S this records

* ``skip_kernel``: the fraction of (query block, key block, head) triples the
  classifier labels EMPTY at 128 x 128 blocks, per head (what the Pallas
  kernels skip: they classify each head apart);
* ``skip_chunked``: the fraction of (query block, key block) pairs EMPTY for
  every head at xla_chunked's 512 x 512 blocks (its ``lax.switch`` label is
  shared by the batch and the heads);
* ``fwd_s``: xla_chunked's forward wall time (median of ``--repeats`` runs
  after a warm-up; compilation excluded), B = 1, N = K = 2, head_dim 64,
  float32.

Masks: ``causal`` and ``window`` (SlidingWindow(T / 8)) as the baselines;
``dilated`` (LongNet's mixture Dilated(2048, 1) | Dilated(8192, 4) |
Dilated(16384, 16)); ``strided`` (Strided(64, 8, local=16), Phi-3-small /
LongGen's local + vertical-stride layout); ``longformer``
(SlidingWindow(left=256, right=256) | GlobalTokens(count=16), not causal);
``shifted_sparse`` (LongLoRA S^2-Attn, group 2048); ``window_per_head`` (MoA,
windows 512 and 2048 on the two heads).

Usage, from the repository root: ``python benchmarks/masks_cpu.py [--lengths
4096 8192 16384] [--masks dilated strided ...]``. The markdown table goes to
stdout, the records to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax import attention
from extrapolax.attention import masks

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "masks_cpu.json")
HEADS, HEAD_DIM = 2, 64


def make_mask(name: str, t: int) -> masks.Mask:
  table = {
      "causal": lambda: masks.Causal(),
      "window": lambda: masks.SlidingWindow(t // 8),
      "dilated": lambda: (masks.Dilated(2048, 1) | masks.Dilated(8192, 4)
                          | masks.Dilated(16384, 16)),
      "strided": lambda: masks.Strided(64, 8, local=16),
      "longformer": lambda: (masks.SlidingWindow(left=256, right=256)
                             | masks.GlobalTokens(count=16)),
      "shifted_sparse": lambda: masks.shifted_sparse(2048),
      "window_per_head": lambda: masks.window_per_head((512, 2048)),
  }
  return table[name]()


ALL_MASKS = ("causal", "window", "dilated", "strided", "longformer",
             "shifted_sparse", "window_per_head")


def skip_fractions(mask: masks.Mask, t: int) -> tuple[float, float]:
  bound = mask.for_heads(HEADS, HEADS)
  heads = HEADS if bound.per_head else None
  with jax.ensure_compile_time_eval():
    kernel = np.asarray(masks.classify_blocks(
        bound, q_len=t, kv_len=t, block_q=128, block_k=128, heads=heads))
    chunked = np.asarray(masks.classify_blocks(
        bound, q_len=t, kv_len=t, block_q=512, block_k=512))
  return (float(np.mean(kernel == masks.EMPTY)),
          float(np.mean(chunked == masks.EMPTY)))


def time_forward(mask: masks.Mask, t: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, HEADS, HEAD_DIM)),
                         jnp.float32) for _ in range(3))
  impl = attention.XlaChunked()
  f = jax.jit(lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=mask, implementation=impl))
  start = time.perf_counter()
  compiled = f.lower(q, k, v).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(q, k, v))           # warm-up
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    runs.append(time.perf_counter() - start)
  return dict(fwd_s=statistics.median(runs), compile_s=compile_s)


def format_table(records) -> str:
  lines = ["| mask | T | skipped (kernel, 128x128 per head) | skipped "
           "(xla_chunked, 512x512) | xla_chunked fwd s |",
           "|---|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['mask']} | {r['t']} | {r['skip_kernel']:.1%} | "
                 f"{r['skip_chunked']:.1%} | {r['fwd_s']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[4096, 8192, 16384])
  parser.add_argument("--masks", nargs="+", default=list(ALL_MASKS),
                      choices=ALL_MASKS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  records = []
  for t in args.lengths:
    for name in args.masks:
      mask = make_mask(name, t)
      skip_kernel, skip_chunked = skip_fractions(mask, t)
      record = dict(mask=name, description=repr(mask), t=t,
                    skip_kernel=skip_kernel, skip_chunked=skip_chunked,
                    **time_forward(mask, t, args.repeats))
      records.append(record)
      print(format_table([record]).splitlines()[-1], flush=True)
  load = os.getloadavg()
  payload = dict(
      benchmark="masks_cpu", date=datetime.datetime.now(
          datetime.timezone.utc).isoformat(timespec="seconds"),
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                   jax=jax.__version__, load_after=load),
      settings=dict(batch=1, heads=HEADS, kv_heads=HEADS, head_dim=HEAD_DIM,
                    dtype="float32", repeats=args.repeats),
      records=records)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  print()
  print(format_table(records))
  print(f"\nload average after the run: {load}")
  return payload


if __name__ == "__main__":
  main()
