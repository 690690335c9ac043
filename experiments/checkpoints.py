"""Orbax checkpoints of a training run: WORKDIR/checkpoints/<step>/.

A checkpoint holds ``params`` (the parameter state as a pure dict),
``opt_state`` (the optimizer state's leaves) and ``data`` (JSON: step, seed
and the data source's state). Arrays are written sharded as they are (every
process its own shards on a multi-host run) and restored onto the shardings
of the targets given, so a checkpoint written on one mesh loads on another.

Once orbax has finished, ``manifest.json`` is written last and atomically
into the step's folder (``models.checkpoint_files``): the size and sha256 of
every file orbax wrote, and the run's config (the fields that may not change
on resume) with its sha256. A step folder without it is incomplete (the save
was interrupted, or the removal of an old step): it is skipped with a
warning, and a resume removes it and continues from the newest complete
step. A complete step is verified before orbax reads it: a changed, short or
missing file raises ``checkpoint_files.CheckpointError`` naming it. Old
steps are removed (keep the newest ``keep``) only after the new step's
manifest is written.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping, Optional

import jax
from absl import logging as absl_logging
from flax import nnx

from extrapolax.models import checkpoint_files
from extrapolax.models import zoo

_FORMAT, _VERSION = "extrapolax.train_checkpoint", 1
CheckpointError = checkpoint_files.CheckpointError


def quiet_orbax():
  """Orbax logs INFO chatter through absl on every save and restore; its
  warnings still show."""
  return zoo.quiet_orbax(logging.WARNING)


def open_manager(workdir: str):
  """An orbax CheckpointManager of WORKDIR/checkpoints (synchronous; old
  steps are removed by ``save``, after the new manifest, not by orbax)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=True, enable_async_checkpointing=False)
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


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step))


def steps(workdir: str) -> tuple[list[int], list[int]]:
  """(complete, incomplete) steps of WORKDIR/checkpoints, ascending: a step
  folder is complete when it holds its manifest."""
  root = os.path.join(workdir, "checkpoints")
  found = sorted(int(n) for n in (os.listdir(root) if os.path.isdir(root)
                                  else ()) if n.isdigit())
  done = [s for s in found if os.path.isfile(os.path.join(
      step_dir(workdir, s), checkpoint_files.MANIFEST))]
  return done, [s for s in found if s not in done]


def latest_complete(workdir: str, *, remove_incomplete: bool = False
                    ) -> Optional[int]:
  """The newest complete step (None if none).

  Incomplete step folders (a save or a removal that was interrupted) are
  named in a warning and, with ``remove_incomplete`` (a resume, before the
  manager opens), deleted: newer ones so the run can save those steps
  again, older ones because nothing can load them.
  """
  done, incomplete = steps(workdir)
  latest = done[-1] if done else None
  if incomplete:
    absl_logging.warning(
        "skipping incomplete checkpoint(s) %s (no %s: a save or a removal "
        "was interrupted)%s; the newest complete step is %s",
        [step_dir(workdir, s) for s in incomplete], checkpoint_files.MANIFEST,
        "; removing them" if remove_incomplete else "", latest)
  root = os.path.join(workdir, "checkpoints")
  # orbax's temporary folders of a killed save (it reuses one only when
  # the same step is saved again).
  temporary = [n for n in (os.listdir(root) if os.path.isdir(root) else ())
               if ".orbax-checkpoint-tmp" in n]
  if remove_incomplete and (incomplete or temporary):
    if jax.process_index() == 0:
      for s in incomplete:
        shutil.rmtree(step_dir(workdir, s))
      for name in temporary:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _sync("extrapolax_drop_incomplete")
  return latest


