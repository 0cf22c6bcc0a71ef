"""Random projections regenerated from keys: the building block of Flora.

A leaf ``G`` is viewed as a matrix, or a batch of matrices, ``(..., n, m)``.
One of the two matrix axes (size ``d``) is compressed to ``r``:

* last axis: ``C = G Pᵀ`` (``n×r``), ``Ĝ = C P``;
* second-last axis: ``C = P G`` (``r×m``), ``Ĝ = Pᵀ C``;

with ``P ∈ R^{r×d}`` drawn from a key such that ``E[Pᵀ P] = I``, so that
``Ĝ`` is an unbiased estimate of ``G``. Only keys are kept, never ``P``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flora_optax import _keys

PROJECTIONS = ('gaussian', 'rademacher', 'orthogonal')
SIDES = ('smaller', 'larger')
TRANSFERS = ('unbiased', 'projected', 'reset')

Projection = Literal['gaussian', 'rademacher', 'orthogonal']
Side = Literal['smaller', 'larger']
Transfer = Literal['unbiased', 'projected', 'reset']
KeyPath = tuple[Any, ...]
RankFn = Callable[[KeyPath, Any], Union[int, None]]


class DimensionNumbers(NamedTuple):
  """Which axes of a leaf form the rows and the columns of its matrix view.

  The same idea as ``optax.contrib.GaLoreDimensionNumbers``: a tensor that is
  logically a linear map but stored with more axes, e.g. an attention kernel
  ``(embed, heads, head_dim)``, is viewed as ``embed × (heads·head_dim)`` with
  ``DimensionNumbers(reduction_axis=0, output_axis=(1, 2))``. Axes named in
  neither field are batch axes: every batch element gets its own projection.

  Attributes:
    reduction_axis: axis or axes forming the rows (``n``) of the matrix view.
    output_axis: axis or axes forming the columns (``m``).
  """

  reduction_axis: int | Sequence[int] = 0
  output_axis: int | Sequence[int] = 1


DimensionNumbersSpec = Union[
    None, DimensionNumbers, Callable[[KeyPath, Any], Union[DimensionNumbers,
                                                           None]], Any]

_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
_R, _R2 = 'Y', 'Z'  # einsum labels of the rank axis (old and new)


def _is_dn_leaf(x) -> bool:
  return x is None or isinstance(x, DimensionNumbers)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is compressed: a static description computed from shapes.

  ``rank is None`` means the leaf is kept dense (exact). Otherwise the axes in
  ``compress_axes`` (size ``d`` together) are replaced by one axis of size
  ``rank`` placed where the first of them was; ``batch_axes`` each get their
  own projection.
  """

  shape: tuple[int, ...]
  rank: int | None = None
  compress_axes: tuple[int, ...] = ()
  batch_axes: tuple[int, ...] = ()

  @property
  def dense(self) -> bool:
    return self.rank is None

  @property
  def d(self) -> int:
    return math.prod(self.shape[a] for a in self.compress_axes)

  @property
  def p_shape(self) -> tuple[int, ...]:
    """The shape of ``P``: ``(*batch, r, *compressed)``."""
    return (*(self.shape[a] for a in self.batch_axes), self.rank,
            *(self.shape[a] for a in self.compress_axes))

  @property
  def sketch_shape(self) -> tuple[int, ...]:
    if self.dense:
      return self.shape
    out = []
    for i, s in enumerate(self.shape):
      if i == self.compress_axes[0]:
        out.append(self.rank)
      elif i not in self.compress_axes:
        out.append(s)
    return tuple(out)

  # --- einsum subscripts -------------------------------------------------
  def _labels(self) -> str:
    return _LETTERS[:len(self.shape)]

  def _p_labels(self, r: str = _R) -> str:
    lab = self._labels()
    return (''.join(lab[a] for a in self.batch_axes) + r +
            ''.join(lab[a] for a in self.compress_axes))

  def _s_labels(self, r: str = _R) -> str:
    lab = self._labels()
    out = ''
    for i in range(len(self.shape)):
      if i == self.compress_axes[0]:
        out += r
      elif i not in self.compress_axes:
        out += lab[i]
    return out

  def _rr_labels(self) -> str:
    lab = self._labels()
    return ''.join(lab[a] for a in self.batch_axes) + _R + _R2

  # --- operations with explicit projections ------------------------------
  def projection(self, key: jax.Array, projection: Projection,
                 dtype: Any = jnp.float32) -> jax.Array:
    """Draws ``P`` with shape ``(*batch, r, *compressed)`` from a typed key."""
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

  # --- sharding (Explicit-axes meshes) -----------------------------------
  # ``sharding`` below is the leaf's own sharding on an Explicit mesh (see
  # ``explicit_sharding``), or None (unsharded, or Auto axes left to XLA).
  # The sketch keeps the mesh axes of the axes that are not compressed and
  # replicates the rank axis; ``P`` is drawn replicated (so its values never
  # depend on the mesh) and then sliced like the leaf's compressed and batch
  # axes, which costs no communication.
  def sketch_spec(self, spec: PartitionSpec) -> PartitionSpec:
    """The spec of the sketch of a leaf with partition spec ``spec``."""
    spec = _padded(spec, len(self.shape))
    if self.dense:
      return PartitionSpec(*spec)
    return PartitionSpec(*(None if i == self.compress_axes[0] else spec[i]
                           for i in range(len(self.shape))
                           if i == self.compress_axes[0] or
                           i not in self.compress_axes))

  def _p_spec(self, spec: PartitionSpec) -> PartitionSpec:
    spec = _padded(spec, len(self.shape))
    return PartitionSpec(*(spec[a] for a in self.batch_axes), None,
                         *(spec[a] for a in self.compress_axes))

  def _rr_spec(self, spec: PartitionSpec) -> PartitionSpec:
    spec = _padded(spec, len(self.shape))
    return PartitionSpec(*(spec[a] for a in self.batch_axes), None, None)

  def compress(self, g: jax.Array, p: jax.Array,
               sharding: NamedSharding | None = None) -> jax.Array:
    subscripts = f'{self._labels()},{self._p_labels()}->{self._s_labels()}'
    if sharding is None:
      return jnp.einsum(subscripts, g, p)
    # A sharded compressed axis makes partial sketches that are summed over
    # its mesh axes (an all-reduce of the sketch, never a gather of ``g``).
    p = jax.sharding.reshard(p, _like(sharding, self._p_spec(sharding.spec)))
    return jnp.einsum(subscripts, g, p, out_sharding=_like(
        sharding, self.sketch_spec(sharding.spec)))

  def decompress(self, c: jax.Array, p: jax.Array,
                 sharding: NamedSharding | None = None) -> jax.Array:
    subscripts = f'{self._s_labels()},{self._p_labels()}->{self._labels()}'
    if sharding is None:
      return jnp.einsum(subscripts, c, p)
    # Each device expands its own block: no communication.
    p = jax.sharding.reshard(p, _like(sharding, self._p_spec(sharding.spec)))
    return jnp.einsum(subscripts, c, p, out_sharding=sharding)

  def transfer(self, c: jax.Array, p_old: jax.Array, p_new: jax.Array,
               method: Transfer = 'unbiased',
               sharding: NamedSharding | None = None) -> jax.Array:
    """Moves a sketch from ``p_old`` to ``p_new`` through an ``r×r`` matrix."""
    if method == 'reset':
      return jnp.zeros_like(c)
    # T = P_old P_newᵀ (batch, r, r): the full-size matrix is never formed.
    t = jnp.einsum(f'{self._p_labels(_R)},{self._p_labels(_R2)}->'
                   f'{self._rr_labels()}', p_old, p_new)
    if method == 'projected':
      # Least-squares re-projection: C' = C P_old pinv(P_new), where
      # pinv(P) = Pᵀ (P Pᵀ)⁻¹. It projects the carried momentum onto the new
      # row space, which never increases its norm.
      gram = jnp.einsum(f'{self._p_labels(_R)},{self._p_labels(_R2)}->'
                        f'{self._rr_labels()}', p_new, p_new)
      t = jnp.swapaxes(jnp.linalg.solve(gram, jnp.swapaxes(t, -1, -2)), -1,
                       -2)
    return self.apply_rr(c, t, sharding)

  def apply_rr(self, c: jax.Array, t: jax.Array,
               sharding: NamedSharding | None = None) -> jax.Array:
    """Multiplies the rank axis of a sketch by ``t`` (``(*batch, r, r')``)."""
    subscripts = (f'{self._s_labels(_R)},{self._rr_labels()}->'
                  f'{self._s_labels(_R2)}')
    if sharding is None:
      return jnp.einsum(subscripts, c, t)
    # ``t`` is small and computed replicated; slice its batch axes like ``c``.
    t = jax.sharding.reshard(t, _like(sharding, self._rr_spec(sharding.spec)))
    return jnp.einsum(subscripts, c, t, out_sharding=_like(
        sharding, self.sketch_spec(sharding.spec)))

  # --- the row space of P (residual momentum) ----------------------------
  # ``Π = Pᵀ (P Pᵀ)⁻¹ P`` is the orthogonal projector onto the row space of
  # ``P``. Applied to a sketch ``C = G Pᵀ`` it reads ``Π G = (C (P Pᵀ)⁻¹) P``:
  # only the ``r×r`` Gram matrix is formed, never a ``d×d`` one.
  def gram_inverse(self, p: jax.Array, projection: Projection) -> jax.Array:
    """``(P Pᵀ)⁻¹`` with shape ``(*batch, r, r)``.

    For ``'orthogonal'`` ``P Pᵀ = (d/r) I`` exactly, so no inverse is
    computed; for the others it is an ``r×r`` inverse per batch element.
    """
    batch = tuple(self.shape[a] for a in self.batch_axes)
    if projection == 'orthogonal':
      eye = jnp.eye(self.rank, dtype=p.dtype) * (self.rank / self.d)
      return jnp.broadcast_to(eye, (*batch, self.rank, self.rank))
    gram = jnp.einsum(f'{self._p_labels(_R)},{self._p_labels(_R2)}->'
                      f'{self._rr_labels()}', p, p)
    return jnp.linalg.inv(gram)

  def subspace_coordinates(self, c: jax.Array, p: jax.Array,
                           projection: Projection,
                           sharding: NamedSharding | None = None,
                           gram_inverse: jax.Array | None = None) -> jax.Array:
    """``C (P Pᵀ)⁻¹``: the sketch whose decompression is ``Π G``."""
    if projection == 'orthogonal':
      return c * (self.rank / self.d)
    if gram_inverse is None:
      gram_inverse = self.gram_inverse(p, projection)
    return self.apply_rr(c, gram_inverse, sharding)

  def dual_rows(self, p: jax.Array, projection: Projection,
                gram_inverse: jax.Array | None = None) -> jax.Array:
    """``(P Pᵀ)⁻¹ P``: decompressing a sketch with it gives ``Π G``.

    ``decompress(C, dual_rows(P)) == decompress(subspace_coordinates(C), P)``
    at ``r²·d`` flops per matrix instead of ``n·r²``.
    """
    if projection == 'orthogonal':
      return p * (self.rank / self.d)
    if gram_inverse is None:
      gram_inverse = self.gram_inverse(p, projection)
    # (P Pᵀ)⁻¹ is symmetric, so contracting either of its rank axes is fine.
    return jnp.einsum(f'{self._rr_labels()},{self._p_labels(_R)}->'
                      f'{self._p_labels(_R2)}', gram_inverse, p)

  def project(self, g: jax.Array, p: jax.Array, projection: Projection,
              sharding: NamedSharding | None = None) -> jax.Array:
    """``Π G``: the orthogonal projection of ``g`` onto the row space of ``p``."""
    c = self.compress(g, p, sharding)
    return self.decompress(c, self.dual_rows(p, projection), sharding)


