"""One vocabulary: masks and position schemes named in one place each, the
implementation chosen at call time, and the package layering."""

import ast
import dataclasses
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax import attention
from extrapolax.attention import core
from extrapolax.attention import layer as L
from extrapolax.attention import masks
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


# A mask defined here, in a user's module: registering it is all it takes
# for specs and configs to name it.
@masks.register("every_other")
@dataclasses.dataclass(frozen=True)
class EveryOther(masks.Mask):
  """Causal, and only keys whose distance is a multiple of ``stride``."""
  stride: int = 2

  def __call__(self, q_pos, k_pos):
    d = q_pos - k_pos
    return (d >= 0) & (d % self.stride == 0)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    return masks.Causal().block_visibility(q_lo, q_hi, k_lo, k_hi)[0], (
        jnp.zeros_like(q_lo + k_lo, dtype=bool))


# A position scheme defined here: ALiBi with doubled slopes.
@L.register_position
@dataclasses.dataclass(frozen=True)
class SteepAlibi(L.PositionScheme):
  """ALiBi with ``factor`` times the paper's slopes."""
  name: ClassVar[str] = "steep_alibi"
  factor: float = 2.0

  def alibi_slopes(self, num_heads):
    return self.factor * attention.alibi_slopes(num_heads)


def _qkv(t=12, n=2, h=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (1, t, n, h), jnp.float32) for k in keys]


def test_builtin_mask_names_parse_and_label():
  assert set(masks.names()) >= {"causal", "sliding_window", "lambda",
                                "chunked", "prefix_lm", "every_other"}
  assert masks.parse("lambda(4, window=64)") == (
      "lambda", {"num_sinks": 4, "window": 64})
  assert masks.from_name("lambda", num_sinks=4, window=64) == masks.Lambda(
      4, 64)
  assert masks.from_name("chunked", chunk=4) == (
      masks.Causal() & masks.Chunked(4))
  assert masks.label("lambda", {"num_sinks": 4, "window": 8}) == (
      "lambda(sinks=4, window=8)")
  assert masks.label("every_other", {"stride": 3}) == "every_other(stride=3)"
  assert "every_other(stride=2)" in masks.describe_names()


@pytest.mark.parametrize("text,match", [
    ("lamda", "did you mean 'lambda'"),
    ("sliding_window(windw=3)", "has no parameter 'windw'"),
    ("sliding_window", "needs window"),
    ("causal(3)", "positional values"),
    ("lambda(4, x)", "not a number"),
    ("every_other(stride=0)", None),
])
def test_bad_mask_text_is_one_clear_error(text, match):
  if match is None:   # the mask's own check: d % 0 is not a valid mask
    spec = AttentionSpec(mask=text)      # builds; the value is the user's
    assert spec.mask_args == {"stride": 0}
    return
  with pytest.raises(ValueError, match=match):
    name, params = masks.parse(text)
    masks.from_name(name, **params)


def test_spec_normalises_mask_text_and_round_trips():
  a = AttentionSpec(mask="lambda(4, 64)")
  assert a == AttentionSpec(mask="lambda", num_sinks=4, window=64)
  b = AttentionSpec(mask="prefix_lm", mask_args={"prefix_len": 8})
  assert b == AttentionSpec(mask="prefix_lm(prefix_len=8)")
  assert b.to_mask() == masks.PrefixLM(8)
  config = ModelConfig(attention=(a, b, AttentionSpec(mask="every_other(3)")))
  assert ModelConfig.from_json(config.to_json()) == config
  with pytest.raises(ValueError, match="sets window=64 but window=32"):
    AttentionSpec(mask="sliding_window(64)", window=32)


def test_user_mask_runs_in_a_model_and_matches_the_dense_oracle():
  spec = AttentionSpec(position="nope", mask="every_other(stride=3)")
  config = ModelConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                       attention=(spec,))
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  assert model.blocks[0].attn.mask == masks.from_name("every_other", stride=3)
  q, k, v = _qkv()
  want = core.dot_product_attention(q, k, v, mask=EveryOther(3),
                                    implementation="xla")
  got = core.dot_product_attention(q, k, v, mask=EveryOther(3),
                                   implementation="xla_chunked")
  np.testing.assert_allclose(got, want, atol=1e-5)
  dense = np.asarray(EveryOther(3).materialize(12, 12))
  assert dense[5, 2] and not dense[5, 3] and not dense[2, 5]
  tokens = jnp.arange(10, dtype=jnp.int32)[None] % 7
  assert np.isfinite(np.asarray(model(tokens))).all()


def test_user_position_scheme_by_name():
  spec = AttentionSpec(position="steep_alibi",
                       position_args={"factor": 3.0})
  config = ModelConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                       attention=(spec,))
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  assert model.blocks[0].attn.position == L.position_from_name(
      "steep_alibi", factor=3.0)
  layer = L.Attention(16, 2, position="alibi", rngs=nnx.Rngs(0))
  assert layer.position == L.Alibi()
  with pytest.raises(ValueError, match="has no parameter 'slope'"):
    L.position_from_name("steep_alibi", slope=1.0)
  with pytest.raises(ValueError, match="rope_base=5.0 needs position='rope'"):
    AttentionSpec(position="steep_alibi", rope_base=5.0)


