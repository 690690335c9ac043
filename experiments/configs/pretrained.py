r"""The long-context study on a real pretrained model (no training).

SmolLM2-135M-Instruct (trained context 8192; zoo name
"smollm2-135m-instruct", its verified GGUF) evaluated zero-shot past its
context on held-out real text tokenized with its own tokenizer (Python
source, KJV books, Shakespeare plays: held-out documents joined to at least
4x the context), at 1/4x, 1/2x, 1x, 2x and 4x the context:

* ``length``: the model as it is (plain RoPE), perplexity vs length and its
  loss per position over the longest window.
* ``rope_scaling``: linear (PI), NTK, dynamic NTK, YaRN and llama3 scaling,
  factor matched to each length (eval_len / 8192; 1 at or below the context,
  where each equals the plain model).
* ``mask``: a plain sliding window (8192 keys), StreamingLLM (4 sinks + an
  8192-key window), LM-Infinite (the Lambda mask, 4 sinks + 8192-key band,
  with the distance ceiling at 8192), and Self-Extend (group 8, neighbour
  window 1024, plain causal mask; Self-Extend's settings for 4x extension of
  Llama-2: (32768 - 1024) / 8 + 1024 < 8192 keeps every grouped distance
  inside the trained range), and STRING (An et al. 2024; local window 128,
  shift matched to 2x and to 4x as N - 8192 + 128 so every far pair's
  remapped distance is a trained one; the paper's S = L/3 targets the
  effective context inside L, not extrapolation).

Command (from the repository root)::

  python -m extrapolax.experiments.extrapolation \
      --config=experiments/configs/pretrained.py:quick --workdir=DIR

Arguments (``:key=value,...``):

  quick: 2048, 8192 and 16384 tokens (1/4x, 1x, 2x); the scalings and masks
    only at 2x (at or below 1x a matched scaling is the plain model and a
    8192-key band covers every key); scored tokens per length: one 8192
    window's worth (4 windows at 2048, 1 at 8192, 1 at 16384: the 16384
    window scores all its 16384 tokens); Python source only; YaRN (matched),
    LM-Infinite and Self-Extend (STRING only in the full config: it would
    add about 170 s); passkey (chat template) at 4096 and 16384, depth 0.5,
    one key per cell, the model and Self-Extend, plus greedy decoding at
    4096. Measured (2026-12-06, `/usr/bin/time -v`, the 2-core CPU with
    nothing else running, load average at most 2.0): 17 min 51 s wall, 4.0
    GB max RSS, 1862 s of CPU time; with STRING as a third mask arm 20 min
    21 s. On the CPU shared with other test runs (load 5-7) an earlier,
    similar config took 27 min.
    Numbers in the README section "The long-context study on SmolLM2".
  smoke: seconds, for tests: a tiny model (``model=PATH`` of a GGUF, e.g.
    ``models.gguf.write_random_llama``), 64-token context, lengths 16..128,
    passkey at 384 and 512.
  model: the model (a zoo name, GGUF file, HF folder or zoo checkpoint).
  train_len: the model's trained context (the unit of the lengths).

Full (no ``quick``): every arm at every length, 32768 scored tokens per
length, all three corpora; not run. CPU estimate from the quick run's
measured forwards under the same load (a 16384-token forward 140-200 s,
32768 about 3x that): perplexity about 3 hours (12 arms at 4x and 2x
dominate), the passkey grid (5 lengths x 5 depths x 2 keys x 3 arms, plus
greedy) about 8 hours: a GPU job.

Full: passkey at every length, 5 depths, 2 keys per cell, for the model,
Self-Extend and LM-Infinite (teacher-forced), and greedy with 1 key.

Memory: evaluation runs xla_chunked attention (memory linear in length) by
default on the CPU, one window per call at >= 8192 tokens, the LM head over
position chunks: XLA's memory analysis gives 3.4 GiB at 32768 tokens
(benchmarks/pretrained_memory.py).
"""

import ml_collections
from ml_collections import config_dict

from extrapolax.experiments import configs


# STRING's local window (the paper's W = 128); its shift is matched to a
# length N as N - train_len + W, so every far pair's remapped distance stays
# inside the trained context (the paper's S = L/3 targets the effective
# context inside L, not extrapolation).
_STRING_W = 128


