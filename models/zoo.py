"""The model zoo: named presets, and checkpoints with orbax.

Presets are ``<family>-<size>``: a position / scaling / mask family in a
"tiny" or a "small" size, each with an :class:`Info` record::

  from extrapolax.models import zoo
  zoo.names()                      # ('alibi-small', 'alibi-tiny', ...)
  zoo.info("rope-yarn-tiny")       # Info(position='rope', scaling='yarn', ...)
  model = zoo.create("alibi-tiny", seed=0)          # random weights
  zoo.save_pretrained(model, "/tmp/alibi-tiny")
  model = zoo.from_pretrained("/tmp/alibi-tiny")    # or a saved run's name
  model = zoo.from_pretrained("alibi-tiny")  # trained weights in the package
  zoo.info("alibi-tiny").card                # recipe, loss, perplexities

The tiny presets ship trained (``zoo_cards``: the package's
``models/pretrained/<name>/``, built by ``python -m
extrapolax.experiments.zoo_build --all``); the small ones are built on demand
with the same command. The hybrids of released models (``irope``: Llama 4,
``gemma3``, ``qk-norm``: Qwen3 / OLMo 2, ``rope-sinks``: gpt-oss's learned
sinks) and the position / softmax methods of 2024-25 papers (``harpe``,
``p-rope``, ``ssmax``, ``head-scale``) ship
without weights in either size (``Info.shipped`` False; their card names
the build command). A family's layer pattern repeats whole: its layer count
is the size's, rounded up to a multiple of the pattern's length (irope-tiny
has 4 layers, gemma3-tiny 6).

Vocabulary: 256 byte ids, no specials. The rope scalings (rope-linear,
-dynamic, -ntk, -yarn, -llama3) and rope-lambda are zero-shot variants of the
rope model (same weights layout; ``Info.weights_from`` names the weights they
run, and ``from_pretrained("rope-yarn-tiny")`` runs saved rope-tiny weights
when there is no rope-yarn-tiny checkpoint).

A checkpoint directory: ``config.json`` (``ModelConfig.to_json``), optional
``info.json``, ``params/`` (the nnx parameters, by orbax: one tensorstore zarr
directory per array, ``params/<array path>/<chunk>``, zstd) and, written last,
``manifest.json`` (each array's shape, dtype and crc32; each file's size and
sha256, config.json and info.json included: ``checkpoint_files``). No
manifest means an interrupted save; a short or changed file is named, with
its array, before orbax reads anything, and a config.json swapped for
another model's is refused even when the shapes agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import logging
import os
import shutil
import uuid
import warnings
import zlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from . import checkpoint_files
from . import pretrained
from . import zoo_cards
from .config import ModelConfig
from .transformer import DecoderLM
from .zoo_families import FAMILIES as _FAMILIES
from .zoo_families import NUM_SINKS, SCALE_FACTOR  # re-exported

__all__ = ["Info", "names", "presets", "families", "info", "config",
           "create",
           "save_pretrained",
           "from_pretrained", "checkpoint_dirs"]

CHECKPOINTS_ENV = "EXTRAPOLAX_CHECKPOINTS"
DEFAULT_CHECKPOINTS = os.path.join("~", ".cache", "extrapolax", "checkpoints")
# Version 2: sha256 of every file, config.json included; version 1 (crc32
# of the params/ files only) still loads, with a warning.
_FORMAT, _VERSION = "extrapolax.checkpoint", 2
_OWN_FILES = ("config.json", "info.json", "manifest.json", "params")

_SIZES: dict[str, dict[str, Any]] = {
    # head_dim 16, grouped-query 4 -> 2; mlp 3 * d_model (SwiGLU).
    "tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, mlp_dim=192, max_len=64),
    # head_dim 32, grouped-query 8 -> 2.
    "small": dict(vocab_size=256, d_model=256, num_layers=6, num_heads=8,
                  num_kv_heads=2, mlp_dim=768, max_len=512),
}


_PRESETS: dict[str, tuple[str, str]] = {
    f"{family}-{size}": (family, size)
    for family in _FAMILIES for size in _SIZES}


@dataclasses.dataclass(frozen=True)
class Info:
  """What a preset is.

  Attributes:
    name: the preset's name, ``<family>-<size>``.
    family: position / scaling / mask family (the name without the size).
    size: "tiny" or "small".
    position: position scheme ("rope", "alibi", ..., "rope+nope" for hybrid).
    scaling: rope scaling type, "none" when unscaled.
    scale: the scaling factor relative to train_len (1.0 when unscaled).
    mask: "causal", "sliding_window(W)" or "lambda(sinks=S, window=W)".
    train_len: the training length (``ModelConfig.max_len``).
    num_params: parameter count (from nnx.eval_shape; no weights built).
    weights_from: the preset whose trained weights this one runs (itself,
      except for the zero-shot rope variants, which run the rope model's).
    shipped: whether the package ships its tiny size trained.
    description: one line.
    card: the model card of its trained weights (``zoo_cards.card``: recipe,
      tokens seen, final loss, held-out perplexity at 1x-16x train_len,
      passkey accuracy, logits fingerprint), or ``{"trained": False, "build": command}``.
  """
  name: str
  family: str
  size: str
  position: str
  scaling: str
  scale: float
  mask: str
  train_len: int
  num_params: int
  weights_from: str
  description: str
  card: Optional[Mapping[str, Any]] = None
  shipped: bool = True


def names() -> tuple[str, ...]:
  """All preset names and real pretrained models, sorted."""
  return tuple(sorted([*_PRESETS, *pretrained.MODELS]))


def families() -> tuple[str, ...]:
  """The preset families (a preset is ``<family>-<size>``)."""
  return tuple(_FAMILIES)


def presets() -> tuple[str, ...]:
  """The preset names only (names() also lists real pretrained models)."""
  return tuple(sorted(_PRESETS))


def _lookup(name) -> tuple[str, str]:
  if not isinstance(name, str) or name not in _PRESETS:
    close = difflib.get_close_matches(str(name), list(_PRESETS), n=3,
                                      cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
    raise ValueError(
        f"unknown preset {name!r}{hint} Presets are <family>-<size> with "
        f"family in {tuple(_FAMILIES)} and size in {tuple(_SIZES)} "
        "(zoo.names() lists them)")
  return _PRESETS[name]


def info(name: str):
  """The preset's info record, with the card of its trained weights (a
  PretrainedInfo for a real model)."""
  if isinstance(name, str) and name in pretrained.MODELS:
    return pretrained.info(name)
  record = _info(*_lookup(name))
  return dataclasses.replace(record, card=zoo_cards.card(
      record.name, record.weights_from, checkpoint_dirs()))


@functools.cache
def _info(family: str, size: str) -> Info:
  fam = _FAMILIES[family]
  train_len = _SIZES[size]["max_len"]
  abstract = nnx.eval_shape(
      lambda: DecoderLM(_config(family, size, {}), rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree_util.tree_leaves(
      nnx.state(abstract, nnx.Param)))
  return Info(
      name=f"{family}-{size}", family=family, size=size,
      position=fam.position, scaling=fam.scaling,
      scale=SCALE_FACTOR if fam.scaling != "none" else 1.0,
      mask=fam.mask(train_len), train_len=train_len, num_params=int(count),
      weights_from=f"rope-{size}" if fam.zero_shot else f"{family}-{size}",
      description=fam.description, shipped=fam.shipped and size == "tiny")


def _config(family: str, size: str, overrides: Mapping[str, Any]):
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig override(s) {unknown}; allowed: "
                     f"{sorted(fields)}")
  kwargs = dict(_SIZES[size])
  fam = _FAMILIES[family]
  pattern = len(fam.specs(kwargs["max_len"]))
  kwargs["num_layers"] = -(-kwargs["num_layers"] // pattern) * pattern
  kwargs.update(overrides)
  kwargs.setdefault("attention", fam.specs(kwargs["max_len"]))
  kwargs.setdefault("absolute", fam.absolute)
  return ModelConfig(**kwargs)


def config(name: str, **overrides) -> ModelConfig:
  """The preset's ModelConfig, with ``overrides`` replacing its fields.

  Overriding ``max_len`` moves the training length: windows and the rope
  scalings' original length follow it (unless ``attention`` is overridden).
  """
  return _config(*_lookup(name), overrides)


def create(name: str, *, rngs: Optional[nnx.Rngs] = None,
           seed: Optional[int] = None, **overrides) -> DecoderLM:
  """A preset with random weights (``seed`` or ``rngs``; default seed 0)."""
  cfg = config(name, **overrides)
  if rngs is not None and seed is not None:
    raise ValueError(f"give rngs or seed, not both (seed={seed})")
  return DecoderLM(cfg, rngs=rngs if rngs is not None else nnx.Rngs(
      0 if seed is None else seed))


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_dirs() -> tuple[str, ...]:
  """Where named checkpoints live, searched in order.

  The directories in ``$EXTRAPOLAX_CHECKPOINTS`` (os.pathsep-separated), then
  ``~/.cache/extrapolax/checkpoints``, then the trained tiny presets shipped
  in the package (``zoo_cards.PACKAGED_DIR``). A run named N is ``<dir>/N/``.
  """
  env = os.environ.get(CHECKPOINTS_ENV, "")
  dirs = [os.path.expanduser(d) for d in env.split(os.pathsep) if d]
  dirs.append(os.path.expanduser(DEFAULT_CHECKPOINTS))
  dirs.append(zoo_cards.PACKAGED_DIR)
  return tuple(dict.fromkeys(dirs))


def _flatten(tree) -> dict[str, Any]:
  """{'blocks.0.attn.q_proj.kernel': leaf} in pytree order."""
  return {".".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _crc32(array: np.ndarray) -> str:
  data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
  return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


@contextlib.contextmanager
def quiet_orbax(threshold: int = logging.ERROR):
  """Keeps orbax's absl logs below ``threshold`` quiet (INFO chatter, a
  no-OCDBT warning); the training checkpoints reuse it."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(max(level, threshold))
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  # Synchronous (save returns once committed); one zarr directory per array
  # (no OCDBT database), so every file belongs to one named array.
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))