class _Counting(core.Implementation):
  """The xla implementation, counting its calls."""
  name = "counting_xla"
  calls = 0

  def __call__(self, request):
    type(self).calls += 1
    return core._resolve("xla")(request)  # pylint: disable=protected-access


def test_use_implementation_chooses_at_call_time():
  core.register_implementation("counting_xla", _Counting)
  q, k, v = _qkv()
  want = core.dot_product_attention(q, k, v, mask=masks.Causal(),
                                    implementation="xla")
  before = _Counting.calls
  with attention.use_implementation("counting_xla"):
    assert attention.current_implementation().name == "counting_xla"
    got = core.dot_product_attention(q, k, v, mask=masks.Causal())
    with attention.use_implementation("xla_chunked"):   # nested
      core.dot_product_attention(q, k, v, mask=masks.Causal())
    # an explicit argument wins over the context
    core.dot_product_attention(q, k, v, mask=masks.Causal(),
                               implementation="xla")
    with attention.use_implementation(None):   # sets nothing
      core.dot_product_attention(q, k, v, mask=masks.Causal())
  assert attention.current_implementation() is None
  assert _Counting.calls - before == 2
  np.testing.assert_allclose(got, want, atol=1e-6)

  # A built layer (its model built for "xla_chunked") follows the context.
  layer = L.Attention(16, 2, implementation="xla_chunked", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 6, 16))
  before = _Counting.calls
  with attention.use_implementation("counting_xla"):
    layer(x)
  assert _Counting.calls - before == 1
  with pytest.raises(ValueError, match="unknown implementation"):
    with attention.use_implementation("xla_chunkd"):
      pass


def test_use_implementation_is_part_of_jits_cache_key():
  """A jitted function called under another implementation is traced again
  (it used to keep the first one silently); the same name again is a hit."""
  core.register_implementation("counting_xla", _Counting)
  q, k, v = _qkv()
  traced = []

  def f(q, k, v):
    traced.append(attention.current_implementation().name)
    return core.dot_product_attention(q, k, v, mask=masks.Causal())

  fn = jax.jit(f)
  with attention.use_implementation("xla"):
    want = fn(q, k, v)
  with attention.use_implementation("xla"):      # a new block, same name
    fn(q, k, v)
  assert traced == ["xla"]
  before = _Counting.calls
  with attention.use_implementation("counting_xla"):
    got = fn(q, k, v)
  assert traced == ["xla", "counting_xla"]
  assert _Counting.calls - before == 1          # ran the new implementation
  with attention.use_implementation(attention.XlaChunked(block_q=2)):
    fn(q, k, v)
  with attention.use_implementation(attention.XlaChunked(block_q=2)):
    fn(q, k, v)                                  # an equal instance: a hit
  assert traced == ["xla", "counting_xla", "xla_chunked"]
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_context_fallback_for_a_jax_without_user_contexts():
  state = core._ContextVarState()  # pylint: disable=protected-access
  assert state.value is None
  with state("a"):
    with state("b"):
      assert state.value == "b"
    assert state.value == "a"
  assert state.value is None


def _imports(path: pathlib.Path) -> set[str]:
  """extrapolax.X modules a file imports (absolute or relative)."""
  tree = ast.parse(path.read_text())
  package = path.relative_to(ROOT).parts[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("extrapolax")}
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        out.add(f"extrapolax.{package}")
      elif node.module and node.module.startswith("extrapolax"):
        out.add(node.module)
        if node.module == "extrapolax":
          out |= {f"extrapolax.{a.name}" for a in node.names}
  return out


LAYERS = ("common", "pallas_kernels", "attention", "models", "experiments")


def test_packages_import_one_way_only():
  """common <- pallas_kernels <- attention <- models <- experiments: no
  package imports one above it (so there is no package-level cycle)."""
  bad = []
  for rank, package in enumerate(LAYERS):
    for path in (ROOT / package).rglob("*.py"):
      for module in _imports(path):
        target = module.split(".")[1] if "." in module else ""
        if target in LAYERS and LAYERS.index(target) > rank:
          bad.append(f"{path.relative_to(ROOT)} imports {module}")
  assert not bad, bad


def test_no_private_names_across_packages():
  bad = []
  for package in LAYERS:
    for path in (ROOT / package).rglob("*.py"):
      text = path.read_text()
      for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and (
            node.module.startswith("extrapolax.")) and (
                node.module.split(".")[1] != package):
          bad += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                  for a in node.names if a.name.startswith("_")]
  assert not bad, bad
  for path in (ROOT / "pallas_kernels").rglob("*.py"):
    assert "extrapolax.attention" not in path.read_text(), path