def _is_plan(x: Any) -> bool:
  return isinstance(x, LeafPlan)


def flatten_plans(plans: Any) -> tuple[list[tuple[Any, LeafPlan]], Any]:
  """``(path, plan)`` pairs of a plan tree, and its treedef."""
  return jax.tree_util.tree_flatten_with_path(plans, is_leaf=_is_plan)


def _groups(items: Sequence[tuple[Any, LeafPlan, Any]]) -> list[list[int]]:
  """Indices of the compressed leaves whose projections have one shape."""
  groups: dict[Any, list[int]] = {}
  for i, (_, plan, dtype) in enumerate(items):
    if not plan.dense:
      groups.setdefault((plan.p_shape, jnp.dtype(dtype)), []).append(i)
  return list(groups.values())


def draw_projections(items: Sequence[tuple[Any, LeafPlan, Any]],
                     key: jax.Array,
                     projection: Projection) -> list[jax.Array | None]:
  """Draws ``P`` for every ``(path, plan, dtype)``; ``None`` for dense ones.

  Leaf ``path`` gets the projection of ``leaf_key(key, path)``. Leaves whose
  projections have the same shape and dtype are drawn by one vmapped call
  (GPT-2 small: 50 draws become one), which for Threefry keys gives the very
  same values as one call per leaf: compiled programs stay small without
  changing a projection. Other implementations (``rbg``) do not promise that,
  and a batched QR (``'orthogonal'``) may round differently from one QR per
  leaf from one program to another, so those are drawn one by one.
  """
  out: list[jax.Array | None] = [None] * len(items)
  batched = (_keys.impl_name(key) == 'threefry2x32' and
             projection != 'orthogonal')
  for idx in _groups(items):
    _, plan0, dtype = items[idx[0]]
    if not batched or len(idx) == 1:
      for i in idx:
        path, plan, dtype = items[i]
        out[i] = plan.projection(_keys.leaf_key(key, path), projection, dtype)
      continue
    ids = jnp.asarray([_keys.leaf_id(items[i][0]) for i in idx], jnp.uint32)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(ids)
    stacked = jax.vmap(lambda k: plan0.projection(k, projection, dtype))(keys)
    for n, i in enumerate(idx):
      out[i] = stacked[n]
  return out


