r"""CPU benchmark: dense XLA attention against the chunked online-softmax path.

For every (implementation, mask, length T = S, pass) this measures

* wall time: median of a few runs after one warm-up run (compilation is done
  ahead of time and timed separately), with ``jax.block_until_ready``;
* the XLA compiled memory estimate: temp + argument + output bytes of
  ``jax.jit(f).lower(...).compile().memory_analysis()``;
* the process peak RSS growth while the compiled function runs, in a fresh
  subprocess per configuration so that the peaks stay independent (the peak is
  reset through ``/proc/self/clear_refs`` after compilation where Linux
  allows it, else ``ru_maxrss`` is used and the growth is an upper bound);
* achieved GFLOP/s on the dense-equivalent count (forward 4 B N T S H, halved
  for causal masks; the backward pass counts 2.5 forward) and on the visited
  blocks (the share of (query block, key block) pairs that
  ``masks.classify_blocks`` labels non-empty at the chunked block sizes; the
  dense path visits every pair).

Passes: ``fwd`` (the output) and ``fwd_bwd`` (the gradient of ``out.sum()``
with respect to q, k and v). Masks: ``causal``, ``window`` (SlidingWindow(T /
8)), ``lambda`` (Lambda(16, T / 8)) and ``packed`` (random documents of mean
length T / 16 as segment ids, with Causal()).

A configuration is skipped, with the reason recorded, when the dense path's
logits (x3: logits, probabilities, gradient) exceed ``--memory_budget_gb``, or
when its time, extrapolated from the same configuration at shorter lengths
(see ``skip_reason``), would exceed ``--time_budget_s`` for the warm-up and
one timed run. ``--resume`` keeps the measured records already in ``--out``.

Usage, from the repository root: ``.venv/bin/python
benchmarks/attention_cpu.py [--quick] [--lengths 256 --masks causal ...]``.
The markdown table goes to stdout, the records to ``--out`` (JSON, rewritten
after every configuration so that a long run can be followed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

import numpy as np

ALL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUICK_LENGTHS = (1024, 4096)
ALL_MASKS = ("causal", "window", "lambda", "packed")
ALL_PASSES = ("fwd", "fwd_bwd")
ALL_IMPLEMENTATIONS = ("xla", "xla_chunked")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "attention_cpu.json")
_RESULT_TAG = "@@ATTENTION_CPU_RESULT@@"
# Backward FLOPs as a multiple of the forward's (FlashAttention convention).
_BACKWARD_FACTOR = 2.5


@dataclasses.dataclass(frozen=True)
class Config:
  """One measured row."""
  implementation: str
  mask: str
  length: int
  pass_: str
  batch: int = 1
  heads: int = 4
  kv_heads: int = 4
  head_dim: int = 64
  block_q: int = 512
  block_k: int = 512
  window_divisor: int = 8
  num_sinks: int = 16
  doc_divisor: int = 16
  seed: int = 0
  repeats: int = 3
  target_s: float = 15.0

  @property
  def window(self) -> int:
    return max(1, self.length // self.window_divisor)

  @property
  def used_blocks(self) -> tuple[int, int]:
    """The block sizes XlaChunked really uses (clamped to the length)."""
    return min(self.block_q, self.length), min(self.block_k, self.length)

  def key(self) -> tuple[str, str, str]:
    return self.implementation, self.mask, self.pass_


# --------------------------------------------------------------------------
# Workload: masks, segment ids, FLOP counts.


def packed_segment_ids(length: int, batch: int, mean_len: float,
                       seed: int) -> np.ndarray:
  """int32 [batch, length]: ids 0, 1, 2, ... in runs of geometric length."""
  rng = np.random.default_rng(seed)
  p = min(1.0, 1.0 / max(mean_len, 1.0))
  rows = []
  for _ in range(batch):
    ids, doc = [], 0
    while len(ids) < length:
      ids.extend([doc] * int(rng.geometric(p)))
      doc += 1
    rows.append(ids[:length])
  return np.asarray(rows, np.int32)


def make_workload(cfg: Config):
  """(mask object, segment ids or None, description) for ``cfg``."""
  from extrapolax.attention import masks  # pylint: disable=g-import-not-at-top
  if cfg.mask == "causal":
    return masks.Causal(), None, "Causal()"
  if cfg.mask == "window":
    return (masks.SlidingWindow(cfg.window), None,
            f"SlidingWindow({cfg.window})")
  if cfg.mask == "lambda":
    return (masks.Lambda(cfg.num_sinks, cfg.window), None,
            f"Lambda({cfg.num_sinks}, {cfg.window})")
  if cfg.mask == "packed":
    mean_len = cfg.length / cfg.doc_divisor
    seg = packed_segment_ids(cfg.length, cfg.batch, mean_len, cfg.seed)
    docs = int(seg.max()) + 1
    return (masks.Causal(), seg,
            f"Causal() + segment_ids ({docs} docs, mean len {mean_len:g})")
  raise ValueError(f"unknown mask {cfg.mask!r}; expected one of {ALL_MASKS}")


def block_fractions(cfg: Config) -> tuple[float, float]:
  """(non-empty, full) shares of block pairs at the chunked block sizes.

  One label per pair for the whole batch, as XlaChunked does: a pair is
  visited if any row needs it.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from extrapolax.attention import masks  # pylint: disable=g-import-not-at-top
  mask, seg, _ = make_workload(cfg)
  bq, bk = cfg.used_blocks
  labels = masks.classify_blocks(
      mask, q_len=cfg.length, kv_len=cfg.length, block_q=bq, block_k=bk,
      q_segment_ids=None if seg is None else jnp.asarray(seg),
      kv_segment_ids=None if seg is None else jnp.asarray(seg))
  labels = np.asarray(labels)
  some = (labels != masks.EMPTY).any(axis=0)
  full = (labels == masks.FULL).all(axis=0)
  return float(some.mean()), float(full.mean())


