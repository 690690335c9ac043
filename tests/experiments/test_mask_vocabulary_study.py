"""A mask defined in this test module (and nowhere in extrapolax) is swept
by a study through its config: defining and registering it is the only
change a new mask needs."""

import dataclasses
import json
import os

import jax.numpy as jnp

from extrapolax.attention import masks
from extrapolax.experiments import configs
from extrapolax.experiments import extrapolation
from extrapolax.experiments import modeling


@masks.register("dilated_causal")
@dataclasses.dataclass(frozen=True)
class DilatedCausal(masks.Mask):
  """Causal; beyond the last ``local`` keys only every ``rate``-th key."""
  local: int = 4
  rate: int = 2

  def __call__(self, q_pos, k_pos):
    d = q_pos - k_pos
    return (d >= 0) & ((d < self.local) | (d % self.rate == 0))

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    some, _ = masks.Causal().block_visibility(q_lo, q_hi, k_lo, k_hi)
    _, local_all = masks.SlidingWindow(self.local).block_visibility(
        q_lo, q_hi, k_lo, k_hi)
    return some, local_all


def test_config_names_a_mask_defined_in_a_test_module():
  config = configs.get_config("extrapolation.py:quick")
  train = config.train.copy_and_resolve_references()
  train.unlock()
  train.model.mask = "dilated_causal(local=8, rate=3)"
  spec = modeling.model_config(train).attention[0]
  assert spec.to_mask() == DilatedCausal(8, 3)
  assert spec.mask_label() == "dilated_causal(local=8, rate=3)"


def test_mask_sweep_runs_a_user_mask_from_the_config(tmp_path):
  config = configs.get_config("extrapolation.py:quick")
  config.unlock()
  config.variants = "rope"
  for name in list(config.evals.keys()):
    del config.evals[name]
  config.evals.mask = dict(type="mask", models="rope", multiples=(1, 2),
                           max_tokens=256,
                           masks="causal,dilated_causal(local=8, rate=2)")
  result = extrapolation.run_study(config, str(tmp_path))
  rows = [r for r in result.records if r["metric"] == "perplexity"]
  by_mask = {}
  for r in rows:
    by_mask.setdefault(r["mask"], []).append(r["value"])
  assert set(by_mask) == {"causal", "dilated_causal(local=8, rate=2)"}
  train_len = config.train.train_len
  assert {r["eval_len"] for r in rows} == {train_len, 2 * train_len}
  # Fewer keys than causal: a different (finite) perplexity.
  assert all(jnp.isfinite(jnp.asarray(v)).all() for v in by_mask.values())
  assert by_mask["causal"] != by_mask["dilated_causal(local=8, rate=2)"]
  report = open(os.path.join(tmp_path, "report.md"), encoding="utf-8").read()
  assert "dilated_causal(local=8, rate=2)" in report
  done = json.load(open(os.path.join(tmp_path, "evaluations.json")))
  assert done


def test_mask_sweep_runs_a_per_head_paper_mask(tmp_path):
  """LongLoRA's S^2-Attn (a per-head mask from attention.masks' registry)
  swept end to end on the tiny model: named by text, run by the model's
  attention with one shifted and one unshifted head."""
  config = configs.get_config("extrapolation.py:quick")
  config.unlock()
  config.variants = "rope"
  for name in list(config.evals.keys()):
    del config.evals[name]
  config.evals.mask = dict(type="mask", models="rope", multiples=(1, 2),
                           max_tokens=256,
                           masks="causal,shifted_sparse(group=8)")
  result = extrapolation.run_study(config, str(tmp_path))
  by_mask = {}
  for r in result.records:
    if r["metric"] == "perplexity":
      by_mask.setdefault(r["mask"], []).append(r["value"])
  assert set(by_mask) == {"causal", "shifted_sparse(group=8)"}
  assert all(jnp.isfinite(jnp.asarray(v)).all() for v in by_mask.values())
  assert by_mask["causal"] != by_mask["shifted_sparse(group=8)"]