_write_json = checkpoint_files.write_json_atomic


def _check_target(path: str, overwrite: bool) -> bool:
  """Whether ``path`` holds a checkpoint to replace; raises if it may not."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"checkpoint path {path} is a file, not a directory")
  entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
  if not entries:
    return False
  if not overwrite:
    raise ValueError(f"{path} already exists and is not empty ({entries}); "
                     "pass overwrite=True to replace the checkpoint there")
  foreign = [e for e in entries if e not in _OWN_FILES]
  if foreign:
    raise ValueError(f"{path} holds files that are not part of a checkpoint "
                     f"({foreign}); refusing to delete them even with "
                     "overwrite=True")
  return True


def save_pretrained(model: DecoderLM, path, *, info=None,
                    overwrite: bool = False) -> str:
  """Writes ``model`` as a checkpoint directory; returns its absolute path.

  Args:
    model: a DecoderLM (its ``config`` goes to config.json).
    path: the directory; it must be absent or empty unless ``overwrite``.
    info: optional metadata for info.json: an :class:`Info` or a JSON-able
      mapping (training run, data, steps...).
    overwrite: replace an existing checkpoint at ``path``.
  """
  if not isinstance(model, DecoderLM) or not isinstance(
      getattr(model, "config", None), ModelConfig):
    raise ValueError(f"save_pretrained needs a DecoderLM, got "
                     f"{type(model).__name__}")
  info = dataclasses.asdict(info) if isinstance(info, Info) else info
  if info is not None and not isinstance(info, Mapping):
    raise ValueError(f"info must be an Info or a mapping, got {info!r}")
  try:
    info_json = None if info is None else json.dumps(dict(info), indent=2,
                                                     sort_keys=True)
  except TypeError as e:
    raise ValueError(f"info is not JSON-serialisable: {e}") from e
  other = jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)))
  if other:
    raise ValueError(f"model holds {len(other)} non-parameter state arrays; "
                     "checkpoints store parameters only")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  arrays = {k: np.asarray(jax.device_get(v))
            for k, v in _flatten(params).items()}
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  replace = _check_target(path, overwrite)
  # Written beside the target and renamed into place, so a failed save never
  # costs the checkpoint it was to replace.
  staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}"
                         f".saving-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.makedirs(staging)
  try:
    _write_json(os.path.join(staging, "config.json"), model.config.to_json())
    if info_json is not None:
      _write_json(os.path.join(staging, "info.json"), info_json)
    params_path = os.path.join(staging, "params")
    with quiet_orbax(), _checkpointer() as checkpointer:
      checkpointer.save(params_path, params)
    checkpoint_files.write_manifest(staging, {
        "format": _FORMAT, "version": _VERSION, "checksum": "sha256",
        "num_params": int(sum(a.size for a in arrays.values())),
        "arrays": {k: {"shape": list(a.shape), "dtype": _dtype_name(a.dtype),
                       "crc32": _crc32(a)} for k, a in arrays.items()},
        "files": checkpoint_files.describe_files(staging)})
    if replace:   # manifest first: a crash mid-swap leaves it incomplete
      if os.path.exists(os.path.join(path, "manifest.json")):
        os.remove(os.path.join(path, "manifest.json"))
      shutil.rmtree(path)
    os.replace(staging, path)     # path is absent or an empty directory
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return path


def _read_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"damaged checkpoint: cannot read {what} {path}: "
                     f"{e}") from e


_first_line = checkpoint_files.innermost_line


def _check_arrays(stored: Mapping[str, tuple], expected: Mapping[str, tuple],
                  stored_where: str, expected_where: str) -> None:
  """Same names, shapes and dtypes, or ValueError naming the first misfit."""
  missing = [k for k in expected if k not in stored]
  extra = [k for k in stored if k not in expected]
  if missing or extra:
    raise ValueError(
        f"{stored_where} and {expected_where} disagree: arrays missing from "
        f"{stored_where}: {missing}; arrays {expected_where} does not have: "
        f"{extra}")
  bad = []
  for k, (shape, dtype) in expected.items():
    got_shape, got_dtype = stored[k]
    if tuple(got_shape) != tuple(shape):
      bad.append(f"{k}: shape {tuple(got_shape)} in {stored_where}, "
                 f"{tuple(shape)} expected by {expected_where}")
    elif got_dtype != dtype:
      bad.append(f"{k}: dtype {got_dtype} in {stored_where}, {dtype} "
                 f"expected by {expected_where}")
  if bad:
    more = f" (and {len(bad) - 1} more arrays disagree)" if len(bad) > 1 else ""
    raise ValueError(bad[0] + more)


def _read_manifest(directory: str) -> dict:
  manifest = checkpoint_files.read_manifest(directory, fmt=_FORMAT,
                                            versions=(1, _VERSION))
  try:
    manifest["listed"] = {k: (tuple(v["shape"]), str(v["dtype"]),
                              str(v["crc32"]))
                          for k, v in manifest["arrays"].items()}
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise checkpoint_files.CheckpointError(
        f"damaged checkpoint: {directory}/manifest.json is malformed "
        f"({type(e).__name__}: {e})") from e
  return manifest


def _check_files(directory: str, manifest: dict) -> None:
  """Every file saved is there, whole and unchanged (before reading).

  Version 2 lists every file (config.json too) relative to the checkpoint;
  version 1 listed the params/ files only, with crc32.
  """
  files = manifest["files"]
  if manifest["version"] == 1:
    warnings.warn(f"{directory} has a version 1 manifest, which does not "
                  "cover config.json; save it again to checksum it",
                  stacklevel=3)
    files = {f"params/{name}": entry for name, entry in files.items()}

  def owner(name):
    parts = name.split("/")
    if parts[0] != "params" or len(parts) < 2:
      return "the model's config" if name == "config.json" else "metadata"
    return (f"array {parts[1]}" if parts[1] in manifest["listed"]
            else "orbax's metadata")

  checkpoint_files.check_files(directory, files, where=directory,
                               owner=owner)


def _load(directory: str) -> tuple[ModelConfig, dict]:
  """Checked config and parameter pure dict of a checkpoint directory."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{directory} is not a checkpoint: it has no "
                     "config.json")
  manifest = _read_manifest(directory)
  try:
    cfg = ModelConfig.from_dict(_read_json(config_path, "config"))
  except (TypeError, ValueError) as e:
    raise ValueError(f"bad config.json in {directory}: {e}") from e
  listed = {k: v[:2] for k, v in manifest["listed"].items()}

  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  expected = {k: (tuple(x.shape), _dtype_name(x.dtype))
              for k, x in _flatten(target).items()}
  _check_arrays(listed, expected, "checkpoint", "config.json")
  _check_files(directory, manifest)

  params_path = os.path.join(directory, "params")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      target)
  # The file checksums cover orbax's metadata too, so the stored arrays are
  # the manifest's (orbax would cast a dtype silently; the crc32 would not).
  with quiet_orbax(), _checkpointer() as checkpointer:
    try:
      restored = checkpointer.restore(params_path, target)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"damaged checkpoint {directory}: orbax cannot read "
                       f"params/: {_first_line(e)}") from e
  for k, array in _flatten(restored).items():
    array = np.asarray(array)
    if (tuple(array.shape), _dtype_name(array.dtype)) != expected[k]:
      raise ValueError(f"damaged checkpoint {directory}: {k} restored as "
                       f"{array.dtype}{list(array.shape)}, expected "
                       f"{expected[k]}")
    if _crc32(array) != manifest["listed"][k][2]:
      raise ValueError(f"damaged checkpoint {directory}: array {k} fails its "
                       "checksum (its values changed since it was saved)")
  return cfg, restored


