r"""Tiny byte-level language model: the smallest training config.

2 layers, d_model 64, 4 query heads over 2 key/value heads, SwiGLU 192, byte
vocabulary (256), trained on 128-token windows of the Python standard
library's sources (the zero-network default corpus). AdamW, peak learning
rate 3e-3, 50 warmup steps, cosine decay to 3e-4.

Command (from the repository root)::

  python -m extrapolax.experiments.train \
      --config=experiments/configs/tiny.py --workdir=/tmp/tiny

Variants (``:key=value,...``)::

  --config=experiments/configs/tiny.py:pe=alibi        # position encoding
  --config=experiments/configs/tiny.py:pe=rope,steps=200,train_len=64

``pe`` is one of nope, sinusoidal, learned, rope, alibi, t5, kerple, fire.
Any field can also be overridden: ``--config.model.mask=sliding_window
--config.model.window=32``, ``--config.learning_rate=1e-3``.

Expected result (measured on the 2-core AMD EPYC CPU of the CI machine, jax
0.10.2, float32, default command): the logged per-batch loss (nats per byte)
goes 6.13 (step 1) -> 2.60 (50) -> 2.01 (150) -> 1.83 (250) -> 1.75 (350) ->
1.62-1.78 over steps 500-600 (1.78 at step 600; one batch, so +-0.1 noise).
The losses are the same bit for bit on every run of the command (and after
a resume). Wall time 37 s for the whole command on the otherwise idle
machine: 3.3 s to the first step (imports, the token store of the stdlib
sources, compilation), then about 44,000 training tokens/s (46 ms per
16 x 128 step; benchmarks/train_cpu.py); 55 s (27,000 tokens/s) while other
jobs shared the CPU.
"""

from extrapolax.experiments import configs


def get_config(arg=None):
  """The tiny config; ``arg``: pe, steps, train_len, batch_size, seed,
  curriculum (``experiments.curriculum``: "0:32x64;300:128x16", stages
  separated by semicolons; the field is set only when given)."""
  arg = configs.parse_arg(arg, pe="rope", steps=600, train_len=128,
                          batch_size=16, seed=0, curriculum="")
  config = configs.base_config()
  config.seed = arg.seed
  config.model.pe = arg.pe
  config.model.d_model = 64
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 192
  config.train_len = arg.train_len
  config.batch_size = arg.batch_size
  config.train_steps = arg.steps
  if arg.curriculum:
    config.curriculum = arg.curriculum
  return config
