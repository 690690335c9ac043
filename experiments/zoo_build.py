r"""Builds the zoo's trained presets: train, evaluate, write checkpoint + card.

This is the zoo's build command (it lives in experiments/, not in
``extrapolax.models.zoo``, because models/ never imports the trainer)::

  python -m extrapolax.experiments.zoo_build alibi-tiny rope-tiny --out DIR
  python -m extrapolax.experiments.zoo_build --all --out models/pretrained \
      --table models/ZOO.md          # what ships in the package
  python -m extrapolax.experiments.zoo_build --table models/ZOO.md  # table only

Each preset is trained with the recorded recipe (``configs/zoo.py``: the
length-extrapolation study's training, by ``trainer.train``, the train
main's code path) in ``--workdir/<name>-<steps>`` (a rerun resumes or reuses
it), then ``export_run`` evaluates it on the held-out documents
(``data.eval_documents``, ``evaluators.perplexity_vs_length``,
non-overlapping windows at 1, 2, 4, 8, 16 x train_len) and writes
``--out/<name>/`` as ``zoo.save_pretrained`` does, its card in info.json
(``models.zoo_cards``). A zero-shot rope preset (rope-yarn-tiny...) builds
rope-tiny: the rope card holds every zero-shot variant's numbers. ``--all``
builds every tiny preset; small ones are built when named (hours on a CPU).
Default ``--out``: ``~/.cache/extrapolax/checkpoints``, where
``zoo.from_pretrained(name)`` finds them.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from extrapolax.experiments import configs
from extrapolax.experiments import data as data_lib
from extrapolax.experiments import modeling
from extrapolax.experiments import trainer
from extrapolax.experiments.configs import zoo as zoo_config
from extrapolax.experiments.evaluators import passkey as passkey_lib
from extrapolax.experiments.evaluators import perplexity as perplexity_lib
from extrapolax.experiments.evaluators import variants
from extrapolax.models import zoo
from extrapolax.models import zoo_cards

MULTIPLES = (1, 2, 4, 8, 16)
# The study's passkey grid (configs/extrapolation.py's evals.passkey).
PASSKEY = dict(lengths=(256, 512), depths=(0.0, 0.5, 1.0), trials=4)
EVAL_MAX_TOKENS = 16384   # the study's (configs/extrapolation.py)
EVAL_TOKENS_PER_BATCH = 8192
EVAL_IMPLEMENTATION = "xla_chunked"
DEFAULT_WORKDIR = os.path.join("~", ".cache", "extrapolax", "zoo_runs")
_RECIPE_FIELDS = ("train_len", "batch_size", "train_steps", "learning_rate",
                  "warmup_steps", "min_lr_ratio", "weight_decay", "adam_b1",
                  "adam_b2", "grad_clip", "seed")


def base_presets(names: Sequence[str]) -> list[str]:
  """The presets whose weights ``names`` need (zero-shot -> rope), in
  order, once each; an unknown name raises ValueError."""
  out = []
  for name in names:
    base = zoo.info(name).weights_from
    if base not in out:
      out.append(base)
  return out


def recipe(config) -> dict[str, Any]:
  """The card's record of a run's training config."""
  out = {k: config[k] for k in _RECIPE_FIELDS}
  out.update({f"data.{k}": config.data[k] for k in (
      "corpus", "tokenizer", "packing", "eval_fraction", "split_seed")})
  out["optimizer"] = "adamw, linear warmup, cosine decay"
  out["python"] = platform.python_version()   # the stdlib corpus's version
  return out


def _perplexities(model, documents, train_len: int, name: str,
                  max_tokens: int) -> dict[str, Optional[float]]:
  records = perplexity_lib.perplexity_vs_length(
      model, documents, train_len=train_len,
      lengths=[m * train_len for m in MULTIPLES], max_tokens=max_tokens,
      tokens_per_batch=EVAL_TOKENS_PER_BATCH,
      implementation=EVAL_IMPLEMENTATION, position_buckets=0,
      labels={"model": name})
  table = perplexity_lib.perplexity_table(records)
  return {str(k): (None if math.isnan(v) else float(v))
          for k, v in sorted(table.items())}


def _passkey(model, name: str) -> dict[str, Optional[float]]:
  records = passkey_lib.passkey_retrieval(model, labels={"model": name},
                                          **PASSKEY)
  by_length: dict[str, list] = {}
  for r in records:
    by_length.setdefault(str(r["eval_len"]), []).append(r["value"])
  return {k: (None if any(math.isnan(v) for v in values)
              else float(np.mean(values)))
          for k, values in by_length.items()}


def evaluate(model, name: str, documents, *,
             max_tokens: int = EVAL_MAX_TOKENS) -> dict[str, Any]:
  """{perplexity: {eval_len: value}, passkey_accuracy: {length: mean over
  depths}, fingerprint} of ``model`` as preset ``name`` (the card's
  measured part)."""
  train_len = model.config.max_len
  return {"perplexity": _perplexities(model, documents, train_len, name,
                                      max_tokens),
          "passkey_accuracy": _passkey(model, name),
          "fingerprint": zoo_cards.fingerprint(model)}


def export_run(workdir: str, path: str, *, preset: Optional[str] = None,
               max_tokens: int = EVAL_MAX_TOKENS, overwrite: bool = False,
               extra: Optional[dict] = None) -> str:
  """Writes a finished training run as a zoo checkpoint with its card.

  Args:
    workdir: the run's folder (``trainer.train``'s).
    path: the checkpoint directory to write.
    preset: the zoo preset the run trained (default its
      config.model.preset; None: a card without preset or zero-shot parts).
    max_tokens: scored tokens per evaluation length.
    overwrite: replace a checkpoint at ``path``.
    extra: more card fields.

  Returns:
    ``path``, absolute; ``zoo.from_pretrained(path)`` loads it.
  """
  model, config = trainer.load_model(workdir)
  preset = preset or config.model.get("preset")
  metrics = trainer.read_metrics(workdir)
  if not metrics:
    raise ValueError(f"{workdir} has no metrics.jsonl records; is it a "
                     "finished training run?")
  documents = data_lib.eval_documents(config, workdir=workdir)
  name = preset or os.path.basename(os.path.abspath(path))
  card = {"preset": name, "trained": True, "recipe": recipe(config),
          "command": f"python -m {zoo_cards.BUILD_MODULE} {name}",
          "tokens_seen": int(metrics[-1]["tokens"]),
          "final_step": int(metrics[-1]["step"]),
          "final_loss": float(metrics[-1]["loss"]),
          "final_loss_last5_mean": float(np.mean(
              [m["loss"] for m in metrics[-5:]])),
          # the run's last process (all of it unless it was resumed)
          "train_seconds": round(float(metrics[-1].get("elapsed_sec", 0)), 1),
          "eval": {"documents": "held-out documents of data.corpus "
                                "(data.eval_documents)",
                   "num_documents": len(documents),
                   "mode": "nonoverlap", "max_tokens": max_tokens,
                   "tokens_per_batch": EVAL_TOKENS_PER_BATCH,
                   "implementation": EVAL_IMPLEMENTATION,
                   "multiples": list(MULTIPLES),
                   "passkey": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in PASSKEY.items()}},
          "versions": {"jax": jax.__version__,
                       "backend": jax.default_backend()}}
  card.update(evaluate(model, name, documents, max_tokens=max_tokens))
  if preset is not None:
    zero_shot = [n for n in zoo.presets()
                 if n != preset and zoo.info(n).weights_from == preset]
    card["zero_shot"] = {}
    for other in zero_shot:
      variant = variants.rebuild(model, zoo.config(
          other, max_len=model.config.max_len))
      card["zero_shot"][other] = evaluate(variant, other, documents,
                                          max_tokens=max_tokens)
  card.update(extra or {})
  return zoo.save_pretrained(model, path, info=card, overwrite=overwrite)


def build(name: str, out: str, *, workdir: str = DEFAULT_WORKDIR,
          steps: Optional[int] = None, max_tokens: int = EVAL_MAX_TOKENS,
          overwrite: bool = True) -> str:
  """Trains preset ``name`` (a base preset) with the recipe and writes
  ``out/name``; returns its path."""
  started = time.perf_counter()
  arg = f"preset={name}" + (f",steps={steps}" if steps is not None else "")
  config = configs.get_config(f"{zoo_config.__file__}:{arg}")
  root = os.path.abspath(os.path.expanduser(workdir))
  config.data.cache_dir = os.path.join(root, "data")
  run = os.path.join(root, f"{name}-{config.train_steps}")
  trainer.train(config, run)
  path = export_run(run, os.path.join(out, name), preset=name,
                    max_tokens=max_tokens, overwrite=overwrite)
  print(f"{name}: {path} ({time.perf_counter() - started:.0f} s)",
        flush=True)
  return path


def study_preset(train, variant: str) -> tuple[str, int]:
  """(preset, its training step) whose shipped weights are the study
  variant's model (``--config.from_zoo=True``): the tiny preset named after
  the variant, trained, with the same model config and the same recipe as
  ``train`` (the variant's training config); else ValueError naming the
  difference."""
  preset = f"{variant}-tiny"
  if preset not in zoo.presets():
    raise ValueError(f"config.from_zoo: variant {variant!r} has no zoo "
                     f"preset {preset!r}; presets: {zoo.presets()}")
  card = zoo.info(preset).card
  if not card.get("trained"):
    raise ValueError(f"config.from_zoo: {preset} has no trained weights; "
                     f"build them with {card['build']}")
  mine = modeling.model_config(train, vocab_size=trainer.vocab_size(train))
  if mine != zoo.config(preset):
    raise ValueError(f"config.from_zoo: variant {variant!r} is not the "
                     f"preset {preset}'s model: {mine} != "
                     f"{zoo.config(preset)}")
  wanted = {k: v for k, v in recipe(train).items() if k != "python"}
  stored = {k: v for k, v in card["recipe"].items() if k != "python"}
  differ = sorted(k for k in wanted if stored.get(k) != wanted[k])
  if differ:
    raise ValueError(
        f"config.from_zoo: the study trains {variant!r} with "
        + ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        + f" but {preset} was trained with "
        + ", ".join(f"{k}={stored.get(k)!r}" for k in differ)
        + "; use the zoo's recipe or config.from_zoo=False")
  return preset, int(card["final_step"])


def _number(value, digits=2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def table(dirs: Sequence[str]) -> str:
  """ZOO.md: every preset with its card's numbers (cards from ``dirs``)."""
  lines = [
      "# The model zoo", "",
      "Generated by `python -m extrapolax.experiments.zoo_build --table "
      "models/ZOO.md` from the shipped cards (`zoo.info(name).card`). "
      "Held-out perplexity (bytes) of non-overlapping windows at 1x-16x the "
      "training length, and passkey retrieval accuracy (teacher-forced, "
      "mean over depths 0, 0.5, 1, 4 keys each); zero-shot rope presets run rope's weights; final loss: "
      "the last training batch's (nats per byte). Small "
      "presets are built on demand (`python -m extrapolax.experiments."
      "zoo_build NAME`).", "",
      "| preset | position | scaling | mask | train_len | params | "
      "final loss | " + " | ".join(f"ppl {m}x" for m in MULTIPLES) + " | "
      + " | ".join(f"passkey {n}" for n in PASSKEY["lengths"]) + " |",
      "|" + "---|" * (7 + len(MULTIPLES) + len(PASSKEY["lengths"]))]
  recipe_line = None
  for name in zoo.presets():
    info = zoo.info(name)
    card = zoo_cards.card(name, info.weights_from, dirs)
    head = (f"| {name} | {info.position} | {info.scaling} | {info.mask} | "
            f"{info.train_len} | {info.num_params:,} | ")
    if not card.get("trained"):
      lines.append(head + "not shipped: build on demand |" +
                   " |" * (len(MULTIPLES) + len(PASSKEY["lengths"])))
      continue
    recipe_line = recipe_line or card["recipe"]
    ppl, passkey = card["perplexity"], card.get("passkey_accuracy", {})
    lines.append(head + f"{_number(card['final_loss'], 3)} | " + " | ".join(
        _number(ppl.get(str(m * info.train_len))) for m in MULTIPLES) + " | "
        + " | ".join(_number(passkey.get(str(n))) for n in PASSKEY["lengths"])
        + " |")
  if recipe_line:
    lines += ["", "Recipe (every trained preset): " + ", ".join(
        f"{k}={v}" for k, v in recipe_line.items()) + "."]
  return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog=f"python -m {zoo_cards.BUILD_MODULE}",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="presets to build")
  parser.add_argument("--all", action="store_true",
                      help="every tiny preset the package ships")
  parser.add_argument("--out", default=zoo.DEFAULT_CHECKPOINTS,
                      help="where checkpoints go (default %(default)s)")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                      help="training runs and token stores")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"training steps (default {zoo_config.STEPS})")
  parser.add_argument("--max-tokens", type=int, default=EVAL_MAX_TOKENS,
                      help="scored tokens per evaluation length")
  parser.add_argument("--table", default=None,
                      help="write the ZOO.md table here: the cards in "
                      "--out, then those from_pretrained finds (the "
                      "package's shipped presets included)")
  args = parser.parse_args(argv)
  names = list(args.names)
  if args.all:
    names += [n for n in zoo.presets() if zoo.info(n).shipped]
  if not names and not args.table:
    parser.error("name presets, or give --all or --table")
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps={args.steps} must be >= 1")
  out = os.path.abspath(os.path.expanduser(args.out))
  try:
    for name in base_presets(names):
      build(name, out, workdir=args.workdir, steps=args.steps,
            max_tokens=args.max_tokens)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.table:
    with open(args.table, "w", encoding="utf-8") as f:
      # --out's cards first, then what from_pretrained searches (the
      # package's shipped presets included), so shipped ones stay shipped.
      f.write(table(list(dict.fromkeys([out, *zoo.checkpoint_dirs()]))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
