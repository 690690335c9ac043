"""Model cards of the zoo's trained weights, and where the shipped ones live.

A trained checkpoint's ``info.json`` is its card, written by the build
(``python -m extrapolax.experiments.zoo_build NAME``; experiments/ owns
training, models/ only reads). Its keys::

  preset, trained (True), recipe (corpus, tokenizer, train_len, steps,
  batch_size, optimizer, seed...), command, tokens_seen, final_loss,
  final_step, eval (documents, mode, max_tokens, tokens_per_batch,
  implementation, passkey grid), perplexity ({eval_len: value} at 1x..16x
  train_len), passkey_accuracy ({length: mean over depths}),
  fingerprint (``fingerprint(model)``), zero_shot ({preset: {perplexity,
  fingerprint}} for the rope scalings and rope-lambda, which run these
  weights), build_seconds, versions.

The tiny presets ship trained in the package, under ``PACKAGED_DIR``
(``extrapolax/models/pretrained/<name>/``); the small ones are built on
demand into the cache (their card says how).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "pretrained")
BUILD_MODULE = "extrapolax.experiments.zoo_build"
FINGERPRINT_HEAD = 8


def fingerprint_tokens(train_len: int) -> np.ndarray:
  """The fixed input [1, train_len] the fingerprint scores:
  ``(arange(train_len) * 37 + 11) % 256``."""
  return ((np.arange(train_len, dtype=np.int64) * 37 + 11) % 256).astype(
      np.int32)[None]


def fingerprint(model) -> dict[str, Any]:
  """Logits of ``model`` on ``fingerprint_tokens(max_len)``, summarised:
  the sum and mean absolute value of all logits, and the last position's
  first FINGERPRINT_HEAD logits (float32 on the CPU; compare with a
  relative tolerance of about 1e-4)."""
  tokens = fingerprint_tokens(model.config.max_len)
  logits = np.asarray(model(tokens), np.float64)
  return {"input": "(arange(train_len) * 37 + 11) % 256",
          "logits_sum": float(logits.sum()),
          "logits_abs_mean": float(np.abs(logits).mean()),
          "last_logits": [float(x) for x in logits[0, -1, :FINGERPRINT_HEAD]]}


def fingerprint_matches(got: Mapping[str, Any], want: Mapping[str, Any], *,
                        rtol: float = 1e-4) -> bool:
  """Whether two fingerprints agree (sums relative to the mean |logit|)."""
  scale = max(abs(want["logits_abs_mean"]), 1e-6)
  n = abs(want["logits_sum"]) / scale + 1.0
  return (abs(got["logits_sum"] - want["logits_sum"]) <= rtol * scale * n
          and np.allclose(got["last_logits"], want["last_logits"],
                          rtol=rtol, atol=rtol * scale)
          and abs(got["logits_abs_mean"] - want["logits_abs_mean"])
          <= rtol * scale)


def _read(path: str) -> Optional[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def card(name: str, weights_from: str,
         dirs: Sequence[str]) -> Mapping[str, Any]:
  """The card of preset ``name``: the info.json of the checkpoint
  ``weights_from`` that ``from_pretrained`` would load (first of ``dirs``),
  with a zero-shot preset's own perplexity and fingerprint; or, when no
  trained checkpoint exists, how to build one."""
  for d in dirs:
    stored = _read(os.path.join(d, weights_from, "info.json"))
    if stored is None or not stored.get("trained"):
      continue
    out = {k: v for k, v in stored.items() if k != "zero_shot"}
    out["checkpoint"] = os.path.join(d, weights_from)
    if name != weights_from:
      own = stored.get("zero_shot", {}).get(name)
      if own is None:
        continue
      out.update(own, preset=name, weights_from=weights_from)
    return out
  return {"trained": False, "preset": name,
          "build": f"python -m {BUILD_MODULE} {weights_from}"}
