r"""CPU benchmark: what learned sinks (``sink_logits=``) cost the Pallas
kernels, counted in Pallas interpret mode.

``pallas_gpu`` and ``pallas_tpu`` serve sinks after the kernel
(``attention/pallas.py``: the kernel's (out, lse) merged with a zero-value
block whose log-sum-exp is the sink). This script checks that claim on the
kernels themselves: for each kernel and mask (causal, sliding window,
Lambda) it runs ``dot_product_attention`` without and with ``sink_logits``
in interpret mode, records the kernel call the implementation made (its
static configuration and its inputs), and runs the kernels' loop-trip
counters (``flash_gpu.visit_counts`` / ``flash_tpu.visit_counts``: the
blocks each program of the forward, dq and dk/dv kernels computed) on each
recorded call. It reports the blocks visited without and with sinks, the
whole grid, the block classifier's count of non-empty blocks
(``masks.classify_blocks``), whether the two calls were the same, and what
the merge adds (one elementwise pass over the output: B * T * N * Hv
elements, beside the kernel's visited logits). The output with sinks is
checked against the ``xla`` oracle with sinks. Counts, not times: interpret
mode's times say nothing about a GPU or TPU.

Usage, from the repository root::

  python benchmarks/sinks_kernels_cpu.py            # T = 512, 64 blocks
  python benchmarks/sinks_kernels_cpu.py --quick    # T = 128 (seconds)

Prints a markdown table; writes JSON (default
``benchmarks/results/sinks_kernels_cpu.json``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from extrapolax.attention import core, masks  # noqa: E402
from extrapolax.attention import pallas as pallas_impl  # noqa: E402
from extrapolax.pallas_kernels import flash_gpu, flash_tpu, tiles  # noqa: E402

KERNELS = {"pallas_gpu": (flash_gpu, pallas_impl.PallasGpu),
           "pallas_tpu": (flash_tpu, pallas_impl.PallasTpu)}
KINDS = ("fwd", "dq", "dkv")


def make_mask(name: str, t: int):
  if name == "causal":
    return masks.Causal()
  if name == "window":
    return masks.SlidingWindow(t // 4)
  if name == "lambda":
    return masks.Lambda(4, t // 4)
  raise ValueError(f"--masks: {name!r} is not one of causal, window, lambda")


def recorded_call(module, fn):
  """``fn()``'s result and the (static, args) of each kernel call it made."""
  calls = []
  original = module.flash_attention

  def spy(static, *args, **kwargs):
    keywords = tuple(value for _, value in sorted(kwargs.items()))
    calls.append((static, args + keywords))
    return original(static, *args, **kwargs)

  module.flash_attention = spy
  try:
    result = fn()
  finally:
    module.flash_attention = original
  return result, calls


def _same_args(a, b) -> bool:
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    if (x is None) != (y is None):
      return False
    if x is not None and not (x.shape == y.shape and x.dtype == y.dtype and
                              np.array_equal(np.asarray(x), np.asarray(y))):
      return False
  return True


def block_shapes(blocks) -> dict:
  return {"fwd": (blocks.block_q, blocks.block_k, False),
          "dq": (blocks.block_q_dq, blocks.block_k_dq, False),
          "dkv": (blocks.block_q_dkv, blocks.block_k_dkv, True)}