def _perplexity(multiples, max_tokens) -> dict:
  return dict(multiples=multiples, modes="nonoverlap",
              stride=config_dict.placeholder(int), max_tokens=max_tokens,
              tokens_per_batch=8192,
              implementation=config_dict.placeholder(str),
              context_devices=1)


def get_config(arg=None):
  """The study config; ``arg``: quick, smoke, model, train_len."""
  arg = configs.parse_arg(arg, quick=False, smoke=False,
                          model="smollm2-135m-instruct", train_len=8192)
  config = ml_collections.ConfigDict()
  config.model_source = arg.model
  config.variants = "smollm2" if arg.model == "smollm2-135m-instruct" else (
      "model")
  config.train = ml_collections.ConfigDict()
  config.train.train_len = arg.train_len
  config.train.seed = 0
  config.train.data = dict(
      corpora="python_stdlib,kjv,shakespeare",
      min_doc_tokens=4 * arg.train_len + 1,   # a 4x window and its target
      max_eval_tokens=16 * arg.train_len, eval_fraction=0.1, split_seed=0,
      cache_dir=config_dict.placeholder(str))
  multiples = (0.25, 0.5, 1, 2, 4)
  max_tokens = 4 * arg.train_len
  window = arg.train_len
  config.evals = ml_collections.ConfigDict()
  config.evals.length = dict(type="length", models="",
                             **_perplexity(multiples, max_tokens))
  config.evals.rope_scaling = dict(
      type="rope_scaling", models="", methods="linear,ntk,dynamic,yarn,llama3",
      factors="matched", **_perplexity(multiples, max_tokens))
  config.evals.mask = dict(
      type="mask", models="",
      masks=("sliding_window,lambda,lambda+ceiling,"
             "causal+self_extend(8, 1024),"
             f"causal+string({window + _STRING_W}, {_STRING_W}),"
             f"causal+string({3 * window + _STRING_W}, {_STRING_W})"),
      window=window, num_sinks=4, **_perplexity(multiples, max_tokens))
  for name in ("rope_scaling", "mask"):   # every arm's loss per position
    config.evals[name].position_buckets = 32
  # Retrieval on the instruct model: the chat-framed passkey at every length
  # and 5 depths, the model as it is and with Self-Extend / LM-Infinite.
  passkey = dict(type="passkey", models="",
                 lengths=tuple(int(m * arg.train_len) for m in multiples),
                 depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=2, chat=True,
                 tokenizer="model",
                 masks="causal,causal+self_extend(8, 1024),lambda+ceiling",
                 window=window, num_sinks=4,
                 implementation=config_dict.placeholder(str))
  config.evals.passkey = dict(passkey, decode="teacher_forced")
  config.evals.passkey_greedy = dict(passkey, decode="greedy", trials=1)
  if arg.quick or arg.smoke:
    config.train.data.corpora = "python_stdlib"
    config.train.data.min_doc_tokens = 2 * arg.train_len + 1
    config.train.data.max_eval_tokens = 4 * arg.train_len
    for name in ("length", "rope_scaling", "mask"):
      config.evals[name].max_tokens = arg.train_len
    config.evals.length.multiples = (0.25, 1, 2)
    config.evals.rope_scaling.multiples = (2,)
    config.evals.rope_scaling.methods = "yarn"
    config.evals.mask.multiples = (2,)
    config.evals.mask.masks = "lambda+ceiling,causal+self_extend(8, 1024)"
    config.evals.passkey.lengths = (arg.train_len // 2, 2 * arg.train_len)
    config.evals.passkey.depths = (0.5,)
    config.evals.passkey.trials = 1
    config.evals.passkey.masks = "causal,causal+self_extend(8, 1024)"
    config.evals.passkey_greedy.lengths = (arg.train_len // 2,)
    config.evals.passkey_greedy.depths = (0.5,)
    config.evals.passkey_greedy.masks = "causal"
  if arg.smoke:
    config.train.data.corpora = "pydoc_topics"
    config.evals.rope_scaling.methods = "none,linear,ntk,dynamic,yarn,llama3"
    config.evals.mask.masks = ("causal,sliding_window,lambda,lambda+ceiling,"
                               "causal+self_extend(2, 8),causal+string(40, 8)")
    for name in ("passkey", "passkey_greedy"):
      config.evals[name].masks = "causal,causal+self_extend(2, 8)"
      config.evals[name].lengths = (384, 512)   # the prompt text is ~300
    config.evals.passkey.depths = (0.0, 0.5, 1.0)
  return config
