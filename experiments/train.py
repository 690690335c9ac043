r"""Trains one model: a thin absl main over ``trainer.train``.

From the repository root::

  python -m extrapolax.experiments.train \
      --config=experiments/configs/tiny.py --workdir=/tmp/tiny
  python -m extrapolax.experiments.train \
      --config=experiments/configs/tiny.py:pe=alibi --workdir=/tmp/alibi \
      --config.train_steps=200 --config.model.d_model=128

``--config`` takes a config file and optional variant arguments after a colon
(see the file's docstring); each field can then be overridden with
``--config.FIELD=VALUE``. A config path that does not exist is looked up by
file name in the installed ``extrapolax/experiments/configs`` folder, so
``--config=tiny.py`` works from anywhere. Rerunning the same command resumes
from the workdir's latest checkpoint. The workdir then holds config.json,
metrics.jsonl, TensorBoard event files and checkpoints/.

Several devices: set the mesh, e.g. ``--config.mesh.data=2
--config.mesh.fsdp=2 --config.mesh.tensor=2`` on 8 GPUs (the sizes'
product is the device count). Several hosts: run the same command on every
host with ``JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N
JAX_PROCESS_ID=i`` (or under SLURM / Open MPI, detected), or
``--distributed=on`` on a Cloud TPU pod slice; see the README.

``--config_help`` lists every ``--config.*`` field with its default and one
line (the tiny config's fields without ``--config``).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from extrapolax.experiments import cli
from extrapolax.experiments import configs
from extrapolax.experiments import sharding
from extrapolax.experiments import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, optionally with ':ARGS'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder: config.json, metrics.jsonl, checkpoints/.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host start-up (jax.distributed.initialize): auto = when "
    "$JAX_COORDINATOR_ADDRESS or a multi-task SLURM / Open MPI job is seen; "
    "on = always (JAX detects Cloud TPU pod slices); off = never.")
_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False, "List the --config.* fields with their defaults "
    "and exit.")
TINY_CONFIG = "tiny.py"


def _parse_flags(argv: list[str]) -> list[str]:
  cli.maybe_print_help(argv, __doc__, "extrapolax.experiments.train")
  argv = configs.resolve_config_flag(argv)
  try:
    try:
      rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:   # a --config.* field typo
      raise ValueError(cli.bad_field_message(
          argv, configs.get_config(cli.config_spec(argv, TINY_CONFIG))) or
                       " ".join(str(e).split())) from None
    if not _CONFIG_HELP.value:
      missing = [f"--{n}" for n in ("config", "workdir")
                 if not flags.FLAGS[n].value]
      if missing:
        raise flags.IllegalFlagValueError(
            f"{' and '.join(missing)} required (e.g. --config=tiny.py "
            "--workdir=/tmp/tiny)")
    return rest
  except (flags.Error, ValueError) as e:
    cli.exit_on_flag_error(e)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG_HELP.value:
    spec = cli.config_spec(sys.argv, TINY_CONFIG)
    config = _CONFIG.value or configs.get_config(spec)
    print(cli.config_help(config, configs.path(spec.partition(":")[0])))
    return
  config = _CONFIG.value
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    sys.exit(f"error: --workdir={workdir} is a file; give a folder (new or "
             "a run's, to resume it)")
  try:
    sharding.initialize_distributed(_DISTRIBUTED.value)
    trainer.validate_config(config)
    result = trainer.train(config, _WORKDIR.value)
  except (ValueError, trainer.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")     # the message names the value or the step
  last = result.metrics[-1] if result.metrics else {}
  print(f"trained {result.step} steps; final loss "
        f"{last.get('loss', float('nan')):.4f}; workdir {_WORKDIR.value}")


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
