# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Random projections regenerated from keys: the building block of Flora.

A leaf ``G`` is viewed as a matrix, or a batch of matrices, ``(..., n, m)``.
One of the two matrix axes (size ``d``) is compressed to ``r``:

* last axis: ``C = G Pᵀ`` (``n×r``), ``Ĝ = C P``;
* second-last axis: ``C = P G`` (``r×m``), ``Ĝ = Pᵀ C``;

with ``P ∈ R^{r×d}`` drawn from a key such that ``E[Pᵀ P] = I``, so that
``Ĝ`` is an unbiased estimate of ``G``. Only keys are kept, never ``P``.

This module holds the math of one leaf (:class:`LeafPlan`), the planning rule
that makes a leaf's plan from its shape, and the drawing of many leaves'
projections at once. Trees are handled by ``_leaves`` (the engine the
optimizers share) and :class:`flora_optax.Projector` (the public tree API).
The math, and the residual mode's row-space projector: the documentation's
"Flora's math" page (``docs/explain/flora.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flora_optax import _checks
from flora_optax import _keys
from flora_optax import _sharding
from flora_optax._types import (DimensionNumbers, KeyPath, Projection, RankFn,
                                Side, Transfer)

_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
_R, _R2 = 'Y', 'Z'  # einsum labels of the rank axis (old and new)

# An axis map says, for each axis of an array made from a leaf (its sketch,
# its ``P``, an ``r×r`` matrix), which axis of the leaf it is, or None for a
# rank axis. The shapes, einsum labels and partition specs of those arrays all
# derive from their maps (:func:`arrange`).
AxisMap = tuple[int | None, ...]


def arrange(axes: AxisMap, per_axis: Sequence[Any], *ranks: Any) -> tuple:
  """``per_axis`` (one entry per leaf axis: sizes, einsum labels, mesh axis
  names) laid out along ``axes``; the rank axes get ``ranks`` in order."""
  rank = iter(ranks)
  return tuple(next(rank) if a is None else per_axis[a] for a in axes)


def spec_on(plan: 'LeafPlan', axes: AxisMap,
            spec: PartitionSpec) -> PartitionSpec:
  """The leaf's partition ``spec`` laid out along ``axes``: an axis keeps
  the mesh axes of the leaf axis it is, rank axes (at most two, in an
  ``r×r`` matrix) are replicated."""
  spec = tuple(spec) + (None,) * (len(plan.shape) - len(spec))
  return PartitionSpec(*arrange(axes, spec, None, None))


def sharding_on(plan: 'LeafPlan', axes: AxisMap | None,
                sharding: NamedSharding | None) -> NamedSharding | None:
  """The leaf's ``sharding`` laid out along ``axes`` (None: the leaf's own);
  None without a sharding (see ``_sharding.explicit_sharding``)."""
  if sharding is None or axes is None:
    return sharding
  return NamedSharding(sharding.mesh, spec_on(plan, axes, sharding.spec))


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is compressed: a static description computed from shapes.

  Public as what :meth:`Projector.plan` returns (as optax exports a
  transformation's dimension numbers next to it): it says which leaves are
  compressed, along which axes, and the shapes of their sketches and
  projections, and its methods apply one leaf's projection ``p`` in custom
  code. It is hashable and holds no arrays, so it can be a static argument.

  ``rank is None`` means the leaf is kept dense (exact). Otherwise the axes in
  ``compress_axes`` (size ``d`` together) are replaced by one axis of size
  ``rank`` placed where the first of them was; ``batch_axes`` each get their
  own projection. The math: :doc:`/explain/flora`
  (``docs/explain/flora.md``).

  Attributes:
    shape: the leaf's shape.
    rank: the rank ``r``, or None for a dense leaf.
    compress_axes: the axes compressed together (``d`` is their size).
    batch_axes: axes with one projection per index.
    kind: how ``P`` is drawn: ``'gaussian'``, ``'rademacher'`` or
      ``'orthogonal'`` (the :class:`Projector`'s ``projection``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flora_optax
    >>> proj = flora_optax.Projector(rank=4)
    >>> plan = proj.plan({'w': jnp.ones((16, 32))})['w']
    >>> plan.compress_axes, plan.d, plan.p_shape, plan.sketch_shape
    ((0,), 16, (4, 16), (4, 32))
    >>> plan.sketch_axes  # axis 0 of the sketch is the rank axis
    (None, 1)
    >>> p = plan.projection(jax.random.key(0))  # drawn as plan.kind
    >>> plan.decompress(plan.compress(jnp.ones((16, 32)), p), p).shape
    (16, 32)
  """

  shape: tuple[int, ...]
  rank: int | None = None
  compress_axes: tuple[int, ...] = ()
  batch_axes: tuple[int, ...] = ()
  kind: Projection = 'gaussian'

  @property
  def dense(self) -> bool:
    """Whether the leaf is kept dense (not compressed)."""
    return self.rank is None

  @property
  def d(self) -> int:
    """The size of the compressed axes together (1 for a dense leaf)."""
    return math.prod(self.shape[a] for a in self.compress_axes)

  # --- axis maps: the compressed axes collapse into a rank axis at the first
  # of them (the sketch); ``P`` is ``(*batch, r, *compressed)``.
  @property
  def sketch_axes(self) -> AxisMap:
    """Per sketch axis, the leaf axis it is (None for the rank axis)."""
    if self.dense:
      return tuple(range(len(self.shape)))
    first = self.compress_axes[0]
    return tuple(None if i == first else i for i in range(len(self.shape))
                 if i == first or i not in self.compress_axes)

  @property
  def p_axes(self) -> AxisMap:
    """Per axis of ``P``, the leaf axis it is (None for the rank axis)."""
    return (*self.batch_axes, None, *self.compress_axes)

  @property
  def rr_axes(self) -> AxisMap:
    """Per axis of an ``(*batch, r, r')`` matrix, the leaf axis it is."""
    return (*self.batch_axes, None, None)

  @property
  def p_shape(self) -> tuple[int, ...]:
    """The shape of ``P``: ``(*batch, r, *compressed)``."""
    return arrange(self.p_axes, self.shape, self.rank)

  @property
  def sketch_shape(self) -> tuple[int, ...]:
    """The shape of the leaf's sketch (its own shape if dense)."""
    return arrange(self.sketch_axes, self.shape, self.rank)

  # --- einsum subscripts -------------------------------------------------
  def _labels(self) -> str:
    return _LETTERS[:len(self.shape)]

  def _p_labels(self, r: str = _R) -> str:
    return ''.join(arrange(self.p_axes, self._labels(), r))

  def _s_labels(self, r: str = _R) -> str:
    return ''.join(arrange(self.sketch_axes, self._labels(), r))

  def _rr_labels(self) -> str:
    return ''.join(arrange(self.rr_axes, self._labels(), _R, _R2))

  # --- operations with explicit projections ------------------------------
  def projection(self, key: jax.Array, projection: Projection | None = None,
                 dtype: Any = jnp.float32) -> jax.Array:
    """Draws ``P`` with shape ``(*batch, r, *compressed)`` from a typed key.

    Args:
      key: a typed PRNG key (e.g. from :func:`cycle_key`, folded with the
        leaf's id as the optimizers do).
      projection: how ``P`` is drawn; ``None``: the plan's ``kind``.
      dtype: the dtype of ``P``.

    Returns:
      ``P``, of shape :attr:`p_shape`.
    """
    projection = projection or self.kind
    batch = tuple(self.shape[a] for a in self.batch_axes)
    comp = tuple(self.shape[a] for a in self.compress_axes)
    r, d = self.rank, self.d
    # Python floats are weakly typed: a NumPy scalar would promote ``p`` to
    # float64 under jax_enable_x64, whatever ``dtype`` is.
    if projection == 'gaussian':
      p = jax.random.normal(key, (*batch, r, d), dtype) / math.sqrt(r)
    elif projection == 'rademacher':
      # jax.random.rademacher with a float32 probability: the same signs as
      # jax.random.rademacher(key, ...) has without x64, where under x64 it
      # would draw them from float64 uniforms.
      signs = jax.random.bernoulli(key, np.float32(0.5), (*batch, r, d))
      p = (2 * signs.astype(dtype) - 1) / math.sqrt(r)
    else:  # orthogonal: sqrt(d/r) times r orthonormal rows.
      g = jax.random.normal(key, (*batch, d, r), dtype)
      q, _ = jnp.linalg.qr(g)
      p = jnp.swapaxes(q, -1, -2) * np.sqrt(d / r).astype(dtype)
    return p.reshape(*batch, r, *comp)

  # --- products (sharded like the leaf on an Explicit-axes mesh) ----------
  # ``sharding`` is the leaf's own sharding on an Explicit mesh, or None: see
  # ``_sharding.explicit_sharding``. ``y_axes``/``out_axes`` are the axis maps
  # of ``y`` and of the result (None: the leaf's own axes).
  def _product(self, subscripts: str, x: jax.Array, y: jax.Array,
               sharding: NamedSharding | None, y_axes: AxisMap,
               out_axes: AxisMap | None) -> jax.Array:
    return _sharding.einsum(subscripts, x, y,
                            sharding_on(self, y_axes, sharding),
                            sharding_on(self, out_axes, sharding))

  def compress(self, g: jax.Array, p: jax.Array,
               sharding: NamedSharding | None = None) -> jax.Array:
    """``G Pᵀ`` or ``P G``: the sketch of ``g``.

    Over a sharded compressed axis the product is all-reduced, never
    gathered.

    Args:
      g: the leaf, of shape ``shape``.
      p: its projection (:meth:`projection`).
      sharding: the leaf's own ``NamedSharding`` on an Explicit-axes mesh, or
        None; the products are then sharded like the leaf.

    Returns:
      The sketch, of shape :attr:`sketch_shape`.
    """
    return self._product(
        f'{self._labels()},{self._p_labels()}->{self._s_labels()}', g, p,
        sharding, self.p_axes, self.sketch_axes)

  def decompress(self, c: jax.Array, p: jax.Array,
                 sharding: NamedSharding | None = None) -> jax.Array:
    """``C P`` or ``Pᵀ C``: back to the leaf's shape (no communication).

    Args:
      c: a sketch, of shape :attr:`sketch_shape`.
      p: the projection it was compressed with (or :meth:`dual_rows` of it).
      sharding: the leaf's own ``NamedSharding`` on an Explicit-axes mesh, or
        None; the products are then sharded like the leaf.

    Returns:
      An array of shape ``shape``.
    """
    return self._product(
        f'{self._s_labels()},{self._p_labels()}->{self._labels()}', c, p,
        sharding, self.p_axes, None)

  def _gram(self, p: jax.Array, q: jax.Array) -> jax.Array:
    """``P Qᵀ`` per batch element: ``(*batch, r, r')``."""
    return jnp.einsum(f'{self._p_labels(_R)},{self._p_labels(_R2)}->'
                      f'{self._rr_labels()}', p, q)

  def transfer(self, c: jax.Array, p_old: jax.Array, p_new: jax.Array,
               method: Transfer = 'unbiased',
               sharding: NamedSharding | None = None) -> jax.Array:
    """Moves a sketch from ``p_old`` to ``p_new`` through an ``r×r`` matrix.

    Args:
      c: a sketch compressed with ``p_old``.
      p_old: the projection ``c`` is in.
      p_new: the projection to move it to.
      method: ``'unbiased'`` (``C P_old P_newᵀ``), ``'projected'``
        (through the pseudo-inverse of ``p_new``: never increases the norm)
        or ``'reset'`` (zeros).
      sharding: the leaf's own ``NamedSharding`` on an Explicit-axes mesh, or
        None; the products are then sharded like the leaf.

    Returns:
      The sketch in ``p_new``, of the shape of ``c``.
    """
    if method == 'reset':
      return jnp.zeros_like(c)
    # T = P_old P_newᵀ (batch, r, r): the full-size matrix is never formed.
    t = self._gram(p_old, p_new)
    if method == 'projected':
      # Least-squares re-projection: C' = C P_old pinv(P_new), where
      # pinv(P) = Pᵀ (P Pᵀ)⁻¹. It projects the carried momentum onto the new
      # row space, which never increases its norm.
      gram = self._gram(p_new, p_new)
      t = jnp.swapaxes(jnp.linalg.solve(gram, jnp.swapaxes(t, -1, -2)), -1,
                       -2)
    return self.apply_rr(c, t, sharding)

  def apply_rr(self, c: jax.Array, t: jax.Array,
               sharding: NamedSharding | None = None) -> jax.Array:
    """Multiplies the rank axis of a sketch by ``t`` (``(*batch, r, r')``).

    Args:
      c: a sketch, of shape :attr:`sketch_shape`.
      t: an ``(*batch, r, r')`` matrix per batch element.
      sharding: the leaf's own ``NamedSharding`` on an Explicit-axes mesh, or
        None; the products are then sharded like the leaf.

    Returns:
      The sketch with its rank axis multiplied by ``t``.
    """
    # ``t`` is small and computed replicated; slice its batch axes like ``c``.
    return self._product(
        f'{self._s_labels(_R)},{self._rr_labels()}->{self._s_labels(_R2)}',
        c, t, sharding, self.rr_axes, self.sketch_axes)

  # --- the row space of P (residual momentum) ----------------------------
  # ``Π = Pᵀ (P Pᵀ)⁻¹ P`` is the orthogonal projector onto the row space of
  # ``P``. Applied to a sketch ``C = G Pᵀ`` it reads ``Π G = (C (P Pᵀ)⁻¹) P``:
  # only the ``r×r`` Gram matrix is formed, never a ``d×d`` one.
  # ``projection`` below defaults to the plan's ``kind``.
  def gram_inverse(self, p: jax.Array,
                   projection: Projection | None = None) -> jax.Array:
    """``(P Pᵀ)⁻¹`` with shape ``(*batch, r, r)``.

    For ``'orthogonal'`` ``P Pᵀ = (d/r) I`` exactly, so no inverse is
    computed; for the others it is an ``r×r`` inverse per batch element.

    Args:
      p: a projection drawn for this plan.
      projection: how ``p`` was drawn; ``None``: the plan's ``kind``.

    Returns:
      The inverse Gram matrices, ``(*batch, r, r)``.
    """
    batch = tuple(self.shape[a] for a in self.batch_axes)
    if (projection or self.kind) == 'orthogonal':
      eye = jnp.eye(self.rank, dtype=p.dtype) * (self.rank / self.d)
      return jnp.broadcast_to(eye, (*batch, self.rank, self.rank))
    gram = self._gram(p, p)
    # P Pᵀ is symmetric positive definite (P has full row rank with
    # probability one): through its Cholesky factor the inverse compiles to
    # about a third of the program jnp.linalg.inv's LU makes (measured on CPU).
    eye = jnp.broadcast_to(jnp.eye(self.rank, dtype=gram.dtype), gram.shape)
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram), True), eye)

  def dual_rows(self, p: jax.Array, projection: Projection | None = None,
                gram_inverse: jax.Array | None = None) -> jax.Array:
    """``(P Pᵀ)⁻¹ P``: decompressing a sketch with it gives ``Π G``.

    ``decompress(C, dual_rows(P)) == decompress(C (P Pᵀ)⁻¹, P)`` at ``r²·d``
    flops per matrix instead of ``n·r²``.

    Args:
      p: a projection drawn for this plan.
      projection: how ``p`` was drawn; ``None``: the plan's ``kind``.
      gram_inverse: :meth:`gram_inverse` of ``p`` if already computed.

    Returns:
      An array of the shape of ``p``.
    """
    projection = projection or self.kind
    if projection == 'orthogonal':
      return p * (self.rank / self.d)
    if gram_inverse is None:
      gram_inverse = self.gram_inverse(p, projection)
    # (P Pᵀ)⁻¹ is symmetric, so contracting either of its rank axes is fine.
    return jnp.einsum(f'{self._rr_labels()},{self._p_labels(_R)}->'
                      f'{self._p_labels(_R2)}', gram_inverse, p)

  def project(self, g: jax.Array, p: jax.Array,
              projection: Projection | None = None,
              sharding: NamedSharding | None = None) -> jax.Array:
    """``Π G``: the orthogonal projection of ``g`` onto the row space of ``p``.

    Args:
      g: the leaf, of shape ``shape``.
      p: a projection drawn for this plan.
      projection: how ``p`` was drawn; ``None``: the plan's ``kind``.
      sharding: the leaf's own ``NamedSharding`` on an Explicit-axes mesh, or
        None; the products are then sharded like the leaf.

    Returns:
      ``Pᵀ (P Pᵀ)⁻¹ P`` applied to ``g``, of shape ``shape``.
    """
    c = self.compress(g, p, sharding)
    return self.decompress(c, self.dual_rows(p, projection), sharding)


# --- planning --------------------------------------------------------------------


def plan_leaf(path: KeyPath, leaf: Any, rank: int | RankFn | None, side: Side,
              dn: DimensionNumbers | None, dn_given: bool,
              kind: Projection = 'gaussian') -> LeafPlan:
  """The :class:`LeafPlan` of one leaf (an array or a ShapeDtypeStruct).

  ``dn`` is the leaf's matrix view; ``dn_given`` says whether the user chose
  it for this leaf (then ``None`` keeps the leaf dense) or it is the default
  (the last two axes; scalars and vectors stay dense). ``kind`` is how its
  ``P`` is drawn.
  """
  _checks.check_float_leaf(path, leaf)
  shape = tuple(int(s) for s in np.shape(leaf))
  ndim = len(shape)
  dense = LeafPlan(shape, kind=kind)
  # An explicit DimensionNumbers for a scalar or vector can not fit: it is
  # checked below (and refused) rather than silently ignored.
  if rank is None or (dn_given and dn is None) or (ndim < 2 and not dn_given):
    return dense
  if dn is None:
    rows, cols = (ndim - 2,), (ndim - 1,)
  else:
    rows = _checks.normalize_axes(dn.reduction_axis, ndim, path)
    cols = _checks.normalize_axes(dn.output_axis, ndim, path)
    _checks.check_matrix_axes(dn, rows, cols, shape, path)
  n = math.prod(shape[a] for a in rows)
  m = math.prod(shape[a] for a in cols)
  use_rows = (n < m) if side == 'smaller' else (n > m)
  comp, d = (rows, n) if use_rows else (cols, m)
  batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
  if callable(rank):
    r = rank(path, leaf)
    if r is None:
      return dense
    _checks.check_leaf_rank(r, d, path)
  else:
    r = rank
    if d <= r:
      return dense
  return LeafPlan(shape, int(r), tuple(sorted(comp)), batch, kind)


def is_plan(x: Any) -> bool:
  return isinstance(x, LeafPlan)


def flatten_plans(plans: Any) -> tuple[list[tuple[KeyPath, LeafPlan]], Any]:
  """``(path, plan)`` pairs of a plan tree, and its treedef."""
  return jax.tree_util.tree_flatten_with_path(plans, is_leaf=is_plan)


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype a leaf is projected in: its own, at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


# --- drawing the projections of many leaves ------------------------------------

# Same-shaped projections are drawn by one vmapped call per chunk of at most
# this many bytes: one call for all would keep every ``P`` of the tree alive at
# once (measured: at rank 256 on GPT-2 small that cost more memory than the
# compressed state saved), one call per leaf makes the program large.
DRAW_CHUNK_BYTES = 8 * 2**20

class Item(NamedTuple):
  """One leaf of a tree as the engine sees it."""

  path: KeyPath
  plan: LeafPlan
  dtype: Any  # the compute dtype (:func:`compute_dtype`)


def _chunks(items: Sequence[Item]) -> list[list[int]]:
  """Indices of compressed leaves drawn together: same ``P`` shape, dtype
  and kind, at most :data:`DRAW_CHUNK_BYTES` per chunk, in leaf order."""
  groups: dict[Any, list[int]] = {}
  for i, (_, plan, dtype) in enumerate(items):
    if not plan.dense:
      groups.setdefault((plan.p_shape, jnp.dtype(dtype), plan.kind),
                        []).append(i)
  out = []
  for (p_shape, dtype, _), idx in groups.items():
    # An empty ``P`` (a zero-length batch axis) costs nothing: one chunk.
    nbytes = math.prod(p_shape) * dtype.itemsize
    per = len(idx) if nbytes == 0 else max(1, DRAW_CHUNK_BYTES // nbytes)
    out += [idx[s:s + per] for s in range(0, len(idx), per)]
  return out


def _scatter(out: list[Any], idx: Sequence[int], stacked: jax.Array) -> None:
  """``out[i]`` for each ``i`` of a chunk from one stacked result."""
  for n, i in enumerate(idx):
    out[i] = stacked[n]


def draw_projections(items: Sequence[Item],
                     key: jax.Array) -> list[jax.Array | None]:
  """Draws ``P`` for every ``(path, plan, dtype)``; ``None`` for dense ones.

  Leaf ``path`` gets the projection of ``leaf_key(key, path)``, drawn as its
  plan's ``kind``. Leaves whose projections have the same shape and dtype
  are drawn by one vmapped call per chunk (GPT-2 small: 50 draws become a
  few), which for Threefry keys gives the very same values as one call per
  leaf: compiled programs stay small without changing a projection. Other
  implementations (``rbg``) do not promise that, and a batched QR
  (``'orthogonal'``) may round differently from one QR per leaf from one
  program to another, so those are drawn one by one.
  """
  out: list[jax.Array | None] = [None] * len(items)
  threefry = _keys.impl_name(key) == 'threefry2x32'
  for idx in _chunks(items):
    _, plan0, dtype0 = items[idx[0]]
    if not threefry or plan0.kind == 'orthogonal' or len(idx) == 1:
      for i in idx:
        path, plan, dtype = items[i]
        out[i] = plan.projection(_keys.leaf_key(key, path), dtype=dtype)
      continue
    ids = jnp.asarray([_keys.leaf_id(items[i][0]) for i in idx], jnp.uint32)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(ids)
    _scatter(out, idx, jax.vmap(lambda k: plan0.projection(k, dtype=dtype0))(
        keys))
  return out


def gram_inverses(items: Sequence[Item],
                  ps: Sequence[jax.Array | None]) -> list[jax.Array | None]:
  """``(P Pᵀ)⁻¹`` of every compressed leaf, one batched inverse per chunk;
  None for dense leaves and for ``'orthogonal'`` ones, whose
  :meth:`LeafPlan.dual_rows` needs none (``P Pᵀ = (d/r) I`` exactly)."""
  out: list[jax.Array | None] = [None] * len(items)
  for idx in _chunks(items):
    plan0 = items[idx[0]][1]
    if plan0.kind == 'orthogonal':
      continue
    if len(idx) == 1:
      out[idx[0]] = plan0.gram_inverse(ps[idx[0]])
      continue
    _scatter(out, idx, jax.vmap(plan0.gram_inverse)(
        jnp.stack([ps[i] for i in idx])))
  return out
