"""Attention masks as small composable value objects, and the block classifier.

A mask says which (query, key) pairs may attend, as a predicate on absolute
positions: query position ``i`` and key position ``j``. Without explicit
positions, query ``t`` of ``T`` sits at ``i = S - T + t`` and key ``j`` at ``j``
(bottom-right alignment, as in DESIGN.md).

Each mask offers three views of the same set:

* ``mask(q_pos, k_pos)``: a broadcasting ``jnp`` predicate, usable on index
  blocks inside a chunked loop or a kernel;
* ``mask.materialize(q_len, kv_len)``: the dense ``bool[q_len, kv_len]``;
* ``mask.block_visibility(q_lo, q_hi, k_lo, k_hi)``: for rectangles of
  positions (inclusive bounds), whether *some* pair may be visible and whether
  *all* pairs are. "some" may over-approximate and "all" may under-approximate;
  both are exact for the primitive masks on rectangles.

A mask may differ by query head (``PerHead``; LongLoRA's shifted groups,
MoA's window per head): ``mask.per_head`` is then True, the predicate and
``block_visibility`` take a ``head`` index array that broadcasts with the
positions, and ``head=None`` in ``block_visibility`` means "some head" (the
union: what a classifier shared by all heads needs). ``dot_product_attention``
binds such a mask to its call's heads (``mask.for_heads(N, K)``).

Masks combine with ``&`` and ``|``; they are frozen dataclasses, so equal masks
compare equal and hash alike (they are static arguments under ``jax.jit``).
Segment ids are not part of a mask: ``dot_product_attention`` applies them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from extrapolax.common import checks
from extrapolax.common import geometry
from extrapolax.common.checks import check_int

# Mask sizes stay below 2**31: positions and distances are int32 on the
# device, so a larger window would overflow inside jax instead of failing here.
MAX_SIZE = 2**31 - 1
from extrapolax.common.geometry import (EMPTY, PARTIAL, FULL, block_minmax,
                                        default_positions)

__all__ = [
    "Mask", "Causal", "SlidingWindow", "Lambda", "Chunked", "PrefixLM",
    "And", "Or", "Dilated", "Strided", "GlobalTokens", "PerHead",
    "shifted_sparse", "window_per_head", "dilated_heads", "EMPTY", "PARTIAL", "FULL", "classify_blocks",
    "block_minmax", "default_positions", "as_mask",
    "register", "names", "parameters", "from_name", "parse", "label",
]


class Mask:
  """Base class. Subclasses are frozen dataclasses.

  A head-independent mask implements ``__call__(q_pos, k_pos)`` and
  ``block_visibility(q_lo, q_hi, k_lo, k_hi)``; a per-head one (``PerHead``)
  also takes ``head=``. Callers go through ``geometry.mask_predicate``, which
  passes ``head`` only to masks whose ``per_head`` is True.
  """

  # True when the mask differs by query head (PerHead, or a combination
  # holding one).
  per_head = False

  def __call__(self, q_pos, k_pos):
    """bool array: may query position ``q_pos`` see key position ``k_pos``."""
    raise NotImplementedError

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    """(some_visible, all_visible) for position rectangles (bounds inclusive)."""
    raise NotImplementedError

  @property
  def head_count(self) -> Optional[int]:
    """Head groups the mask tells apart (None: the same for every head)."""
    return None

  @property
  def head_layout(self) -> Optional[tuple[int, int]]:
    """(query heads N, key/value heads K) once bound by ``for_heads``."""
    return None

  def for_heads(self, num_heads: int, num_kv_heads: int) -> "Mask":
    """The mask bound to a call with N query and K key/value heads."""
    del num_heads, num_kv_heads
    return self

  def materialize(self, q_len: int, kv_len: int,
                  num_heads: Optional[int] = None) -> jax.Array:
    """Dense ``bool[q_len, kv_len]`` with the bottom-right alignment.

    A per-head mask gives ``bool[num_heads, q_len, kv_len]`` (``num_heads``
    defaults to ``head_count``).
    """
    q_pos, k_pos = default_positions(q_len, kv_len)
    if not self.per_head:
      if num_heads is not None:
        raise ValueError(f"num_heads={num_heads} is for per-head masks; "
                         f"{self!r} is the same for every head")
      return jnp.asarray(self(q_pos[:, None], k_pos[None, :]))
    n = self.head_count if num_heads is None else num_heads
    bound = self.for_heads(n, 1)
    head = jnp.arange(n, dtype=jnp.int32)[:, None, None]
    return jnp.broadcast_to(bound(q_pos[None, :, None], k_pos[None, None, :],
                                  head=head), (n, q_len, kv_len))

  def __and__(self, other: "Mask") -> "Mask":
    return And(self, as_mask(other, "right operand of &"))

  def __or__(self, other: "Mask") -> "Mask":
    return Or(self, as_mask(other, "right operand of |"))


def as_mask(mask, what: str = "mask") -> Optional[Mask]:
  """Validates that ``mask`` is a Mask (or None)."""
  if mask is None or isinstance(mask, Mask):
    return mask
  raise ValueError(
      f"{what} must be an extrapolax.attention.masks.Mask (Causal, "
      f"SlidingWindow, Lambda, Chunked, PrefixLM, Dilated, Strided, "
      f"GlobalTokens, PerHead or a combination) or None, got {mask!r}")


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key ``j`` is visible to query ``i`` iff ``j <= i``."""

  def __call__(self, q_pos, k_pos):
    return k_pos <= q_pos

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    return k_lo <= q_hi, k_hi <= q_lo


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class SlidingWindow(Mask):
  """A window of keys around each query.

  ``SlidingWindow(window)``: causal, ``window`` keys, the query's own
  included: visible iff ``0 <= i - j < window`` (Mistral, Longformer's
  decoder form). ``SlidingWindow(left=l, right=r)``: two-sided, visible iff
  ``-r <= i - j <= l``: ``l`` keys before the query, itself, ``r`` after
  (``l + r + 1`` keys). That is ``jax.nn.dot_product_attention``'s
  ``local_window_size=(l, r)``; jax's single int ``w`` means ``(w, w)``,
  which is ``SlidingWindow(left=w, right=w)``, not ``SlidingWindow(w)``
  (``SlidingWindow(w) == SlidingWindow(left=w - 1, right=0)``).
  """
  left: int
  right: int

  def __init__(self, window: Optional[int] = None, *, left=None, right=None):
    if window is not None:
      if left is not None or right is not None:
        raise ValueError(
            f"SlidingWindow takes window (causal, window keys) or left and "
            f"right (two-sided), not both; got window={window!r}, "
            f"left={left!r}, right={right!r}")
      left, right = check_int("window", window, 1, MAX_SIZE) - 1, 0
    elif left is None or right is None:
      raise ValueError(f"SlidingWindow needs window=W or both left= and "
                       f"right=; got left={left!r}, right={right!r}")
    object.__setattr__(self, "left", check_int("left", left, 0, MAX_SIZE))
    object.__setattr__(self, "right", check_int("right", right, 0, MAX_SIZE))

  @property
  def window(self) -> int:
    """Keys a query sees away from the edges: ``left + right + 1``."""
    return self.left + self.right + 1

  def __repr__(self):
    if self.right == 0:
      return f"SlidingWindow({self.window})"
    return f"SlidingWindow(left={self.left}, right={self.right})"

  def __call__(self, q_pos, k_pos):
    d = q_pos - k_pos
    return (d >= -self.right) & (d <= self.left)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = q_lo - k_hi, q_hi - k_lo
    some = (d_max >= -self.right) & (d_min <= self.left)
    return some, (d_min >= -self.right) & (d_max <= self.left)


