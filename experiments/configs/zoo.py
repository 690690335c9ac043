r"""The zoo's training recipe: one preset's architecture, the study's training.

Every trained zoo preset (``extrapolax.models.zoo``) comes from this config,
the same recipe for every position scheme so the presets compare fairly: the
length-extrapolation study's training (``extrapolation.py``, itself the tiny
config): the Python standard library's sources as bytes (vocab 256, concat
packing, 10% of the documents held out with split_seed 0), 1000 steps of
16 rows x train_len tokens, AdamW (peak 3e-3, 50 warmup steps, cosine to
3e-4, weight decay 0.1, b2 0.95, clip 1.0), seed 0. train_len is the
preset's (64 for tiny, the study's length; 512 for small).

Command (trains, evaluates and writes the checkpoint and its card)::

  python -m extrapolax.experiments.zoo_build alibi-tiny --out /tmp/zoo

or only the training run, with the train main::

  python -m extrapolax.experiments.train \
      --config=experiments/configs/zoo.py:preset=alibi-tiny --workdir=/tmp/a

Variants (``:key=value,...``): preset, steps, seed.
"""

from extrapolax.experiments import configs
from extrapolax.experiments.configs import tiny
from extrapolax.models import zoo

STEPS = 1000


def get_config(arg=None):
  """The recipe for ``arg``'s preset (default rope-tiny), steps, seed."""
  arg = configs.parse_arg(arg, preset="rope-tiny", steps=STEPS, seed=0)
  if arg.preset not in zoo.names():
    raise ValueError(f"preset={arg.preset!r} is not a zoo preset; allowed: "
                     f"{zoo.names()}")
  train_len = zoo.config(arg.preset).max_len
  config = tiny.get_config(
      f"steps={arg.steps},train_len={train_len},seed={arg.seed}")
  config.model.preset = arg.preset
  config.log_every = 50
  config.checkpoint_every = max(1, arg.steps)
  config.keep_checkpoints = 1
  return config
