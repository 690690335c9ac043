"""KV-cache decoding that can stream far past the training length.

The cache holds keys *before* RoPE, so every step rotates them with the
positions (and, for dynamic NTK, the frequencies) of the current length.
Decoding equals the full forward position by position, except that with
dynamic NTK the hidden states behind a deeper layer's cached keys were
computed at an earlier length (exact for the first layer; no cache can do
better). The cache size is fixed by the policy, so memory is bounded however
long generation runs.

Prompts are prefilled: run through the model in one forward (or in chunks of
``prefill_chunk`` tokens) that writes every cache slot token-by-token
feeding would have written, then decoding goes one token per jit-compiled
step. This is exact while the cache has evicted nothing the model could see:
always for ``full``; for ``window`` / ``sinks`` when every layer's mask hides
what the cache drops (a sliding window or Lambda mask no wider than the
cache) and keys keep true positions. Otherwise (e.g. a causal model streamed
through a window cache, or StreamingLLM's re-positioned keys) the first
``capacity`` prompt tokens are prefilled and the rest are fed step by step.
With dynamic NTK past its reference length, a prefilled chunk uses one
length's frequencies, as the full forward does.

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
import functools
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
  b = tokens.shape[0]
  pos = jnp.full((b, 1), position, jnp.int32)
  x = _embed(model, tokens[:, None], pos)
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
    x = block.mlp_residual(block.attn_residual(x, attn.o_proj(out)))
  return _head(model, x)[:, 0], dict(layers=new_layers, slot_pos=slot_pos)


def _embed(model: DecoderLM, tokens: Array, pos: Array) -> Array:
  cfg = model.config
  x = model.embed_tokens(tokens)
  if cfg.absolute == "sinusoidal":
    x = x + positional.sinusoidal_embedding(pos, cfg.d_model).astype(x.dtype)
  elif cfg.absolute == "learned":
    x = x + model.position_embed(pos).astype(x.dtype)
  return x


def _head(model: DecoderLM, x: Array) -> Array:
  return model.head(model.final_norm(x))


def prefill(model: DecoderLM, cache, tokens: Array, start, policy: CachePolicy,
            *, fresh: bool = False):
  """Tokens [B, T] at positions start..start+T-1 in one forward.

  Each query attends to the cache (keys of positions < start) and to the
  chunk's own keys, with true positions under the model's masks; then the
  chunk's keys and values go into the slots token-by-token feeding would
  have left them in (a later token of the chunk wins a shared slot). Exact
  when nothing the model can see has been evicted (see the module
  docstring; ``generate`` decides). ``fresh``: the cache is empty, so it is
  not attended to. Returns (logits [B, T, V], cache).
  """
  b, t = tokens.shape
  start = jnp.asarray(start, jnp.int32)
  pos = start + jnp.arange(t, dtype=jnp.int32)
  q_pos = jnp.broadcast_to(pos, (b, t))
  x = _embed(model, tokens, q_pos)
  last = start + t - 1
  ring = policy.capacity - policy.num_sinks
  keep = (pos < policy.num_sinks) | (pos > last - ring)
  # Dropped tokens scatter out of bounds (mode="drop").
  slots = jnp.where(keep, policy.slot(pos), policy.capacity)
  old_pos = cache["slot_pos"]
  # Empty slots sit in the future, where every causal mask hides them.
  k_pos = q_pos if fresh else jnp.concatenate(
      [jnp.where(old_pos >= 0, old_pos, last + 1), q_pos], axis=1)
  new_layers = []
  for block, layer_cache in zip(model.blocks, cache["layers"]):
    attn = block.attn
    h = block.attn_norm(x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    if fresh:
      keys, values = k, v
    else:
      keys = jnp.concatenate([layer_cache["k"].astype(k.dtype), k], axis=1)
      values = jnp.concatenate([layer_cache["v"].astype(v.dtype), v], axis=1)
    out = attn.attend(q, keys, values, q_pos, k_pos)
    new_layers.append({
        name: layer_cache[name].at[:, slots].set(
            new.astype(layer_cache[name].dtype), mode="drop")
        for name, new in (("k", k), ("v", v))})
    x = block.mlp_residual(block.attn_residual(x, attn.o_proj(out)))
  slot_pos = old_pos.at[:, slots].set(q_pos, mode="drop")
  return _head(model, x), dict(layers=new_layers, slot_pos=slot_pos)


def prefill_length(model: DecoderLM, policy: CachePolicy, prompt_len: int
                   ) -> int:
  """How many prompt tokens ``generate`` prefills exactly (the rest are
  fed step by step): all of them unless the cache evicts keys the model's
  masks could still see."""
  if policy.kind == "full" or prompt_len <= policy.capacity:
    return prompt_len
  ring = policy.capacity - policy.num_sinks
  covered = not policy.reposition and all(
      (spec.mask == "sliding_window" and spec.window <= ring) or (
          spec.mask == "lambda" and spec.window <= ring
          and spec.num_sinks <= policy.num_sinks)
      for spec in model.config.attention)
  return prompt_len if covered else policy.capacity


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
             return_logits: bool = False, prefill_chunk: Optional[int] = None,
             use_prefill: bool = True):
  """Prefills ``prompt`` [B, P] into the cache, then samples ``steps`` tokens.

  temperature 0 is greedy; otherwise softmax sampling at that temperature,
  restricted to the ``top_k`` most likely tokens when given. The prompt runs
  through the model in one forward (chunks of ``prefill_chunk`` tokens when
  given; ``use_prefill=False`` feeds it one token per step, the reference
  path); one jit-compiled decode step serves every later position. Returns
  tokens [B, P + steps] (and the logits of every position [B, P + steps - 1,
  V] and the final cache with return_logits).
  """
  _check_generate_args(model, prompt, steps, temperature)
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k must be in [1, {model.config.vocab_size}], "
                     f"got {top_k}")
  if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or (
      not isinstance(prefill_chunk, int)) or prefill_chunk < 1):
    raise ValueError(f"prefill_chunk must be None or an integer >= 1, got "
                     f"{prefill_chunk!r}")
  b, p = prompt.shape
  if steps == 0 and not return_logits:
    return prompt                  # nothing to decode
  if steps < 1:
    raise ValueError("return_logits needs steps >= 1, got 0")
  policy = policy or CachePolicy.full(p + steps)
  if policy.kind == "full" and p + steps > policy.capacity:
    raise ValueError(f"{p + steps} tokens do not fit a full cache of "
                     f"{policy.capacity}; use a window or sinks cache")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  step = _step_fn(graphdef, policy, temperature, top_k)

  cache = init_cache(model, b, policy)
  out = [prompt]
  all_logits = []
  filled = prefill_length(model, policy, p) if use_prefill else 0
  chunk = prefill_chunk or max(filled, 1)
  runs = {fresh: _prefill_fn(graphdef, policy, fresh)
          for fresh in (True, False)}
  for start in range(0, filled, chunk):
    stop = min(start + chunk, filled)
    logits, cache = runs[start == 0](state, cache, prompt[:, start:stop],
                                     start)
    all_logits.append(logits)
  if filled:
    rng, key = jax.random.split(rng)
    last = all_logits[-1][:, -1]
    token = (prompt[:, filled] if filled < p
             else _sample(last, key, temperature, top_k))
  else:
    token = prompt[:, 0]
  if filled == p:
    out.append(token[:, None])
  for position in range(max(filled, 1) - (filled == 0), p + steps - 1):
    rng, key = jax.random.split(rng)
    logits, cache, sampled = step(state, cache, token, position, key)
    all_logits.append(logits[:, None])
    token = prompt[:, position + 1] if position + 1 < p else sampled
    if position + 1 >= p:
      out.append(sampled[:, None])
  tokens = jnp.concatenate(out, axis=1)
  if return_logits:
    return tokens, jnp.concatenate(all_logits, axis=1), cache
  return tokens


@functools.lru_cache(maxsize=16)
def _cached(make, *args):
  return make(*args)


def _reuse(make, *args):
  """``make(*args)``, the same object again for equal hashable args (so a
  second ``generate`` on the same model does not compile again)."""
  try:
    hash(args)
  except TypeError:    # e.g. a config holding a rope_scaling dict
    return make(*args)
  return _cached(make, *args)


def _step_fn(graphdef, policy, temperature, top_k):
  """The jit-compiled decode step (one call per decoded position)."""
  return _reuse(_make_step, graphdef, policy, temperature, top_k)


def _make_step(graphdef, policy, temperature, top_k):

  @jax.jit
  def step(state, cache, tokens, position, key):
    m = nnx.merge(graphdef, state)
    logits, cache = decode_step(m, cache, tokens, position, policy)
    return logits, cache, _sample(logits, key, temperature, top_k)

  return step


def _prefill_fn(graphdef, policy, fresh):
  """The jit-compiled prefill of one chunk (compiled per chunk length)."""
  return _reuse(_make_prefill, graphdef, policy, fresh)


def _make_prefill(graphdef, policy, fresh):

  @jax.jit
  def run(state, cache, tokens, start):
    return prefill(nnx.merge(graphdef, state), cache, tokens, start, policy,
                   fresh=fresh)

  return run


def complete(model: DecoderLM, tokenizer, text: str, steps: int, *,
             chat: bool = False, **kwargs) -> str:
  """Text in, continuation text out: ``text`` encoded by ``tokenizer`` (as a
  user message under its chat template when ``chat``), ``generate`` for up
  to ``steps`` tokens (kwargs as generate's), cut at the first
  ``tokenizer.eos_id``, decoded."""
  if chat:
    text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
  ids = tokenizer.encode(text)
  out = generate(model, jnp.asarray([ids], jnp.int32), steps, **kwargs)
  new = [int(i) for i in out[0, len(ids):]]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return tokenizer.decode(new)
