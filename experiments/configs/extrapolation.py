r"""The default length-extrapolation study (the README's main job).

Tiny byte-level models (the tiny config: 2 layers, d_model 64, 4 query heads
over 2 key/value heads) that differ only in their position encoding
(nope, sinusoidal, learned, rope, alibi, t5), each trained with 3 seeds
(0, 1, 2) for 1000 steps of 16 x 64 tokens on the Python standard library's
sources, then evaluated on the held-out documents at 1, 2, 4, 8 and 16
times the training length (non-overlapping perplexity, 16,384 scored tokens
per length; tables mean +- sample std over the seeds, plots a band). Then,
from each seed's RoPE model:

* ``rope_pi4`` and ``rope_yarn4``: fine-tuned for 200 steps (4 x 256
  tokens, learning rate 3e-4) to 4x the training length with Position
  Interpolation and with YaRN; the rope_scaling table shows them beside the
  zero-shot PI ("linear") and YaRN of the same model.
* ``rope_passkey``: trained on for 800 steps (learning rate 3e-3) on short
  passkey prompts only (``data.RetrievalMix`` with retrieval_mix=1.0:
  "key=KEY. " somewhere in 16 to 59 tokens of filler, then "\nkey=", the
  loss on the 5 key digits), so it retrieves inside its training length
  and the passkey curve past it says something. Mixing a quarter or half
  of each batch into the text corpus did not teach retrieval in 300-500
  steps (0.00 exact match; see the README).

The RoPE model's sweeps run on seed 0's model only (to keep the job under
15 minutes; ``evals.<name>.seeds``): zero-shot RoPE scalings (linear,
dynamic NTK, YaRN, llama3, factor matched to each length) and a sliding
window, a Lambda mask and Lambda plus LM-Infinite's distance ceiling at
inference. Passkey retrieval with the short prompt at 32 to 512 tokens
(depths 0, 0.5, 1; 8 keys each) for every model.

Command (from the repository root; ``--config`` defaults to this file)::

  python -m extrapolax.experiments.extrapolation --workdir=/tmp/extrapolation

Variants (``:key=value,...``)::

  --config=experiments/configs/extrapolation.py:quick   # seconds (tests)
  --config=experiments/configs/extrapolation.py:steps=2000,train_len=128
  --config=experiments/configs/extrapolation.py:from_zoo  # zoo weights,
                                                   # no training (seconds)
  --config=experiments/configs/extrapolation.py:seeds=0  # one run per
                                                   # variant (a third of it)

Any field can be overridden too: ``--config.variants=rope,alibi``,
``--config.train.model.d_model=128``,
``--config.evals.length.multiples=1,2,4``,
``--config.evals.passkey.lengths=()`` (no passkey grid),
``--config.evals.mask.models=none`` (no mask sweep),
``--config.evals.mask.seeds=`` (the mask sweep on every seed). Lists of
names are comma-separated strings (a tuple also works in a config file).
``--config_help`` lists every field with its default.

Fields:
  train: the training config every variant shares (the tiny config's
    fields); each variant sets train.model.pe to its name.
  from_zoo: evaluate the zoo's shipped weights instead of training
    (``extrapolax.models.zoo``; the default training recipe only).
  variants: the models, one per position encoding (nope, sinusoidal,
    learned, rope, alibi, t5, kerple, fire).
  seeds: the training seeds each variant runs with (here (0, 1, 2);
    runs/<variant>/seed<k>); (): one run per variant with train.seed, in
    runs/<variant>. The report shows mean, std and n over seeds
    (``experiments.seeds``).
  finetunes: fine-tuned variants, each a dict of base, method (pi, yarn,
    ntk_by_parts, abf, continue), factor, steps, retrieval_mix, ...
    (``experiments.study_finetune``), trained from their base's checkpoint
    of the same seed (here rope_pi4, rope_yarn4, rope_passkey; none with
    from_zoo or quick).
  evals: the evaluations, by name; each entry's type is an evaluator
    (``extrapolax.experiments.evals``: length, rope_scaling, mask, passkey,
    algorithmic, ruler) or "package.module:function", models picks the variants
    ("" every one, "none" none), seeds the study seeds it runs on ("" all),
    the other keys are the evaluator's settings (its module docstring lists
    them).
  evals.length: perplexity vs length of every variant.
  evals.rope_scaling: the RoPE variant with zero-shot RoPE scalings.
  evals.mask: the RoPE variant with other masks at inference.
  evals.passkey: passkey retrieval accuracy (the short prompt).

Expected result: see the README's "Main job" section (the tables this
command printed). Measured (2-core AMD EPYC, jax 0.10.2, 2026-12-06): 14
min 52 s wall with nothing else running (the 18 core runs and their
evaluations 11 min, the 9 fine-tunes 3 min 49 s; 1.9 GB max RSS), 17 min
29 s with other jobs on the CPU (load average 1.4 rising to 7.3)
(BENCHMARKS.md, "Main job"). The budget is 15 minutes.
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


VARIANTS = ("nope", "sinusoidal", "learned", "rope", "alibi", "t5")
SEEDS = 3
# Short passkey prompts (``data.short_passkey_prompt``): half, one, two,
# four and eight times the training length of 64.
PASSKEY_LENGTHS = (32, 64, 128, 256, 512)
FINETUNE_STEPS = 200
RETRIEVAL_STEPS = 800
RETRIEVAL_MIX = 1.0
RETRIEVAL_LEARNING_RATE = 3e-3


def finetunes() -> ml_collections.ConfigDict:
  """The fine-tuned variants: RoPE fine-tuned to 4x its length with PI and
  with YaRN (beside their zero-shot versions), and RoPE trained on short
  passkey examples only (every row; a quarter or half of each batch mixed
  into the text taught no retrieval in 300-500 steps) at its own length:
  the retrieval curve's model."""
  out = ml_collections.ConfigDict()
  out.rope_pi4 = dict(base="rope", method="pi", factor=4,
                      steps=FINETUNE_STEPS)
  out.rope_yarn4 = dict(base="rope", method="yarn", factor=4,
                        steps=FINETUNE_STEPS)
  out.rope_passkey = dict(base="rope", method="continue", factor=1,
                          steps=RETRIEVAL_STEPS, retrieval_mix=RETRIEVAL_MIX,
                          learning_rate=RETRIEVAL_LEARNING_RATE)
  return out