@dataclasses.dataclass(frozen=True)
class Lambda(Mask):
  """LM-Infinite's Lambda mask: causal and (``j < num_sinks`` or ``i - j < window``)."""
  num_sinks: int
  window: int

  def __post_init__(self):
    object.__setattr__(self, "num_sinks",
                       check_int("num_sinks", self.num_sinks, 0, MAX_SIZE))
    object.__setattr__(self, "window",
                       check_int("window", self.window, 1, MAX_SIZE))

  def __call__(self, q_pos, k_pos):
    d = q_pos - k_pos
    return (d >= 0) & ((k_pos < self.num_sinks) | (d < self.window))

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = q_lo - k_hi, q_hi - k_lo
    band_some = (d_max >= 0) & (d_min < self.window)
    sink_some = (k_lo <= q_hi) & (k_lo < self.num_sinks)
    # Every key is causal, and every key past the sinks is within the window
    # of the farthest query.
    first_non_sink = jnp.maximum(k_lo, self.num_sinks)
    all_ = (d_min >= 0) & ((k_hi < self.num_sinks) |
                           (q_hi - first_non_sink < self.window))
    return band_some | sink_some, all_


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Block-diagonal chunks: visible iff ``(i - offset) // size == (j - offset) // size``.

  Not causal by itself (Llama 4's chunked attention is ``Causal() & Chunked(n)``).
  ``offset`` shifts the chunk boundaries (LongLoRA's shifted groups).
  """
  size: int
  offset: int = 0

  def __post_init__(self):
    object.__setattr__(self, "size",
                       check_int("size", self.size, 1, MAX_SIZE))
    object.__setattr__(self, "offset",
                       check_int("offset", self.offset, 0, self.size - 1))

  def __call__(self, q_pos, k_pos):
    c, o = self.size, self.offset
    return ((q_pos - o) // c) == ((k_pos - o) // c)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    c, o = self.size, self.offset
    ql, qh, kl, kh = ((x - o) // c for x in (q_lo, q_hi, k_lo, k_hi))
    some = (ql <= kh) & (kl <= qh)
    all_ = (ql == qh) & (kl == kh) & (ql == kl)
    return some, all_


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  """Bidirectional over the first ``prefix_len`` keys, causal after: ``j <= i or j < prefix_len``."""
  prefix_len: int

  def __post_init__(self):
    object.__setattr__(self, "prefix_len",
                       check_int("prefix_len", self.prefix_len, 0,
                                 MAX_SIZE))

  def __call__(self, q_pos, k_pos):
    return (k_pos <= q_pos) | (k_pos < self.prefix_len)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    return ((k_lo <= q_hi) | (k_lo < self.prefix_len),
            (k_hi <= q_lo) | (k_hi < self.prefix_len))


class _Combined(Mask):
  """What And and Or share: head handling of their two operands."""
  left: Mask
  right: Mask

  @property
  def per_head(self):
    return self.left.per_head or self.right.per_head

  @property
  def head_count(self):
    counts = [m.head_count for m in (self.left, self.right)
              if m.head_count is not None]
    return None if not counts else math.lcm(*counts)

  @property
  def head_layout(self):
    return self.left.head_layout or self.right.head_layout

  def for_heads(self, num_heads, num_kv_heads):
    return type(self)(self.left.for_heads(num_heads, num_kv_heads),
                      self.right.for_heads(num_heads, num_kv_heads))

  def _both(self, q_pos, k_pos, head):
    return (geometry.mask_predicate(self.left, q_pos, k_pos, head),
            geometry.mask_predicate(self.right, q_pos, k_pos, head))

  def _both_blocks(self, bounds, head):
    return (geometry.mask_blocks(self.left, *bounds, head=head),
            geometry.mask_blocks(self.right, *bounds, head=head))


@dataclasses.dataclass(frozen=True)
class And(_Combined):
  """Intersection of two masks."""
  left: Mask
  right: Mask

  def __call__(self, q_pos, k_pos, head=None):
    a, b = self._both(q_pos, k_pos, head)
    return a & b

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi, head=None):
    # With head=None each side is its union over heads: "some" stays an
    # over-approximation, "all" exact.
    (s1, a1), (s2, a2) = self._both_blocks((q_lo, q_hi, k_lo, k_hi), head)
    return s1 & s2, a1 & a2


@dataclasses.dataclass(frozen=True)
class Or(_Combined):
  """Union of two masks."""
  left: Mask
  right: Mask

  def __call__(self, q_pos, k_pos, head=None):
    a, b = self._both(q_pos, k_pos, head)
    return a | b

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi, head=None):
    (s1, a1), (s2, a2) = self._both_blocks((q_lo, q_hi, k_lo, k_hi), head)
    return s1 | s2, a1 | a2


# ----------------------------------------------------------------------------
# The vocabulary: mask names, defined here once.
#
# A named mask is a factory (a Mask subclass or a function) taking keyword
# parameters. Model specs (``AttentionSpec(mask=...)``), experiment configs
# (``config.model.mask``), the mask sweep and ``--help`` all read this
# registry, so a mask registered in any module (a user's included) can be
# named everywhere:
#
#   @masks.register("strided")
#   @dataclasses.dataclass(frozen=True)
#   class Strided(masks.Mask):
#     stride: int
#     ...
#
#   AttentionSpec(mask="strided(stride=4)")       # or mask_args={"stride": 4}


@dataclasses.dataclass(frozen=True)
class _Named:
  factory: Callable[..., Mask]
  params: tuple[tuple[str, Any], ...]     # (name, default or _REQUIRED)
  label: Optional[Callable[..., str]]
  doc: str


_REQUIRED = inspect.Parameter.empty
_NAMED: dict[str, _Named] = {}


def register(name: str, factory=None, *, label: Optional[Callable] = None,
             doc: Optional[str] = None):
  """Names a mask factory: ``register("name", factory)`` or a decorator.

  Args:
    name: the name configs and specs use (lowercase, no spaces).
    factory: a Mask subclass or a function of keyword parameters returning a
      Mask; its parameters (names and defaults) are the mask's parameters.
    label: optional ``(**params) -> str`` for record labels (default
      ``name(param=value, ...)``).
    doc: one line for ``--help`` (default: the factory's first doc line).
  Returns:
    ``factory`` (so it works as a decorator).
  """
  if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"a mask name must be lowercase letters, digits and _, "
                     f"got {name!r}")

  def add(factory):
    signature = inspect.signature(factory)
    params = tuple((p.name, p.default)
                   for p in signature.parameters.values()
                   if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    text = doc or (inspect.getdoc(factory) or name).splitlines()[0].replace(
        "``", "")
    _NAMED[name] = _Named(factory, params, label, text)
    return factory

  return add if factory is None else add(factory)


def names() -> tuple[str, ...]:
  """Every registered mask name."""
  return tuple(_NAMED)


def _entry(name: str) -> _Named:
  if name not in _NAMED:
    raise ValueError(f"mask must be one of {names()}, got {name!r}"
                     f"{checks.close_matches(name, names())}")
  return _NAMED[name]


def parameters(name: str) -> dict[str, Any]:
  """``{parameter: default}`` of a named mask (required ones map to
  ``inspect.Parameter.empty``)."""
  return dict(_entry(name).params)


def describe_names() -> dict[str, str]:
  """``{"name(params)": one line}`` for help texts."""
  out = {}
  for name, entry in _NAMED.items():
    args = ", ".join(p if d is _REQUIRED else f"{p}={d}"
                     for p, d in entry.params)
    out[f"{name}({args})" if args else name] = entry.doc
  return out


def from_name(name: str, **params) -> Mask:
  """The named mask with ``params``; unknown or missing parameters raise."""
  entry = _entry(name)
  checks.check_parameters(f"mask {name!r}", params,
                          [p for p, _ in entry.params])
  missing = [p for p, d in entry.params if d is _REQUIRED and p not in params]
  if missing:
    raise ValueError(f"mask {name!r} needs {', '.join(missing)}, got "
                     f"none; e.g. {name}("
                     + ", ".join(f"{p}=..." for p in missing) + ")")
  return as_mask(entry.factory(**params), f"mask {name!r}")


def _literal(text: str, where: str):
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"{where}: {text.strip()!r} is not a number or a "
                     "quoted string") from e


def _top_level_split(text: str) -> list[str]:
  """Splits at commas outside brackets: ``"windows=(8, 16), x=1"`` -> 2."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def parse(text: str) -> tuple[str, dict[str, Any]]:
  """``"name"`` or ``"name(v, k=v, ...)"`` -> (name, params).

  Positional values fill the mask's parameters in order:
  ``"lambda(4, 64)"`` is ``("lambda", {"num_sinks": 4, "window": 64})``.
  """
  if not isinstance(text, str):
    raise ValueError(f"a mask must be given as text such as 'causal' or "
                     f"'sliding_window(window=64)', got {text!r}")
  match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*",
                       text)
  if not match:
    raise ValueError(f"mask {text!r} is not 'name' or 'name(args)'; known "
                     f"names: {names()}")
  name, args = match.group(1), match.group(2)
  order = [p for p, _ in _entry(name).params]
  params: dict[str, Any] = {}
  keywords = False
  for i, part in enumerate(p for p in _top_level_split(args or "")
                           if p.strip()):
    if re.match(r"\s*[A-Za-z_]\w*\s*=", part):
      key, value = part.split("=", 1)
      params[key.strip()] = _literal(value, f"mask {text!r}")
      keywords = True
    elif i < len(order) and not keywords:
      params[order[i]] = _literal(part, f"mask {text!r}")
    else:
      raise ValueError(f"mask {text!r}: positional values must come first "
                       f"and number at most {len(order)}")
  return name, params


def label(name: str, params: Optional[dict[str, Any]] = None) -> str:
  """The record label of a named mask: ``"sliding_window(64)"``, ..."""
  entry = _entry(name)
  params = dict(params or {})
  if entry.label is not None:
    return entry.label(**params)
  if not params:
    return name
  return f"{name}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


def _causal_chunked(chunk: int) -> Mask:
  """Causal within chunks of ``chunk`` tokens (Llama 4's chunked attention)."""
  return Causal() & Chunked(chunk)


register("causal", Causal)
def _sliding_window(window: int) -> Mask:
  """Causal window of ``window`` keys: visible iff ``0 <= i - j < window``."""
  return SlidingWindow(window)


register("sliding_window", _sliding_window,
         label=lambda window: f"sliding_window({window})")
register("lambda", Lambda,
         label=lambda num_sinks, window: f"lambda(sinks={num_sinks}, "
                                         f"window={window})")
register("chunked", _causal_chunked, label=lambda chunk: f"chunked({chunk})")
register("prefix_lm", PrefixLM)


def classify_blocks(mask: Optional[Mask], **kwargs) -> jax.Array:
  """Labels every (query block, key block) pair EMPTY, PARTIAL or FULL.

  ``mask`` is checked to be a Mask (or None); the rest is
  :func:`extrapolax.common.geometry.classify_blocks` (keyword arguments
  q_len, kv_len, block_q, block_k, and optional positions and segment ids).
  """
  return geometry.classify_blocks(as_mask(mask), **kwargs)


# The papers' sparse patterns (defined in sparse_masks.py to keep files
# short; registered there, exported here).
from .sparse_masks import (Dilated, Strided, GlobalTokens, PerHead,  # noqa: E402
                           shifted_sparse, window_per_head, dilated_heads)
