"""The per-leaf engine that every transformation of flora_optax runs on.

:func:`compressed_momentum`, :class:`MultiSteps`, :func:`accumulate_gradients`
and :class:`Projector` all go through :class:`Leaves`: one flat view of a tree
with each leaf's plan, compute dtype and sharding, and one place where the
projections of a cycle are drawn, where leaves are compressed and
decompressed, and where zero sketches (with their Flax NNX metadata) are
made.

It holds both compressors: the projection (a leaf's ``LeafPlan``: its state
is a sketch) and the quantization of the stored state (a ``Quantizer``: the
sketch, or the dense state, kept as block-wise codes). A transformation
loads its state to float (:meth:`Leaves.load`), does its float math, and
stores the result (:meth:`Leaves.store`); with ``quantizer=None`` these are the
casts the float states always had. That is why ``accumulate_gradients`` and ``MultiSteps`` agree bit for
bit, and why ``Projector.compress(g, cycle_key(key, c))`` reproduces what the
optimizers compute: they share this code, not a convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from flora_optax import _checks
from flora_optax import _keys
from flora_optax import _nnx
from flora_optax import _projection
from flora_optax import _sharding
from flora_optax._projection import Item, LeafPlan
from flora_optax._quantization import QuantizedArray, Quantizer, is_quantized


@dataclasses.dataclass(frozen=True)
class Leaves:
  """A tree seen as a flat list of leaves, each with how it is compressed.

  Attributes:
    treedef: the tree's structure.
    items: per leaf ``(path, plan, compute dtype)``; the compute dtype is the
      leaf's own, at least float32 (:func:`_projection.compute_dtype`).
    shardings: per leaf its sharding on an Explicit-axes mesh, or None.
    projection: the projection type the leaves are drawn with.
    quantizer: how stored states are quantized (None: float states).
  """

  treedef: Any
  items: tuple[Item, ...]
  shardings: tuple[NamedSharding | None, ...]
  projection: str
  quantizer: Quantizer | None = None

  @classmethod
  def of(cls, projector: Any, like: Any, dtypes_of: Any = None,
         quantizer: Quantizer | None = None) -> 'Leaves':
    """The leaves of ``like`` (arrays or ShapeDtypeStructs) as ``projector``
    compresses them; compute dtypes from ``dtypes_of`` (default ``like``)."""
    flat, treedef = _projection.flatten_plans(projector.plan(like))
    likes = treedef.flatten_up_to(like)
    typed = likes if dtypes_of is None else treedef.flatten_up_to(dtypes_of)
    items = tuple((path, plan, _projection.compute_dtype(x.dtype))
                  for (path, plan), x in zip(flat, typed))
    return cls(treedef, items,
               tuple(_sharding.explicit_sharding(x) for x in likes),
               projector.projection, quantizer)

  @property
  def plans(self) -> list[LeafPlan]:
    return [plan for _, plan, _ in self.items]

  @property
  def dtypes(self) -> list[Any]:
    return [dtype for _, _, dtype in self.items]

  def flatten(self, tree: Any) -> list[Any]:
    return self.treedef.flatten_up_to(tree)

  # --- stored states: float, or quantized ----------------------------------
  def quantized(self, plan: LeafPlan) -> bool:
    """Whether the stored state of a leaf with this plan is quantized."""
    return (self.quantizer is not None and
            self.quantizer.quantizes(plan.sketch_shape))

  def stored_shape(self, plan: LeafPlan) -> Any:
    """The shape of a leaf's stored state (codes' and scales' if quantized)."""
    if self.quantized(plan):
      return self.quantizer.shapes(plan.sketch_shape)
    return plan.sketch_shape

  def check_state(self, stored: Any, what: str, params: Any = None) -> None:
    """Trace-time check that a stored state fits these leaves (an update
    whose shapes differ from ``init``'s params would broadcast silently)."""
    _checks.check_sketches(self.unflatten(self.plans), stored, what, params,
                           self.stored_shape, is_quantized)

  def load_one(self, i: int, stored: Any) -> jax.Array:
    """Leaf ``i``'s stored state (sketch or dense) as a float in its compute
    dtype."""
    _, plan, dtype = self.items[i]
    if isinstance(stored, QuantizedArray):
      return self.quantizer.decode(stored, plan.sketch_shape, dtype)
    return stored.astype(dtype)

  def store_one(self, i: int, value: jax.Array, dtype: Any,
                key: jax.Array | None = None) -> Any:
    """Leaf ``i``'s float state as it is stored: quantized where
    :meth:`quantized`, else cast to ``dtype``. ``key`` (typed) draws
    stochastic rounding's noise, ``leaf_key(key, path)`` as the
    projections."""
    path, plan, _ = self.items[i]
    if not self.quantized(plan):
      return value.astype(dtype)
    q = self.quantizer
    return q.encode(value, _keys.leaf_key(key, path)
                    if q.stochastic_rounding else None)

  def load(self, stored: Sequence[Any]) -> list[jax.Array]:
    """Stored states (sketches or dense) as floats in the compute dtype."""
    return [self.load_one(i, s) for i, s in enumerate(stored)]

  def store(self, values: Sequence[jax.Array], dtype: Any,
            key: jax.Array | None = None) -> list[Any]:
    """:meth:`store_one` of every leaf, with one ``dtype`` for all."""
    return [self.store_one(i, v, dtype, key) for i, v in enumerate(values)]

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    return self.treedef.unflatten(leaves)

  def draw(self, key: jax.Array) -> list[jax.Array | None]:
    """Every compressed leaf's ``P`` for a (typed) cycle key; None if dense."""
    return _projection.draw_projections(self.items, key, self.projection)

  def gram_inverses(self, ps: Sequence[jax.Array | None]) -> list[Any]:
    """``(P Pᵀ)⁻¹`` per compressed leaf (None for dense leaves)."""
    return _projection.gram_inverses(self.items, ps, self.projection)

  def compress(self, gs: Sequence[jax.Array],
               ps: Sequence[jax.Array | None]) -> list[jax.Array]:
    """Sketches in the compute dtype; dense leaves pass through unchanged."""
    return [
        g if p is None else plan.compress(g.astype(dtype), p,
                                          _sharding.explicit_sharding(g))
        for (_, plan, dtype), g, p in zip(self.items, gs, ps)
    ]

  def decompress(self, cs: Sequence[jax.Array],
                 ps: Sequence[jax.Array | None]) -> list[jax.Array]:
    """Full-size leaves in the compute dtype, sharded like the leaves."""
    return [
        c if p is None else plan.decompress(c.astype(dtype), p, sh)
        for (_, plan, dtype), c, p, sh in zip(self.items, cs, ps,
                                              self.shardings)
    ]


def sketch_zeros(projector: Any, params: Any, dtype: Any,
                 quantizer: Quantizer | None = None) -> Any:
  """Zero states of ``params``'s leaves: sketches of compressed leaves, dense
  zeros of the others, quantized where ``quantizer`` quantizes them; float
  states in ``dtype`` (``None``: each leaf's own).

  Sharded like the params on an Explicit-axes mesh (codes and scales like
  the sketch); under Flax NNX the sketches get their params' sharding names
  with the rank axis replicated.
  """
  plans = projector.plan(params)

  def zeros(plan, x):
    if quantizer is None or not quantizer.quantizes(plan.sketch_shape):
      return _sharding.sketch_zeros(plan, x, x.dtype if dtype is None else
                                    dtype)
    return quantizer.zeros(
        plan.sketch_shape,
        lambda shape, dt: _sharding.sketch_zeros(plan, x, dt, shape))

  return _nnx.fit_metadata(params, jax.tree.map(zeros, plans, params), plans)
