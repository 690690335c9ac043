"""What a study config asks for: its checks, each variant's training config,
and the evaluations it lists.

``validate_config(config)`` raises ValueError naming the first bad field of
a study config (experiments/configs/extrapolation.py and its siblings);
``variant_config(config, variant, workdir)`` is one variant's training
config (config.train with its position encoding or zoo family set);
``model_source(config)`` names the pretrained model a study evaluates
instead of training. ``evaluations(config)`` turns ``config.evals`` into the
list of ``Evaluation`` the study runs, variant by variant, each entry's
settings checked by its evaluator (``experiments.evals``).

``experiments.extrapolation`` runs them and keeps these names importable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import ml_collections

from extrapolax.common import checks
from extrapolax.experiments import evals
from extrapolax.experiments import modeling
from extrapolax.experiments import seeds as seeds_lib
from extrapolax.experiments import study_finetune
from extrapolax.experiments import trainer
from extrapolax.experiments import zoo_build

__all__ = ["Evaluation", "evaluations", "model_source", "validate_config",
           "variant_choices", "variant_config"]


# ----------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """A validated ``config.evals`` entry."""
  name: str
  type: str
  evaluator: evals.Evaluator
  models: tuple
  settings: Optional[dict]   # None: nothing to run
  seeds: Optional[tuple] = None   # None: every seed of the study


def _entries(config) -> list[_Entry]:
  """config.evals, validated by each entry's evaluator."""
  variants = study_finetune.all_variants(config)
  evaluations_config = config.get("evals")
  if evaluations_config is None:
    raise ValueError("config.evals is missing; see "
                     "experiments/configs/extrapolation.py")
  out = []
  for name in evaluations_config.keys():
    entry = evaluations_config[name]
    if not hasattr(entry, "keys") or "type" not in entry:
      raise ValueError(f"config.evals.{name}={entry!r} must be a dict with "
                       f"a type (one of {evals.names()} or "
                       "'package.module:function')")
    settings = {k: (v.to_dict() if hasattr(v, "to_dict") else v)
                for k, v in entry.items()}
    type_name = settings.pop("type")
    try:
      evaluator = evals.get(type_name)
      models = evals.select_models(name, settings.pop("models", ""),
                                   variants)
      seeds = _entry_seeds(settings.pop("seeds", None), config)
      checked = evaluator.validate(dict(settings, models=models), config)
    except ValueError as e:
      message = str(e)
      if not message.startswith(f"config.evals.{name}"):
        message = f"config.evals.{name}: {message}"
      raise ValueError(message) from e
    if checked is not None:
      checked = dict(checked)
      checked.pop("models", None)
    out.append(_Entry(name, type_name, evaluator, models, checked, seeds))
  return out


def _entry_seeds(value, config) -> Optional[tuple]:
  """An evaluation's ``seeds`` (a runner setting, like ``models``): the
  study seeds it runs on, comma-separated ("0,1"); "" or None: all."""
  values = () if value is None else evals.split_numbers(value)
  if not values:
    return None
  study = seeds_lib.study_seeds(config)
  if study is None:
    raise ValueError(f"seeds={value!r}: the study has no config.seeds; "
                     "leave seeds out (the evaluation runs on each run)")
  bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)
         or v not in study]
  if bad or not values:
    raise ValueError(f"seeds={value!r} must name seeds of config.seeds="
                     f"{study!r} (comma-separated; () for all)")
  return tuple(int(v) for v in values)


def model_source(config) -> Optional[str]:
  """The pretrained model a study evaluates (None: it trains its variants)."""
  return config.get("model_source")


def _validate_source(config, variants: tuple) -> None:
  from extrapolax.experiments.data import corpora  # pylint: disable=g-import-not-at-top
  from extrapolax.models import pretrained  # pylint: disable=g-import-not-at-top
  source = model_source(config)
  known = isinstance(source, str) and (
      source in pretrained.MODELS or os.path.exists(os.path.expanduser(source)))
  if not known:
    raise ValueError(f"config.model_source={source!r} is neither a "
                     f"pretrained zoo name {tuple(pretrained.MODELS)} nor an "
                     "existing GGUF file or model folder")
  if len(variants) != 1:
    raise ValueError(f"config.variants={config.variants!r} must be one name "
                     "(the loaded model's label) when model_source is set")
  checks.check_int("config.train.train_len", config.train.get("train_len"),
                   minimum=1)
  data = config.train.data
  names = evals.split_names(data.corpora)
  bad = [n for n in names if n not in corpora.CORPUS_NAMES
         and not os.path.exists(os.path.expanduser(n))]
  if not names or bad:
    raise ValueError(f"config.train.data.corpora={data.corpora!r}: name "
                     f"corpora of {corpora.CORPUS_NAMES} or existing paths")
  checks.check_int("config.train.data.min_doc_tokens", data.min_doc_tokens,
                   minimum=1)
  checks.check_optional_int("config.train.data.max_eval_tokens",
                            data.get("max_eval_tokens"), minimum=1)


