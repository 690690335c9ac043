r"""The default length-extrapolation study (the README's main job).

Tiny byte-level models (the tiny config: 2 layers, d_model 64, 4 query heads
over 2 key/value heads) that differ only in their position encoding
(nope, sinusoidal, learned, rope, alibi, t5), each trained for 1000 steps of
16 x 64 tokens on the Python standard library's sources, then evaluated on
the held-out documents at 1, 2, 4, 8 and 16 times the training length
(non-overlapping perplexity, 16,384 scored tokens per length); the RoPE model
also with zero-shot RoPE scalings (linear, dynamic NTK, YaRN, llama3, factor
matched to each length) and with a sliding window, a Lambda mask and Lambda
plus LM-Infinite's distance ceiling at inference; passkey retrieval at 256
and 512 tokens.

Command (from the repository root; ``--config`` defaults to this file)::

  python -m extrapolax.experiments.extrapolation --workdir=/tmp/extrapolation

Variants (``:key=value,...``)::

  --config=experiments/configs/extrapolation.py:quick   # seconds (tests)
  --config=experiments/configs/extrapolation.py:steps=2000,train_len=128
  --config=experiments/configs/extrapolation.py:from_zoo  # zoo weights,
                                                   # no training (seconds)
  --config=experiments/configs/extrapolation.py:seeds=3  # seeds 0, 1, 2

Any field can be overridden too: ``--config.variants=rope,alibi``,
``--config.train.model.d_model=128``,
``--config.evals.length.multiples=1,2,4``,
``--config.evals.passkey.lengths=()`` (no passkey grid),
``--config.evals.mask.models=none`` (no mask sweep). Lists of names are
comma-separated strings (a tuple also works in a config file).
``--config_help`` lists every field with its default.

Fields:
  train: the training config every variant shares (the tiny config's
    fields); each variant sets train.model.pe to its name.
  from_zoo: evaluate the zoo's shipped weights instead of training
    (``extrapolax.models.zoo``; the default training recipe only).
  variants: the models, one per position encoding (nope, sinusoidal,
    learned, rope, alibi, t5, kerple, fire).
  seeds: the training seeds each variant runs with (``--config.seeds=0,1,2``;
    runs/<variant>/seed<k>); () (the default): one run per variant with
    train.seed, in runs/<variant>. The report shows mean, std and n over
    seeds (``experiments.seeds``).
  finetunes: optional (absent here): fine-tuned variants, each a dict of
    base, method (pi, yarn, ntk_by_parts, abf), factor, steps, ...
    (``experiments.study_finetune``), trained from their base's checkpoint.
  evals: the evaluations, by name; each entry's type is an evaluator
    (``extrapolax.experiments.evals``: length, rope_scaling, mask, passkey,
    algorithmic, ruler) or "package.module:function", models picks the variants
    ("" every one, "none" none), the other keys are the evaluator's
    settings (its module docstring lists them).
  evals.length: perplexity vs length of every variant.
  evals.rope_scaling: the RoPE variant with zero-shot RoPE scalings.
  evals.mask: the RoPE variant with other masks at inference.
  evals.passkey: passkey retrieval accuracy.

Expected result: see the README's "Main job" section (the table this
command printed, with the machine and the wall time).
"""

import ml_collections
from ml_collections import config_dict

from extrapolax.experiments import configs
from extrapolax.experiments.configs import tiny


def _perplexity() -> dict:
  """The perplexity settings the length, rope_scaling and mask evaluations
  each get (``evals.length``'s module docstring explains them)."""
  return dict(
      multiples=(1, 2, 4, 8, 16), modes="nonoverlap",
      stride=config_dict.placeholder(int), max_tokens=16384,
      tokens_per_batch=8192,
      # None: the model's own (auto; memory-linear xla_chunked on the CPU).
      implementation=config_dict.placeholder(str),
      # > 1: split each window over this many devices (context-parallel
      # attention), for lengths one device cannot hold; every length must
      # divide by it.
      context_devices=1)


def get_config(arg=None):
  """The study config; ``arg``: quick, steps, train_len, seed, from_zoo,
  seeds (a count: seeds=3 runs seeds seed, seed + 1, seed + 2)."""
  arg = configs.parse_arg(arg, quick=False, steps=1000, train_len=64, seed=0,
                          from_zoo=False, seeds=0)
  config = ml_collections.ConfigDict()
  config.train = tiny.get_config(
      f"steps={arg.steps},train_len={arg.train_len},seed={arg.seed}")
  config.train.log_every = 100
  config.train.checkpoint_every = 100
  config.variants = "nope,sinusoidal,learned,rope,alibi,t5"
  # The training seeds of every variant; (): one run with train.seed.
  if isinstance(arg.seeds, bool) or not isinstance(arg.seeds, int) or (
      arg.seeds < 0):
    raise ValueError(f"seeds={arg.seeds!r}: a count >= 1 of seeds (seeds=3 "
                     "runs seed, seed + 1, seed + 2), or 0 for one run")
  config.seeds = tuple(range(arg.seed, arg.seed + arg.seeds))
  # True: evaluate the zoo's shipped tiny presets (the same models, trained
  # with this recipe) instead of training them.
  config.from_zoo = arg.from_zoo
  config.evals = ml_collections.ConfigDict()
  config.evals.length = dict(type="length", models="", **_perplexity())
  config.evals.rope_scaling = dict(
      type="rope_scaling", models="rope", methods="linear,dynamic,yarn,llama3",
      factors="matched", **_perplexity())
  config.evals.mask = dict(
      type="mask", models="rope", masks="sliding_window,lambda,lambda_ceiling",
      window=config_dict.placeholder(int), num_sinks=4, **_perplexity())
  config.evals.passkey = dict(
      type="passkey", models="", lengths=(256, 512), depths=(0.0, 0.5, 1.0),
      trials=4, implementation=config_dict.placeholder(str))
  if arg.quick:  # a smoke test: seconds, not a result
    config.train.train_len = 16
    configs.shrink_for_smoke(config.train)
    config.variants = "rope,alibi"
    for name in ("length", "rope_scaling", "mask"):
      config.evals[name].multiples = (1, 4)
      config.evals[name].max_tokens = 512
    config.evals.rope_scaling.methods = "linear,yarn"
    config.evals.mask.masks = "lambda"
    config.evals.passkey.lengths = (256,)
    config.evals.passkey.depths = (0.5,)
    config.evals.passkey.trials = 2
    config.evals.passkey.models = "rope"
  return config
