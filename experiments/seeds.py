"""Several training seeds per study variant (``config.seeds``).

A study config's ``seeds`` field says which training seeds each variant is
trained (and evaluated) with:

* absent, ``None`` or ``()``: one run per variant, trained with
  ``config.train.seed``, in ``WORKDIR/runs/<variant>`` (the single-seed
  layout, as before this field existed);
* a tuple of distinct non-negative ints (``--config.seeds=0,1,2`` on the
  command line): one run per variant and seed, in
  ``WORKDIR/runs/<variant>/seed<k>``, its ``train.seed`` set to ``k``;
* an int ``n >= 1`` (in a config file): the ``n`` seeds ``train.seed``,
  ``train.seed + 1``, ..., ``train.seed + n - 1``.

Every record keeps its run's seed; the report averages the seeds of a cell
and shows their spread (``report.cell_stats``). A zoo study (``from_zoo``)
and a loaded model (``model_source``) evaluate one fixed set of weights, so
they refuse seeds.
"""

from __future__ import annotations

import numbers
import os
from typing import Optional

__all__ = ["study_seeds", "run_dir", "done_key", "seed_of", "scalars_dir"]


def study_seeds(config) -> Optional[tuple[int, ...]]:
  """The seeds ``config.seeds`` names (None: the single-seed layout).

  Raises:
    ValueError: a bad ``seeds`` value (one line naming it and what is
      allowed), or seeds with ``from_zoo`` / ``model_source``.
  """
  value = config.get("seeds")
  if value is None or (isinstance(value, (tuple, list)) and not value):
    return None
  allowed = ("a tuple of distinct integers >= 0 (--config.seeds=0,1,2), an "
             "int count >= 1, or () for one run per variant")
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    if value < 1:
      raise ValueError(f"config.seeds={value!r}: {allowed}")
    first = int(config.train.get("seed", 0))
    seeds = tuple(range(first, first + int(value)))
  elif isinstance(value, (tuple, list)):
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
               and s >= 0 for s in value) or len(set(value)) != len(value):
      raise ValueError(f"config.seeds={tuple(value)!r}: {allowed}")
    seeds = tuple(int(s) for s in value)
  else:
    raise ValueError(f"config.seeds={value!r}: {allowed}")
  for field in ("from_zoo", "model_source"):
    if config.get(field):
      raise ValueError(f"config.seeds={seeds!r} with config.{field}="
                       f"{config.get(field)!r}: a zoo or loaded model is one "
                       "fixed set of weights; use seeds=() there")
  return seeds


def run_dir(workdir: str, variant: str, seed: Optional[int]) -> str:
  """A run's folder: runs/<variant> (seed None), else runs/<variant>/seed<k>."""
  folder = os.path.join(workdir, "runs", variant)
  return folder if seed is None else os.path.join(folder, f"seed{seed}")


def done_key(name: str, seed: Optional[int]) -> str:
  """An evaluation's key in evaluations.json: "<experiment>/<variant>"
  (seed None) or "<experiment>/<variant>/seed<k>"."""
  return name if seed is None else f"{name}/seed{seed}"


def seed_of(config, seed: Optional[int]) -> int:
  """The training seed of a run (``config.train.seed`` for seed None)."""
  return int(config.train.get("seed", 0)) if seed is None else int(seed)


def scalars_dir(workdir: str, seed: Optional[int]) -> str:
  """Where a run's evaluation scalars go: WORKDIR (seed None), else
  WORKDIR/seed<k>, one TensorBoard run per seed (same tags, no clash)."""
  return workdir if seed is None else os.path.join(workdir, f"seed{seed}")
