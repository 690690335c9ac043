r"""Fine-tune a trained run to a longer context (``experiments.finetune``).

The config is the trained run's own (WORKDIR/config.json), continued from
its latest checkpoint at ``factor`` times its training length with the
position settings of ``method``:

  pi            linear RoPE scaling by the factor (Position Interpolation)
  yarn          YaRN (NTK-by-parts frequencies and its temperature)
  ntk_by_parts  YaRN's frequencies without the temperature
  abf           the RoPE base times ``base_factor`` (ABF, Code Llama)
  continue      the position settings unchanged (plain continued training)

Command (from the repository root; first train the run it starts from)::

  python -m extrapolax.experiments.train --config=tiny.py:train_len=64 \
      --workdir=/tmp/base
  python -m extrapolax.experiments.train \
      --config=finetune.py:init_from=/tmp/base,method=pi,factor=4 \
      --workdir=/tmp/base_pi4

Arguments (``:key=value,...``): init_from (required: a training workdir),
method (pi), factor (4; the new train_len is factor x the old unless
train_len is given), train_len, steps (200), learning_rate (default: the
run's / 10), warmup_steps (20), batch_size (default: the run's, divided by
the factor so the tokens per step stay the same, at least 1), optimizer
(reset or keep: ``config.init_from_optimizer``), base_factor (abf, 100),
retrieval_mix (0: none; a fraction of each batch's rows that are short
passkey examples, ``data.RetrievalMix``).

Fields besides the run's: init_from, init_from_optimizer
(``experiments.finetune``); model.rope_scaling and model.rope_base are set
by the method. Any field can be overridden with ``--config.FIELD=VALUE``.
The zero-shot version of the same scaling is this config's model at step 0
(``trainer.load_model`` of the run it starts from with these position
settings; the study's rope_scaling evaluation).
"""

import os

from extrapolax.experiments import configs
from extrapolax.experiments import finetune
from extrapolax.experiments import run_config


def get_config(arg=None):
  """The fine-tuning config; ``arg``: see the module docstring."""
  arg = configs.parse_arg(arg, init_from="", method="pi", factor=4.0,
                          train_len=0, steps=200, learning_rate=0.0,
                          warmup_steps=20, batch_size=0, optimizer="reset",
                          base_factor=100.0, retrieval_mix=0.0)
  if not arg.init_from:
    raise ValueError("finetune.py needs init_from=WORKDIR (a trained run: "
                     "config.json and checkpoints/)")
  workdir = os.path.abspath(os.path.expanduser(arg.init_from))
  config = finetune.finetune_config(
      run_config.read_config(workdir), workdir, method=arg.method,
      factor=arg.factor, train_len=arg.train_len, steps=arg.steps,
      learning_rate=arg.learning_rate, warmup_steps=arg.warmup_steps,
      batch_size=arg.batch_size, optimizer=arg.optimizer,
      base_factor=arg.base_factor)
  if arg.retrieval_mix:
    config.data.retrieval_mix = float(arg.retrieval_mix)
  return config