def flop_counts(cfg: Config, visited: float) -> tuple[float, float]:
  """(dense-equivalent, visited) FLOPs of one call of the measured pass."""
  b, n, t, h = cfg.batch, cfg.heads, cfg.length, cfg.head_dim
  full = 4.0 * b * n * t * t * h
  factor = 1.0 + (_BACKWARD_FACTOR if cfg.pass_ == "fwd_bwd" else 0.0)
  # Every benchmarked mask is causal (window, Lambda and packed included).
  dense_equivalent = 0.5 * full * factor
  if cfg.implementation == "xla":
    visited = 1.0  # the dense path computes every pair
  return dense_equivalent, full * visited * factor


def dense_bytes(cfg: Config) -> int:
  """Bytes of one float32 [B, N, T, S] logits array."""
  return cfg.batch * cfg.heads * cfg.length * cfg.length * 4


# --------------------------------------------------------------------------
# Measuring one configuration (runs in the worker subprocess).


def _proc_status_kb() -> dict[str, int]:
  out = {}
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
          out[name] = int(rest.split()[0])
  except OSError:
    pass
  return out


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _memory_stats(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"xla_memory_bytes": None, "xla_memory_error": repr(e)}
  if stats is None:
    return {"xla_memory_bytes": None, "xla_memory_error": "None returned"}
  temp = getattr(stats, "temp_size_in_bytes", None)
  arg = getattr(stats, "argument_size_in_bytes", None)
  out = getattr(stats, "output_size_in_bytes", None)
  total = None if None in (temp, arg, out) else int(temp + arg + out)
  return {"xla_memory_bytes": total, "xla_temp_bytes": temp,
          "xla_argument_bytes": arg, "xla_output_bytes": out}