def _assemble(cfg: ModelConfig, params: dict) -> DecoderLM:
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree_util.tree_leaves(rest):    # it would stay abstract
    raise ValueError("the model has non-parameter state; checkpoints hold "
                     "parameters only")
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state, rest)


def _zero_shot_config(name: str, base: ModelConfig, directory: str):
  family, _ = _PRESETS[name]
  plain = all(s.position == "rope" and s.rope_scaling is None
              and s.mask == "causal" for s in base.attention)
  if not plain:
    raise ValueError(f"{name} runs the weights of {info(name).weights_from}, "
                     f"but the checkpoint {directory} is not a plain causal "
                     f"rope model: {base.attention}")
  transform = _FAMILIES[family].zero_shot
  return base.replace(attention=tuple(transform(s, base.max_len)
                                      for s in base.attention))


def _refuse_training_workdir(directory: str) -> None:
  """A training run's (or a study's) workdir is not a zoo checkpoint: say
  how to load or export it instead of "no manifest"."""
  if os.path.exists(os.path.join(directory, "manifest.json")):
    return
  runs = os.path.join(directory, "runs")
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    raise ValueError(
        f"{directory} is a training run's workdir, not a zoo checkpoint: "
        f"load it with extrapolax.experiments.trainer.load_model("
        f"{directory!r}) (returns (model, config)), or export it once with "
        f"extrapolax.experiments.trainer.export_pretrained({directory!r}, "
        "OUT_DIR) and then zoo.from_pretrained(OUT_DIR)")
  if os.path.isdir(runs):
    names = sorted(os.listdir(runs))
    raise ValueError(
        f"{directory} is a study's workdir, not a zoo checkpoint; its "
        f"training runs are {[os.path.join(runs, n) for n in names]}: load "
        "one with extrapolax.experiments.trainer.load_model(RUN) or export "
        "it with extrapolax.experiments.trainer.export_pretrained(RUN, "
        "OUT_DIR)")


