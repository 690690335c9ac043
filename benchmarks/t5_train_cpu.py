r"""CPU benchmark: training a T5-bias decoder LM at 16k-64k tokens.

Issue 18's "T5 at 64k tokens trains on this CPU in bounded memory": the
library's decoder LM (``models.DecoderLM``, byte vocabulary, the tiny
config's width: d_model 64, SwiGLU 192; by default 1 layer of 2 query heads
over 1 key/value head, so a 64k step fits the shared 2-core CPU) with T5's
bucketed relative bias (``AttentionSpec(position="t5")``: 32 buckets, max
distance 128), causal, on ``xla_chunked``, which evaluates the bias per
visited 512 x 512 block forward and backward. Each step is the library's
train step (``experiments.trainer.make_train_step``: cross entropy, its
gradient, clipping + AdamW update) on consecutive windows of batch 1 x T
bytes of the Python standard library's sources.

Per length, in a fresh subprocess (so its peak RSS is its own):

* ``memory``: XLA's ``memory_analysis()`` of the compiled train step
  (temporaries, arguments, outputs); ``dense_bias_temp``: the same step with
  the bias materialised as a dense [1, N, T, T] float32 ``bias`` read by the
  same xla_chunked (compiled, never run; what the model did before
  ``position_bias``);
* ``peak_rss``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the
  steps (and before compiling, for the baseline);
* ``step_s``: wall time of each step (compiled beforehand), and the losses,
  which must be finite and decrease.

Usage, from the repository root::

  python benchmarks/t5_train_cpu.py --lengths 16384 32768 65536 --steps 3

Prints a markdown table; writes JSON (default
``benchmarks/results/t5_train_cpu.json``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "t5_train_cpu.json")


def stdlib_bytes(count: int):
  """The first ``count`` bytes of the standard library's sources (sorted
  paths), as int32 tokens of the byte vocabulary."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  chunks, total = [], 0
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"],
                                            "**", "*.py"), recursive=True)):
    with open(path, "rb") as fh:
      data = fh.read()
    chunks.append(data)
    total += len(data)
    if total >= count:
      break
  data = b"".join(chunks)[:count]
  if len(data) < count:
    raise ValueError(f"the standard library has {len(data)} bytes of source, "
                     f"fewer than the {count} needed")
  return np.frombuffer(data, np.uint8).astype(np.int32)


def model_config(args, length: int):
  from extrapolax.models.config import AttentionSpec, ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig(
      vocab_size=256, d_model=args.d_model, num_layers=args.num_layers,
      num_heads=args.num_heads, num_kv_heads=args.kv_heads,
      mlp_dim=args.mlp_dim, max_len=length,
      attention=(AttentionSpec(position="t5", mask="causal"),),
      implementation="xla_chunked")


def build_step(config, learning_rate: float):
  """(train_step, params, opt_state) of a fresh model."""
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments import trainer  # pylint: disable=import-outside-toplevel
  from extrapolax.models.transformer import DecoderLM  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)),
                               nnx.Param)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(learning_rate, weight_decay=0.0))
  return (trainer.make_train_step(graphdef, optimizer), params,
          optimizer.init(params))


def dense_bias_chunked():
  """xla_chunked served the bias materialised (it does not declare
  ``takes_position_bias``, so ``core.serve`` densifies it)."""
  from extrapolax.attention.xla_chunked import XlaChunked  # pylint: disable=import-outside-toplevel

  class DenseBiasChunked(XlaChunked):
    takes_position_bias = False

  return DenseBiasChunked()


def compiled_memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  return dict(temp=int(ma.temp_size_in_bytes),
              arguments=int(ma.argument_size_in_bytes),
              outputs=int(ma.output_size_in_bytes),
              aliased=int(ma.alias_size_in_bytes))


