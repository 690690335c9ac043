"""Scaling out: the device mesh, named shardings and multi-host start-up.

The engine is JAX's own SPMD: a ``jax.sharding.Mesh`` with four named axes,
``NamedSharding`` on parameters, optimizer state and batches, and XLA's
partitioner for everything in between. Attention, whose sequence axis may be
split across devices, is the one place that runs its own ``shard_map`` (see
``extrapolax.attention.context_parallel``).

Mesh axes (``config.mesh.<axis>``: sizes, 1 by default; their product is the
number of devices)::

  data     splits the batch (parameters replicated)
  fsdp     splits the batch and shards parameters and optimizer state
           (the model dimension of every matrix)
  tensor   shards attention heads, the MLP width and the vocabulary
  context  splits the sequence (context-parallel attention)

Parameters follow logical-axis rules (as MaxText's): each parameter's path
names logical axes (``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``)
and ``LOGICAL_TO_MESH`` maps them to mesh axes. A dimension that a mesh axis
does not divide stays replicated (logged once), so any mesh runs any model;
a parameter no rule names is replicated.

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize``
from the usual environment (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or JAX's own detection of SLURM,
Open MPI, Kubernetes and Cloud TPU). Each process builds only the batch rows
its devices hold (``host_batch``); checkpoints are written and read sharded
by orbax (each process its own shards).
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")

# Parameter path (slash-joined, matched at the end) -> logical axes per dim.
PARAM_RULES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r"embed/embedding", ("vocab", None)),   # gathers stay batch-sharded
    (r"position_embed/table", (None, "embed")),
    (r"q_proj/kernel", ("embed", "heads", None)),
    (r"q_proj/bias", ("heads", None)),
    (r"[kv]_proj/kernel", ("embed", "kv_heads", None)),
    (r"[kv]_proj/bias", ("kv_heads", None)),
    (r"o_proj/kernel", ("heads", None, "embed")),
    (r"mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"mlp/down/kernel", ("mlp", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"(t5_table|kerple_raw)", (None, "heads")),
    (r"fire_out/kernel", (None, "heads")),
    (r"fire_out/bias", ("heads",)),
)
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
                   "mlp": "tensor", "vocab": "tensor"}

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ----------------------------------------------------------------------------
# The mesh.


def default_mesh_config() -> ml_collections.ConfigDict:
  """config.mesh with every axis of size 1 (one device)."""
  return ml_collections.ConfigDict({axis: 1 for axis in MESH_AXES})


def mesh_sizes(config) -> dict[str, int]:
  """config.mesh (absent: all 1) -> {axis: size}, checked."""
  fields = config.get("mesh") if hasattr(config, "get") else None
  fields = {} if fields is None else dict(fields)
  unknown = sorted(set(fields) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown config.mesh field(s) {unknown}; allowed: "
                     f"{list(MESH_AXES)}")
  sizes = {axis: fields.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"config.mesh.{axis}={size!r} must be an integer >= 1")
  return sizes


def validate_mesh_config(config) -> None:
  """The batch and the sequence divide over the mesh (without devices)."""
  sizes = mesh_sizes(config)
  rows = sizes["data"] * sizes["fsdp"]
  if config.batch_size % rows:
    raise ValueError(
        f"config.batch_size={config.batch_size} must be a multiple of "
        f"mesh.data * mesh.fsdp = {sizes['data']} * {sizes['fsdp']} = {rows}")
  if config.train_len % sizes["context"]:
    raise ValueError(
        f"config.train_len={config.train_len} must be a multiple of "
        f"mesh.context={sizes['context']} (the sequence is split across the "
        "context devices)")


def make_mesh(sizes: Mapping[str, int],
              devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """A Mesh with axes MESH_AXES of the given sizes over ``devices``.

  Args:
    sizes: {axis: size} (missing axes: 1), e.g. ``mesh_sizes(config)``.
    devices: default all devices (every process's, multi-host). Their number
      must be the product of the sizes.
  """
  sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
  devices = list(jax.devices() if devices is None else devices)
  total = math.prod(sizes.values())
  if total != len(devices):
    shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    raise ValueError(
        f"the mesh {shape} needs {total} devices; {len(devices)} are "
        f"available ({jax.default_backend()}). Set config.mesh.* so their "
        "product is the device count")
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(
        jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_from_config(config) -> jax.sharding.Mesh:
  """The config's mesh; all axes 1 (the default) gives a one-device mesh."""
  sizes = mesh_sizes(config)
  if math.prod(sizes.values()) == 1:
    return make_mesh(sizes, jax.devices()[:1])
  return make_mesh(sizes)


def describe(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


# ----------------------------------------------------------------------------
# Shardings.


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(mesh) -> P:
  """[B, T] batches: rows over data and fsdp, the sequence over context."""
  return P(BATCH_AXES, "context")


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def _path_name(path) -> str:
  """"blocks/0/attn/q_proj/kernel" (an nnx Variable's ``.value`` dropped)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path
                  if not isinstance(k, jax.tree_util.GetAttrKey))


def logical_axes(path: str, ndim: int) -> tuple[Optional[str], ...]:
  """The logical axes PARAM_RULES give a parameter (None: replicated)."""
  for pattern, axes in PARAM_RULES:
    if re.search(rf"(^|/){pattern}$", path) and len(axes) == ndim:
      return axes
  return (None,) * ndim


@functools.lru_cache(maxsize=256)
def _warn_once(message: str) -> None:
  logging.info("%s", message)


def param_spec(path: str, shape: Sequence[int], mesh) -> P:
  """The PartitionSpec of one parameter on ``mesh``."""
  out = []
  for dim, name in zip(shape, logical_axes(path, len(shape))):
    axis = LOGICAL_TO_MESH.get(name) if name else None
    size = mesh.shape.get(axis, 1) if axis else 1
    if size > 1 and dim % size:
      _warn_once(f"{path}: dimension {dim} ({name}) is not divisible by "
                 f"mesh.{axis}={size}; replicated on that axis")
      axis = None
    out.append(axis if size > 1 else None)
  return P(*out)


def param_shardings(params, mesh):
  """A tree like ``params`` (an nnx State or any pytree of arrays or
  ShapeDtypeStructs) holding each parameter's NamedSharding."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(
          mesh, param_spec(_path_name(path), np.shape(x), mesh)), params)


