"""Orbax checkpoints of a training run: WORKDIR/checkpoints/<step>/.

A checkpoint holds ``params`` (the parameter state as a pure dict),
``opt_state`` (the optimizer state's leaves) and ``data`` (JSON: step, seed
and the data source's state). Arrays are written sharded as they are (every
process its own shards on a multi-host run) and restored onto the shardings
of the targets given, so a checkpoint written on one mesh loads on another.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from flax import nnx

from extrapolax.models import zoo


def quiet_orbax():
  """Orbax logs INFO chatter through absl on every save and restore; its
  warnings still show."""
  return zoo.quiet_orbax(logging.WARNING)


def open_manager(workdir: str, keep: int):
  """An orbax CheckpointManager of WORKDIR/checkpoints (synchronous)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False)
  with quiet_orbax():
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                 options=options)


def close(manager) -> None:
  with quiet_orbax():
    manager.close()


def abstract(tree):
  """Restore targets: each array's own sharding (a checkpoint written on
  another mesh is resharded onto it), else the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device),
                      tree)


def save(manager, step, params, opt_state, data_state) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with quiet_orbax():
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
        opt_state=ocp.args.StandardSave(jax.tree.leaves(opt_state)),
        data=ocp.args.JsonSave(data_state)))
    manager.wait_until_finished()


def restore(manager, step, items: Mapping[str, Any]) -> dict:
  """Restores the named items; ``items`` maps name -> target tree or None
  (JSON)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  args = {name: (ocp.args.JsonRestore() if target is None else
                 ocp.args.StandardRestore(abstract(target)))
          for name, target in items.items()}
  with quiet_orbax():
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  return {name: restored[name] for name in items}


def fill_params(params_state, pure: dict):
  nnx.replace_by_pure_dict(params_state, pure)
  return params_state
