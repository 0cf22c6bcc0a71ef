# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""The :class:`Projector`: Flora's random projections applied to pytrees."""

from __future__ import annotations

from typing import Any

import jax

from flora_optax import _checks
from flora_optax import _keys
from flora_optax._leaves import Leaves
from flora_optax import _projection
from flora_optax._types import (PROJECTIONS, SIDES, TRANSFERS, DimensionNumbers,
                                DimensionNumbersSpec, KeyLike, Projection,
                                RankFn, Side, Transfer,
                                is_dimension_numbers_leaf)


class Projector:
  """Compresses pytrees with random projections regenerated from keys.

  Each leaf is viewed as a matrix (or a batch of matrices, see
  :class:`DimensionNumbers`) and one of its two matrix axes, of size ``d``, is
  compressed to ``r``. Scalars, vectors and leaves whose compressed axis is not
  larger than an int ``rank`` stay dense (passed through exactly). Every
  projection is redrawn from ``fold_in(key, leaf_id)`` where it is needed;
  nothing but the key is kept. The math and the choice of ``projection`` and
  ``side``: :doc:`/explain/flora` (``docs/explain/flora.md``); how keys and
  leaf ids are made: :doc:`/explain/keys`.

  Args:
    rank: the rank ``r``: a positive int, or a callable ``(path, leaf) -> int
      | None`` giving each leaf's rank (``None`` keeps it dense). A rank from a
      callable is applied as given whenever ``1 <= r <= d``, so ``r == d`` with
      ``projection='orthogonal'`` is an exact path; ``r > d`` is an error.
      ``None`` compresses no leaf (what the optimizers' ``rank=None`` means).
    projection: ``'gaussian'`` (i.i.d. ``N(0, 1/r)``, the paper's),
      ``'rademacher'`` (``±1/sqrt(r)``) or ``'orthogonal'`` (``sqrt(d/r)``
      times ``r`` orthonormal rows; the identity when ``r == d``). All satisfy
      ``E[Pᵀ P] = I``.
    side: ``'smaller'`` compresses the smaller matrix axis (state ``r·max(n,
      m)``, lower variance, the paper's choice); ``'larger'`` the larger one
      (state ``r·min(n, m)``). Ties compress the last axis.
    dimension_numbers: the matrix view of leaves with more than two axes.
      ``None``: the last two axes form the matrix, leading axes are batch axes.
      A :class:`DimensionNumbers` applies to every leaf with two or more axes;
      a pytree of ``DimensionNumbers | None`` matching the params, or a
      callable ``(path, leaf) -> DimensionNumbers | None``, chooses per leaf
      (``None`` there keeps the leaf dense).

  Raises:
    TypeError: if ``rank`` is neither a positive int, None nor a callable, or
      ``dimension_numbers`` is not a :class:`DimensionNumbers`, a pytree of
      them or a callable; the methods, for a leaf that is not a real
      floating array or a callable's rank that is not an int or None.
    ValueError: if ``rank < 1`` or ``projection`` or ``side`` is not one of
      the names above; the methods, for a callable's rank above a leaf's
      compressed axis, ``dimension_numbers`` that do not fit a leaf (naming
      it), or an unknown transfer ``method``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flora_optax
    >>> proj = flora_optax.Projector(rank=4)
    >>> grads = {'w': jnp.ones((16, 32)), 'b': jnp.ones((32,))}
    >>> key = jax.random.key(0)
    >>> sketch = proj.compress(grads, key)
    >>> jax.tree.map(jnp.shape, sketch)
    {'b': (32,), 'w': (4, 32)}
    >>> approx = proj.decompress(sketch, key, like=grads)
    >>> jax.tree.map(jnp.shape, approx)
    {'b': (32,), 'w': (16, 32)}

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """

  def __init__(self,
               rank: int | RankFn,
               *,
               projection: Projection = 'gaussian',
               side: Side = 'smaller',
               dimension_numbers: DimensionNumbersSpec = None):
    _checks.check_rank(rank)
    _checks.check_choice(projection, 'projection', PROJECTIONS)
    _checks.check_choice(side, 'side', SIDES)
    _checks.check_dimension_numbers(dimension_numbers)
    self.rank = rank
    self.projection = projection
    self.side = side
    self.dimension_numbers = dimension_numbers

  def __repr__(self) -> str:
    return (f'Projector(rank={self.rank!r}, projection={self.projection!r}, '
            f'side={self.side!r}, dimension_numbers={self.dimension_numbers!r})')

  # --- planning ------------------------------------------------------------
  def plan(self, like: Any) -> Any:
    """The :class:`LeafPlan` of every leaf of ``like`` (arrays or shapes).

    Args:
      like: a pytree of arrays or ``jax.ShapeDtypeStruct`` objects (only
        shapes and dtypes are read).

    Returns:
      A pytree of :class:`LeafPlan` with the structure of ``like``.
    """
    dn = self.dimension_numbers

    def leaf(path, x, leaf_dn, given):
      return _projection.plan_leaf(path, x, self.rank, self.side, leaf_dn,
                                   given, self.projection)

    if dn is None or isinstance(dn, DimensionNumbers):
      return jax.tree_util.tree_map_with_path(
          lambda p, x: leaf(p, x, dn, False), like)
    if callable(dn):
      return jax.tree_util.tree_map_with_path(
          lambda p, x: leaf(p, x, dn(p, x), True), like)
    _checks.check_prefix_tree(dn, like, '`dimension_numbers`',
                              is_leaf=is_dimension_numbers_leaf)
    return jax.tree_util.tree_map_with_path(
        lambda p, d, x: leaf(p, x, d, True), dn, like,
        is_leaf=is_dimension_numbers_leaf)

  def sketch_shapes(self, like: Any, dtype: Any = None) -> Any:
    """The ``jax.ShapeDtypeStruct`` of each sketch of ``like``.

    Args:
      like: a pytree of arrays or ``jax.ShapeDtypeStruct`` objects.
      dtype: the sketches' dtype; ``None``: each leaf's own.

    Returns:
      A pytree of ``jax.ShapeDtypeStruct`` with the structure of ``like``.
    """
    return jax.tree.map(
        lambda pl, x: jax.ShapeDtypeStruct(pl.sketch_shape, dtype or x.dtype),
        self.plan(like), like)

  def projections(self, like: Any, key: KeyLike) -> Any:
    """The projection matrix ``P`` of every compressed leaf (``None`` if dense).

    ``P`` has shape ``(*batch, r, *compressed_axes)``. This is the frozen
    ``A`` of the LoRA view: ``compress`` is ``G Aᵀ``. Only for inspection and
    experiments; the optimizers never store it.

    Args:
      like: a pytree of arrays or ``jax.ShapeDtypeStruct`` objects.
      key: a typed key or raw key data, as for :meth:`compress`.

    Returns:
      A pytree with the structure of ``like``: ``P`` per compressed leaf,
      ``None`` per dense one.
    """
    leaves = Leaves.of(self, like)
    return leaves.unflatten(leaves.draw(_keys.as_typed(key)))

  # --- tree operations ---------------------------------------------------
  def compress(self, tree: Any, key: KeyLike) -> Any:
    """Compresses every leaf: ``G Pᵀ`` or ``P G`` (dense leaves unchanged).

    Args:
      tree: a pytree of full-size arrays (e.g. gradients).
      key: a typed key or raw key data; leaf keys are ``fold_in(key,
        leaf_id)``.

    Returns:
      The sketches, computed in at least float32.
    """
    leaves = Leaves.of(self, tree)
    return leaves.unflatten(
        leaves.compress(leaves.flatten(tree), leaves.draw(_keys.as_typed(key))))

  def decompress(self, sketches: Any, key: KeyLike, like: Any) -> Any:
    """Maps sketches back to full size: ``C P`` or ``Pᵀ C``.

    Args:
      sketches: the output of :meth:`compress` (or a sum of such outputs).
      key: the key they were compressed with.
      like: the full-size tree (arrays or ``jax.ShapeDtypeStruct`` objects).

    Returns:
      A tree with the shapes of ``like``, in the sketches' dtype.
    """
    leaves = Leaves.of(self, like, dtypes_of=sketches)
    return leaves.unflatten(leaves.decompress(leaves.flatten(sketches),
                                              leaves.draw(_keys.as_typed(key))))

  def transfer(self,
               sketches: Any,
               old_key: KeyLike,
               new_key: KeyLike,
               like: Any,
               *,
               method: Transfer = 'unbiased') -> Any:
    """Re-expresses sketches made with ``old_key`` in ``new_key``'s projection.

    ``method='unbiased'`` gives ``compress_new(decompress_old(C))``, computed
    through the ``r×r`` product ``P_old P_newᵀ``; ``'projected'`` uses the
    pseudo-inverse of ``P_new`` instead (a contraction, biased by ``r/d``);
    ``'reset'`` returns zeros.

    Args:
      sketches: sketches made with ``old_key`` (:meth:`compress`).
      old_key: the key they were compressed with.
      new_key: the key of the projection to move them to.
      like: the full-size tree (arrays or ``jax.ShapeDtypeStruct`` objects).
      method: ``'unbiased'``, ``'projected'`` or ``'reset'``.

    Returns:
      The sketches in ``new_key``'s projection, with their shapes.
    """
    _checks.check_choice(method, 'method', TRANSFERS)
    leaves = Leaves.of(self, like, dtypes_of=sketches)
    olds = leaves.draw(_keys.as_typed(old_key))
    news = leaves.draw(_keys.as_typed(new_key))
    return leaves.unflatten([
        c if item.plan.dense else
        item.plan.transfer(c.astype(item.dtype), p_old, p, method, sh)
        for c, p_old, p, item, sh in zip(leaves.flatten(sketches), olds, news,
                                         leaves.items, leaves.shardings)])

  def project(self, tree: Any, key: KeyLike) -> Any:
    """Projects every leaf orthogonally onto the row space of its ``P``.

    For a compressed leaf this is ``Π G`` with ``Π = Pᵀ (P Pᵀ)⁻¹ P`` along
    the compressed axis: symmetric, idempotent, exact for ``'orthogonal'``
    and computed through the ``r×r`` Gram matrix ``P Pᵀ`` for the others
    (never a ``d×d`` matrix, and ``P`` is not stored). ``G - Π G`` is the
    part of ``G`` that a sketch made with ``key`` can not hold: the residual
    that ``compressed_momentum(residual=True)`` passes through. Dense leaves
    are returned unchanged (their projector is the identity).

    Args:
      tree: a pytree of full-size arrays.
      key: a typed key or raw key data, as for :meth:`compress`.

    Returns:
      A tree like ``tree``, computed in at least float32.
    """
    leaves = Leaves.of(self, tree)
    ps = leaves.draw(_keys.as_typed(key))
    return leaves.unflatten([
        g if item.plan.dense else
        item.plan.project(g.astype(item.dtype), p, sharding=sh)
        for g, p, item, sh in zip(leaves.flatten(tree), ps, leaves.items,
                                  leaves.shardings)])
