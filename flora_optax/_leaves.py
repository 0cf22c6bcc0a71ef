# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""The leaves of a tree with how each is compressed: plans and quantizers.

:func:`compressed_momentum`, :func:`scale_by_adam`, :class:`MultiSteps`,
:func:`accumulate_gradients` and :class:`Projector` all see a tree through
:class:`Leaves`: one flat view with each leaf's plan, compute dtype and
sharding, and one place where the projections of a cycle are drawn, where
leaves are compressed and decompressed, where a float state is stored
(quantized, or cast), and where zero states (with their Flax NNX metadata)
are made. Their per-leaf loops run on :func:`_engine.map_leaves`, as
:func:`quantized` does: a step loads its state through the engine's
:class:`_engine.LeafOrder`, does its float math, and stores the result
(:meth:`Leaves.store_one`). With ``quantizer=None`` these are the casts the
float states always had. That is why ``accumulate_gradients`` and
``MultiSteps`` agree bit for bit, and why ``Projector.compress(g,
cycle_key(key, c))`` reproduces what the optimizers compute: they share this
code, not a convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from flora_optax import _checks
from flora_optax import _engine
from flora_optax import _keys
from flora_optax import _nnx
from flora_optax import _projection
from flora_optax import _quantization
from flora_optax import _sharding
from flora_optax._projection import Item, LeafPlan
from flora_optax._quantization import Quantizer, is_quantized
from flora_optax._types import KeyPath


def quantizer(bits: Any, block_size: Any = None, code_map: Any = None,
              min_quantized_size: Any = None,
              stochastic_rounding: Any = False, *,
              default_rounding: bool = False,
              **options: Any) -> Quantizer | None:
  """The quantization keywords of a public builder, validated (a
  ``ValueError``/``TypeError`` naming the keyword) and defaulted, in one
  place: a :class:`Quantizer`, or None for ``bits=None``.
  ``stochastic_rounding=None`` takes ``default_rounding``; ``options`` go to
  ``make_quantizer`` (``signed``)."""
  _checks.check_quantization(bits, block_size, code_map, min_quantized_size,
                             stochastic_rounding)
  return _quantization.make_quantizer(
      bits, block_size, code_map,
      default_rounding if stochastic_rounding is None else
      stochastic_rounding, min_quantized_size, **options)