def run_length(args, length: int) -> dict:
  """One length in this process: compile, memory, ``args.steps`` steps."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from extrapolax.attention import core  # pylint: disable=import-outside-toplevel
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  config = model_config(args, length)
  step, params, opt_state = build_step(config, args.learning_rate)
  tokens = stdlib_bytes(args.steps * length + 1)
  batches = [dict(tokens=tokens[None, i * length:(i + 1) * length],
                  targets=tokens[None, i * length + 1:(i + 1) * length + 1],
                  weights=np.ones((1, length), np.float32))
             for i in range(args.steps)]
  record = dict(length=length, steps=args.steps,
                num_params=int(sum(x.size for x in jax.tree.leaves(params))),
                rss_before_compile=rss())
  if not args.no_dense:
    # Lowered and compiled inside the block: the executable keeps it.
    dense_step = build_step(config, args.learning_rate)[0]
    with core.use_implementation(dense_bias_chunked()):
      dense = dense_step.lower(params, opt_state, batches[0]).compile()
    record["dense_bias_memory"] = compiled_memory(dense)
    del dense
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batches[0]).compile()
  record["compile_s"] = time.perf_counter() - start
  record["memory"] = compiled_memory(compiled)
  losses, times = [], []
  for batch in batches:
    start = time.perf_counter()
    params, opt_state, metrics = compiled(params, opt_state, batch)
    losses.append(float(jax.block_until_ready(metrics["loss"])))
    times.append(time.perf_counter() - start)
  record.update(losses=losses, step_s=times, peak_rss=rss(),
                load_after=list(os.getloadavg()))
  record["loss_finite_and_decreasing"] = bool(
      np.all(np.isfinite(losses)) and all(
          b < a for a, b in zip(losses, losses[1:])))
  return record


def _argv_of(args) -> list[str]:
  argv = []
  for name in ("steps", "num_layers", "num_heads", "kv_heads", "d_model",
               "mlp_dim", "learning_rate"):
    argv += [f"--{name}", str(getattr(args, name))]
  return argv + (["--no_dense"] if args.no_dense else [])


def table(rows) -> str:
  mb = lambda x: f"{x / 2**20:,.0f}"
  lines = ["| T | XLA temp MiB | args + outputs MiB | dense-bias temp MiB | "
           "peak RSS MiB (before compile) | compile s | step s | losses |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    m = r["memory"]
    dense = r.get("dense_bias_memory")
    lines.append(
        f"| {r['length']} | {mb(m['temp'])} | "
        f"{mb(m['arguments'] + m['outputs'])} | "
        f"{'-' if dense is None else mb(dense['temp'])} | "
        f"{mb(r['peak_rss'])} ({mb(r['rss_before_compile'])}) | "
        f"{r['compile_s']:.1f} | "
        + ", ".join(f"{t:.1f}" for t in r["step_s"]) + " | "
        + " -> ".join(f"{x:.3f}" for x in r["losses"]) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[16384, 32768, 65536])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--num_layers", type=int, default=1)
  parser.add_argument("--num_heads", type=int, default=2)
  parser.add_argument("--kv_heads", type=int, default=1)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--mlp_dim", type=int, default=192)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--no_dense", action="store_true",
                      help="skip compiling the dense-bias comparison")
  parser.add_argument("--no_subprocess", action="store_true",
                      help="run every length in this process (peak RSS is "
                      "then the running maximum)")
  parser.add_argument("--one", action="store_true",
                      help=argparse.SUPPRESS)   # child: print one record
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error(f"--steps={args.steps}: at least 2 (the loss must be seen "
                 "to decrease)")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.one:
    (length,) = args.lengths
    print("RECORD " + json.dumps(run_length(args, length)), flush=True)
    return None
  load_before = os.getloadavg()
  rows = []
  for length in args.lengths:
    if args.no_subprocess:
      row = run_length(args, length)
    else:
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--one", "--lengths",
           str(length)] + _argv_of(args), check=True, capture_output=True,
          text=True).stdout
      row = json.loads(next(line for line in out.splitlines()
                            if line.startswith("RECORD "))[7:])
    rows.append(row)
    print(json.dumps(row), flush=True)
  import jax  # pylint: disable=import-outside-toplevel
  load = os.getloadavg()
  text = table(rows)
  print(f"\njax {jax.__version__}, {platform.machine()}, {os.cpu_count()} "
        f"cpus, load before {load_before[0]:.2f}, after {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}")
  print(text)
  payload = dict(
      benchmark="t5_train_cpu",
      command=" ".join(["python benchmarks/t5_train_cpu.py"] + (
          sys.argv[1:] if argv is None else list(argv))),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      jax=jax.__version__, load_before=load_before, load_after=load,
      args=vars(args), rows=rows, table=text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
      json.dump(payload, fh, indent=1)
      fh.write("\n")
  return payload


if __name__ == "__main__":
  main()