def validate_config(config) -> None:
  """Raises ValueError naming the first bad field of a study config."""
  variants = evals.split_names(config.variants)
  seeds_lib.study_seeds(config)
  if model_source(config) is not None:
    _validate_source(config, variants)
    study_finetune.validate(config, variants, variant_config)
    _entries(config)
    return
  choices = variant_choices()
  if not variants:
    raise ValueError("config.variants is empty; name at least one position "
                     f"encoding of {choices}")
  bad = [v for v in variants if v not in choices]
  if bad:
    raise ValueError(f"config.variants={variants!r}: {bad} not in "
                     f"{choices}{checks.close_matches(bad[0], choices)}")
  if len(set(variants)) != len(variants):
    raise ValueError(f"config.variants={variants!r} repeats a name")
  entries = _entries(config)
  if config.train.data.task is not None:
    # A task-trained study (configs/algorithmic_study.py) has no held-out
    # text: only evaluations without documents can run on it.
    text = [e.name for e in entries if e.evaluator.needs_documents
            and e.settings is not None and e.models]
    if text:
      raise ValueError(f"config.train.data.task={config.train.data.task!r}: "
                       f"the study models text: the evaluations {text} "
                       "score held-out documents; use None, or only "
                       "evaluations without documents (algorithmic, passkey, "
                       "ruler)")
  for variant in variants:
    trainer.validate_config(variant_config(config, variant, workdir=""))
    if config.get("from_zoo"):
      zoo_build.study_preset(variant_config(config, variant, ""), variant)
  study_finetune.validate(config, variants, variant_config)


def variant_choices() -> tuple[str, ...]:
  """What config.variants may name: a position encoding (``modeling.
  pe_choices()``), or a zoo family (``zoo.families()``: irope, gemma3,
  qk-norm, harpe, p-rope, ssmax, ...) whose architecture is trained at the
  study's sizes (config.model.preset = "<family>-tiny")."""
  from extrapolax.models import zoo  # pylint: disable=g-import-not-at-top
  pes = modeling.pe_choices()
  return pes + tuple(f for f in zoo.families() if f not in pes)


def variant_config(config, variant: str,
                   workdir: str) -> ml_collections.ConfigDict:
  """The training config of one variant: config.train with model.pe set
  (or, for a zoo family that is no pe name, model.preset = its tiny preset).

  The runs share one token store folder, WORKDIR/data, unless
  config.train.data.cache_dir names one.
  """
  train = config.train.copy_and_resolve_references()
  train.unlock()
  if variant in modeling.pe_choices():
    train.model.pe = variant
  else:
    train.model.preset = f"{variant}-tiny"
  if train.data.cache_dir is None and workdir:
    train.data.cache_dir = os.path.join(os.path.abspath(workdir), "data")
  return train


# ----------------------------------------------------------------------------
# Evaluations.


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of one trained variant.

  Attributes:
    name: "<experiment>/<variant>", its key in evaluations.json.
    variant: the trained model it evaluates.
    settings: everything besides the model that decides its records (the
      evaluator's validated settings, and its type).
    evaluate: (model, eval documents, labels) -> records.
    experiment: the config.evals entry's name (the records' experiment).
    needs_documents: whether evaluate reads the eval documents.
    seeds: the study seeds it runs on (None: every one).
  """
  name: str
  variant: str
  settings: dict
  evaluate: Callable[[Any, list, dict], list]
  experiment: str = ""
  needs_documents: bool = True
  seeds: Optional[tuple] = None


def _evaluate(entry: _Entry, settings: dict):
  def evaluate(model, documents, labels):
    labels = dict(labels, experiment=entry.name)
    records = entry.evaluator.run(model, documents, dict(settings), labels)
    return [r if r.get("experiment") else dict(r, experiment=entry.name)
            for r in records]
  return evaluate


def evaluations(config) -> list[Evaluation]:
  """The study's evaluations, in the order they run: variant by variant,
  each variant's config.evals entries in name order."""
  entries = [e for e in _entries(config) if e.settings is not None]
  out = []
  for variant in study_finetune.all_variants(config):
    for entry in entries:
      if variant in entry.models:
        out.append(Evaluation(
            f"{entry.name}/{variant}", variant,
            dict(entry.settings, type=entry.type),
            _evaluate(entry, entry.settings), entry.name,
            entry.evaluator.needs_documents, entry.seeds))
  return out
