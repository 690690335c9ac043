"""Context-parallel attention: the sequence split over a mesh axis.

The T queries and keys of a self-attention call are cut into C contiguous
shards of L = T / C along a mesh axis (``"context"`` by default); device ``i``
holds queries and keys ``[i L, (i + 1) L)``. Two strategies:

* ``"ring"``: every device starts with its own key/value shard and passes it
  to its neighbour (``lax.ppermute``) R - 1 times, so that at ring step ``r``
  device ``i`` holds shard ``(i - r) mod C``. Each (query shard, visiting key
  shard) pair is labelled by ``masks.classify_blocks`` at run time and skipped
  with ``lax.cond`` when it is empty; the others run the inner implementation
  on the shard and are merged by their log-sum-exp in float32. The ring is a
  loop (``lax.scan``), so only the current and the incoming shard are alive,
  and a custom VJP saves only the device's own shard: the backward runs the
  ring again, recomputes each block, sends the key/value gradients along
  with their shard and then home with one more ``ppermute``. Memory per
  device is linear in L whatever R is.
* ``"all_gather"``: keys and values are gathered whole (``lax.all_gather``)
  and each device makes one call for its queries (plain autodiff). Simple,
  memory O(T) per device; a cross-check of the ring.

The number of ring steps R is static (``ring_plan``): with default positions
the shard geometry is known at trace time, so R = 1 + the largest ring
distance of a non-empty shard pair (a sliding window no wider than a shard
needs R = 2, ``Chunked(L)`` R = 1, ``Causal`` R = C; a bidirectional mask
that sees the next shard, such as ``Chunked`` across shards, needs R = C
since the ring only turns one way). ``Lambda(sinks, w)`` sends its sink keys
to every device apart from the ring (one small all-gather) and rings only
over the window. With explicit positions R = C; segment ids only remove
pairs, so they keep the mask's R.

Limits: the layout is contiguous, so a causal ring is unbalanced (device
``i`` computes ``i + 1`` of its C pairs and the step time is the busiest
device's; no zigzag / striped layout). Self-attention only (T == S, T a
multiple of C); no dense bias over keys (a per-query bias ``[.., T, 1]`` is
fine; relative biases go as ``position_bias``, below). A per-head mask
(``masks.PerHead``) keeps the heads whole on every device (no split over
the head axis). Learned sinks (``sink_logits``) are
merged after the keys on every strategy, so the inner implementation need
not take them.

Every device's local call is ``dot_product_attention`` with explicit global
positions, so masks, ALiBi and the far query see the same geometry as one
big call, and any implementation (xla, xla_chunked, pallas_*) can serve it.

A ``position_bias`` (``relative_bias.RelativeBias``: T5, Kerple, FIRE) is
passed to that local call too, so each device evaluates the bias only on
its own shard pairs, at their global positions: per tile when the inner
implementation takes it (xla_chunked), else materialised as the pair's
[Bp, N, L, L] block, never the global [T, S] matrix. Its parameters are
replicated over the context axis (split over the head axis with the heads);
their gradient stays on the query's device and shard_map's transpose sums
it over the context (and batch) axes once.

The code is in two modules: this one holds the implementation
(``ContextParallel``: mesh checks, partition specs, ``shard_map``) and the
all-gather strategy; ``context_parallel_ring`` holds the ring (its static
plan ``ring_plan``, the per-device call both strategies make, the
log-sum-exp ``merge`` and ``add_sinks``, and the ring's custom VJP). Its
public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from jax.sharding import PartitionSpec as P

from extrapolax.common import geometry
from . import core
from .context_parallel_ring import (RingPlan, _local, _ring, _ring_with_sinks,
                                    _Static, add_sinks, executed_permutes,
                                    merge, ring_plan, ring_steps)

Array = jax.Array
STRATEGIES = ("ring", "all_gather")

__all__ = ["STRATEGIES", "ContextParallel", "context_parallel_attention",
           "RingPlan", "ring_plan", "ring_steps", "executed_permutes",
           "merge", "add_sinks"]


# --------------------------------------------------------------------------
# The all-gather strategy, per device (run inside shard_map); the ring is in
# context_parallel_ring.


def _all_gather(st: _Static, q, k, v, slopes, bias, pb, far_q, far_k, q_pos,
                k_pos, q_seg, kv_seg):
  gather = lambda x: None if x is None else jax.lax.all_gather(
      x, st.axis, axis=1, tiled=True)
  return _local(st, q, gather(k), gather(v), slopes, bias, pb, far_q,
                gather(far_k), q_pos, gather(k_pos), q_seg, gather(kv_seg))


# --------------------------------------------------------------------------
# The implementation: mesh checks, partition specs, shard_map.


def _position_bias_specs(pb, head):
  """``pb`` with each parameter replaced by its PartitionSpec: replicated
  (so shard_map's transpose sums its gradient over the context and batch
  axes), and split over ``head`` along the parameter's head axis, if any."""
  def spec(name, axis):
    entries = [None] * getattr(pb, name).ndim
    if axis is not None:
      entries[axis] = head
    return P(*entries)
  axes = pb.head_axes if head is not None else (None,) * len(
      pb.param_names)
  return dataclasses.replace(pb, **{
      name: spec(name, axis) for name, axis in zip(pb.param_names, axes)})


