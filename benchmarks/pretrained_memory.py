r"""Memory of the real-model study's forward, from XLA's own accounting.

Compiles (does not run) the NLL function the perplexity evaluator uses
(``perplexity.model_nll_fn``: the model's hidden states, then the LM head
over position chunks) and the passkey's teacher-forced argmax
(``algorithmic.model_argmax_fn``, the same chunked head) for SmolLM2-135M-Instruct (30 layers, vocabulary
49152) on one window of each length, with the attention implementation the
study uses on the CPU (xla_chunked), and reports XLA's memory analysis:
arguments (the float32 weights and the window), outputs and temporaries.
The study's bound is 8 GB at 4x the context (32768 tokens).

Usage, from the repository root: ``python benchmarks/pretrained_memory.py
[--lengths 8192 16384 32768] [--out PATH]``. Prints a markdown table and
writes JSON (default benchmarks/results/pretrained_memory.json).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import time

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "pretrained_memory.json")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[8192, 16384, 32768])
  parser.add_argument("--model", default="smollm2-135m-instruct")
  parser.add_argument("--implementation", default="xla_chunked")
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from extrapolax.attention import use_implementation  # pylint: disable=g-import-not-at-top
  from extrapolax.experiments.evaluators import perplexity  # pylint: disable=g-import-not-at-top
  from extrapolax.experiments.extrapolation import load_source  # pylint: disable=g-import-not-at-top

  model = load_source(args.model)
  graphdef, state = nnx.split(model)

  def nll(state, inputs, targets):
    m = nnx.merge(graphdef, state)
    return perplexity._head_nll(m, m.hidden(inputs), targets)  # pylint: disable=protected-access

  def argmax(state, inputs, targets):   # the passkey's teacher-forced grading
    del targets
    m = nnx.merge(graphdef, state)
    return perplexity.head_in_chunks(m, m.hidden(inputs),
                                     lambda logits: jnp.argmax(logits, -1))

  rows = []
  gib = 1 << 30
  for (what, fn), length in itertools.product(
      (("nll", nll), ("argmax", argmax)), args.lengths):
    spec = jax.ShapeDtypeStruct((1, length), jnp.int32)
    clock = time.perf_counter()
    with use_implementation(args.implementation):
      compiled = jax.jit(fn).lower(state, spec, spec).compile()
    stats = compiled.memory_analysis()
    row = dict(function=what, length=length,
               implementation=args.implementation,
               argument_gib=stats.argument_size_in_bytes / gib,
               output_gib=stats.output_size_in_bytes / gib,
               temp_gib=stats.temp_size_in_bytes / gib,
               compile_s=time.perf_counter() - clock)
    row["total_gib"] = row["argument_gib"] + row["output_gib"] + row[
        "temp_gib"]
    rows.append(row)
    print(f"{what} {length}: {row['total_gib']:.2f} GiB", flush=True)
  print()
  print("| function | tokens | weights + window (GiB) | temporaries (GiB) | "
        "total (GiB) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['function']} | {r['length']} | {r['argument_gib']:.2f} | "
          f"{r['temp_gib']:.2f} | {r['total_gib']:.2f} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(dict(model=args.model, rows=rows, jax=jax.__version__,
                   machine=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(),
                   date=datetime.datetime.now().isoformat(timespec="seconds"),
                   head_chunk_logits=perplexity.HEAD_CHUNK_LOGITS), f,
              indent=2)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
