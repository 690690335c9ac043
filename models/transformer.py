"""The decoder-only LM in flax.nnx.

Token embedding (tied or not; optionally scaled by sqrt(d_model)) ->
optional absolute positions -> layers of [pre-norm RMSNorm -> grouped-query
attention (-> post-norm) -> residual, pre-norm RMSNorm -> gated MLP (SwiGLU or
GeGLU) (-> post-norm) -> residual] -> final RMSNorm -> logits (float32,
optionally soft-capped). The post-norms, GeGLU, the embedding scale and the
logit cap are Gemma 2/3's; the rest is Llama's.

``model(tokens, *, positions=None, segment_ids=None)``: packed rows pass
per-document positions (restarting at 0) and segment ids; each document then
gives the same logits as it would alone.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from extrapolax.attention import layer as attn_layer
from extrapolax.attention import positional

from .config import ModelConfig

Array = jax.Array

# Under a mesh (jax.set_mesh) with these axis names, the residual stream
# [B, T, D] is kept with its batch over data/fsdp and its sequence over
# context (experiments.sharding names the same axes).
BATCH_MESH_AXES = ("data", "fsdp")
SEQUENCE_MESH_AXIS = "context"


def constrain_activations(x: Array) -> Array:
  """A sharding constraint on [B, T, ...] activations when the ambient mesh
  has the batch / context axes (and they divide B / T); else ``x``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  sizes = dict(mesh.shape)
  batch = tuple(a for a in BATCH_MESH_AXES if sizes.get(a, 1) > 1)
  rows = 1
  for a in batch:
    rows *= sizes[a]
  seq = sizes.get(SEQUENCE_MESH_AXIS, 1)
  spec = (batch if batch and x.shape[0] % rows == 0 else None,
          SEQUENCE_MESH_AXIS if seq > 1 and x.shape[1] % seq == 0 else None)
  if spec == (None, None):
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(*spec, *([None] * (x.ndim - 2))))


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


_ACTIVATIONS = {"silu": jax.nn.silu,
                "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-GELU (GeGLU)."""

  def __init__(self, d_model: int, hidden: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, activation: str = "silu"):
    self.activation = activation
    dense = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.gate = dense(d_model, hidden)
    self.up = dense(d_model, hidden)
    self.down = dense(hidden, d_model)

  def __call__(self, x: Array) -> Array:
    return self.down(_ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """One pre-norm decoder layer."""

  def __init__(self, config: ModelConfig, index: int, *, rngs: nnx.Rngs):
    spec = config.layer_spec(index)
    dtype, param_dtype = _dtype(config.dtype), _dtype(config.param_dtype)
    norm = lambda: nnx.RMSNorm(config.d_model, epsilon=config.norm_eps,
                               dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.attn_norm = norm()
    self.attn = attn_layer.Attention(
        config.d_model, config.num_heads, num_kv_heads=config.kv_heads,
        head_dim=config.per_head_dim, position=spec.to_position(),
        mask=spec.to_mask(), implementation=config.implementation,
        logits_soft_cap=spec.logits_soft_cap,
        length_scaling=spec.length_scaling,
        temperature=spec.to_temperature(), qk_norm=spec.qk_norm,
        sink_logits=spec.sink_logits,
        qk_norm_eps=config.norm_eps, qkv_bias=config.qkv_bias,
        out_bias=config.out_bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = SwiGLU(config.d_model, config.mlp_dim, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs,
                      activation=config.mlp_activation)
    if config.post_norms:
      self.post_attn_norm = norm()
      self.post_mlp_norm = norm()

  def attn_residual(self, x, attn_out):
    """x + the attention's output (o_proj applied), post-normed if set."""
    if hasattr(self, "post_attn_norm"):
      attn_out = self.post_attn_norm(attn_out)
    return x + attn_out

  def mlp_residual(self, x):
    """x + MLP(pre-norm(x)), post-normed if set."""
    out = self.mlp(self.mlp_norm(x))
    if hasattr(self, "post_mlp_norm"):
      out = self.post_mlp_norm(out)
    return x + out

  def __call__(self, x, positions, segment_ids):
    x = self.attn_residual(x, self.attn(self.attn_norm(x),
                                        positions=positions,
                                        segment_ids=segment_ids))
    return self.mlp_residual(x)


class DecoderLM(nnx.Module):
  """A decoder-only language model built from a ``ModelConfig``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = _dtype(config.dtype), _dtype(config.param_dtype)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    if config.absolute == "learned":
      self.position_embed = attn_layer.LearnedPositionEmbedding(
          config.max_len, config.d_model, rngs=rngs, param_dtype=param_dtype)
    self.blocks = nnx.List(
        [Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps,
                                  dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(config.d_model, config.vocab_size,
                                use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None) -> Array:
    """tokens int [B, T] -> logits float32 [B, T, vocab]."""
    return self.head(self.hidden(tokens, positions=positions,
                                 segment_ids=segment_ids))

  def hidden(self, tokens: Array, *, positions: Optional[Array] = None,
             segment_ids: Optional[Array] = None) -> Array:
    """tokens int [B, T] -> the final-normed hidden states [B, T, d_model]
    (``head`` of them is the logits; a long window's loss can run the head
    over a few positions at a time)."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [batch, seq], got "
                       f"{tokens.dtype}{list(tokens.shape)}")
    b, t = tokens.shape
    x = self.embed_tokens(tokens)
    abs_positions = (jnp.arange(t, dtype=jnp.int32) if positions is None
                     else jnp.asarray(positions, jnp.int32))
    abs_positions = jnp.broadcast_to(abs_positions, (b, t))
    if self.config.absolute == "sinusoidal":
      x = x + positional.sinusoidal_embedding(
          abs_positions, self.config.d_model).astype(x.dtype)
    elif self.config.absolute == "learned":
      x = x + self.position_embed(abs_positions).astype(x.dtype)
    x = constrain_activations(x)
    with attn_layer.rope_tables_once():   # RoPE tables once, not per layer
      for block in self.blocks:
        x = constrain_activations(block(x, positions, segment_ids))
    return self.final_norm(x)

  def embed_tokens(self, tokens: Array) -> Array:
    """int tokens [...] -> embeddings [..., d_model] (scaled if set)."""
    x = self.embed(tokens)
    if self.config.scale_embeddings:   # Gemma: the normalizer in x's dtype
      x = x * jnp.asarray(self.config.d_model ** 0.5, x.dtype)
    return x

  def head(self, x: Array) -> Array:
    """Final-normed hidden states [..., d_model] -> logits float32."""
    if self.config.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    cap = self.config.final_logit_soft_cap
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    return logits


def num_params(model: nnx.Module) -> int:
  """Number of parameter scalars."""
  return sum(x.size for x in jax.tree_util.tree_leaves(
      nnx.state(model, nnx.Param)))