def one_case(kernel: str, mask_name: str, args) -> dict:
  module, impl_cls = KERNELS[kernel]
  b, t, n, kh, h = 1, args.length, args.heads, args.kv_heads, args.head_dim
  blk = args.block
  blocks = module.BlockSizes(block_q=blk, block_k=blk, block_q_dq=blk,
                             block_k_dq=blk, block_q_dkv=blk, block_k_dkv=blk)
  impl = impl_cls(block_sizes=blocks, interpret=True)
  mask = make_mask(mask_name, t)
  r = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
  q, k, v = f(b, t, n, h), f(b, t, kh, h), f(b, t, kh, h)
  sinks = f(n) + 1.0         # large enough to move every row's softmax

  row = dict(kernel=kernel, mask=mask_name, mask_detail=repr(mask), length=t,
             block=blk, batch=b, heads=n, kv_heads=kh, head_dim=h)
  counts, calls = {}, {}
  start = time.perf_counter()
  for label, s in (("none", None), ("sinks", sinks)):
    out, recorded = recorded_call(module, lambda s=s: jax.block_until_ready(
        core.dot_product_attention(q, k, v, mask=mask, sink_logits=s,
                                   implementation=impl)))
    if len(recorded) != 1:
      raise RuntimeError(f"{kernel}: expected one kernel call, got "
                         f"{len(recorded)}")
    static, kernel_args = recorded[0]
    calls[label] = recorded[0]
    counts[label] = {kind: np.asarray(c) for kind, c in jax.jit(
        functools.partial(module.visit_counts, static))(*kernel_args).items()}
    want = core.dot_product_attention(q, k, v, mask=mask, sink_logits=s,
                                      implementation="xla")
    row[f"max_abs_err_vs_xla_{label}"] = float(jnp.max(jnp.abs(out - want)))
    row[f"out_{label}"] = out
  row["seconds"] = time.perf_counter() - start
  row["sinks_change_output_max_abs"] = float(
      jnp.max(jnp.abs(row.pop("out_sinks") - row.pop("out_none"))))
  row["same_kernel_config"] = calls["none"][0] == calls["sinks"][0]
  row["same_kernel_inputs"] = _same_args(calls["none"][1], calls["sinks"][1])
  row["same_blocks"] = all(np.array_equal(counts["none"][kind],
                                          counts["sinks"][kind])
                           for kind in KINDS)
  q_pos, k_pos = masks.default_positions(t, t)
  for kind, (bq, bk, transpose) in block_shapes(blocks).items():
    labels = masks.classify_blocks(mask, q_len=t, kv_len=t, block_q=bq,
                                   block_k=bk, q_positions=q_pos,
                                   k_positions=k_pos)
    if transpose:
      labels = jnp.swapaxes(labels, 1, 2)
    row[f"{kind}_classifier"] = int(
        np.asarray(tiles.visited_blocks(labels)).sum()) * b * n
    row[f"{kind}_grid"] = int(labels.shape[1] * labels.shape[2]) * b * n
    for label in ("none", "sinks"):
      row[f"{kind}_visited_{label}"] = int(counts[label][kind].sum())
  row["kernel_visited_logits"] = row["fwd_visited_sinks"] * blk * blk
  row["merge_elements"] = b * t * n * h      # the merge's pass over out
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--block", type=int, default=64)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=32)
  parser.add_argument("--masks", default="causal,window,lambda")
  parser.add_argument("--kernels", default="pallas_gpu,pallas_tpu")
  parser.add_argument("--quick", action="store_true",
                      help="T = 128, blocks of 32 (a smoke run)")
  parser.add_argument("--out", default=os.path.join(
      ROOT, "benchmarks", "results", "sinks_kernels_cpu.json"))
  args = parser.parse_args(argv)
  if args.quick:
    args.length, args.block = 128, 32
  kernels = [x for x in args.kernels.split(",") if x]
  bad = [x for x in kernels if x not in KERNELS]
  if bad:
    raise ValueError(f"--kernels: {bad} not in {sorted(KERNELS)}")
  rows = [one_case(kernel, name, args) for kernel in kernels
          for name in args.masks.split(",") if name]
  load = os.getloadavg()
  print(f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} "
        f"cpus, load {load[0]:.2f}; Pallas interpret mode, B=1, "
        f"N={args.heads}, K={args.kv_heads}, H={args.head_dim}, "
        f"T={args.length}, blocks {args.block} x {args.block}, float32")
  print("| kernel | mask | pass | blocks visited, no sinks | with sinks | "
        "classifier (non-empty) | grid | same kernel call |")
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    same = row["same_kernel_config"] and row["same_kernel_inputs"]
    for kind in KINDS:
      print(f"| {row['kernel']} | {row['mask']} | {kind} | "
            f"{row[kind + '_visited_none']} | {row[kind + '_visited_sinks']} "
            f"| {row[kind + '_classifier']} | {row[kind + '_grid']} | "
            f"{'yes' if same else 'NO'} |")
  print("| kernel | mask | max abs err vs xla (sinks) | sinks change output "
        "by | merge elements | kernel visited logits (fwd) |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['kernel']} | {row['mask']} | "
          f"{row['max_abs_err_vs_xla_sinks']:.1e} | "
          f"{row['sinks_change_output_max_abs']:.3f} | "
          f"{row['merge_elements']:,} | {row['kernel_visited_logits']:,} |")
  payload = dict(date=datetime.datetime.now(datetime.timezone.utc)
                 .isoformat(), jax=jax.__version__, load=load,
                 cpu_count=os.cpu_count(), args=vars(args), rows=rows)
  with open(args.out, "w") as fh:
    json.dump(payload, fh, indent=1)
  return payload


if __name__ == "__main__":
  main()
