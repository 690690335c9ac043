"""A training run's config.json: written once, compared on resume, and
checked against the config a checkpoint's manifest recorded.

Only ``RESUMABLE_FIELDS`` may change when a run resumes; the rest (the
"fixed" fields) go into every checkpoint's manifest with their sha256, so a
config.json replaced by another model's of the same shapes (rope -> alibi)
is refused by ``trainer.load_model`` and by a resume.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import ml_collections
from absl import logging as absl_logging

from extrapolax.models import checkpoint_files

# Fields that may change when a run resumes (the rest must match config.json).
# The mesh may change too: checkpoints are resharded onto the new one.
RESUMABLE_FIELDS = ("train_steps", "log_every", "checkpoint_every",
                    "keep_checkpoints", "mesh", "mesh.data", "mesh.fsdp",
                    "mesh.tensor", "mesh.context")


def _load(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path}: {e}; restore it (checkpoint "
                     "manifests record its fields) or use another "
                     "--workdir") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path} is not a training config (a JSON object)")
  return data


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json a training run wrote."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{workdir} holds no training run (no config.json)")
  return ml_collections.ConfigDict(_load(path))


def config_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _differences(old: Mapping, new: Mapping, prefix="") -> list[str]:
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _differences(a, b, f"{prefix}{key}.")
    elif a != b and f"{prefix}{key}" not in RESUMABLE_FIELDS:
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out


def write_config(config, workdir: str) -> None:
  """Writes config.json; a resumed run may only change RESUMABLE_FIELDS."""
  path = os.path.join(workdir, "config.json")
  new = config_json(config)
  if os.path.isfile(path):
    old = _load(path)
    changed = _differences(old, new)
    if old.get("train_steps") != new["train_steps"]:
      absl_logging.warning(
          "train_steps changed from %s to %s: the cosine schedule of the "
          "remaining steps follows the new value", old.get("train_steps"),
          new["train_steps"])
    if changed:
      raise ValueError(
          f"{workdir} holds a run with a different config "
          f"({'; '.join(changed)}); only {RESUMABLE_FIELDS} may change when "
          "resuming. Use another --workdir for a new run")
  if jax.process_index():
    return      # multi-host: process 0 writes the workdir's files
  checkpoint_files.write_json_atomic(path, new)


def fixed_fields(data: Mapping) -> dict:
  """The config (as JSON data) without RESUMABLE_FIELDS: what a checkpoint's
  manifest records (config.json may change only outside it)."""
  fixed = json.loads(json.dumps(data))
  for name in RESUMABLE_FIELDS:
    *parents, leaf = name.split(".")
    node = fixed
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(leaf, None)
  return fixed


def check_saved_config(manifest: Mapping, data: Mapping, workdir: str,
                       step: int) -> None:
  """Refuses a config (``data``, from config.json) that is not the one
  checkpoint ``step`` was saved with (another model of the same shapes
  would load silently).

  Raises:
    checkpoint_files.CheckpointError: naming the fields that differ.
  """
  fixed = fixed_fields(data)
  if checkpoint_files.json_sha256(fixed) == manifest["config_sha256"]:
    return
  changed = _differences(manifest["config"], fixed) or [
      "a value's JSON form"]
  raise checkpoint_files.CheckpointError(
      f"{os.path.join(workdir, 'config.json')} is not the config checkpoint "
      f"{step} was saved with ({'; '.join(changed[:3])}); put back the run's "
      "own config.json, or use another --workdir for another model")
