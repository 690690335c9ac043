"""KV-cache decoding that can stream far past the training length.

The cache holds keys *before* RoPE, so every step rotates them with the
positions (and, for dynamic NTK, the frequencies) of the current length.
Decoding equals the full forward position by position, except that with
dynamic NTK the hidden states behind a deeper layer's cached keys were
computed at an earlier length (exact for the first layer; no cache can do
better). The cache size is fixed by the policy, so memory is bounded however
long generation runs. Prompts are fed one token per jit-compiled step.

Policies (``CachePolicy``):

* ``full(max_len)``: every token, slot = position.
* ``window(w)``: a rolling buffer of the last ``w`` tokens.
* ``sinks(num_sinks, window)``: StreamingLLM: the first ``num_sinks`` tokens
  plus a rolling window; keys are re-positioned by their rank in the cache.
* ``sinks(num_sinks, window, reposition=False)``: the same cache with true
  positions: LM-Infinite (pair it with a ``lambda`` mask and a distance
  ceiling in the model).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extrapolax.attention import positional
from extrapolax.common.checks import check_int, check_number

from .transformer import DecoderLM

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """Which tokens the cache keeps (see the module docstring)."""
  kind: str
  capacity: int
  num_sinks: int = 0
  reposition: bool = False

  def __post_init__(self):
    if self.kind not in ("full", "window", "sinks"):
      raise ValueError(f"cache kind must be full, window or sinks, got "
                       f"{self.kind!r}")
    if self.capacity < 1 or self.capacity <= self.num_sinks:
      raise ValueError(f"cache capacity {self.capacity} must exceed "
                       f"num_sinks {self.num_sinks} and be >= 1")

  @classmethod
  def full(cls, max_len: int):
    return cls("full", max_len)

  @classmethod
  def window(cls, window: int):
    return cls("window", window)

  @classmethod
  def sinks(cls, num_sinks: int, window: int, *, reposition: bool = True):
    if num_sinks < 0 or window < 1:
      raise ValueError(f"need num_sinks >= 0 and window >= 1, got "
                       f"{num_sinks}, {window}")
    return cls("sinks", num_sinks + window, num_sinks, reposition)

  def slot(self, position):
    """The cache slot of absolute ``position``."""
    if self.kind == "full":
      return position
    if self.kind == "window":
      return position % self.capacity
    ring = self.capacity - self.num_sinks
    return jnp.where(position < self.num_sinks, position,
                     self.num_sinks + (position - self.num_sinks) % ring)


def init_cache(model: DecoderLM, batch: int, policy: CachePolicy):
  """An empty cache: keys/values per layer, and each slot's position (-1)."""
  cfg = model.config
  shape = (batch, policy.capacity, cfg.kv_heads, cfg.per_head_dim)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
  layers = [dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
            for _ in range(cfg.num_layers)]
  return dict(layers=layers,
              slot_pos=jnp.full((batch, policy.capacity), -1, jnp.int32))