def measure(cfg: Config) -> dict:
  """Compiles and times ``cfg`` in this process; returns the measurements."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from extrapolax import attention  # pylint: disable=g-import-not-at-top

  mask, seg, _ = make_workload(cfg)
  if cfg.implementation == "xla_chunked":
    impl = attention.XlaChunked(block_q=cfg.block_q, block_k=cfg.block_k)
  else:
    impl = cfg.implementation
  kq, kk, kv = jax.random.split(jax.random.key(cfg.seed), 3)
  t, b = cfg.length, cfg.batch
  q = jax.random.normal(kq, (b, t, cfg.heads, cfg.head_dim), jnp.float32)
  k = jax.random.normal(kk, (b, t, cfg.kv_heads, cfg.head_dim), jnp.float32)
  v = jax.random.normal(kv, (b, t, cfg.kv_heads, cfg.head_dim), jnp.float32)
  args = (q, k, v)
  if seg is not None:
    args += (jnp.asarray(seg),)

  def forward(q, k, v, segment_ids=None):
    return attention.dot_product_attention(
        q, k, v, mask=mask, segment_ids=segment_ids, implementation=impl)

  if cfg.pass_ == "fwd":
    fn = forward
  elif cfg.pass_ == "fwd_bwd":
    fn = jax.grad(lambda q, k, v, *s: forward(q, k, v, *s).sum(),
                  argnums=(0, 1, 2))
  else:
    raise ValueError(f"unknown pass {cfg.pass_!r}")
  jax.block_until_ready(args)

  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  result = {"compile_s": time.perf_counter() - start}
  result.update(_memory_stats(compiled))

  rss_before_kb = _proc_status_kb().get("VmRSS")
  ru_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  reset = _reset_peak_rss()

  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  warmup_s = time.perf_counter() - start
  runs = max(1, min(cfg.repeats, int(cfg.target_s // max(warmup_s, 1e-9))))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)

  status = _proc_status_kb()
  if reset and "VmHWM" in status and rss_before_kb is not None:
    peak_kb, method = status["VmHWM"], "VmHWM after clear_refs"
  else:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = "ru_maxrss (upper bound)"
    rss_before_kb = rss_before_kb or ru_before_kb
  result.update(
      warmup_s=warmup_s, times_s=times, time_s=statistics.median(times),
      runs=runs, rss_baseline_mb=rss_before_kb / 1024,
      rss_peak_mb=peak_kb / 1024,
      rss_growth_mb=max(0, peak_kb - rss_before_kb) / 1024,
      rss_method=method)
  return result


def _worker(spec: str) -> int:
  print(_RESULT_TAG + json.dumps(measure(Config(**json.loads(spec)))),
        flush=True)
  return 0


def measure_in_subprocess(cfg: Config, timeout_s: float) -> dict:
  """Runs ``measure(cfg)`` in a fresh Python process."""
  spec = json.dumps(dataclasses.asdict(cfg))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"worker timed out after {timeout_s:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_TAG):
      return json.loads(line[len(_RESULT_TAG):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
  return {"error": f"worker exited with {proc.returncode}: "
                   + " | ".join(tail)}


# --------------------------------------------------------------------------
# Planning: what to skip and why.


def skip_reason(cfg: Config, visited: float, history: dict,
                memory_budget_gb: float, time_budget_s: float
                ) -> Optional[str]:
  """A reason to skip ``cfg``, or None to run it.

  ``history`` maps Config.key() to the (length, time_s, visited) points
  measured so far, by increasing length. The time of a run is extrapolated
  from the last point by the visited work (T^2 x visited fraction) and, once
  two points exist, by the growth measured between them (T^p), whichever is
  larger: a path whose cost grows faster than its work is caught too.
  """
  if cfg.implementation == "xla":
    need = 3 * dense_bytes(cfg)
    if need > memory_budget_gb * 1e9:
      return (f"dense logits would need {dense_bytes(cfg) / 1e9:.1f} GB "
              f"(x3 with probabilities and gradient: {need / 1e9:.1f} GB > "
              f"budget {memory_budget_gb:g} GB)")
  points = history.get(cfg.key(), [])
  if not points:
    return None
  dense = cfg.implementation == "xla"
  last_len, last_s, last_visited = points[-1]
  work = cfg.length ** 2 * (1.0 if dense else visited)
  last_work = last_len ** 2 * (1.0 if dense else last_visited)
  estimate = last_s * work / max(last_work, 1e-30)
  how = "by visited work"
  if len(points) > 1:
    prev_len, prev_s, _ = points[-2]
    p = math.log(last_s / prev_s) / math.log(last_len / prev_len)
    growth = last_s * (cfg.length / last_len) ** p
    if growth > estimate:
      estimate, how = growth, (f"by the T^{p:.1f} growth measured from "
                               f"T={prev_len}")
  if 2 * estimate > time_budget_s:
    return (f"estimated {estimate:.0f} s per run (scaled from "
            f"{last_s:.2f} s at T={last_len} {how}) x 2 runs > time budget "
            f"{time_budget_s:g} s")
  return None


# --------------------------------------------------------------------------
# Reporting.


def machine_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  cpu_model = None
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu_model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_total_gb = None
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      mem_total_gb = int(f.readline().split()[1]) / 1024 ** 2
  except (OSError, ValueError, IndexError):
    pass
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  return {
      "processor": platform.processor(), "cpu_model": cpu_model,
      "machine": platform.machine(), "platform": platform.platform(),
      "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
      "memory_total_gb": mem_total_gb, "python": platform.python_version(),
      "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
      "devices": [str(d) for d in jax.devices()],
  }


def _fmt(x, spec, missing="-"):
  return missing if x is None else format(x, spec)


def format_table(records: list[dict]) -> str:
  """Markdown table of the records (skipped rows carry their reason)."""
  head = ("| impl | mask | T | pass | time (s) | runs | XLA mem (MB) "
          "| RSS growth (MB) | GFLOP/s dense-eq | visited | GFLOP/s visited "
          "| note |")
  lines = [head, "|" + "---|" * 12]
  for r in records:
    mb = lambda x: None if x is None else x / 2 ** 20
    note = r.get("skipped") or r.get("error") or ""
    lines.append(
        f"| {r['implementation']} | {r['mask']} | {r['length']} "
        f"| {r['pass']} | {_fmt(r.get('time_s'), '.3f')} "
        f"| {_fmt(r.get('runs'), 'd')} "
        f"| {_fmt(mb(r.get('xla_memory_bytes')), ',.1f')} "
        f"| {_fmt(r.get('rss_growth_mb'), ',.1f')} "
        f"| {_fmt(r.get('gflops_dense_equivalent'), '.1f')} "
        f"| {_fmt(r.get('visited_fraction'), '.3f')} "
        f"| {_fmt(r.get('gflops_visited'), '.1f')} | {note} |")
  return "\n".join(lines)


def _write(path: str, payload: dict):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)


# --------------------------------------------------------------------------
# Entry point.


def _int_list(text: str) -> list[int]:
  values = [int(x) for x in text.split(",") if x.strip()]
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
  return values


def _choice_list(choices):
  def parse(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if x not in choices]
    if not values or bad:
      raise argparse.ArgumentTypeError(
          f"{bad or text!r}: expected a comma list from {choices}")
    return values
  return parse


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", type=_int_list, default=None,
                 help="T = S values, comma separated (any positive length, "
                 f"tiny ones included); default {ALL_LENGTHS}, or "
                 f"{QUICK_LENGTHS} with --quick")
  p.add_argument("--masks", type=_choice_list(ALL_MASKS),
                 default=list(ALL_MASKS))
  p.add_argument("--passes", type=_choice_list(ALL_PASSES),
                 default=list(ALL_PASSES))
  p.add_argument("--implementations", type=_choice_list(ALL_IMPLEMENTATIONS),
                 default=list(ALL_IMPLEMENTATIONS))
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
  p.add_argument("--quick", action="store_true",
                 help=f"smoke run: lengths {QUICK_LENGTHS} (an explicit "
                 "--lengths wins) and one timed run per configuration")
  for name, default, text in (
      ("batch", 1, "B"), ("heads", 4, "query heads N"),
      ("kv_heads", 4, "key/value heads K"), ("head_dim", 64, "H"),
      ("block_q", 512, "XlaChunked block_q"),
      ("block_k", 512, "XlaChunked block_k"),
      ("window_divisor", 8, "window = T / this (window and lambda masks)"),
      ("num_sinks", 16, "Lambda sinks"),
      ("doc_divisor", 16, "packed: mean document length = T / this"),
      ("repeats", 3, "timed runs after the warm-up (fewer for slow ones)"),
      ("seed", 0, "inputs and document lengths")):
    p.add_argument(f"--{name}", type=int, default=default, help=text)
  p.add_argument("--target_s", type=float, default=15.0,
                 help="cap on timed runs: at most target_s / warm-up time")
  p.add_argument("--memory_budget_gb", type=float, default=8.0,
                 help="skip dense when 3 x B N T S x 4 bytes exceeds this")
  p.add_argument("--time_budget_s", type=float, default=400.0,
                 help="skip a configuration whose extrapolated warm-up + "
                 "one run exceeds this")
  p.add_argument("--timeout_s", type=float, default=None,
                 help="kill a worker after this long (default: 2 x "
                 "time_budget_s + 120)")
  p.add_argument("--no_subprocess", action="store_true",
                 help="measure in this process (faster; RSS peaks are then "
                 "not independent)")
  p.add_argument("--resume", action="store_true",
                 help="keep the measured records already in --out (same "
                 "workload settings) and run only the rest")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.lengths is None:
    args.lengths = list(QUICK_LENGTHS if args.quick else ALL_LENGTHS)
  if args.quick:
    args.repeats = 1
  if args.heads % args.kv_heads:
    p.error(f"--heads {args.heads} must be a multiple of --kv_heads "
            f"{args.kv_heads}")
  return args


_WORKLOAD_SETTINGS = ("batch", "heads", "kv_heads", "head_dim", "block_q",
                      "block_k", "window_divisor", "num_sinks", "doc_divisor",
                      "seed")


def run_one(cfg: Config, args, history: dict, timeout_s: float) -> dict:
  """The record of one configuration: skipped with a reason, or measured."""
  impl = cfg.implementation
  visited, full = block_fractions(cfg)
  record = {
      "implementation": impl, "mask": cfg.mask,
      "mask_detail": make_workload(cfg)[2], "length": cfg.length,
      "pass": cfg.pass_, "batch": cfg.batch, "heads": cfg.heads,
      "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "dtype": "float32",
      "block_q": cfg.used_blocks[0] if impl == "xla_chunked" else None,
      "block_k": cfg.used_blocks[1] if impl == "xla_chunked" else None,
      "chunked_visited_fraction": visited, "chunked_full_fraction": full,
      "visited_fraction": 1.0 if impl == "xla" else visited,
      "dense_logits_bytes": dense_bytes(cfg),
      "load_average": os.getloadavg()[0],
  }
  reason = skip_reason(cfg, visited, history, args.memory_budget_gb,
                       args.time_budget_s)
  if reason is not None:
    record["skipped"] = reason
    return record
  if args.no_subprocess:
    record.update(measure(cfg))
  else:
    record.update(measure_in_subprocess(cfg, timeout_s))
  if "time_s" in record:
    dense_eq, visited_flops = flop_counts(cfg, visited)
    record["flops_dense_equivalent"] = dense_eq
    record["flops_visited"] = visited_flops
    record["gflops_dense_equivalent"] = dense_eq / record["time_s"] / 1e9
    record["gflops_visited"] = visited_flops / record["time_s"] / 1e9
  return record


def _load_previous(args, settings: dict, payload: dict) -> dict:
  """--resume: measured records of an earlier run into ``args.out``."""
  if not (args.resume and os.path.exists(args.out)):
    return {}
  with open(args.out, encoding="utf-8") as f:
    old = json.load(f)
  for name in _WORKLOAD_SETTINGS:
    if old["settings"].get(name) != settings[name]:
      raise SystemExit(f"--resume: {args.out} was run with {name}="
                       f"{old['settings'].get(name)}, not {settings[name]}")
  payload["previous_runs"] = old.get("previous_runs", []) + [
      {k: old.get(k) for k in ("command", "started", "finished",
                               "elapsed_s", "settings")}]
  return {(r["implementation"], r["mask"], r["length"], r["pass"]): r
          for r in old["records"] if "time_s" in r}


def main(argv=None) -> dict:
  """Runs the benchmark; returns the JSON payload it wrote."""
  args = parse_args(argv)
  if args.worker is not None:
    sys.exit(_worker(args.worker))
  timeout_s = args.timeout_s or 2 * args.time_budget_s + 120
  settings = {k: v for k, v in vars(args).items() if k != "worker"}
  payload = {
      "benchmark": "attention_cpu",
      "command": " ".join([os.path.relpath(__file__)] + list(
          sys.argv[1:] if argv is None else argv)),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": machine_info(),
      "settings": settings,
      "records": [],
  }
  previous = _load_previous(args, settings, payload)
  history = {}
  total_start = time.perf_counter()
  for length in sorted(args.lengths):
    for mask_name in args.masks:
      for impl in args.implementations:
        for pass_ in args.passes:
          cfg = Config(
              implementation=impl, mask=mask_name, length=length,
              pass_=pass_, batch=args.batch, heads=args.heads,
              kv_heads=args.kv_heads, head_dim=args.head_dim,
              block_q=args.block_q, block_k=args.block_k,
              window_divisor=args.window_divisor, num_sinks=args.num_sinks,
              doc_divisor=args.doc_divisor, seed=args.seed,
              repeats=args.repeats, target_s=args.target_s)
          record = previous.get((impl, mask_name, length, pass_))
          if record is not None:
            record["from_previous_run"] = True
          else:
            record = run_one(cfg, args, history, timeout_s)
          if "time_s" in record:
            history.setdefault(cfg.key(), []).append(
                (length, record["time_s"], record["chunked_visited_fraction"]))
          payload["records"].append(record)
          payload["elapsed_s"] = time.perf_counter() - total_start
          _write(args.out, payload)
          status = record.get("skipped") or record.get("error") or (
              f"{record['time_s']:.3f} s")
          print(f"[{payload['elapsed_s']:7.0f} s] {impl:11s} {mask_name:7s} "
                f"T={length:<6d} {pass_:7s} {status}", file=sys.stderr,
                flush=True)
  payload["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  _write(args.out, payload)
  machine = payload["machine"]
  print(f"\nMachine: {machine['cpu_model'] or machine['processor']!s} "
        f"({machine['cpu_count']} CPUs), jax {machine['jax_version']}, "
        f"devices {machine['devices']}\n")
  print(format_table(payload["records"]))
  print(f"\nWrote {len(payload['records'])} records to {args.out}")
  return payload


if __name__ == "__main__":
  main()