def _resolve(path_or_name) -> tuple[str, Optional[str]]:
  """(checkpoint directory, zero-shot preset to derive from it or None)."""
  text = os.fspath(path_or_name)
  expanded = os.path.expanduser(text)
  if os.path.isdir(expanded):
    _refuse_training_workdir(expanded)
    return os.path.abspath(expanded), None
  separators = [s for s in (os.sep, os.altsep) if s]
  if any(s in text for s in separators) or text.startswith((".", "~")):
    raise ValueError(f"no checkpoint directory at {text!r}")
  dirs = checkpoint_dirs()
  for d in dirs:
    if os.path.isdir(os.path.join(d, text)):
      return os.path.join(d, text), None
  if text in _PRESETS:
    base = info(text).weights_from
    if base != text:
      for d in dirs:
        if os.path.isdir(os.path.join(d, base)):
          return os.path.join(d, base), text
    saved = f" nor {base!r}" if base != text else ""
    raise ValueError(
        f"no trained weights exist for preset {text!r}: no checkpoint "
        f"{text!r}{saved} in {list(dirs)}. zoo.create({text!r}) builds it "
        "with random weights; to get trained ones, build them with their "
        f"recorded recipe: python -m {zoo_cards.BUILD_MODULE} {base} (into "
        f"{dirs[-2]}), or train and save with zoo.save_pretrained(model, "
        f"os.path.join(dir, {base!r})) in one of those directories (or add "
        f"one to ${CHECKPOINTS_ENV})")
  candidates = [e for d in dirs if os.path.isdir(d) for e in os.listdir(d)
                if not e.startswith(".")] + list(_PRESETS)
  close = difflib.get_close_matches(text, candidates, n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
  raise ValueError(f"{text!r} is neither a checkpoint directory nor a saved "
                   f"checkpoint name in {list(dirs)}{hint}")


def from_pretrained(path_or_name) -> DecoderLM:
  """Loads a checkpoint directory, or a saved checkpoint by name.

  Every array is checked against the model that config.json builds (names,
  shapes, dtypes) and against the manifest's crc32 before the model is
  assembled; any mismatch or damage raises ValueError naming the array, so a
  half-loaded model is never returned.

  Args:
    path_or_name: a directory written by :func:`save_pretrained`, or a name
      looked up as ``<dir>/<name>/`` in :func:`checkpoint_dirs`. A zero-shot
      rope preset (e.g. "rope-yarn-tiny") without a checkpoint of its own
      runs its ``Info.weights_from`` checkpoint. A real pretrained
      model's name (``pretrained.MODELS``, e.g. "smollm2-135m-instruct")
      loads its verified GGUF file with ``load_gguf``.
  """
  if isinstance(path_or_name, str) and path_or_name in pretrained.MODELS:
    return pretrained.load(path_or_name)   # a real model's GGUF
  directory, zero_shot = _resolve(path_or_name)
  cfg, params = _load(directory)
  if zero_shot is not None:
    cfg = _zero_shot_config(zero_shot, cfg, directory)
  return _assemble(cfg, params)
