r"""CPU benchmark: SmolLM2-135M-Instruct (the zoo's real GGUF model).

Measures, in float32 on this machine:

* ``load``: ``zoo.from_pretrained("smollm2-135m-instruct")`` (sha256 check,
  GGUF dequantization, model build) and ``load_tokenizer`` wall time.
* per prompt length P (``--lengths``): ``generate(model, prompt, 1)`` with
  one-pass prefill and with ``use_prefill=False`` (the old token-by-token
  feeding, only up to ``--step_max`` tokens); prompt tokens/s = P / time.
  Every configuration runs once to compile, then ``--repeats`` times; the
  best time is kept (the machine is shared).
* decode tokens/s: (time of ``generate(..., 1 + D)`` - time of
  ``generate(..., 1)``) / D after a P-token prefill.
* optionally (``--ppl_len N``): perplexity of the first N tokens of Python
  standard-library source (one forward, no cache).

Usage, from the repository root: ``python benchmarks/smollm2_cpu.py
[--lengths 128 512 2048] [--ppl_len 2048] [--out PATH]``. Prints a markdown
table and writes JSON (default benchmarks/results/smollm2_cpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import sys
import time


NAME = "smollm2-135m-instruct"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "smollm2_cpu.json")


def _best(fn, repeats: int) -> float:
  fn()      # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _python_source(min_chars: int) -> str:
  """Standard-library source files, concatenated in sorted order."""
  root = os.path.dirname(os.__file__)
  parts, total = [], 0
  for path in sorted(glob.glob(os.path.join(root, "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as fh:
      parts.append(fh.read())
    total += len(parts[-1])
    if total >= min_chars:
      break
  return "\n".join(parts)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[128, 512, 2048])
  parser.add_argument("--step_max", type=int, default=512,
                      help="longest prompt also fed token by token")
  parser.add_argument("--decode", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--ppl_len", type=int, default=0)
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from extrapolax.models import generate, load_tokenizer, zoo  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  model = zoo.from_pretrained(NAME)
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  tokenizer = load_tokenizer(NAME)
  tokenizer_s = time.perf_counter() - start
  text = _python_source(40 * max(max(args.lengths), args.ppl_len))
  ids = tokenizer.encode(text)
  rows = []
  for length in args.lengths:
    prompt = jnp.asarray([ids[:length]], jnp.int32)
    run = lambda steps, **kw: jax.block_until_ready(
        generate(model, prompt, steps, **kw))
    prefill_s = _best(lambda: run(1), args.repeats)
    with_decode_s = _best(lambda: run(1 + args.decode), args.repeats)
    decode_tps = args.decode / max(with_decode_s - prefill_s, 1e-9)
    step_s = None
    if length <= args.step_max:
      step_s = _best(lambda: run(1, use_prefill=False), 1)
    rows.append(dict(
        prompt_len=length, prefill_s=prefill_s,
        prefill_tokens_per_s=length / prefill_s,
        token_by_token_s=step_s,
        token_by_token_tokens_per_s=None if step_s is None
        else length / step_s,
        speedup=None if step_s is None else step_s / prefill_s,
        decode_tokens_per_s=decode_tps))
  ppl = None
  if args.ppl_len:
    tokens = jnp.asarray([ids[:args.ppl_len + 1]], jnp.int32)
    start = time.perf_counter()
    logits = nnx.jit(lambda m, x: m(x))(model, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    ppl = dict(tokens=args.ppl_len, perplexity=float(jnp.exp(nll)),
               forward_s=time.perf_counter() - start,
               text="Python stdlib *.py, sorted, concatenated")
  result = dict(
      benchmark="smollm2_cpu", model=NAME, dtype="float32",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                   python=sys.version.split()[0], jax=jax.__version__),
      load_s=load_s, tokenizer_load_s=tokenizer_s, decode_steps=args.decode,
      rows=rows, perplexity=ppl)
  fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
  print(f"load {load_s:.1f} s, tokenizer {tokenizer_s:.1f} s (float32, "
        f"{os.cpu_count()} CPUs)")
  print("| prompt | prefill s | prefill tok/s | token-by-token s | "
        "token-by-token tok/s | speed-up | decode tok/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['prompt_len']} | {r['prefill_s']:.2f} | "
          f"{r['prefill_tokens_per_s']:.0f} | "
          f"{fmt(r['token_by_token_s'], '{:.2f}')} | "
          f"{fmt(r['token_by_token_tokens_per_s'], '{:.0f}')} | "
          f"{fmt(r['speedup'])} | {r['decode_tokens_per_s']:.1f} |")
  if ppl:
    print(f"perplexity of {ppl['tokens']} tokens of Python source: "
          f"{ppl['perplexity']:.2f} ({ppl['forward_s']:.1f} s forward)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=2)
  return result


if __name__ == "__main__":
  main()
