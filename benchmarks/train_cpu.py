r"""CPU benchmark: training tokens per second of the tiny config.

Two measurements:

* ``step``: the jitted train step alone (``trainer.init_params`` and the
  trainer's cached step, fed one fixed random batch) for each position
  encoding of experiments/configs/tiny.py, and for rope in bfloat16 compute.
  Compile time is timed separately. Then ``--repeats`` rounds each time one
  block of ``--steps`` steps of every configuration (ended by
  ``jax.block_until_ready``); the step time is the best block's mean (the
  machine is shared, so the best block is the least disturbed one), the
  median is recorded too. tokens/s = batch_size * train_len / step time.
* ``train``: ``trainer.train`` on the real data path (the default
  python_stdlib corpus, byte tokenizer, token store, TrainSource), a fresh
  workdir, ``--train_steps`` steps: the wall time of the call, the time to
  build the data (corpus, split, token store), and the steady-state tokens/s
  of the last logged interval (data loading, logging and checkpointing
  included; compilation not).

Usage, from the repository root: ``.venv/bin/python benchmarks/train_cpu.py
[--quick] [--pes rope alibi] [--out PATH]``. Prints a markdown table and
writes JSON (default benchmarks/results/train_cpu.json) with the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ALL_PES = ("nope", "sinusoidal", "learned", "rope", "alibi", "t5", "kerple",
           "fire")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "train_cpu.json")


def machine_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  cpu_model = None
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
  except OSError:
    pass
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {"cpu_model": cpu_model, "machine": platform.machine(),
          "platform": platform.platform(), "cpu_count": os.cpu_count(),
          "cpu_affinity": affinity, "load_average_at_start": load,
          "python": platform.python_version(), "jax_version": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


def _tiny(arg: str):
  from extrapolax.experiments import configs  # pylint: disable=import-outside-toplevel
  return configs.get_config(f"tiny.py:{arg}")


class StepBench:
  """One compiled train step of the tiny config (this pe and dtype) and its
  timings; ``time_block`` runs ``steps`` steps and records their mean."""

  def __init__(self, pe: str, dtype: str):
    import jax  # pylint: disable=import-outside-toplevel
    from extrapolax.experiments import trainer  # pylint: disable=import-outside-toplevel
    self.pe, self.dtype = pe, dtype
    config = _tiny(f"pe={pe}")
    config.model.vocab_size = 256
    config.model.dtype = dtype
    from extrapolax.experiments import modeling, sharding  # pylint: disable=import-outside-toplevel
    mesh = sharding.mesh_from_config(config)   # one device
    _, self.params = trainer.init_params(config, mesh)
    init_opt_state, self.step_fn, _ = trainer._cached_train_step(  # pylint: disable=protected-access
        modeling.model_config(config).to_json(),
        tuple((k, config[k]) for k in trainer._OPTIMIZER_FIELDS), mesh)  # pylint: disable=protected-access
    self.opt_state = init_opt_state(self.params)
    self.batch_size, self.train_len = config.batch_size, config.train_len
    rows = np.random.default_rng(0).integers(
        0, 256, (self.batch_size, self.train_len + 1), np.int32)
    self.batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:],
                  "weights": np.ones(rows[:, 1:].shape, np.float32)}
    start = time.perf_counter()
    self._run(1)
    self.compile_s = time.perf_counter() - start
    self._run(2)
    self._block_until_ready = jax.block_until_ready
    self.times: list[float] = []

  def _run(self, steps: int) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    for _ in range(steps):
      self.params, self.opt_state, out = self.step_fn(
          self.params, self.opt_state, self.batch)
    jax.block_until_ready(out)

  def time_block(self, steps: int) -> None:
    start = time.perf_counter()
    self._run(steps)
    self.times.append((time.perf_counter() - start) / steps)

  def record(self) -> dict:
    best, median = min(self.times), statistics.median(self.times)
    tokens = self.batch_size * self.train_len
    return {"kind": "step", "pe": self.pe, "dtype": self.dtype,
            "batch_size": self.batch_size, "train_len": self.train_len,
            "compile_s": self.compile_s, "step_ms": best * 1e3,
            "step_ms_median": median * 1e3,
            "step_ms_all": [x * 1e3 for x in self.times],
            "tokens_per_sec": tokens / best,
            "tokens_per_sec_median": tokens / median}


def bench_steps(runs, *, steps: int, repeats: int) -> list[dict]:
  """Compiles every (pe, dtype), then times ``repeats`` rounds, each round
  one block of ``steps`` steps per configuration (so a burst of load from
  other processes spreads over all of them); the best block counts."""
  benches = []
  for pe, dtype in runs:
    benches.append(StepBench(pe, dtype))
    print(f"compiled {pe} {dtype} in {benches[-1].compile_s:.1f} s",
          file=sys.stderr, flush=True)
  for _ in range(repeats):
    for bench in benches:
      bench.time_block(steps)
  return [bench.record() for bench in benches]


def bench_train(train_steps: int, data_dir: str) -> dict:
  """trainer.train of the tiny config on the default corpus, end to end."""
  from extrapolax.experiments import trainer  # pylint: disable=import-outside-toplevel
  config = _tiny(f"steps={train_steps}")
  config.log_every = max(1, train_steps // 4)
  config.data.cache_dir = data_dir
  workdir = tempfile.mkdtemp(prefix="train_cpu_")
  try:
    start = time.perf_counter()
    source = trainer.make_source(config, workdir)
    data_s = time.perf_counter() - start
    batch_start = time.perf_counter()
    for i in range(20):
      source.batch(i)
    batch_ms = (time.perf_counter() - batch_start) / 20 * 1e3
    start = time.perf_counter()
    result = trainer.train(config, workdir, source=source)
    wall_s = time.perf_counter() - start
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  last = result.metrics[-1]
  return {"kind": "train", "pe": config.model.pe, "dtype": "float32",
          "batch_size": config.batch_size, "train_len": config.train_len,
          "train_steps": train_steps, "data_setup_s": data_s,
          "batch_ms": batch_ms, "wall_s": wall_s,
          "first_loss": result.metrics[0]["loss"], "final_loss": last["loss"],
          "tokens_per_sec": last["tokens_per_sec"],
          "step_ms": 1e3 * config.batch_size * config.train_len / last[
              "tokens_per_sec"]}


def table(records: list[dict]) -> str:
  lines = ["| kind | pe | dtype | batch x len | compile s | step ms | "
           "tokens/s | notes |", "|---|---|---|---|---|---|---|---|"]
  for r in records:
    if r["kind"] == "step":
      notes = (f"median {r['step_ms_median']:.1f} ms, "
               f"{r['tokens_per_sec_median']:,.0f} tokens/s")
      compile_s = f"{r['compile_s']:.2f}"
    else:
      notes = (f"{r['train_steps']} steps in {r['wall_s']:.1f} s (data "
               f"setup {r['data_setup_s']:.1f} s, batch {r['batch_ms']:.2f} "
               f"ms); loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}")
      compile_s = "-"
    lines.append(
        f"| {r['kind']} | {r['pe']} | {r['dtype']} | {r['batch_size']} x "
        f"{r['train_len']} | {compile_s} | {r['step_ms']:.1f} | "
        f"{r['tokens_per_sec']:,.0f} | {notes} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pes", nargs="+", default=list(ALL_PES))
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                      help="float32 runs every pe; bfloat16 runs rope only")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per block (default 10; quick 3)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed blocks (default 5; quick 2)")
  parser.add_argument("--train_steps", type=int, default=None,
                      help="trainer.train steps (default 200; quick 20)")
  parser.add_argument("--no_train", action="store_true",
                      help="skip the end-to-end trainer.train measurement")
  parser.add_argument("--data_dir", default=None,
                      help="token store cache (default: a temporary folder)")
  parser.add_argument("--quick", action="store_true",
                      help="rope only; fewer steps (see above)")
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  for name, full, quick in (("steps", 10, 3), ("repeats", 5, 2),
                            ("train_steps", 200, 20)):
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)
  if args.quick:
    args.pes = ["rope"]
  payload = {"benchmark": "train_cpu",
             "command": " ".join(["benchmarks/train_cpu.py"] + (
                 argv if argv is not None else sys.argv[1:])),
             "started": datetime.datetime.now().isoformat(timespec="seconds"),
             "machine": machine_info(), "records": []}
  runs = [(pe, "float32") for pe in args.pes if "float32" in args.dtypes]
  if "rope" in args.pes and "bfloat16" in args.dtypes:
    runs.append(("rope", "bfloat16"))
  payload["records"] += bench_steps(runs, steps=args.steps,
                                   repeats=args.repeats)
  if not args.no_train:
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="train_cpu_data_")
    try:
      payload["records"].append(bench_train(args.train_steps, data_dir))
    finally:
      if args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
  payload["table"] = table(payload["records"])
  print(payload["table"])
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(payload, f, indent=1)
      f.write("\n")
  return payload


if __name__ == "__main__":
  main()
