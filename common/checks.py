"""Argument checks shared by every package: one clear ValueError each.

Each check returns the value normalised (a Python ``int`` or ``float``), so
callers write ``self.window = check_int("window", window, 1)``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable, Optional, Sequence

__all__ = ["check_int", "check_optional_int", "check_number", "check_choice",
           "check_choices", "check_numbers", "check_setting", "check_parameters",
           "close_matches"]


def check_int(name: str, value, minimum: int = 0,
              maximum: Optional[int] = None) -> int:
  """``value`` as an int in [minimum, maximum]; bools and floats refused."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {value}")
  return int(value)


def check_optional_int(name: str, value, minimum: int = 0) -> Optional[int]:
  """None, or ``check_int``."""
  return None if value is None else check_int(name, value, minimum)


def check_number(name: str, value, *, positive: bool = False,
                 minimum: Optional[float] = None,
                 maximum: Optional[float] = None,
                 finite: bool = True) -> float:
  """``value`` as a float: real, finite (unless ``finite=False``), and > 0
  with ``positive``, within [minimum, maximum] when given."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number, got {value!r}")
  value = float(value)
  if math.isnan(value) or (finite and math.isinf(value)):
    raise ValueError(f"{name} must be a finite number, got {value}")
  if positive and value <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {value}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {value}")
  return value


def close_matches(value: Any, allowed: Iterable[str]) -> str:
  """" (did you mean 'x'?)" for a near miss among ``allowed``, else ""."""
  if not isinstance(value, str):
    return ""
  near = difflib.get_close_matches(value, [str(a) for a in allowed], n=2)
  if not near:
    return ""
  return " (did you mean " + " or ".join(repr(n) for n in near) + "?)"


def check_choice(name: str, value, allowed: Sequence) -> Any:
  """``value`` if it is one of ``allowed``; else names both."""
  if value not in tuple(allowed):
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got "
                     f"{value!r}{close_matches(value, allowed)}")
  return value


def check_numbers(name: str, values: Sequence, *, integer: bool = False,
                  minimum: Optional[float] = None,
                  positive: bool = True) -> tuple:
  """Every item of ``values`` a number (an integer with ``integer``),
  > 0 with ``positive``, >= ``minimum`` when given."""
  for v in values:
    ok = (not isinstance(v, bool) and isinstance(v, numbers.Real)
          and math.isfinite(v) and (not positive or v > 0)
          and (minimum is None or v >= minimum)
          and (not integer or int(v) == v))
    if not ok:
      kind = "integers" if integer else "numbers"
      bound = ("positive " if positive else "") + kind
      if minimum is not None:
        bound += f" >= {minimum}"
      raise ValueError(f"{name}={tuple(values)!r} must hold {bound}; got "
                       f"{v!r}")
  return tuple(int(v) if integer else v for v in values)


def check_choices(name: str, values: Sequence, allowed: Sequence) -> tuple:
  """Every item of ``values`` one of ``allowed``."""
  bad = [v for v in values if v not in tuple(allowed)]
  if bad:
    raise ValueError(f"{name}={tuple(values)!r}: {bad} not in "
                     f"{tuple(allowed)}{close_matches(bad[0], allowed)}")
  return tuple(values)


def check_setting(label: str, value, *, integer: bool = False,
                  minimum: Optional[float] = None,
                  maximum: Optional[float] = None,
                  allow_none: bool = False):
  """A config setting: ``label=value must be an integer >= 1`` style errors
  (the label is how the user wrote it, e.g. ``config.batch_size``)."""
  if value is None and allow_none:
    return None
  kind = "an integer" if integer else "a number"
  ok = not isinstance(value, bool) and isinstance(
      value, numbers.Integral if integer else numbers.Real)
  ok = ok and math.isfinite(value)
  ok = ok and (minimum is None or value >= minimum)
  ok = ok and (maximum is None or value <= maximum)
  if not ok:
    bounds = "".join([f" >= {minimum}" if minimum is not None else "",
                      f" and <= {maximum}" if maximum is not None else ""])
    raise ValueError(f"{label}={value!r} must be {kind}{bounds}")
  return value


def check_parameters(what: str, params, allowed: Sequence[str]) -> None:
  """Every key of ``params`` one of ``allowed`` (``what``: "mask 'x'")."""
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    takes = (f"its parameters are {tuple(allowed)}" if allowed
             else "it takes no parameters")
    raise ValueError(f"{what} has no parameter {unknown[0]!r} "
                     f"({unknown[0]}={params[unknown[0]]!r}); {takes}"
                     f"{close_matches(unknown[0], allowed)}")


def build_registered(what: str, registry, name: str, params):
  """``registry[name](**params)`` for a registry of dataclasses: an unknown
  name or a parameter the class does not have raises one line naming it
  ("{what} must be one of ...", "{what} 'name' has no parameter ...")."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  names = tuple(registry)
  if name not in registry:
    raise ValueError(f"{what} must be one of {names}, got {name!r}"
                     f"{close_matches(name, names)}")
  cls = registry[name]
  check_parameters(f"{what} {name!r}", params,
                   tuple(f.name for f in dataclasses.fields(cls)))
  return cls(**params)