def gram_inverses(items: Sequence[tuple[Any, LeafPlan, Any]],
                  ps: Sequence[jax.Array | None],
                  projection: Projection) -> list[jax.Array | None]:
  """``(P Pᵀ)⁻¹`` of every compressed leaf, one batched inverse per group."""
  out: list[jax.Array | None] = [None] * len(items)
  for idx in _groups(items):
    plan0 = items[idx[0]][1]
    if len(idx) == 1:
      out[idx[0]] = plan0.gram_inverse(ps[idx[0]], projection)
      continue
    stacked = jax.vmap(lambda p: plan0.gram_inverse(p, projection))(
        jnp.stack([ps[i] for i in idx]))
    for n, i in enumerate(idx):
      out[i] = stacked[n]
  return out


def _padded(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
  return tuple(spec) + (None,) * (ndim - len(spec))


def _like(sharding: NamedSharding, spec: PartitionSpec) -> NamedSharding:
  return NamedSharding(sharding.mesh, spec)


def sketch_zeros(plan: LeafPlan, like: Any, dtype: Any) -> jax.Array:
  """Zeros of ``plan``'s sketch shape, sharded like ``like`` if it is typed.

  On an Explicit-axes mesh ``jnp.zeros(shape)`` alone is replicated, and a
  state built that way would change its type at the first update.
  """
  sharding = explicit_sharding(like)
  if sharding is None:
    return jnp.zeros(plan.sketch_shape, dtype)
  return jnp.zeros(plan.sketch_shape, dtype,
                   out_sharding=_like(sharding, plan.sketch_spec(sharding.spec)))


def explicit_sharding(x: Any) -> NamedSharding | None:
  """The sharding of ``x`` when it is typed on an Explicit-axes mesh.

  Under ``jax.set_mesh`` with ``AxisType.Explicit`` axes the sharding is part
  of an array's type and every new array must be given its sharding. With Auto
  axes (plain ``jit`` with ``in_shardings``), or no mesh, this returns None and
  XLA propagates shardings itself.
  """
  try:
    sharding = jax.typeof(x).sharding
  except TypeError:  # e.g. a jax.ShapeDtypeStruct
    sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  if mesh.empty or not any(t == jax.sharding.AxisType.Explicit
                           for t in mesh.axis_types):
    return None
  return sharding


# --- argument checks ---------------------------------------------------------


def check_rank(rank: Any) -> None:
  if callable(rank):
    return
  if isinstance(rank, (jax.Array, np.ndarray)):
    raise TypeError(
        '`rank` must be a Python int or a callable (path, leaf) -> int | None, '
        f'got an array ({rank!r}). It sets state shapes, so it must be static: '
        "under optax.inject_hyperparams pass static_args=('rank',).")
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError('`rank` must be a positive int or a callable '
                    f'(path, leaf) -> int | None, got {rank!r}.')
  if rank <= 0:
    raise ValueError(f'`rank` must be a positive int, got {rank}.')


# Packages whose frames are not the user's: a warning raised while one of them
# runs (an init inside optax.chain, flora, jax.jit or nnx.Optimizer) is
# attributed to the first frame outside them.
_LIBRARY_PACKAGES = ('flora_optax', 'optax', 'jax', 'jaxlib', 'flax')


def user_stacklevel() -> int:
  """The ``stacklevel`` that attributes a warning to the user's code.

  For ``warnings.warn`` called by the function that calls this one: the first
  frame outside flora_optax, optax, JAX and Flax. (Python 3.12's
  ``skip_file_prefixes`` would do this; 3.11 is supported.)
  """
  dirs = tuple(
      os.path.dirname(os.path.abspath(sys.modules[name].__file__)) + os.sep
      for name in _LIBRARY_PACKAGES
      if getattr(sys.modules.get(name), '__file__', None))
  frame, level = inspect.currentframe().f_back, 1
  while frame is not None and os.path.abspath(
      frame.f_code.co_filename).startswith(dirs):
    frame, level = frame.f_back, level + 1
  return level


def check_float_dtype(value: Any, name: str) -> Any:
  """Returns ``jnp.dtype(value)``, or raises naming ``name`` if not floating."""
  if isinstance(value, (jax.Array, np.ndarray)):
    # jnp.dtype(array) would silently give the array's dtype.
    raise TypeError(
        f'`{name}` must be a dtype, got an array: optax.inject_hyperparams '
        'takes a callable such as jnp.bfloat16 for a schedule. Pass a string '
        f"('bfloat16') or a jnp.dtype(...) instead, or list '{name}' in "
        'static_args.')
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'`{name}` must be a floating dtype, got {value!r}.')
  return dtype


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f'`{name}` must be one of {list(choices)}, got {value!r}.')


