r"""Learned sinks and iRoPE against plain RoPE (issue 17's comparisons).

Three tiny byte-level models trained with the default study's recipe
(``extrapolation.py``: 1000 steps of 16 x 64 tokens of the Python standard
library's sources), named by the study variants of one vocabulary:

* ``rope``: the tiny RoPE model (2 layers, d_model 64, 4 query heads over 2
  key/value heads);
* ``rope-sinks``: the same with gpt-oss's learned attention sinks (zoo
  family ``rope-sinks``: one logit per query head in the softmax
  denominator, no value; ``AttentionSpec(sink_logits=True)``);
* ``irope``: Llama 4's iRoPE at this size (zoo family ``irope``: 3 RoPE
  layers with chunked attention of train_len / 4 and QK-norm, then 1 NoPE
  layer with temperature tuning; the pattern repeats whole, so 4 layers
  and about 1.9x rope's parameters).

Each is trained with ``seeds`` seeds (default 3) and evaluated on the
held-out documents at 1, 2, 3, 4, 8 and 16 times the training length
(non-overlapping perplexity, 16,384 scored tokens per length, and the loss
per position of the longest), and rope and rope-sinks again with a sliding
window (train_len keys) and a Lambda mask (4 sink tokens + train_len) at
inference: do learned sinks replace the first tokens as attention sinks?

Command (from the repository root)::

  python -m extrapolax.experiments.extrapolation \
      --config=experiments/configs/methods_study.py --workdir=/tmp/methods

Arguments (``:key=value,...``): steps (1000), train_len (64), seed (0),
seeds (3: seeds seed .. seed + 2; 0: one run per variant), quick (a smoke
test: about a minute; one run per variant unless seeds= is given). Other
fields as in ``extrapolation.py`` (``--config.variants=rope,rope-sinks``,
``--config.evals.length.multiples=1,2,4``,
``--config.evals.mask.models=none``).

Measured (the 2-core AMD EPYC CPU of the CI machine, jax 0.10.2, float32,
shared with other jobs: load average 4 to 7; 2026-12-06): the default
command took 11 min 4 s wall (1.6 GB peak memory; training 27 to 63 s per
rope / rope-sinks run, 74 to 91 s per irope run; each evaluation 6 to 22 s).
Held-out perplexity, mean +- sample std over seeds 0, 1, 2 (training
length 64):

  eval length     64          128         256         512         1024
  rope         8.03+-0.09  9.19+-0.90  15.99+-2.06 24.36+-3.24 33.12+-3.33
  rope-sinks   8.06+-0.10  9.42+-0.68  17.03+-2.53 26.45+-4.27 35.39+-5.35
  irope        7.66+-0.04  7.64+-0.05   7.67+-0.05  7.73+-0.06  7.79+-0.06
  rope, window 8.03        7.91         7.85        7.82        7.80
  sinks, window 8.06       7.97         7.87        7.89        7.87

(192 = 3x: rope 12.51, rope-sinks 13.30, irope 7.61. Lambda(4 sink tokens,
64) at 1024: rope 11.22, rope-sinks 11.94.) Learned sinks did not help past
the training length: equal at 1x, and from 3x on worse than rope in every
seed (at 16x by 4.5, 1.9 and 0.4), a gap inside the seed spread; under a
sliding window or a Lambda mask at inference they did no better either. The
trained sinks stayed small (0.47 to 0.88 in layer 1, 0.07 to 0.41 in layer
2, from 0 at init). iRoPE stays flat to 16x (7.66 -> 7.79) and is better
even at 1x, but it is not a matched comparison: its pattern repeats whole
(4 layers, 1.9x rope's parameters) and its RoPE layers see only
16-token chunks, so no RoPE distance past training ever occurs; rope with a
sliding window at inference is as flat (7.80 at 16x).
"""

import ml_collections

from extrapolax.experiments import configs
from extrapolax.experiments.configs import extrapolation

VARIANTS = "rope,rope-sinks,irope"
MULTIPLES = (1, 2, 3, 4, 8, 16)


def get_config(arg=None):
  """The study config; ``arg``: steps, train_len, seed, seeds, quick."""
  arg_text = arg or ""
  arg = configs.parse_arg(arg, steps=1000, train_len=64, seed=0, seeds=3,
                          quick=False)
  seeds = arg.seeds
  if arg.quick and "seeds" not in {item.partition("=")[0].strip()
                                   for item in arg_text.split(",")}:
    seeds = 0   # quick: one run per variant unless seeds= is given
  # The default study's recipe and perplexity settings, other variants.
  config = extrapolation.get_config(
      f"steps={arg.steps},train_len={arg.train_len},seed={arg.seed},"
      f"seeds={seeds}")
  config.variants = VARIANTS
  config.finetunes = ml_collections.ConfigDict()   # none here
  base = config.evals
  config.evals = ml_collections.ConfigDict()
  config.evals.length = base.length
  config.evals.length.multiples = MULTIPLES
  config.evals.mask = base.mask
  config.evals.mask.models = "rope,rope-sinks"
  config.evals.mask.seeds = ""   # every seed (the main job: one)
  config.evals.mask.masks = "sliding_window,lambda"
  config.evals.mask.multiples = MULTIPLES
  if arg.quick:  # a smoke test: seconds, not a result
    # The zoo families train at the tiny sizes (a preset's sizes are its
    # own), so only the length, the steps and the evaluations shrink.
    config.train.train_len = 16
    configs.shrink_for_smoke(config.train, model=False)
    for entry in (config.evals.length, config.evals.mask):
      entry.multiples = (1, 2)
      entry.max_tokens = 256
    config.evals.mask.masks = "sliding_window"
  return config
