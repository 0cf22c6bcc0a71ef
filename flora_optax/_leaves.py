"""The per-leaf engine that every transformation of flora_optax runs on.

:func:`compressed_momentum`, :class:`MultiSteps`, :func:`accumulate_gradients`
and :class:`Projector` all go through :class:`Leaves`: one flat view of a tree
with each leaf's plan, compute dtype and sharding, and one place where the
projections of a cycle are drawn, where leaves are compressed and
decompressed, and where zero sketches (with their Flax NNX metadata) are
made. That is why ``accumulate_gradients`` and ``MultiSteps`` agree bit for
bit, and why ``Projector.compress(g, cycle_key(key, c))`` reproduces what the
optimizers compute: they share this code, not a convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from flora_optax import _nnx
from flora_optax import _projection
from flora_optax import _sharding
from flora_optax._projection import Item, LeafPlan


@dataclasses.dataclass(frozen=True)
class Leaves:
  """A tree seen as a flat list of leaves, each with how it is compressed.

  Attributes:
    treedef: the tree's structure.
    items: per leaf ``(path, plan, compute dtype)``; the compute dtype is the
      leaf's own, at least float32 (:func:`_projection.compute_dtype`).
    shardings: per leaf its sharding on an Explicit-axes mesh, or None.
    projection: the projection type the leaves are drawn with.
  """

  treedef: Any
  items: tuple[Item, ...]
  shardings: tuple[NamedSharding | None, ...]
  projection: str

  @classmethod
  def of(cls, projector: Any, like: Any, dtypes_of: Any = None) -> 'Leaves':
    """The leaves of ``like`` (arrays or ShapeDtypeStructs) as ``projector``
    compresses them; compute dtypes from ``dtypes_of`` (default ``like``)."""
    flat, treedef = _projection.flatten_plans(projector.plan(like))
    likes = treedef.flatten_up_to(like)
    typed = likes if dtypes_of is None else treedef.flatten_up_to(dtypes_of)
    items = tuple((path, plan, _projection.compute_dtype(x.dtype))
                  for (path, plan), x in zip(flat, typed))
    return cls(treedef, items,
               tuple(_sharding.explicit_sharding(x) for x in likes),
               projector.projection)

  @property
  def plans(self) -> list[LeafPlan]:
    return [plan for _, plan, _ in self.items]

  @property
  def dtypes(self) -> list[Any]:
    return [dtype for _, _, dtype in self.items]

  def flatten(self, tree: Any) -> list[Any]:
    return self.treedef.flatten_up_to(tree)

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


def sketch_zeros(projector: Any, params: Any, dtype: Any) -> Any:
  """Zero sketches (dense zeros for dense leaves) of ``params``'s leaves.

  Sharded like the params on an Explicit-axes mesh; under Flax NNX the
  sketches get their params' sharding names with the rank axis replicated.
  """
  plans = projector.plan(params)
  zeros = jax.tree.map(lambda pl, x: _sharding.sketch_zeros(pl, x, dtype),
                       plans, params)
  return _nnx.fit_metadata(params, zeros, plans)
