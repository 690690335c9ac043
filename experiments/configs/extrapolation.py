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

Any field can be overridden too: ``--config.variants=rope,alibi``,
``--config.train.model.d_model=128``, ``--config.eval.multiples=1,2,4``,
``--config.passkey.lengths=()`` (no passkey grid). Lists of names are
comma-separated strings (a tuple also works in a config file).

Fields:
  train: the training config every variant shares (the tiny config's
    fields); each variant sets train.model.pe to its name.
  variants: the models, one per position encoding (nope, sinusoidal,
    learned, rope, alibi, t5, kerple, fire).
  eval: perplexity vs length: multiples (of train.train_len), modes
    (nonoverlap, sliding), stride (sliding; None: train_len // 2),
    max_tokens (scored per length), tokens_per_batch, implementation.
  rope_scaling: model (the RoPE variant; "" for none), methods (linear,
    dynamic, ntk, yarn, llama3; "none" adds the unscaled model), factors
    (numbers and/or "matched": the factor eval_len / train_len).
  masks: model ("" for none), masks (sliding_window, lambda,
    lambda_ceiling), window (None: train_len), num_sinks.
  passkey: lengths (() for none; a prompt needs >= 247 tokens), depths,
    trials, models ("" for every variant).

Expected result: see the README's "Main job" section (the table this
command printed, with the machine and the wall time).
"""

import ml_collections
from ml_collections import config_dict

from extrapolax.experiments import configs
from extrapolax.experiments.configs import tiny


def get_config(arg=None):
  """The study config; ``arg``: quick, steps, train_len, seed."""
  arg = configs.parse_arg(arg, quick=False, steps=1000, train_len=64, seed=0)
  config = ml_collections.ConfigDict()
  config.train = tiny.get_config(
      f"steps={arg.steps},train_len={arg.train_len},seed={arg.seed}")
  config.train.log_every = 100
  config.train.checkpoint_every = 100
  config.variants = "nope,sinusoidal,learned,rope,alibi,t5"
  config.eval = ml_collections.ConfigDict(dict(
      multiples=(1, 2, 4, 8, 16), modes="nonoverlap",
      stride=config_dict.placeholder(int), max_tokens=16384,
      tokens_per_batch=8192,
      # None: the model's own (auto; memory-linear xla_chunked on the CPU).
      # A name rebuilds each evaluated model for that implementation, which
      # loses the mask sweep's LM-Infinite distance ceiling (set on the
      # built layers, not in the config).
      implementation=config_dict.placeholder(str),
      # > 1: the perplexity evaluations (length, RoPE scaling, masks) split
      # each window over this many devices (context-parallel attention), for
      # lengths one device cannot hold; every length must divide by it.
      # Passkey still runs on one device.
      context_devices=1))
  config.rope_scaling = ml_collections.ConfigDict(dict(
      model="rope", methods="linear,dynamic,yarn,llama3", factors="matched"))
  config.masks = ml_collections.ConfigDict(dict(
      model="rope", masks="sliding_window,lambda,lambda_ceiling",
      window=config_dict.placeholder(int), num_sinks=4))
  config.passkey = ml_collections.ConfigDict(dict(
      lengths=(256, 512), depths=(0.0, 0.5, 1.0), trials=4, models=""))
  if arg.quick:  # a smoke test: seconds, not a result
    config.train.train_len = 16
    config.train.train_steps = 4
    config.train.batch_size = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.model.d_model = 32
    config.train.model.num_layers = 1
    config.train.model.num_heads = 2
    config.train.model.num_kv_heads = 1
    config.train.model.mlp_dim = 64
    config.variants = "rope,alibi"
    config.eval.multiples = (1, 4)
    config.eval.max_tokens = 512
    config.rope_scaling.methods = "linear,yarn"
    config.masks.masks = "lambda"
    config.passkey.lengths = (256,)
    config.passkey.depths = (0.5,)
    config.passkey.trials = 2
    config.passkey.models = "rope"
  return config