def check_dimension_numbers(dn: Any) -> None:
  if dn is None or callable(dn) and not isinstance(dn, DimensionNumbers):
    return
  if isinstance(dn, DimensionNumbers):
    for field in dn:
      axes = (field,) if isinstance(field, (int, np.integer)) else field
      if not isinstance(axes, Sequence) or not axes or not all(
          isinstance(a, (int, np.integer)) and not isinstance(a, bool)
          for a in axes):
        raise TypeError(
            '`dimension_numbers` axes must be ints or non-empty sequences of '
            f'ints, got {dn}.')
    return
  # Otherwise a pytree of DimensionNumbers | None, checked against the params
  # at init.
  for leaf in jax.tree.leaves(dn, is_leaf=_is_dn_leaf):
    if not _is_dn_leaf(leaf):
      raise TypeError(
          '`dimension_numbers` must be None, a DimensionNumbers, a callable '
          '(path, leaf) -> DimensionNumbers | None, or a pytree of those '
          f'matching the params; found a leaf {leaf!r}.')
    if leaf is not None:
      check_dimension_numbers(leaf)


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or '<root>'


def check_same_tree(tree: Any, init_tree: Any, what: str) -> None:
  """Raises a ValueError naming the leaves when two trees' structures differ.

  Runs at trace time: ``jax.tree.map`` would otherwise fail with a generic
  message, or not at all when a container type alone differs.
  """
  if jax.tree.structure(tree) == jax.tree.structure(init_tree):
    return
  paths = lambda t: {_leaf_name(p) for p, _ in  # noqa: E731
                     jax.tree_util.tree_leaves_with_path(t)}
  got, want = paths(tree), paths(init_tree)
  show = lambda xs: ', '.join(sorted(xs)[:5]) or 'none'  # noqa: E731
  detail = (f'leaves missing: {show(want - got)}; unexpected leaves: '
            f'{show(got - want)}')
  if got == want:
    detail = (f'same leaf paths but different containers: '
              f'{jax.tree.structure(tree)} vs {jax.tree.structure(init_tree)}')
  raise ValueError(f'The {what} tree does not have the structure of the params '
                   f'given to init ({detail}).')