def _spec_entry(axes):
  axes = tuple(axes)
  return None if not axes else axes[0] if len(axes) == 1 else axes


class ContextParallel(core.Implementation):
  """Attention with the sequence split over the ``axis_name`` mesh axis.

  Args:
    inner: the implementation each device runs on its shard: None (automatic,
      never context_parallel itself), a registered name or an instance.
    axis_name: the mesh axis that splits the sequence.
    strategy: "ring" (ppermute of key/value shards, memory linear in the
      shard) or "all_gather" (gather all keys and values).
    mesh: a ``jax.sharding.Mesh``; None uses the ambient mesh
      (``jax.set_mesh``).
    batch_axes: mesh axes the batch is split over (those present with size >
      1 whose product divides B; else the batch is replicated).
    head_axis: mesh axis the heads are split over when both N and K are
      multiples of its size.
  """
  name = "context_parallel"
  takes_sink_logits = True     # merged after the ring (``add_sinks``)
  takes_position_bias = True   # passed on per shard pair (``_local``)

  def __init__(self, inner=None, *, axis_name: str = core.CONTEXT_AXIS,
               strategy: str = "ring", mesh=None,
               batch_axes=("data", "fsdp"),
               head_axis: Optional[str] = "tensor"):
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got "
                       f"{strategy!r}")
    if not isinstance(axis_name, str):
      raise ValueError(f"axis_name must be a string, got {axis_name!r}")
    if isinstance(batch_axes, str):
      batch_axes = (batch_axes,)
    batch_axes = tuple(batch_axes)
    if not all(isinstance(a, str) for a in batch_axes):
      raise ValueError(f"batch_axes must be strings, got {batch_axes!r}")
    if head_axis is not None and not isinstance(head_axis, str):
      raise ValueError(f"head_axis must be a string or None, got "
                       f"{head_axis!r}")
    if axis_name in batch_axes or axis_name == head_axis:
      raise ValueError(f"axis_name={axis_name!r} must differ from "
                       f"batch_axes={batch_axes} and head_axis={head_axis!r}")
    if mesh is not None and not isinstance(mesh, (jax.sharding.Mesh,
                                                  jax.sharding.AbstractMesh)):
      raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got "
                       f"{mesh!r}")
    if inner is None:
      inner = core.Auto(exclude=(self.name,))
    elif isinstance(inner, str):
      if inner == self.name:
        raise ValueError(f"inner={inner!r}: the per-device implementation "
                         "cannot be context_parallel itself")
      inner = core._resolve(inner)
    elif not isinstance(inner, core.Implementation) or isinstance(
        inner, ContextParallel):
      raise ValueError(f"inner must be None, an implementation name or a "
                       f"non-context-parallel Implementation, got {inner!r}")
    self.inner, self.axis_name, self.strategy = inner, axis_name, strategy
    self.mesh, self.batch_axes, self.head_axis = mesh, batch_axes, head_axis

  def __repr__(self):
    return (f"ContextParallel({self.inner!r}, axis_name={self.axis_name!r}, "
            f"strategy={self.strategy!r})")

  def _mesh(self):
    mesh = self.mesh
    if mesh is None:
      mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      raise NotImplementedError(
          "context_parallel needs a mesh: pass mesh= or call it under "
          "`with jax.set_mesh(mesh):`")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if self.axis_name not in sizes:
      raise NotImplementedError(f"the mesh {tuple(mesh.axis_names)} has no "
                                f"{self.axis_name!r} axis")
    if sizes[self.axis_name] == 1:
      raise NotImplementedError(f"the {self.axis_name!r} axis has size 1")
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
      raise NotImplementedError("context_parallel cannot run inside a "
                                "shard_map (the mesh has manual axes)")
    return mesh, sizes

  def plan(self, request: core.AttentionRequest, num_shards: int) -> RingPlan:
    """The ring schedule this implementation uses for ``request``."""
    return ring_plan(request.mask, seq_len=request.query.shape[1],
                     num_shards=num_shards,
                     explicit_positions=request.explicit_positions,
                     has_segments=request.q_segment_ids is not None)

  def __call__(self, request: core.AttentionRequest):
    mesh, sizes = self._mesh()
    c = sizes[self.axis_name]
    b, t, s, n, k, _, _ = request.shape_info
    if t != s:
      raise NotImplementedError(f"context_parallel needs self-attention "
                                f"layout T == S, got T={t}, S={s}")
    if t % c:
      raise NotImplementedError(f"context_parallel needs T={t} to be a "
                                f"multiple of the {self.axis_name!r} axis "
                                f"size C={c}")
    if request.bias is not None and request.bias.shape[3] != 1:
      raise NotImplementedError(
          "context_parallel takes no dense bias over keys, got bias shape "
          f"{request.bias.shape}; pass a relative bias (T5, Kerple, FIRE) as "
          "position_bias, or ALiBi slopes")
    plan = self.plan(request, c)
    st = _Static(call=geometry.AttentionStatics.of(request), inner=self.inner,
                 axis=self.axis_name, num_shards=c, steps=plan.steps)

    batch, prod = [], 1
    for a in self.batch_axes:
      if sizes.get(a, 1) > 1 and b % (prod * sizes[a]) == 0:
        batch.append(a)
        prod *= sizes[a]
    batch = _spec_entry(batch)
    hs = sizes.get(self.head_axis, 1)
    # A per-head mask names global head indices: heads stay whole on each
    # device (the mask is static, so a device cannot pick its slice).
    per_head = request.mask is not None and request.mask.per_head
    # So does a relative bias that does not say which axis holds its heads.
    pb = request.position_bias
    whole = per_head or (pb is not None and len(pb.head_axes) != len(
        pb.param_names))
    head = self.head_axis if (hs > 1 and n % hs == 0 and k % hs == 0
                              and not whole) else None
    ctx = self.axis_name
    by_batch = lambda x: batch if x.shape[0] == b else None

    args = dict(q=request.query, k=request.key, v=request.value,
                q_pos=request.query_positions, k_pos=request.key_positions,
                q_seg=request.q_segment_ids, kv_seg=request.kv_segment_ids,
                slopes=request.alibi_slopes, bias=request.bias,
                far_q=request.far_query, far_k=request.far_key,
                sinks=request.sink_logits, pb=request.position_bias)
    args = {name: x for name, x in args.items() if x is not None}
    specs = {}
    for name, x in args.items():
      if name in ("q", "k", "v", "far_q", "far_k"):
        specs[name] = P(batch, ctx, head, None)
      elif name in ("q_pos", "k_pos", "q_seg", "kv_seg"):
        specs[name] = P(by_batch(x), ctx)
      elif name == "sinks":   # [N]
        specs[name] = P(head)
      elif name == "pb":      # replicated, split over the heads with them
        specs[name] = _position_bias_specs(x, head)
      elif name == "slopes":
        specs[name] = P(by_batch(x), head if x.shape[1] == n else None)
      else:  # bias [Bb, Nb, Tb, 1]
        specs[name] = P(by_batch(x), head if x.shape[1] == n else None,
                        ctx if x.shape[2] == t else None, None)

    def body(a):
      get = a.get
      common = (get("slopes"), get("bias"), get("pb"), get("far_q"),
                get("far_k"), get("q_pos"), get("k_pos"))
      if self.strategy == "all_gather":
        out, lse = _all_gather(st, a["q"], a["k"], a["v"], *common,
                               get("q_seg"), get("kv_seg"))
      elif plan.sinks:
        out, lse = _ring_with_sinks(st, plan, a["q"], a["k"], a["v"],
                                    *common)
      else:
        out, lse = _ring(st, a["q"], a["k"], a["v"], *common, get("q_seg"),
                         get("kv_seg"))
      if "sinks" in a:
        out, lse = add_sinks(out, lse, a["sinks"])
      return out, lse

    if any(kind == jax.sharding.AxisType.Explicit
           for kind in mesh.axis_types):
      # Explicit axes type the inputs' shardings; shard_map wants them equal
      # to in_specs.
      to = lambda spec: (jax.sharding.NamedSharding(mesh, spec) if isinstance(
          mesh, jax.sharding.Mesh) else spec)
      def reshard(x, spec):   # x an array or a RelativeBias of arrays
        leaves, tree = jax.tree.flatten(x)
        parts = jax.tree.leaves(spec, is_leaf=lambda y: isinstance(y, P))
        return jax.tree.unflatten(tree, [jax.sharding.reshard(a, to(sp))
                                         for a, sp in zip(leaves, parts)])
      args = {name: reshard(x, specs[name]) for name, x in args.items()}
    # check_vma=False: the inner implementations build their loop carries
    # without device-variance types (xla_chunked's jnp.full inits, Pallas
    # calls), which the check rejects inside lax.switch / scan. Without it,
    # shard_map's transpose sums the gradients of inputs that are replicated
    # over an axis (slopes over the context axis, positions over the batch).
    fn = jax.shard_map(body, mesh=mesh, in_specs=(specs,),
                       out_specs=(P(batch, ctx, head, None),
                                  P(batch, head, ctx)), check_vma=False)
    return fn(args)


def context_parallel_attention(query, key, value, *, mesh=None,
                               axis_name: str = core.CONTEXT_AXIS,
                               strategy: str = "ring", inner=None, **kwargs):
  """``dot_product_attention`` with the sequence split over ``axis_name``.

  ``kwargs`` are ``dot_product_attention``'s (mask, segment_ids,
  alibi_slopes, return_residuals, query_positions, ...). ``mesh`` None uses
  the ambient mesh (``jax.set_mesh``).
  """
  if "implementation" in kwargs:
    raise ValueError("context_parallel_attention takes inner=, not "
                     f"implementation={kwargs['implementation']!r}")
  impl = ContextParallel(inner, axis_name=axis_name, strategy=strategy,
                         mesh=mesh)
  return core.dot_product_attention(query, key, value, implementation=impl,
                                    **kwargs)


core.register_implementation("context_parallel", ContextParallel)
