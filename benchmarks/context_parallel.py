r"""Context-parallel attention: ring vs all-gather vs one device.

For every (implementation, mask, length T = S, pass) this measures

* wall time: median of a few runs after one warm-up (compilation is done
  ahead of time and reported apart), with ``jax.block_until_ready``;
* ring steps: R of ``attention.ring_plan`` (key/value shards each device
  visits) and whether Lambda's sinks travel apart from the ring;
* collective-permutes: how many the compiled program runs (the ring's
  exchanges, forward and backward; a loop body counts once per trip);
* per-device memory: temp + argument + output bytes of the compiled
  program's ``memory_analysis()`` (for a sharded program, one device's share).

Implementations: ``ring`` and ``all_gather`` (``ContextParallel`` over a
mesh with one ``"context"`` axis spanning every device, inner
``XlaChunked(block_q, block_k)``) and ``single`` (the same ``XlaChunked`` on
one device). Masks: ``causal`` = Causal(), ``window`` = SlidingWindow(L) with
L = T / C the shard length, ``lambda`` = Lambda(num_sinks, L). Passes:
``fwd`` (the output) and ``fwd_bwd`` (the gradient of ``out.sum()`` with
respect to q, k and v).

On the CPU the script gives itself eight host devices
(``--xla_force_host_platform_device_count``) unless XLA_FLAGS already sets a
count. Those devices share the machine's cores, so the CPU numbers show the
schedule's overheads and memory, not a speed-up.

Usage, from the repository root: ``.venv/bin/python
benchmarks/context_parallel.py [--lengths 4096,16384 --masks causal ...]``.
The markdown table goes to stdout, the records to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  _count = 8
  for _i, _arg in enumerate(sys.argv):
    if _arg.startswith("--host_devices="):
      _count = int(_arg.split("=", 1)[1])
    elif _arg == "--host_devices" and _i + 1 < len(sys.argv):
      _count = int(sys.argv[_i + 1])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_count}"
                             ).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from extrapolax import attention
from extrapolax.attention import masks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_cpu import machine_info  # the same machine record
# pylint: enable=g-import-not-at-top,wrong-import-position

IMPLEMENTATIONS = ("ring", "all_gather", "single")
MASKS = ("causal", "window", "lambda")
PASSES = ("fwd", "fwd_bwd")
DEFAULT_LENGTHS = (2048, 8192)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "context_parallel_cpu.json")


def make_mask(name: str, shard: int, num_sinks: int):
  if name == "causal":
    return masks.Causal()
  if name == "window":
    return masks.SlidingWindow(shard)
  if name == "lambda":
    return masks.Lambda(num_sinks, shard)
  raise ValueError(f"unknown mask {name!r}; expected one of {MASKS}")


def _memory(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"memory_error": repr(e)}
  if stats is None:
    return {"memory_error": "memory_analysis() returned None"}
  temp = stats.temp_size_in_bytes
  arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
  return {"device_memory_bytes": int(temp + arg + out),
          "device_temp_bytes": int(temp)}


def measure(impl: str, mask_name: str, length: int, pass_: str, args,
            mesh) -> dict:
  c = mesh.shape["context"]
  shard = length // c
  mask = make_mask(mask_name, shard, args.num_sinks)
  inner = attention.XlaChunked(block_q=args.block_q, block_k=args.block_k)
  if impl == "single":
    implementation = inner
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    implementation = attention.ContextParallel(inner, strategy=impl,
                                               mesh=mesh)
    sharding = NamedSharding(mesh, P(None, "context"))
  keys = jax.random.split(jax.random.key(args.seed), 3)
  shapes = [(args.batch, length, h, args.head_dim)
            for h in (args.heads, args.kv_heads, args.kv_heads)]
  qkv = [jax.device_put(jax.random.normal(key, shape, jnp.float32), sharding)
         for key, shape in zip(keys, shapes)]

  def forward(q, k, v):
    return attention.dot_product_attention(q, k, v, mask=mask,
                                           implementation=implementation)

  fn = forward if pass_ == "fwd" else jax.grad(
      lambda *a: forward(*a).sum(), argnums=(0, 1, 2))
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*qkv).compile()
  record = {"compile_s": time.perf_counter() - start}
  record.update(_memory(compiled))
  # Executed: the ring's loop body counted once per trip.
  record["collective_permutes"] = attention.context_parallel.executed_permutes(
      compiled.as_text())
  if impl == "ring":
    plan = attention.ring_plan(mask, seq_len=length, num_shards=c)
    record.update(ring_steps=plan.steps, separate_sinks=plan.sinks)
  start = time.perf_counter()
  jax.block_until_ready(compiled(*qkv))
  record["warmup_s"] = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*qkv))
    times.append(time.perf_counter() - start)
  record.update(times_s=times, time_s=statistics.median(times))
  return record


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def format_table(records) -> str:
  lines = ["| impl | mask | T | pass | time (ms) | compile (s) | ring steps "
           "| collective-permutes | per-device mem (MB) |",
           "|" + "---|" * 9]
  for r in records:
    steps = r.get("ring_steps")
    if steps is not None and r.get("separate_sinks"):
      steps = f"{steps} + sinks"
    mem = r.get("device_memory_bytes")
    ms = None if "time_s" not in r else 1e3 * r["time_s"]
    lines.append(
        f"| {r['implementation']} | {r['mask']} | {r['length']} "
        f"| {r['pass']} | {_fmt(ms, '.1f')} "
        f"| {_fmt(r.get('compile_s'), '.1f')} | {_fmt(steps, '')} "
        f"| {r.get('collective_permutes', '-')} "
        f"| {_fmt(None if mem is None else mem / 2 ** 20, ',.1f')} |")
  return "\n".join(lines)


def _choices(allowed):
  def parse(text):
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if x not in allowed]
    if not values or bad:
      raise argparse.ArgumentTypeError(
          f"{bad or text!r}: expected a comma list from {allowed}")
    return values
  return parse


def _lengths(text):
  values = [int(x) for x in text.split(",") if x.strip()]
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
  return values


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", type=_lengths, default=list(DEFAULT_LENGTHS),
                 help="T = S values, comma separated, multiples of the "
                 "device count")
  p.add_argument("--implementations", type=_choices(IMPLEMENTATIONS),
                 default=list(IMPLEMENTATIONS))
  p.add_argument("--masks", type=_choices(MASKS), default=list(MASKS))
  p.add_argument("--passes", type=_choices(PASSES), default=list(PASSES))
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
  for name, default, text in (
      ("batch", 1, "B"), ("heads", 4, "query heads N"),
      ("kv_heads", 4, "key/value heads K"), ("head_dim", 64, "H"),
      ("block_q", 512, "inner XlaChunked block_q"),
      ("block_k", 512, "inner XlaChunked block_k"),
      ("num_sinks", 16, "Lambda sinks"), ("repeats", 3, "timed runs"),
      ("seed", 0, "inputs"),
      ("host_devices", 8, "CPU devices to force when XLA_FLAGS sets none")):
    p.add_argument(f"--{name}", type=int, default=default, help=text)
  args = p.parse_args(argv)
  c = len(jax.devices())
  bad = [t for t in args.lengths if t % c]
  if bad:
    p.error(f"--lengths {bad} must be multiples of the device count {c}")
  if args.heads % args.kv_heads:
    p.error(f"--heads {args.heads} must be a multiple of --kv_heads "
            f"{args.kv_heads}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  mesh = jax.make_mesh((len(jax.devices()),), ("context",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  payload = {
      "benchmark": "context_parallel",
      "command": " ".join([os.path.relpath(__file__)] + list(
          sys.argv[1:] if argv is None else argv)),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": machine_info(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "settings": vars(args),
      "records": [],
  }
  total = time.perf_counter()
  for length in args.lengths:
    for mask_name in args.masks:
      for pass_ in args.passes:
        for impl in args.implementations:
          record = {"implementation": impl, "mask": mask_name,
                    "length": length, "pass": pass_,
                    "context": mesh.shape["context"],
                    "load_average": os.getloadavg()[0]}
          try:
            record.update(measure(impl, mask_name, length, pass_, args, mesh))
          except Exception as e:  # pylint: disable=broad-except
            record["error"] = f"{type(e).__name__}: {e}"[:500]
          payload["records"].append(record)
          status = record.get("error") or f"{1e3 * record['time_s']:.1f} ms"
          print(f"[{time.perf_counter() - total:6.0f} s] {impl:10s} "
                f"{mask_name:6s} T={length:<6d} {pass_:7s} {status}",
                file=sys.stderr, flush=True)
  payload["elapsed_s"] = time.perf_counter() - total
  payload["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  m = payload["machine"]
  print(f"\nMachine: {m['cpu_model'] or m['processor']} ({m['cpu_count']} "
        f"CPUs), jax {m['jax_version']}, {len(m['devices'])} devices\n")
  print(format_table(payload["records"]))
  print(f"\nWrote {len(payload['records'])} records to {args.out}")
  return payload


if __name__ == "__main__":
  main()
