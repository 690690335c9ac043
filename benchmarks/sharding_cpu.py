r"""Benchmark: per-device memory and step time of sharded training meshes.

For one model (a wider tiny config: d_model 256, 4 layers, 8 heads over 4
kv heads, MLP 1024, 512 tokens, batch 16) the trainer's train step is
compiled on several meshes of the available devices (on a CPU the script
forces 8 host devices, unless XLA_FLAGS already sets a count) and measured:

* parameter + optimizer-state bytes held by one device (the shards of its
  arrays: fsdp and tensor divide them, data and context do not);
* XLA's memory analysis of the compiled step per device: arguments, outputs
  and temporaries (activations, gradients, attention blocks);
* the step time (best of ``--repeats`` blocks of ``--steps`` steps) and the
  first step's loss, which must agree across meshes.

On the CPU the forced devices share the machine's cores, so step times show
the cost of the partitioned program (collectives, smaller kernels), not a
speed-up; the memory columns are what sharding buys.

Usage, from the repository root: ``.venv/bin/python benchmarks/sharding_cpu.py
[--quick] [--out PATH]``. Prints a markdown table and writes JSON (default
benchmarks/results/sharding_cpu.json) with the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", "") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import numpy as np  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results", "sharding_cpu.json")
MESHES = (
    {},
    {"data": 8},
    {"fsdp": 8},
    {"tensor": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 2, "context": 4},
    {"context": 8},
)


def _config(quick: bool):
  from extrapolax.experiments import configs  # pylint: disable=import-outside-toplevel
  config = configs.get_config("tiny.py")
  config.model.vocab_size = 256
  if not quick:
    config.model.d_model = 256
    config.model.num_layers = 4
    config.model.num_heads = 8
    config.model.num_kv_heads = 4
    config.model.mlp_dim = 1024
    config.train_len = 512
  config.batch_size = 16
  return config


def _device_bytes(tree, device) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def bench_mesh(sizes: dict, *, quick: bool, steps: int, repeats: int) -> dict:
  """Compiles and times the train step on one mesh."""
  import jax  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments import modeling, sharding, trainer  # pylint: disable=import-outside-toplevel
  config = _config(quick)
  for axis, size in sizes.items():
    config.mesh[axis] = size
  mesh = sharding.mesh_from_config(config)
  _, params = trainer.init_params(config, mesh)
  init_opt, step_fn, shardings = trainer._cached_train_step(  # pylint: disable=protected-access
      modeling.model_config(config).to_json(),
      tuple((k, config[k]) for k in trainer._OPTIMIZER_FIELDS), mesh)  # pylint: disable=protected-access
  opt_state = init_opt(params)
  rows = np.random.default_rng(0).integers(
      0, 256, (config.batch_size, config.train_len + 1)).astype(np.int32)
  batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:],
           "weights": np.ones(rows[:, 1:].shape, np.float32)}
  batch = {k: jax.device_put(v, shardings[2]) for k, v in batch.items()}
  device = mesh.devices.flat[0]
  state_bytes = (_device_bytes(params, device) +
                 _device_bytes(opt_state, device))
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step_fn.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    params, opt_state, out = step_fn(params, opt_state, batch)
    first_loss = float(out["loss"])
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps):
        params, opt_state, out = step_fn(params, opt_state, batch)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - start) / steps)
  name = " x ".join(f"{k}={v}" for k, v in sizes.items()) or "one device"
  return {
      "mesh": name, "sizes": sizes, "devices": mesh.size,
      "state_bytes_per_device": state_bytes,
      "argument_bytes": getattr(analysis, "argument_size_in_bytes", None),
      "output_bytes": getattr(analysis, "output_size_in_bytes", None),
      "temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
      "compile_s": compile_s, "step_ms": min(times) * 1e3,
      "step_ms_all": [t * 1e3 for t in times], "first_loss": first_loss,
      "batch_size": config.batch_size, "train_len": config.train_len,
      "d_model": config.model.d_model, "num_layers": config.model.num_layers}


def table(records) -> str:
  mib = lambda b: "-" if b is None else f"{b / 2**20:.2f}"
  lines = ["| mesh | devices | params+opt MiB/device | args MiB | temps MiB "
           "| step ms | first loss |", "|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(
        f"| {r['mesh']} | {r['devices']} | {mib(r['state_bytes_per_device'])}"
        f" | {mib(r['argument_bytes'])} | {mib(r['temp_bytes'])} | "
        f"{r['step_ms']:.1f} | {r['first_loss']:.6f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="the tiny config itself, 2 repeats of 2 steps")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  steps = args.steps or (2 if args.quick else 3)
  repeats = args.repeats or (2 if args.quick else 3)
  import jax  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from train_cpu import machine_info  # pylint: disable=import-outside-toplevel
  records = []
  for sizes in MESHES:
    if int(np.prod(list(sizes.values()) or [1])) > jax.device_count():
      continue
    records.append(bench_mesh(sizes, quick=args.quick, steps=steps,
                              repeats=repeats))
    print(f"{records[-1]['mesh']}: {records[-1]['step_ms']:.1f} ms",
          file=sys.stderr, flush=True)
  print(table(records))
  result = {"benchmark": "sharding_cpu", "date": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "benchmarks/sharding_cpu.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "machine": machine_info(), "records": records}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  return result


if __name__ == "__main__":
  main()