@dataclasses.dataclass(frozen=True)
class Leaves:
  """A tree seen as a flat list of leaves, each with how it is compressed.

  Attributes:
    treedef: the tree's structure.
    items: per leaf an :class:`Item` ``(path, plan, dtype)``; the compute
      dtype is the leaf's own, at least float32
      (:func:`_projection.compute_dtype`).
    shardings: per leaf its sharding on an Explicit-axes mesh, or None.
    quantizer: how stored states are quantized (None: float states).
  """

  treedef: Any
  items: tuple[Item, ...]
  shardings: tuple[NamedSharding | None, ...]
  quantizer: Quantizer | None = None

  @classmethod
  def of(cls, projector: Any, like: Any, dtypes_of: Any = None,
         quantizer: Quantizer | None = None) -> 'Leaves':
    """The leaves of ``like`` (arrays or ShapeDtypeStructs) as ``projector``
    (anything with ``plan(like)``) compresses them; compute dtypes from
    ``dtypes_of`` (default ``like``)."""
    flat, treedef = _projection.flatten_plans(projector.plan(like))
    likes = treedef.flatten_up_to(like)
    typed = likes if dtypes_of is None else treedef.flatten_up_to(dtypes_of)
    items = tuple(Item(path, plan, _projection.compute_dtype(x.dtype))
                  for (path, plan), x in zip(flat, typed))
    return cls(treedef, items,
               tuple(_sharding.explicit_sharding(x) for x in likes),
               quantizer)

  @property
  def plans(self) -> list[LeafPlan]:
    return [item.plan for item in self.items]

  @property
  def dtypes(self) -> list[Any]:
    return [item.dtype for item in self.items]

  def flatten(self, tree: Any) -> list[Any]:
    return self.treedef.flatten_up_to(tree)

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    return self.treedef.unflatten(leaves)

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
    return _engine.load(stored, self.items[i].dtype)

  def store_one(self, i: int, value: jax.Array, dtype: Any,
                key: jax.Array | None = None) -> Any:
    """Leaf ``i``'s float state as it is stored: quantized where
    :meth:`quantized`, else cast to ``dtype``. ``key`` (typed) draws
    stochastic rounding's noise, ``leaf_key(key, path)`` as the
    projections."""
    item = self.items[i]
    if not self.quantized(item.plan):
      return value.astype(dtype)
    q = self.quantizer
    return q.encode(value, _keys.leaf_key(key, item.path)
                    if q.stochastic_rounding else None)

  def load(self, stored: Sequence[Any]) -> list[jax.Array]:
    """Stored states (sketches or dense) as floats in the compute dtype."""
    return [self.load_one(i, s) for i, s in enumerate(stored)]

  def store(self, values: Sequence[jax.Array], dtype: Any,
            key: jax.Array | None = None) -> list[Any]:
    """:meth:`store_one` of every leaf, with one ``dtype`` for all."""
    return [self.store_one(i, v, dtype, key) for i, v in enumerate(values)]

  # --- projections ----------------------------------------------------------
  def draw(self, key: jax.Array) -> list[jax.Array | None]:
    """Every compressed leaf's ``P`` for a (typed) cycle key; None if dense."""
    return _projection.draw_projections(self.items, key)

  def gram_inverses(self, ps: Sequence[jax.Array | None]) -> list[Any]:
    """``(P Pᵀ)⁻¹`` per compressed leaf; None for dense and orthogonal
    leaves (whose ``dual_rows`` need none)."""
    return _projection.gram_inverses(self.items, ps)

  def compress(self, gs: Sequence[jax.Array],
               ps: Sequence[jax.Array | None]) -> list[jax.Array]:
    """Sketches in the compute dtype; dense leaves pass through unchanged."""
    return [
        g if item.plan.dense else item.plan.compress(
            g.astype(item.dtype), p, _sharding.explicit_sharding(g))
        for item, g, p in zip(self.items, gs, ps)
    ]

  def decompress(self, cs: Sequence[jax.Array],
                 ps: Sequence[jax.Array | None]) -> list[jax.Array]:
    """Full-size leaves in the compute dtype, sharded like the leaves."""
    return [
        c if item.plan.dense else
        item.plan.decompress(c.astype(item.dtype), p, sh)
        for item, c, p, sh in zip(self.items, cs, ps, self.shardings)
    ]


# --- trees of states ------------------------------------------------------------


def _zeros(plan: LeafPlan, like: Any, dtype: Any,
           quantizer: Quantizer | None) -> Any:
  """One leaf's zero state, sharded like its sketch if ``like`` is typed on
  an Explicit-axes mesh (codes and scales too, where their axes allow)."""
  sharding = _projection.sharding_on(plan, plan.sketch_axes,
                                     _sharding.explicit_sharding(like))
  if quantizer is None or not quantizer.quantizes(plan.sketch_shape):
    return _sharding.zeros(plan.sketch_shape,
                           like.dtype if dtype is None else dtype, sharding)
  return quantizer.zeros(
      plan.sketch_shape, lambda shape, dt: _sharding.zeros(
          shape, dt, _sharding.fit_sharding(sharding, shape)))


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
  zeros = jax.tree.map(lambda plan, x: _zeros(plan, x, dtype, quantizer),
                       plans, params)
  return _nnx.fit_metadata(params, zeros, plans)


def compressed_plans(plans: Any) -> list[tuple[KeyPath, LeafPlan]]:
  """``(path, plan)`` of every compressed leaf of a tree of plans."""
  return [(path, plan) for path, plan in _projection.flatten_plans(plans)[0]
          if not plan.dense]


def zeros_of(shapes: Any) -> Any:
  """Zeros of a tree of traced shapes (``jax.eval_shape``'s), each keeping
  its sharding on an Explicit-axes mesh."""
  return jax.tree.map(_sharding.zeros_of, shapes)


def fit_metadata(params: Any, state: Any) -> Any:
  """``state`` (of any transformation) with the Flax NNX metadata of leaves
  not shaped like their params dropped (see ``_nnx.fit_metadata``)."""
  return _nnx.fit_metadata(params, state)