def check_prefix_tree(prefix: Any, tree: Any, what: str,
                      is_leaf: Callable[[Any], bool] | None = None) -> None:
  """Raises a ValueError naming the leaves unless ``prefix`` fits ``tree``.

  ``prefix`` (whose leaves are told by ``is_leaf``) must have the structure of
  ``tree`` down to its own leaves, as ``jax.tree.map(f, prefix, tree)`` needs;
  a leaf of ``prefix`` may stand for a subtree of ``tree`` (e.g. an NNX
  ``Variable``).
  """
  treedef = jax.tree.structure(prefix, is_leaf=is_leaf)
  try:
    treedef.flatten_up_to(tree)
    return
  except (ValueError, TypeError):
    pass  # the mismatch is described below, independently of JAX's wording
  want = [p for p, _ in jax.tree_util.tree_leaves_with_path(
      prefix, is_leaf=is_leaf)]
  got = [p for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  covered = lambda p, qs: any(p[:len(q)] == q for q in qs)  # noqa: E731
  missing = {_leaf_name(p) for p in got if not covered(p, want)}
  unused = {_leaf_name(q) for q in want
            if not any(p[:len(q)] == q for p in got)}
  show = lambda xs: ', '.join(sorted(xs)[:5]) or 'none'  # noqa: E731
  detail = (f'params leaves it lacks: {show(missing)}; its entries for no '
            f'params leaf: {show(unused)}')
  if not missing and not unused:
    detail = (f'same paths but different containers: {treedef} vs '
              f'{jax.tree.structure(tree)}')
  raise ValueError(f'{what} as a pytree must match the structure of the '
                   f'params ({detail}).')


def check_sketches(plans: Any,
                   sketches: Any,
                   what: str = 'state',
                   params: Any = None) -> None:
  """Checks at trace time that stored sketches fit the plans of an update.

  An update whose leaf shapes differ from the params given to ``init`` would
  otherwise broadcast silently or fail deep inside an einsum. A change of the
  compressed axis alone keeps the sketch's shape; ``params``, when given with
  the updates' structure, reveal it.

  Args:
    plans: the :class:`LeafPlan` tree of the incoming updates.
    sketches: the tree held in the state (built at ``init``).
    what: the name of that tree in the error message.
    params: the ``params`` passed to ``update`` (or None).
  """
  check_same_tree(plans, sketches, 'updates')

  def f(path, plan, s):
    if tuple(s.shape) != plan.sketch_shape:
      raise ValueError(
          f'Leaf {_leaf_name(path)}: an update of shape {plan.shape} needs a '
          f'{what} of shape {plan.sketch_shape}, but the {what} holds '
          f'{tuple(s.shape)}. Updates must have the shapes of the params '
          'given to init.')

  jax.tree_util.tree_map_with_path(f, plans, sketches)
  if params is not None and (jax.tree.structure(params) ==
                             jax.tree.structure(plans)):
    check_like_params(plans, params)


def check_like_params(updates: Any, params: Any) -> None:
  """Raises a ValueError naming the leaf where updates and params differ.

  Args:
    updates: the updates, or their :class:`LeafPlan` tree.
    params: the params passed to ``update``.
  """
  check_same_tree(updates, params, 'updates')

  def g(path, u, x):
    shape = u.shape if isinstance(u, LeafPlan) else tuple(np.shape(u))
    if tuple(shape) != tuple(np.shape(x)):
      raise ValueError(
          f'Leaf {_leaf_name(path)}: the update has shape {tuple(shape)} but '
          f'the param has shape {tuple(np.shape(x))}.')

  jax.tree_util.tree_map_with_path(g, updates, params)


def check_float_leaf(path, leaf) -> None:
  """Raises a TypeError naming the leaf unless it is a real floating array."""
  dtype = getattr(leaf, 'dtype', None)
  try:
    # The dtype the user passed: jnp.result_type would report an int64 NumPy
    # leaf as int32 without x64.
    dtype = None if dtype is None else np.dtype(dtype)
  except TypeError:  # an extended dtype (e.g. a PRNG key's): shown as it is
    pass
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    kind = (f'no dtype (a Python {type(leaf).__name__}, not an array)'
            if dtype is None else f'dtype {dtype}')
    raise TypeError(
        f'Leaf {_leaf_name(path)} has {kind}; flora_optax handles real '
        'floating-point leaves only (float16, bfloat16, float32, float64). '
        'Keep other leaves out of the optimizer with optax.masked or '
        'optax.partition.')


def check_float_leaves(tree: Any) -> None:
  """:func:`check_float_leaf` on every leaf of ``tree``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    check_float_leaf(path, leaf)


def _normalize_axes(field, ndim: int, path) -> tuple[int, ...]:
  axes = (field,) if isinstance(field, (int, np.integer)) else tuple(field)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f'`dimension_numbers` axis {a} is out of range for leaf '
          f'{_leaf_name(path)} with {ndim} axes.')
    out.append(int(a) % ndim)
  return tuple(out)


class Projector:
  """Compresses pytrees with random projections regenerated from keys.

  Each leaf is viewed as a matrix (or a batch of matrices, see
  :class:`DimensionNumbers`) and one of its two matrix axes, of size ``d``, is
  compressed to ``r``. Scalars, vectors and leaves whose compressed axis is not
  larger than an int ``rank`` stay dense (passed through exactly). Every
  projection is redrawn from ``fold_in(key, leaf_id)`` where it is needed;
  nothing but the key is kept.

  Args:
    rank: the rank ``r``: a positive int, or a callable ``(path, leaf) -> int
      | None`` giving each leaf's rank (``None`` keeps it dense). A rank from a
      callable is applied as given whenever ``1 <= r <= d``, so ``r == d`` with
      ``projection='orthogonal'`` is an exact path; ``r > d`` is an error.
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
    check_rank(rank)
    check_choice(projection, 'projection', PROJECTIONS)
    check_choice(side, 'side', SIDES)
    check_dimension_numbers(dimension_numbers)
    self.rank = rank
    self.projection = projection
    self.side = side
    self.dimension_numbers = dimension_numbers

  def __repr__(self) -> str:
    return (f'Projector(rank={self.rank!r}, projection={self.projection!r}, '
            f'side={self.side!r}, dimension_numbers={self.dimension_numbers!r})')

  # --- planning ------------------------------------------------------------
  def _plan_leaf(self, path, leaf, dn, dn_given: bool) -> LeafPlan:
    check_float_leaf(path, leaf)
    shape = tuple(int(s) for s in np.shape(leaf))
    ndim = len(shape)
    # An explicit DimensionNumbers for a scalar or vector can not fit: it is
    # checked below (and refused) rather than silently ignored.
    if (dn_given and dn is None) or (ndim < 2 and not dn_given):
      return LeafPlan(shape)
    if dn is None:
      rows, cols = (ndim - 2,), (ndim - 1,)
    else:
      rows = _normalize_axes(dn.reduction_axis, ndim, path)
      cols = _normalize_axes(dn.output_axis, ndim, path)
      if set(rows) & set(cols) or len(set(rows)) != len(rows) or len(
          set(cols)) != len(cols):
        raise ValueError(
            f'`dimension_numbers` {dn} names an axis twice for leaf '
            f'{_leaf_name(path)} of shape {shape}.')
    n = math.prod(shape[a] for a in rows)
    m = math.prod(shape[a] for a in cols)
    smaller_is_rows = n < m
    use_rows = smaller_is_rows if self.side == 'smaller' else (n > m)
    comp = rows if use_rows else cols
    d = n if use_rows else m
    batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
    if callable(self.rank):
      r = self.rank(path, leaf)
      if r is None:
        return LeafPlan(shape)
      if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError(f'The `rank` callable returned {r!r} for leaf '
                        f'{_leaf_name(path)}; it must return an int or None.')
      if not 1 <= r <= d:
        raise ValueError(
            f'The `rank` callable returned {r} for leaf {_leaf_name(path)} '
            f'whose compressed axis has size {d}; accepted: 1 <= rank <= {d}, '
            'or None to keep the leaf dense.')
    else:
      r = self.rank
      if d <= r:
        return LeafPlan(shape)
    return LeafPlan(shape, int(r), tuple(sorted(comp)), batch)

  def plan(self, like: Any) -> Any:
    """The :class:`LeafPlan` of every leaf of ``like`` (arrays or shapes)."""
    dn = self.dimension_numbers
    if dn is None or isinstance(dn, DimensionNumbers):
      return jax.tree_util.tree_map_with_path(
          lambda p, x: self._plan_leaf(p, x, dn, False), like)
    if callable(dn):
      return jax.tree_util.tree_map_with_path(
          lambda p, x: self._plan_leaf(p, x, dn(p, x), True), like)
    check_prefix_tree(dn, like, '`dimension_numbers`', is_leaf=_is_dn_leaf)
    return jax.tree_util.tree_map_with_path(
        lambda p, d, x: self._plan_leaf(p, x, d, True), dn, like,
        is_leaf=_is_dn_leaf)

  def sketch_shapes(self, like: Any, dtype: Any = None) -> Any:
    """``jax.ShapeDtypeStruct``s of the sketches of ``like``."""
    return jax.tree.map(
        lambda pl, x: jax.ShapeDtypeStruct(pl.sketch_shape, dtype or x.dtype),
        self.plan(like), like)

  def projections(self, like: Any, key: jax.Array) -> Any:
    """The projection matrix ``P`` of every compressed leaf (``None`` if dense).

    ``P`` has shape ``(*batch, r, *compressed_axes)``. This is the frozen
    ``A`` of the LoRA view: ``compress`` is ``G Aᵀ``. Only for inspection and
    experiments; the optimizers never store it.
    """
    ps = self._map(lambda plan, dt, ps, x: ps[0], [key], like, like)
    return jax.tree.map(lambda plan, p: None if plan.dense else p,
                        self.plan(like), ps, is_leaf=_is_plan)

  # --- tree operations ---------------------------------------------------
  def _compute_dtype(self, x) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)

  def _map(self, fn, keys, like, *trees):
    """``fn(plan, dtype, projections, *leaves)`` on every compressed leaf.

    Dense leaves return their leaf of ``trees[0]``. ``projections`` holds the
    leaf's ``P`` for each key of ``keys``, drawn with
    :func:`draw_projections` (as the optimizers draw them) in the compute
    dtype of ``trees[0]``'s leaf.
    """
    flat, treedef = flatten_plans(self.plan(like))
    leaves = [treedef.flatten_up_to(t) for t in trees]
    items = [(path, plan, self._compute_dtype(x))
             for (path, plan), x in zip(flat, leaves[0])]
    pss = [draw_projections(items, _as_typed(k), self.projection)
           for k in keys]
    out = []
    for i, (_, plan, dt) in enumerate(items):
      args = [ls[i] for ls in leaves]
      out.append(args[0] if plan.dense else
                 fn(plan, dt, [ps[i] for ps in pss], *args))
    return treedef.unflatten(out)

  def compress(self, tree: Any, key: jax.Array) -> Any:
    """Compresses every leaf: ``G Pᵀ`` or ``P G`` (dense leaves unchanged).

    Args:
      tree: a pytree of full-size arrays (e.g. gradients).
      key: a typed key or raw key data; leaf keys are ``fold_in(key,
        leaf_id)``.

    Returns:
      The sketches, computed in at least float32.
    """
    return self._map(
        lambda plan, dt, ps, g: plan.compress(g.astype(dt), ps[0],
                                              explicit_sharding(g)),
        [key], tree, tree)

  def decompress(self, sketches: Any, key: jax.Array, like: Any) -> Any:
    """Maps sketches back to full size: ``C P`` or ``Pᵀ C``.

    Args:
      sketches: the output of :meth:`compress` (or a sum of such outputs).
      key: the key they were compressed with.
      like: the full-size tree (arrays or ``jax.ShapeDtypeStruct``s).

    Returns:
      A tree with the shapes of ``like``, in the sketches' dtype.
    """
    return self._map(
        lambda plan, dt, ps, c, x: plan.decompress(c, ps[0],
                                                   explicit_sharding(x)),
        [key], like, sketches, like)

  def transfer(self,
               sketches: Any,
               old_key: jax.Array,
               new_key: jax.Array,
               like: Any,
               *,
               method: Transfer = 'unbiased') -> Any:
    """Re-expresses sketches made with ``old_key`` in ``new_key``'s projection.

    ``method='unbiased'`` gives ``compress_new(decompress_old(C))``, computed
    through the ``r×r`` product ``P_old P_newᵀ``; ``'projected'`` uses the
    pseudo-inverse of ``P_new`` instead (a contraction, biased by ``r/d``);
    ``'reset'`` returns zeros.
    """
    check_choice(method, 'method', TRANSFERS)
    return self._map(
        lambda plan, dt, ps, c, x: plan.transfer(
            c.astype(dt), ps[0], ps[1], method, explicit_sharding(x)),
        [old_key, new_key], like, sketches, like)

  def project(self, tree: Any, key: jax.Array) -> Any:
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
    return self._map(
        lambda plan, dt, ps, g: plan.project(g.astype(dt), ps[0],
                                             self.projection,
                                             explicit_sharding(g)),
        [key], tree, tree)