class CheckpointWriteError(ValueError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


_SPACE = ("No space left", "ENOSPC", "Disk quota", "Read-only file system",
          "Permission denied")


def _os_failure(error: BaseException) -> Optional[str]:
  """The OS reason behind an orbax / tensorstore save failure, or None."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError):
      return seen.strerror or str(seen)
    text = str(seen)
    for phrase in _SPACE:
      if phrase in text:
        return phrase if phrase != "ENOSPC" else "No space left on device"
    seen = seen.__cause__ or seen.__context__
  return None


def save(manager, step, params, opt_state, data_state, *, workdir: str,
         config: Mapping[str, Any], keep: int) -> None:
  """Saves step with orbax, then its manifest (``config``: the run's fixed
  fields), then removes complete steps beyond the newest ``keep``.

  Raises:
    CheckpointWriteError: the OS refused the write (a full disk, ...): one
      line naming the folder; the half-written step and orbax's temporary
      folders are removed, so a rerun after freeing space resumes from the
      newest complete step.
  """
  try:
    _save(manager, step, params, opt_state, data_state, workdir=workdir,
          config=config, keep=keep)
  except Exception as e:  # pylint: disable=broad-except
    reason = _os_failure(e)
    if reason is None:
      raise
    directory = step_dir(workdir, step)
    root = os.path.join(workdir, "checkpoints")
    if jax.process_index() == 0:
      shutil.rmtree(directory, ignore_errors=True)
      for name in (os.listdir(root) if os.path.isdir(root) else ()):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    done = steps(workdir)[0]
    raise CheckpointWriteError(
        f"could not write checkpoint step {step} to {directory}: {reason}; "
        "the partial step was removed; free space (or fix the folder) and "
        "rerun the same command to resume from "
        + (f"step {done[-1]}" if done else "the start")) from None


def _save(manager, step, params, opt_state, data_state, *, workdir: str,
          config: Mapping[str, Any], keep: int) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with quiet_orbax():
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
        opt_state=ocp.args.StandardSave(jax.tree.leaves(opt_state)),
        data=ocp.args.JsonSave(data_state)))
    manager.wait_until_finished()
  directory = step_dir(workdir, step)
  # Listed before the barrier below, so every process prunes the same steps.
  done = sorted(set(steps(workdir)[0]) | {step})
  if jax.process_index() == 0:
    checkpoint_files.write_manifest(directory, {
        "format": _FORMAT, "version": _VERSION, "step": int(step),
        "checksum": "sha256", "config": dict(config),
        "config_sha256": checkpoint_files.json_sha256(dict(config)),
        "files": checkpoint_files.describe_files(directory)})
  _sync("extrapolax_manifest_written")
  with quiet_orbax():
    for old in [s for s in done if s < step][:max(len(done) - keep, 0)]:
      # Manifest first: a kill mid-delete leaves an incomplete step, not a
      # damaged one.
      manifest = os.path.join(step_dir(workdir, old),
                              checkpoint_files.MANIFEST)
      if jax.process_index() == 0 and os.path.exists(manifest):
        os.remove(manifest)
      manager.delete(old)


def _sync(name: str) -> None:
  """A barrier across processes (nothing on a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils as mh  # pylint: disable=import-outside-toplevel
    mh.sync_global_devices(name)


def verify(workdir: str, step: int) -> dict:
  """The manifest of a complete step, after checking every file it lists.

  Raises:
    checkpoint_files.CheckpointError: the step is incomplete, or a file is
      missing, short or changed (the message names it).
  """
  directory = step_dir(workdir, step)
  manifest = checkpoint_files.read_manifest(
      directory, fmt=_FORMAT, versions=(_VERSION,),
      hint="load another step, or delete the folder to resume before it")
  if not isinstance(manifest.get("config"), dict) or not isinstance(
      manifest.get("config_sha256"), str):
    raise CheckpointError(f"damaged checkpoint: {directory}/"
                          f"{checkpoint_files.MANIFEST} has no config")
  checkpoint_files.check_files(directory, manifest["files"], where=directory)
  return manifest


def restore(manager, step, items: Mapping[str, Any]) -> dict:
  """Restores the named items; ``items`` maps name -> target tree or None
  (JSON)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  args = {name: (ocp.args.JsonRestore() if target is None else
                 ocp.args.StandardRestore(abstract(target)))
          for name, target in items.items()}
  with quiet_orbax():
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"damaged checkpoint {os.path.join(manager.directory, str(step))}: "
          f"orbax cannot read it: {checkpoint_files.innermost_line(e)}"
      ) from e
  return {name: restored[name] for name in items}


def fill_params(params_state, pure: dict):
  nnx.replace_by_pure_dict(params_state, pure)
  return params_state
