"""The held-out evaluation documents of a training run or a study."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from . import store as store_lib

__all__ = ["eval_documents"]


def eval_documents(config, workdir: Optional[str] = None
                   ) -> list[np.ndarray]:
  """The held-out documents (token arrays) the run's evaluators score.

  The same split the training run left out (``config.data``: corpus,
  tokenizer, eval_fraction, split_seed), from the cached token store (built
  if missing).

  Args:
    config: a training config (``config.data``, as trainer.train takes, or
      a run's config.json loaded as a ConfigDict) or a study config (its
      ``train`` field).
    workdir: the run's (or study's) folder; its ``data`` folder holds the
      stores unless ``config.data.cache_dir`` names one.

  Raises:
    ValueError: neither config.data.cache_dir nor workdir says where the
      stores are.
  """
  study = "train" in config
  fields = (config["train"] if study else config)["data"]
  root = fields.get("cache_dir") or (
      os.path.join(workdir, "data") if workdir else None)
  if not root:
    raise ValueError("eval_documents: config.data.cache_dir is None and no "
                     "workdir was given; pass workdir= (the run's folder)")
  root = os.path.abspath(os.path.expanduser(root))
  path = store_lib.default_store_path(root, fields["corpus"],
                                      fields["tokenizer"], "eval")
  store = store_lib.build_store(
      path, fields["corpus"], fields["tokenizer"], split="eval",
      eval_fraction=fields["eval_fraction"], split_seed=fields["split_seed"],
      # A study's runs keep downloaded archives there too.
      cache_dir=fields.get("cache_dir") or (root if study else None))
  return [store.document(i) for i in range(store.num_documents)]