def get_config(arg=None):
  """The study config; ``arg``: quick, steps, train_len, seed, from_zoo,
  seeds (a count: seeds=3, the default, runs seeds seed, seed + 1, seed + 2;
  0: one run per variant, no fine-tunes)."""
  arg_text = arg or ""
  given = {item.partition("=")[0].strip() for item in arg_text.split(",")}
  arg = configs.parse_arg(arg, quick=False, steps=1000, train_len=64, seed=0,
                          from_zoo=False, seeds=SEEDS)
  if (arg.quick or arg.from_zoo) and "seeds" not in given:
    arg.seeds = 0   # a smoke test, or the zoo's one set of weights
  config = ml_collections.ConfigDict()
  config.train = tiny.get_config(
      f"steps={arg.steps},train_len={arg.train_len},seed={arg.seed}")
  config.train.log_every = 100
  config.train.checkpoint_every = 100
  config.variants = ",".join(VARIANTS)
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
  # The sweeps of the RoPE model's inference variants: one seed's model.
  for name in ("rope_scaling", "mask"):
    config.evals[name].seeds = str(arg.seed) if arg.seeds else ""
  config.evals.passkey = dict(
      type="passkey", models="", prompt="short", lengths=PASSKEY_LENGTHS,
      depths=(0.0, 0.5, 1.0), trials=8,
      implementation=config_dict.placeholder(str))
  config.finetunes = finetunes()
  if arg.from_zoo:   # the zoo's weights: nothing is trained
    config.finetunes = ml_collections.ConfigDict()
  if arg.quick:  # a smoke test: seconds, not a result
    config.train.train_len = 16
    configs.shrink_for_smoke(config.train)
    config.variants = "rope,alibi"
    for name in ("length", "rope_scaling", "mask"):
      config.evals[name].multiples = (1, 4)
      config.evals[name].max_tokens = 512
    config.evals.rope_scaling.methods = "linear,yarn"
    config.evals.mask.masks = "lambda"
    config.finetunes = ml_collections.ConfigDict()
    config.evals.passkey.lengths = (32,)
    config.evals.passkey.depths = (0.5,)
    config.evals.passkey.trials = 2
    config.evals.passkey.models = "rope"
  return config
