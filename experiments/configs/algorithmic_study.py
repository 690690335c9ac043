r"""Algorithmic length generalisation: one task x position schemes.

The Randomized PE paper's protocol (Ruoss et al., 2023) at a size this CPU
runs: the tiny task model of ``algorithmic.py`` (2 layers, d_model 64,
bytes, loss on the answer only) trained on one task with example sizes from
the task's smallest up to ``max_size`` (default: the largest whose examples
fit ``train_len`` tokens), once per position scheme (``config.variants``:
nope, rope, alibi by default), then scored by the ``algorithmic`` evaluator
(sequence and token accuracy, 64 examples per size) at sizes 1/4, 1/2, 1,
3/2, 2, 3 and 4 times ``max_size``: inside and past the training range.
``randomized`` trains every scheme with randomized positions instead
(``data.positions``: each row's positions a sorted random subset of
``[0, max_position)``, default 4 x the longest evaluated example), the
paper's intervention; run the study once without and once with it and
compare.

Command (from the repository root)::

  python -m extrapolax.experiments.extrapolation \
      --config=experiments/configs/algorithmic_study.py:task=reverse \
      --workdir=/tmp/reverse
  python -m extrapolax.experiments.extrapolation \
      --config=experiments/configs/algorithmic_study.py:task=reverse,randomized \
      --workdir=/tmp/reverse_randomized

Arguments (``:key=value,...``): task (copy; any ``data.TASK_NAMES``),
randomized (False), max_position (0: 4 x the longest evaluated example),
steps (1000), train_len (64), max_size (0: all that fit), seed (0), quick
(a smoke test: seconds). The grid is a shell loop over tasks x randomized
(x seeds). Other fields: ``--config.variants=nope,rope,alibi,t5``,
``--config.evals.algorithmic.lengths=...``, ``--config.train.*``.

Measured (the 2-core CPU of the CI machine, jax 0.10.2, shared with other
jobs: load average 9 to 11 throughout): ``task=reverse`` with the defaults
took 478 s wall (1000 steps per variant in 140 to 175 s, each evaluation
12 to 14 s; 1.2 GB peak memory); on an idle machine expect about a third.
Its sequence accuracy (64 examples per size; training sizes 1..31):

  size     8      16     31     46     62     93     124
  nope     0.00   0.00   0.00   0.00   0.00   0.00   0.00
  rope     0.66   0.75   0.45   0.00   0.00   0.00   0.00
  alibi    0.52   0.02   0.00   0.00   0.00   0.00   0.00

Token accuracy past the range falls from 0.97 (rope, size 31) to 0.24 at 46
and 0.05 at 124; alibi keeps 0.50 at 46 and 0.18 at 124; nope 0.14 / 0.01.
With ``randomized`` (max_position 1000; 394 s wall, same load) no scheme
learns reverse in 1000 steps (final answer loss: rope 2.05 against 0.09
without, alibi 1.26 against 0.82; nope 2.22 either way, as it has no
positions): sequence accuracy 0.00 at every size, token accuracy 0.11 to
0.08 for rope from size 31 to 124. At this budget the study does not
reproduce the paper's direction (its models train for far longer); more
steps (``steps=``) or a smaller ``max_position`` are the knobs to try.
"""

import ml_collections

from extrapolax.experiments import configs
from extrapolax.experiments.configs import algorithmic

MULTIPLES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def get_config(arg=None):
  """The study config; ``arg``: task, randomized, max_position, steps,
  train_len, max_size, seed, quick."""
  from extrapolax.experiments import data  # pylint: disable=import-outside-toplevel
  arg = configs.parse_arg(arg, task="copy", randomized=False, max_position=0,
                          steps=1000, train_len=64, max_size=0, seed=0,
                          quick=False)
  config = ml_collections.ConfigDict()
  config.train = algorithmic.get_config(
      f"task={arg.task},steps={arg.steps},train_len={arg.train_len},"
      f"max_size={arg.max_size},seed={arg.seed}")
  task = data.get_task(arg.task)
  largest = arg.max_size or task.max_length_for(arg.train_len)
  sizes = sorted({max(task.min_length, round(m * largest))
                  for m in MULTIPLES})
  if arg.quick:
    configs.shrink_for_smoke(config.train)
    sizes = sizes[::3]
  if arg.randomized:
    max_position = arg.max_position or 4 * task.max_tokens(max(sizes))
    config.train.data.positions = f"randomized(max_position={max_position})"
  config.variants = "nope,rope,alibi" if not arg.quick else "rope,alibi"
  config.from_zoo = False
  config.evals = ml_collections.ConfigDict()
  config.evals.algorithmic = dict(
      type="algorithmic", models="", task=arg.task, lengths=tuple(sizes),
      train_len=largest, train_min_len=task.min_length,
      num_examples=8 if arg.quick else 64, seed=0,
      implementation=ml_collections.config_dict.placeholder(str))
  return config
