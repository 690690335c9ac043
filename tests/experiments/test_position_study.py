"""The study and the sweeps reach the new position methods by name."""

import pytest

from extrapolax.experiments import configs, extrapolation, modeling
from extrapolax.experiments.evaluators import mask_sweep, variants
from extrapolax.models import AttentionSpec, ModelConfig, zoo


@pytest.mark.parametrize("family", ["irope", "gemma3", "qk-norm",
                                    "rope-sinks", "harpe", "p-rope", "ssmax",
                                    "head-scale"])
def test_a_zoo_family_is_a_study_variant(family):
  config = configs.get_config("extrapolation.py")
  config.variants = f"rope,{family}"
  config.evals.rope_scaling.models = "rope"
  extrapolation.validate_config(config)
  train = extrapolation.variant_config(config, family, "/tmp/x")
  assert train.model.preset == f"{family}-tiny"
  got = modeling.model_config(train)
  assert got == zoo.config(f"{family}-tiny", max_len=config.train.train_len)


def test_unknown_variant_lists_the_families():
  config = configs.get_config("extrapolation.py:quick")
  config.variants = "rope,irop"
  with pytest.raises(ValueError, match=r"\['irop'\] not in .*'irope'"):
    extrapolation.validate_config(config)


def test_sweep_transforms_reach_the_rope_layers_and_labels():
  model = zoo.create("hybrid-tiny")
  for entry, field, value in (
      ("causal+string(16, 4)", "string", (16, 4)),
      ("causal+p_rope(0.5)", "p_rope", 0.5),
      ("causal+truncated_basis(0.001, 0.1, 0.01)", "truncated_basis",
       (0.001, 0.1, 0.01))):
    variant = mask_sweep.mask_variant(model, entry, window=64, num_sinks=4)
    rope, nope = variant.config.attention
    assert getattr(rope, field) == value and getattr(nope, field) is None
    assert variants.describe(variant)["mask"] == entry


@pytest.mark.parametrize("entry,match", [
    ("causal+string(8, 8)", "local_window=8 must be < shift=8"),
    ("causal+p_rope(2)", r"p_rope fraction must be in \[0, 1\]"),
    ("causal+string(x)", r"write it as '\+string\(SHIFT, LOCAL_WINDOW\)'"),
])
def test_bad_sweep_transforms_are_named(entry, match):
  with pytest.raises(ValueError, match=match):
    mask_sweep.check_entries([entry], window=16)


def test_spec_fields_round_trip_and_need_their_scheme():
  specs = (AttentionSpec(rope_base=(100.0, 1e4), string=(8, 2), p_rope=0.5,
                         qk_norm=True),
           AttentionSpec(position="nope", temperature="llama4",
                         temperature_args={"floor_scale": 4}),
           AttentionSpec(truncated_basis=(0.001, 0.1, 0.01),
                         temperature="ssmax"))
  config = ModelConfig(num_kv_heads=2, attention=specs)
  assert ModelConfig.from_json(config.to_json()) == config
  with pytest.raises(ValueError, match=r"string=\(8, 2\) needs "
                     r"position='rope', got 'alibi'"):
    AttentionSpec(position="alibi", string=(8, 2))
  with pytest.raises(ValueError, match="temperature_args=.* needs a "
                     "temperature"):
    AttentionSpec(temperature_args={"init": 1.0})
  with pytest.raises(ValueError, match="temperature 'ssmax' has no "
                     "parameter 'scale'"):
    AttentionSpec(temperature="ssmax", temperature_args={"scale": 1.0})
