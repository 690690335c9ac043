"""Evaluator plug-ins: what a study's ``config.evals`` entries name.

A study config holds a ConfigDict of named evaluations (big_vision's
``config.evals``)::

  config.evals.length = dict(type="length", models="", multiples=(1, 4), ...)
  config.evals.mine = dict(type="my_pkg.my_module:my_eval", models="rope")

``type`` is a registered evaluator name (``names()``: length, perplexity,
rope_scaling, mask, passkey, algorithmic, ruler) or ``"package.module:attribute"``,
an :class:`Evaluator` or a plain function ``run(model, documents, settings,
labels) -> records``. ``models`` (every evaluator has it) picks the trained
variants the evaluation runs on: comma-separated names, "" for every
variant, "none" for none. The other keys are the evaluator's own settings.

The contract (see experiments/README.md for a complete example):

* ``validate(settings, study) -> dict or None``: ``settings`` is the entry
  as a dict without ``type`` and ``models``; ``study`` the study config.
  Returns the settings the run gets (JSON-able; they are also the
  evaluation's fingerprint, so a change re-runs it), None for nothing to run,
  or raises ValueError naming the bad value and what is allowed.
* ``run(model, documents, settings, labels) -> list of records``: ``model``
  a trained DecoderLM, ``documents`` the held-out token documents (None when
  ``needs_documents`` is False), ``labels`` the record fields the runner
  fixes (model, seed, step, experiment = the entry's name). Records are
  ``records.make_record`` dicts; a record without ``experiment`` gets the
  entry's name.
* ``report(records, out_dir, all_records) -> markdown``: the evaluator's
  report section(s) for its records (one experiment's); ``out_dir`` None
  means tables only (no plots), else PNGs go there and the markdown links
  them; ``all_records`` is every record of the report (e.g. for baseline
  columns). None: ``report.generic_section`` (a table and a line plot per
  metric).
* ``summary(records, all_records) -> markdown`` (optional): what the study
  main prints; None: the report section without plots.

This package imports no JAX: the report reads it without the models.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["Evaluator", "register", "get", "names", "resolve",
           "split_names", "split_numbers", "select_models"]

RunFn = Callable[[Any, Optional[list], dict, dict], list]
ReportFn = Callable[[list, Optional[str], list], str]


def _keep(settings, study):  # pylint: disable=unused-argument
  return dict(settings)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """An evaluator plug-in (see the module docstring for the contract).

  Attributes:
    name: its registered name (or its ``module:attribute`` path).
    run: (model, documents, settings, labels) -> records.
    validate: (settings, study config) -> settings dict or None.
    report: (records, out_dir or None, all_records) -> markdown; None: the
      generic section.
    summary: (records, all_records) -> markdown printed by the study main;
      None: ``report`` without plots.
    needs_documents: whether ``run`` reads the held-out documents.
    metrics: the metrics its records carry, so records without an
      ``experiment`` field (older results) still find their section.
    help: one line per setting, for ``--config_help``.
  """
  name: str
  run: RunFn
  validate: Callable[[dict, Any], Optional[dict]] = _keep
  report: Optional[ReportFn] = None
  summary: Optional[Callable[[list, list], str]] = None
  needs_documents: bool = True
  metrics: tuple = ()
  help: Mapping[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Evaluator] = {}
_BUILTINS_LOADED = False


def register(evaluator: Evaluator, *aliases: str) -> Evaluator:
  """Adds ``evaluator`` under its name (and ``aliases``); returns it."""
  for name in (evaluator.name,) + aliases:
    _REGISTRY[name] = evaluator
  return evaluator


def _load_builtins() -> None:
  global _BUILTINS_LOADED
  if not _BUILTINS_LOADED:
    _BUILTINS_LOADED = True
    # Registration order is the report's section order.
    for module in ("length", "rope_scaling", "mask", "passkey",
                   "algorithmic", "ruler"):
      importlib.import_module(f"{__name__}.{module}")


def names() -> tuple[str, ...]:
  """The registered evaluator names, in registration order."""
  _load_builtins()
  return tuple(_REGISTRY)


def get(type_name: str) -> Evaluator:
  """The evaluator a ``type`` names: registered, or ``module:attribute``.

  Raises:
    ValueError: the name is neither, or the attribute is not an Evaluator
      or a callable.
  """
  _load_builtins()
  if not isinstance(type_name, str) or not type_name:
    raise ValueError(f"evaluator type {type_name!r} must be one of "
                     f"{names()} or 'package.module:function'")
  if type_name in _REGISTRY:
    return _REGISTRY[type_name]
  module_name, sep, attribute = type_name.partition(":")
  if not sep or not module_name or not attribute:
    raise ValueError(f"evaluator type {type_name!r} is not one of "
                     f"{names()} nor 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"evaluator type {type_name!r}: cannot import "
                     f"{module_name!r} ({e})") from e
  value = getattr(module, attribute, None)
  if isinstance(value, Evaluator):
    return value
  if callable(value):
    return Evaluator(name=type_name, run=value)
  raise ValueError(f"evaluator type {type_name!r}: {module_name} has no "
                   f"Evaluator or function named {attribute!r}")


def resolve(experiment: str, metric: str,
            types: Optional[Mapping[str, str]] = None
            ) -> Optional[Evaluator]:
  """The evaluator that reports records of ``experiment`` / ``metric``.

  ``types`` maps experiment names to ``type`` strings (a study's
  config.evals); else an experiment named as a registered evaluator is that
  evaluator, else the one whose ``metrics`` hold ``metric``; None: none
  (the report's generic section).
  """
  _load_builtins()
  type_name = (types or {}).get(experiment)
  if type_name:
    try:
      return get(type_name)
    except ValueError:
      return None
  if experiment in _REGISTRY:
    return _REGISTRY[experiment]
  for evaluator in _REGISTRY.values():
    if metric in evaluator.metrics:
      return evaluator
  return None


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside parentheses: "a,lambda(4, 64)" -> two."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def split_names(value) -> tuple:
  """A list setting: "rope,alibi", ("rope,alibi",) or ("rope", "alibi") ->
  ("rope", "alibi"); numbers are kept as they are. Commas inside
  parentheses stay: "causal,lambda(4, 64)" -> ("causal", "lambda(4, 64)")."""
  if isinstance(value, str):
    value = (value,)
  out = []
  for item in value or ():
    if isinstance(item, str):
      out += _split_top_level(item)
    else:
      out.append(item)
  return tuple(out)


def split_numbers(value) -> tuple:
  """A list of numbers: "1,2,4", ("1,2", 4) or (1, 2, 4) -> (1, 2, 4);
  text that is not a number is kept (for the caller's check to name)."""
  out = []
  for item in split_names(value):
    if isinstance(item, str):
      for kind in (int, float):
        try:
          item = kind(item)
          break
        except ValueError:
          pass
    out.append(item)
  return tuple(out)


def select_models(name: str, models, variants: Sequence[str]) -> tuple:
  """``config.evals.<name>.models`` -> the variants it runs on.

  "" (or unset): every variant; "none": none; else comma-separated names,
  each one of ``variants``.
  """
  chosen = split_names(models)
  if not chosen:
    return tuple(variants)
  if chosen == ("none",):
    return ()
  bad = [m for m in chosen if m not in variants]
  if bad:
    raise ValueError(f"config.evals.{name}.models={models!r}: {bad} not in "
                     f"the variants {tuple(variants)} (use '' for every "
                     "variant, 'none' for none)")
  return tuple(v for v in variants if v in chosen)
