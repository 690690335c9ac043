"""Fine-tuned variants of a study (``config.finetunes``).

A study config may add variants that continue a trained variant at a
longer length with new position settings (``experiments.finetune``)::

  config.finetunes = ml_collections.ConfigDict()
  config.finetunes.rope_pi4 = dict(base="rope", method="pi", factor=4,
                                   steps=100)

Each entry's name is a variant of the study (its run is
WORKDIR/runs/<name>[/seed<k>], trained after its base from the base run's
latest checkpoint of the same seed; the evaluations' ``models`` may name
it, and ``""`` includes it). Settings: ``base`` (a variant of
config.variants), ``method`` (pi, yarn, ntk_by_parts, abf, continue),
``factor`` (the new train_len is factor x config.train.train_len; > 1, or
>= 1 for continue), ``steps``, and optionally ``learning_rate`` (0: a tenth
of the base's), ``warmup_steps`` (20), ``optimizer`` (reset or keep),
``base_factor`` (abf, 100) and ``retrieval_mix`` (a fraction of each
batch's rows that are short passkey examples, ``data.RetrievalMix``: a
retrieval fine-tune; 0 or absent: the base's data). The
evaluations keep measuring at multiples of the study's train_len, so the
fine-tuned model's column sits beside its base's and, in the rope_scaling
section, beside the zero-shot scaling of the same factor; its records keep
the study's train_len (the base's) and carry the scaling the model runs
with (``scaling``, ``scale``: "rope_pi4 linear x4" in the tables) and
their base (``base``: the rope_scaling section shows a fine-tune of its
model beside the zero-shot scalings).
"""

from __future__ import annotations

import os
from typing import Optional

from extrapolax.experiments import finetune
from extrapolax.experiments import seeds as seeds_lib

__all__ = ["names", "base_of", "all_variants", "validate", "train_config"]

_KEYS = ("base", "method", "factor", "steps", "learning_rate",
         "warmup_steps", "optimizer", "base_factor", "retrieval_mix")


def _entries(config) -> dict:
  entries = config.get("finetunes")
  if not entries:
    return {}
  return {name: (entries[name].to_dict() if hasattr(entries[name], "to_dict")
                 else dict(entries[name])) for name in entries.keys()}


def names(config) -> tuple[str, ...]:
  """The fine-tuned variants' names, in config order."""
  return tuple(_entries(config))


def base_of(config, name: str):
  """The base variant of fine-tuned variant ``name`` (None: not one)."""
  entry = _entries(config).get(name)
  return None if entry is None else entry.get("base")


def all_variants(config) -> tuple[str, ...]:
  """config.variants, then the fine-tuned ones (trained after their
  bases)."""
  from extrapolax.experiments import evals  # pylint: disable=import-outside-toplevel
  return tuple(evals.split_names(config.variants)) + names(config)


def validate(config, variants: tuple, variant_config) -> None:
  """Raises ValueError naming a bad config.finetunes entry."""
  entries = _entries(config)
  if entries and (config.get("from_zoo") or config.get("model_source")):
    raise ValueError("config.finetunes needs trained variants; it cannot be "
                     "used with from_zoo or model_source")
  for name, entry in entries.items():
    where = f"config.finetunes.{name}"
    if name in variants:
      raise ValueError(f"{where}: the name is already a variant of "
                       f"config.variants={variants!r}")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown settings {unknown}; allowed: "
                       f"{list(_KEYS)}")
    if entry.get("base") not in variants:
      raise ValueError(f"{where}.base={entry.get('base')!r} must be one of "
                       f"config.variants={variants!r}")
    if entry.get("method") not in finetune.METHODS:
      raise ValueError(f"{where}.method={entry.get('method')!r} must be one "
                       f"of {finetune.METHODS}")
    for key in ("factor", "steps"):
      value = entry.get(key)
      least = 1 if key == "factor" else 0
      if key == "factor" and entry["method"] == "continue":
        ok = _is_number(value) and value >= 1
        bound = ">= 1 (continue)"
      else:
        ok = _is_number(value) and value > least
        bound = f"> {least}"
      if not ok:
        raise ValueError(f"{where}.{key}={value!r} must be a number {bound}")
    mix = entry.get("retrieval_mix", 0)
    if not _is_number(mix) or not 0 <= mix <= 1:
      raise ValueError(f"{where}.retrieval_mix={mix!r} must be a fraction in "
                       "[0, 1] (0: the base's data)")
    from extrapolax.experiments import trainer  # pylint: disable=import-outside-toplevel
    try:
      trainer.validate_config(train_config(config, name, "", None,
                                           variant_config))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e


def _is_number(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float))


def train_config(config, name: str, workdir: str, seed: Optional[int],
                 variant_config):
  """The training config of fine-tuned variant ``name`` (seed None: the
  single-seed layout); ``init_from`` is its base's run (None without a
  workdir: for validation)."""
  entry = _entries(config)[name]
  base = entry["base"]
  train = variant_config(config, base, workdir)
  train.seed = seeds_lib.seed_of(config, seed)
  init_from = (seeds_lib.run_dir(os.path.abspath(workdir), base, seed)
               if workdir else None)
  train = finetune.finetune_config(
      train, init_from, method=entry["method"],
      factor=float(entry["factor"]), steps=int(entry["steps"]),
      learning_rate=float(entry.get("learning_rate") or 0.0),
      warmup_steps=int(entry.get("warmup_steps", 20)),
      optimizer=entry.get("optimizer", "reset") if workdir else "reset",
      base_factor=float(entry.get("base_factor", 100.0)))
  if entry.get("retrieval_mix"):
    train.data.retrieval_mix = float(entry["retrieval_mix"])
  return train