def decode_step(model: DecoderLM, cache, tokens: Array, position,
                policy: CachePolicy):
  """One token per row at absolute ``position``: (logits [B, V], cache)."""
  cfg = model.config
  b = tokens.shape[0]
  pos = jnp.full((b, 1), position, jnp.int32)
  x = model.embed(tokens[:, None])
  if cfg.absolute == "sinusoidal":
    x = x + positional.sinusoidal_embedding(pos, cfg.d_model).astype(x.dtype)
  elif cfg.absolute == "learned":
    x = x + model.position_embed(pos).astype(x.dtype)
  slot = policy.slot(jnp.asarray(position, jnp.int32))
  slot_pos = cache["slot_pos"].at[:, slot].set(position)
  valid = slot_pos >= 0
  # Empty slots sit in the future, where every causal mask hides them.
  k_pos = jnp.where(valid, slot_pos, position + 1)
  rope_q = rope_k = None
  if policy.reposition:
    # StreamingLLM: positions are ranks within the cache.
    earlier = (slot_pos[:, None, :] < slot_pos[:, :, None]) & valid[:, None]
    rope_k = jnp.where(valid, earlier.sum(-1), position + 1).astype(jnp.int32)
    rope_q = (valid.sum(-1, keepdims=True) - 1).astype(jnp.int32)
  new_layers = []
  for block, layer_cache in zip(model.blocks, cache["layers"]):
    attn = block.attn
    h = block.attn_norm(x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    keys = layer_cache["k"].at[:, slot].set(k[:, 0].astype(
        layer_cache["k"].dtype))
    values = layer_cache["v"].at[:, slot].set(v[:, 0].astype(
        layer_cache["v"].dtype))
    new_layers.append(dict(k=keys, v=values))
    out = attn.attend(q, keys.astype(q.dtype), values.astype(q.dtype), pos,
                      k_pos, rope_q_positions=rope_q,
                      rope_k_positions=rope_k)
    x = x + attn.o_proj(out)
    x = x + block.mlp(block.mlp_norm(x))
  x = model.final_norm(x)
  logits = model.embed.attend(x) if cfg.tie_embeddings else model.lm_head(x)
  return logits[:, 0].astype(jnp.float32), dict(layers=new_layers,
                                                slot_pos=slot_pos)


def _sample(logits, rng, temperature, top_k):
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


def _check_generate_args(model: DecoderLM, prompt, steps, temperature):
  """ValueErrors for what would otherwise decode NaN logits or nothing."""
  check_int("steps", steps, 0)
  check_number("temperature", temperature, minimum=0.0)
  shape, dtype = getattr(prompt, "shape", None), getattr(prompt, "dtype", None)
  if (shape is None or len(shape) != 2
      or not jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"prompt must be an int array [batch, prompt_len], got "
                     f"{dtype}{list(shape) if shape is not None else ''} "
                     f"({type(prompt).__name__}); a single prompt is "
                     "prompt[None]")
  if shape[1] < 1:
    raise ValueError("the prompt needs at least one token")
  ids = np.asarray(prompt)
  vocab = model.config.vocab_size
  if ids.size and (ids.min() < 0 or ids.max() >= vocab):
    bad = ids.min() if ids.min() < 0 else ids.max()
    raise ValueError(f"prompt token id {int(bad)} is outside the vocabulary "
                     f"[0, {vocab})")
  if model.config.absolute == "learned":
    # The last position fed is P + steps - 2: the learned table's own check
    # (the error the forward gives).
    model.position_embed(jnp.asarray([max(shape[1] + steps - 2, 0)]))


def generate(model: DecoderLM, prompt: Array, steps: int, *,
             policy: Optional[CachePolicy] = None, temperature: float = 0.0,
             top_k: Optional[int] = None, rng: Optional[Array] = None,
             return_logits: bool = False):
  """Feeds ``prompt`` [B, P] through the cache, then samples ``steps`` tokens.

  temperature 0 is greedy; otherwise softmax sampling at that temperature,
  restricted to the ``top_k`` most likely tokens when given. One jit-compiled
  decode step serves every position. Returns tokens [B, P + steps] (and the
  logits of every step [B, P + steps - 1, V] and the final cache with
  return_logits).
  """
  _check_generate_args(model, prompt, steps, temperature)
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k must be in [1, {model.config.vocab_size}], "
                     f"got {top_k}")
  b, p = prompt.shape
  policy = policy or CachePolicy.full(p + steps)
  if policy.kind == "full" and p + steps > policy.capacity:
    raise ValueError(f"{p + steps} tokens do not fit a full cache of "
                     f"{policy.capacity}; use a window or sinks cache")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, cache, tokens, position, key):
    m = nnx.merge(graphdef, state)
    logits, cache = decode_step(m, cache, tokens, position, policy)
    return logits, cache, _sample(logits, key, temperature, top_k)

  cache = init_cache(model, b, policy)
  out = [prompt[:, i] for i in range(p)]
  all_logits = []
  token = prompt[:, 0]
  for position in range(p + steps - 1):
    rng, key = jax.random.split(rng)
    logits, cache, sampled = step(state, cache, token, position, key)
    all_logits.append(logits)
    token = prompt[:, position + 1] if position + 1 < p else sampled
    if position + 1 >= p:
      out.append(sampled)
  tokens = jnp.stack(out, axis=1)
  if return_logits:
    return tokens, jnp.stack(all_logits, axis=1), cache
  return tokens