def _as_typed(key: Any) -> jax.Array:
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key):
    return key
  return _keys.wrap(_keys.key_data(key))


# --- Flax NNX Variables -------------------------------------------------------

# Metadata keys under which NNX keeps a Variable's per-axis sharding names.
_NNX_SHARDING_KEYS = ('out_sharding', 'sharding_names', 'optimizer_sharding')


def _nnx_variable_type() -> type | None:
  # Looked up only if Flax NNX is already imported: no dependency on Flax.
  nnx = sys.modules.get('flax.nnx')
  return getattr(nnx, 'Variable', None) if nnx is not None else None


def fit_nnx_metadata(params: Any, tree: Any, plans: Any = None) -> Any:
  """Fixes NNX metadata on state leaves whose shape differs from the param's.

  ``nnx.Optimizer`` initialises the state from ``nnx.Variable`` params, so a
  ``jax.tree.map`` over them wraps each state leaf in the param's Variable
  type with the param's metadata, sharding names included, which NNX then
  applies eagerly (``nnx.Optimizer`` re-creates every Variable). Names for an
  ``(n, m)`` param on an ``(r, m)`` sketch mis-shard it, and on a leaf with
  fewer axes they fail. Sketches (leaves matching ``plans``) therefore get the
  param's names with the rank axis replicated, as ``LeafPlan.sketch_spec``;
  other leaves of another shape (factored rows, ``(1,)`` placeholders) become
  plain arrays. Without Flax NNX in use ``tree`` is returned unchanged.
  """
  variable = _nnx_variable_type()
  if variable is None:
    return tree

  def is_var(x):
    return isinstance(x, variable)

  if not any(is_var(x) for x in jax.tree.leaves(params, is_leaf=is_var)):
    return tree

  def fit(p, s, plan=None):
    if not (is_var(p) and is_var(s)):
      return s
    value = s.get_value()
    if np.shape(value) == np.shape(p.get_value()):
      return s
    plan = plan.get_value() if is_var(plan) else plan
    if not isinstance(plan, LeafPlan) or plan.dense or (np.shape(value) !=
                                                         plan.sketch_shape):
      return value
    metadata = dict(s.get_metadata())
    for k in _NNX_SHARDING_KEYS:
      names = metadata.get(k)
      if isinstance(names, (tuple, list)) and len(names) == len(plan.shape):
        metadata[k] = tuple(plan.sketch_spec(PartitionSpec(*names)))
    return type(s)(value, **metadata)

  if plans is None:
    return jax.tree.map(fit, params, tree, is_leaf=is_var)
  return jax.tree.map(fit, params, tree, plans, is_leaf=is_var)