def opt_state_shardings(optimizer, abstract_opt_state, params_shardings,
                        mesh):
  """Shardings of an optax state: the parameter's where a leaf mirrors a
  parameter (Adam's moments), replicated elsewhere (counts, scalars)."""
  return optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt_state,
      params_shardings, transform_non_params=lambda _: replicated(mesh))


def abstract_with(tree, shardings):
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a like tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------
# Batches: each process builds only its own rows.


def host_rows(sharding: NamedSharding, global_shape: Sequence[int]
              ) -> tuple[int, int]:
  """[lo, hi): the batch rows this process's devices hold."""
  indices = sharding.addressable_devices_indices_map(tuple(global_shape))
  starts = [idx[0].start or 0 for idx in indices.values()]
  stops = [global_shape[0] if idx[0].stop is None else idx[0].stop
           for idx in indices.values()]
  return min(starts), max(stops)


def host_batch(get_rows: Callable[[int, int], Mapping[str, np.ndarray]],
               sharding: NamedSharding, global_shape: Sequence[int]
               ) -> dict[str, jax.Array]:
  """Global arrays from this process's rows.

  ``get_rows(lo, hi)`` returns numpy arrays [hi - lo, T] of the rows
  ``host_rows`` names (a data source reads only those); every device's
  shard is cut from them.
  """
  lo, hi = host_rows(sharding, global_shape)
  local = get_rows(lo, hi)
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.shape != (hi - lo,) + tuple(global_shape[1:]):
      raise ValueError(f"rows[{key!r}] has shape {value.shape}, expected "
                       f"{(hi - lo,) + tuple(global_shape[1:])}")

    def shard(index, value=value):
      rows, *rest = index
      rows = slice((rows.start or 0) - lo,
                   (global_shape[0] if rows.stop is None else rows.stop) - lo)
      return value[(rows, *rest)]

    out[key] = jax.make_array_from_callback(tuple(global_shape), sharding,
                                            shard)
  return out


# ----------------------------------------------------------------------------
# Multi-host.


def distributed_environment() -> bool:
  """Whether the environment describes a multi-process job: our variables
  or a cluster JAX detects (SLURM / Open MPI with more than one task)."""
  if os.environ.get(_ENV_COORDINATOR):
    return True
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(os.environ.get(name, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def initialize_distributed(mode: str = "auto") -> bool:
  """Starts JAX's multi-process runtime; returns whether it did.

  Args:
    mode: "auto" (when ``distributed_environment()``), "on" (always: JAX's
      cluster detection fills what the environment does not give; use on a
      TPU pod slice) or "off".

  ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are passed when set. Must run
  before any other JAX call of the process.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r} is not one of "
                     "('auto', 'on', 'off')")
  if mode == "off" or (mode == "auto" and not distributed_environment()):
    return False
  kwargs: dict[str, Any] = {}
  if os.environ.get(_ENV_COORDINATOR):
    kwargs["coordinator_address"] = os.environ[_ENV_COORDINATOR]
  for env, key in ((_ENV_NUM_PROCESSES, "num_processes"),
                   (_ENV_PROCESS_ID, "process_id")):
    if os.environ.get(env):
      try:
        kwargs[key] = int(os.environ[env])
      except ValueError as e:
        raise ValueError(f"${env}={os.environ[env]!r} is not an integer"
                         ) from e
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
