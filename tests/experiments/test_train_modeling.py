"""config.model -> ModelConfig (experiments/modeling.py) and config parsing."""

import ml_collections
import pytest
from flax import nnx

from extrapolax.experiments import configs
from extrapolax.experiments import modeling
from extrapolax.models import DecoderLM


def _config(**model):
  config = configs.base_config()
  config.train_len = 64
  for key, value in model.items():
    config.model[key] = value
  return config


@pytest.mark.parametrize("pe", modeling.PE_CHOICES)
def test_every_pe_builds_a_model(pe):
  cfg = modeling.model_config(_config(pe=pe))
  absolute = pe if pe in ("sinusoidal", "learned") else "none"
  position = "nope" if pe in ("sinusoidal", "learned") else pe
  assert cfg.absolute == absolute
  assert [s.position for s in cfg.attention] == [position]
  assert cfg.max_len == 64 and cfg.vocab_size == 256
  model = nnx.eval_shape(lambda: modeling.create_model(
      _config(pe=pe), nnx.Rngs(0)))
  assert isinstance(model, DecoderLM)
  assert hasattr(model, "position_embed") == (pe == "learned")


def test_sizes_masks_and_scaling_reach_the_model_config():
  cfg = modeling.model_config(_config(
      d_model=96, num_layers=3, num_heads=6, num_kv_heads=2, mlp_dim=100,
      mask="lambda", window=16, num_sinks=4, dtype="bfloat16",
      rope_base=500.0,
      rope_scaling='{"rope_type": "linear", "factor": 2.0}'),
      vocab_size=300)
  assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.kv_heads,
          cfg.mlp_dim, cfg.vocab_size, cfg.dtype) == (96, 3, 6, 2, 100, 300,
                                                      "bfloat16")
  spec = cfg.attention[0]
  assert (spec.mask, spec.window, spec.num_sinks, spec.rope_base) == (
      "lambda", 16, 4, 500.0)
  assert dict(spec.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
  as_dict = modeling.model_config(_config(
      rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
  assert dict(as_dict.attention[0].rope_scaling)["rope_type"] == "dynamic"
  window = modeling.model_config(_config(mask="sliding_window", window=8))
  assert window.attention[0].to_mask().materialize(4, 4).sum() == 10


@pytest.mark.parametrize("fields, match", [
    (dict(pe="foo"), r"config.model.pe='foo' is not one of"),
    (dict(mask="dilatd"),
     r"bad config.model: mask must be one of .* got 'dilatd'"),
    (dict(mask="sliding_window"),
     r"bad config.model: mask 'sliding_window' needs window"),
    (dict(window=8), r"window=8 is not a parameter of mask 'causal'"),
    (dict(mask="sliding_window", window=8, num_sinks=2),
     r"num_sinks=2 is not a parameter of mask 'sliding_window'"),
    (dict(mask="lambda(num_sinks=2, window=8)", logits_soft_cap=-1.0),
     r"logits_soft_cap must be a finite number > 0"),
    (dict(pe="alibi", rope_scaling='{"rope_type": "linear", "factor": 2}'),
     r"needs pe='rope'"),
    (dict(rope_scaling="{linear"), r"rope_scaling='\{linear' is not a JSON"),
    (dict(rope_scaling='{"rope_type": "warp", "factor": 2}'), r"warp"),
    (dict(num_heads=3), r"num_heads=3"),
    (dict(dtype="float16"), r"'float16'"),
    (dict(d_modle=64), r"unknown config.model field\(s\) \['d_modle'\]"),
])
def test_bad_model_fields_raise_naming_them(fields, match):
  config = _config()
  with config.unlocked():
    for key, value in fields.items():
      config.model[key] = value
  with pytest.raises(ValueError, match=match):
    modeling.model_config(config)


def test_parse_arg_types_and_errors():
  arg = configs.parse_arg("pe=alibi,steps=20,fast,lr=0.5", pe="rope",
                          steps=600, fast=False, lr=1.0)
  assert (arg.pe, arg.steps, arg.fast, arg.lr) == ("alibi", 20, True, 0.5)
  assert configs.parse_arg(None, pe="rope").pe == "rope"
  with pytest.raises(ValueError, match="unknown config argument 'size'"):
    configs.parse_arg("size=3", pe="rope")
  with pytest.raises(ValueError, match="steps='many' is not a int"):
    configs.parse_arg("steps=many", steps=1)


def test_config_files_and_their_variants():
  tiny = configs.load("tiny")
  config = tiny.get_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.model.pe == "rope" and config.train_len == 128
  variant = tiny.get_config("pe=alibi,steps=20,train_len=64")
  assert (variant.model.pe, variant.train_steps, variant.train_len) == (
      "alibi", 20, 64)
  modeling.model_config(variant)          # valid as written
  assert configs.path("tiny") == configs.path("experiments/configs/tiny.py")
  with pytest.raises(ValueError, match="no config file 'huge'"):
    configs.path("huge")
