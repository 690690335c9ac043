"""What the absl mains (train, extrapolation) share on the command line:
``--help`` without the required flags, ``--config_help`` (every
``--config.*`` field with its default and one line), and one-line errors for
a ``--config.*`` field the config does not have.

The one-liners come from where the fields are written down: the config
file's docstring ``Fields:`` section, ``configs.base_config``'s docstring,
the comments of ``modeling.MODEL_FIELDS`` and each evaluator plug-in's
``help`` (``config.evals.<name>.<setting>``).
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from typing import Optional, Sequence

from extrapolax.experiments import configs

__all__ = ["HELP_FLAGS", "maybe_print_help", "parse_known", "config_spec",
           "bad_field_message", "field_docs", "config_help"]

HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def maybe_print_help(argv: Sequence[str], doc: str, prog: str) -> None:
  """Prints ``doc`` and the common flags and exits 0 when argv asks for
  help (before any check of required flags)."""
  if not any(a in HELP_FLAGS for a in argv[1:]):
    return
  print(f"usage: python -m {prog} --config=PATH[:ARGS] --workdir=DIR "
        "[--config.FIELD=VALUE ...]\n")
  print(inspect.cleandoc(doc or ""))
  print("\nflags:\n"
        "  --config: a config file, optionally with ':ARGS' (a packaged "
        "config by name, e.g. extrapolation.py:quick)\n"
        "  --config.FIELD=VALUE: override one field (--config_help lists "
        "them)\n"
        "  --workdir: the output folder (a rerun resumes it)\n"
        "  --config_help: list the --config.* fields with their defaults\n"
        "  absl's flags (--verbosity, --logtostderr, ...) also apply.")
  sys.exit(0)


def config_spec(argv: Sequence[str], default: Optional[str]) -> Optional[str]:
  """The ``--config`` value in argv (default when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _leaf_paths(config, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if hasattr(value, "keys") and not isinstance(value, dict):
      out += [path] + _leaf_paths(value, path + ".")
    else:
      out.append(path)
  return out


def bad_field_message(argv: Sequence[str], config) -> Optional[str]:
  """One line for the first ``--config.PATH=...`` that ``config`` lacks
  (with close matches), or None."""
  paths = _leaf_paths(config)
  for arg in argv:
    if not arg.startswith("--config.") or arg.startswith("--config_"):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    if path in paths:
      continue
    parent, _, leaf = path.rpartition(".")
    siblings = [p.rpartition(".")[2] for p in paths
                if p.rpartition(".")[0] == parent]
    close = [f"{parent}.{c}" if parent else c for c in
             difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)]
    close = close or difflib.get_close_matches(path, paths, n=2, cutoff=0.8)
    hint = (f"; did you mean {' or '.join('--config.' + c for c in close)}?"
            if close else "; --config_help lists the fields")
    return f"--config.{path}: the config has no field {path!r}{hint}"
  return None


def parse_known(flag_values, argv: Sequence[str],
                default_config: Optional[str]) -> list[str]:
  """``flag_values(argv, known_only=True)``, a field the config lacks
  raised as a one-line ValueError."""
  try:
    return flag_values(argv, known_only=True)
  except (AttributeError, KeyError) as e:
    raise ValueError(one_line(e, argv, default_config)) from None


def flag_error_line(error) -> str:
  """A flag error as one line: ml_collections wraps an exception raised
  while loading a --config file (e.g. an unknown ':ARGS' value) in a
  message carrying its whole traceback; keep the flag and the exception's
  own last line."""
  text = str(error)
  if "Traceback (most recent call last)" not in text:
    return text
  head = text.split("Error whilst parsing config file")[0].rstrip(" :")
  last = [line for line in text.splitlines() if line.strip()][-1].strip()
  return f"{head}: {last}"


def exit_on_flag_error(error) -> None:
  """A main's flag error: one line on stderr, then exit status 1."""
  sys.stderr.write(f"FATAL Flags parsing error: {flag_error_line(error)}\n"
                   "Pass --help to see help on flags, --config_help for "
                   "the config fields.\n")
  sys.exit(1)


def one_line(error, argv, default_config) -> str:
  """A --config.* typo as one line (close matches when the config loads)."""
  spec = config_spec(argv, default_config)
  if spec:
    try:
      message = bad_field_message(argv, configs.get_config(spec))
    except Exception:  # pylint: disable=broad-except
      message = None
    if message:
      return message
  return "bad --config override: " + " ".join(str(error).split())


def _docstring_fields(text: Optional[str]) -> dict[str, str]:
  """``Fields:`` entries of a docstring: {"a.b": "one line", ...}."""
  if not text or "Fields:" not in text:
    return {}
  lines = inspect.cleandoc(text).split("Fields:", 1)[1].splitlines()
  out, names, indent = {}, None, None
  for line in lines:
    if not line.strip():
      if names is not None:
        break
      continue
    width = len(line) - len(line.lstrip())
    if indent is None:
      indent = width
    if width < indent:
      break
    match = re.match(r"\s*([\w.]+(?:,\s*[\w.]+)*):\s*(.*)", line)
    if width == indent and match:
      names = [n.strip() for n in match.group(1).split(",")]
      for n in names:
        out[n] = match.group(2).strip()
    elif names:
      for n in names:
        out[n] = (out[n] + " " + line.strip()).strip()
  return _split_inline(out)


_INLINE = re.compile(r"([a-z_][\w.]*(?:,\s*[a-z_][\w.]*)*):\s+(.+)")


def _split_inline(entries: dict[str, str]) -> dict[str, str]:
  """Entries written inside another's text ("... steps. checkpoint_every,
  keep_checkpoints: orbax checkpoints.") become entries of their own."""
  out = dict(entries)
  for name, text in entries.items():
    sentences = re.split(r"(?<=\.)\s+", text)
    kept, current = [], None
    for sentence in sentences:
      match = _INLINE.fullmatch(sentence) if kept else None
      if match:
        current = [n.strip() for n in match.group(1).split(",")]
        for n in current:
          out[n] = match.group(2)
      elif current:
        for n in current:
          out[n] += " " + sentence
      else:
        kept.append(sentence)
    out[name] = " ".join(kept)
  return out


def _model_field_comments() -> dict[str, str]:
  from extrapolax.attention import masks as masks_lib  # pylint: disable=import-outside-toplevel
  from extrapolax.experiments import modeling  # pylint: disable=import-outside-toplevel
  source = inspect.getsource(modeling)
  block = source.split("MODEL_FIELDS", 1)[1].split("}", 1)[0]
  out = {m.group(1): m.group(2).strip() for m in re.finditer(
      r'"(\w+)":[^#\n]*#\s*(.*)', block)}
  # The vocabularies, read from where they are defined.
  out["pe"] = "position encoding, one of " + ", ".join(modeling.pe_choices())
  out["mask"] = ("a mask as text, one of " + ", ".join(
      masks_lib.describe_names()) + ", e.g. \"lambda(num_sinks=4, "
                 "window=64)\"")
  return out


def field_docs(config, config_path: str) -> dict[str, str]:
  """{field path: description} for ``config`` (a training or study
  config) from the docstrings and comments named in the module docstring."""
  docs = {}
  train_docs = _docstring_fields(configs.base_config.__doc__)
  train_docs.update({f"model.{k}": v
                     for k, v in _model_field_comments().items()})
  study = "train" in config
  prefix = "train." if study else ""
  docs.update({prefix + k: v for k, v in train_docs.items()})
  try:
    module = configs.load(config_path.partition(":")[0])
    docs.update(_docstring_fields(module.__doc__))
  except Exception:  # pylint: disable=broad-except
    pass
  if "evals" in config:
    from extrapolax.experiments import evals  # pylint: disable=import-outside-toplevel
    for name in config.evals.keys():
      try:
        evaluator = evals.get(config.evals[name].get("type"))
      except ValueError:
        continue
      docs[f"evals.{name}.type"] = ("the evaluator: one of "
                                    f"{', '.join(evals.names())} or "
                                    "'package.module:function'")
      for key, text in evaluator.help.items():
        docs[f"evals.{name}.{key}"] = text
      docs.setdefault(f"evals.{name}.seeds",
                      "the study seeds it runs on, comma-separated (the "
                      "runner's setting; '': every seed)")
  return docs


def _describe(path: str, docs: dict) -> str:
  parts = path.split(".")
  for i in range(len(parts), 0, -1):   # the field, else its nearest parent
    text = docs.get(".".join(parts[:i]))
    if text:
      return text if i == len(parts) else f"({'.'.join(parts[:i])}) {text}"
  return ""


def config_help(config, config_path: str, width: int = 100) -> str:
  """Every leaf field of ``config`` as ``--config.PATH=DEFAULT  one line``."""
  docs = field_docs(config, config_path)
  lines = [f"--config.* fields of {config_path} (default values):", ""]
  for path in _leaf_paths(config):
    value = config
    for part in path.split("."):
      value = value[part]
    if hasattr(value, "keys") and not isinstance(value, dict):
      continue
    text = _describe(path, docs)
    if len(text) > width:
      text = text[:width - 3].rstrip() + "..."
    lines.append(f"  --config.{path}={value!r}")
    if text:
      lines.append(f"      {text}")
  return "\n".join(lines)
