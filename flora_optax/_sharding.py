# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Shardings of optimizer states, derived from the shardings of the params.

Under SPMD (``jax.jit`` with ``NamedSharding``), a Flora sketch keeps the mesh
axes of the matrix axes that are *not* compressed and replicates its rank
axis: a ``(n, m)`` kernel sharded ``P('data', 'model')`` whose last axis is
compressed has a ``(n, r)`` sketch sharded ``P('data', None)``. Counters and
keys are replicated. :func:`state_shardings` gives these shardings for a
whole optimizer state.

Per compressed leaf, an update communicates one all-reduce of the local sketch
block over the mesh axes that shard the compressed axis (none if it is not
sharded), and at most an ``r×r`` all-reduce on the first step of a cycle;
projections are drawn locally (Threefry is counter-based) and the gradient
is never gathered. The case-by-case account: the documentation's "Sharded
states and communication" page (``docs/explain/sharding.md``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flora_optax import _checks


# --- arrays on Explicit-axes meshes -------------------------------------------
# A leaf's sharding on an Explicit mesh (see ``explicit_sharding``), or None
# (unsharded, or Auto axes left to XLA, which then propagates shardings
# itself). A sketch keeps the mesh axes of the axes that are not compressed
# and replicates the rank axis; ``P`` is drawn replicated (so its values never
# depend on the mesh) and then sliced like the leaf's compressed and batch
# axes, which costs no communication. Those shardings derive from a
# ``LeafPlan``'s axis maps (``_projection.sharding_on``).


def explicit_sharding(x: Any) -> NamedSharding | None:
  """The sharding of ``x`` when it is typed on an Explicit-axes mesh.

  Under ``jax.set_mesh`` with ``AxisType.Explicit`` axes the sharding is part
  of an array's type and every new array must be given its sharding. With Auto
  axes (plain ``jit`` with ``in_shardings``), or no mesh, this returns None.
  """
  try:
    sharding = jax.typeof(x).sharding
  except TypeError:  # e.g. a jax.ShapeDtypeStruct
    sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  if mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding


def einsum(subscripts: str, x: jax.Array, y: jax.Array,
           y_sharding: NamedSharding | None,
           out_sharding: NamedSharding | None) -> jax.Array:
  """``jnp.einsum(subscripts, x, y)`` with ``y`` resharded first.

  A sharded contracted axis makes partial products that XLA sums over its
  mesh axes (an all-reduce of the small result, never a gather of ``x``).
  """
  if out_sharding is None:
    return jnp.einsum(subscripts, x, y)
  if y_sharding is not None:
    y = jax.sharding.reshard(y, y_sharding)
  return jnp.einsum(subscripts, x, y, out_sharding=out_sharding)


def zeros(shape: tuple[int, ...], dtype: Any,
          sharding: NamedSharding | None = None) -> jax.Array:
  """Zeros, sharded when ``sharding`` is given (else left to XLA).

  On an Explicit-axes mesh ``jnp.zeros(shape)`` alone is replicated, and a
  state built that way would change its type at the first update.
  """
  if sharding is None:
    return jnp.zeros(shape, dtype)
  return jnp.zeros(shape, dtype, out_sharding=sharding)


def fit_names(names: Any, shape: tuple[int, ...],
              axis_sizes: dict[str, int]) -> tuple[Any, ...]:
  """Per-axis mesh names with those that do not divide their axis dropped.

  The codes and block scales of a quantized state have the state's axes but
  a shorter last one: e.g. one block scale on an axis sharded four ways is
  replicated there instead.
  """
  names = tuple(names) + (None,) * (len(shape) - len(names))

  def fits(entry, n):
    if entry is None:
      return True
    group = entry if isinstance(entry, tuple) else (entry,)
    return n % math.prod(axis_sizes.get(a, 1) for a in group) == 0

  return tuple(e if fits(e, n) else None for e, n in zip(names, shape))


def fit_sharding(sharding: NamedSharding | None,
                 shape: tuple[int, ...]) -> NamedSharding | None:
  """``sharding`` for an array of ``shape`` with the same axes, e.g. the
  codes or block scales of a quantized sketch: mesh axes that do not divide
  its axes are dropped (:func:`fit_names`)."""
  if sharding is None:
    return None
  mesh = sharding.mesh
  return NamedSharding(mesh, PartitionSpec(*fit_names(
      sharding.spec, shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))))


def zeros_of(shape: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of a traced shape, keeping its sharding on an Explicit mesh."""
  return zeros(shape.shape, shape.dtype, explicit_sharding(shape))


# --- state_shardings -------------------------------------------------------------


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (jax.sharding.Sharding, PartitionSpec))


def _init_fn(tx: Any) -> Callable[[Any], Any]:
  init = getattr(tx, 'init', tx)
  _checks.check_callable(
      init, 'tx', 'an optax GradientTransformation (anything with an `init` '
      'method) or an init function params -> state')
  return init


def _param_shardings(params: Any, param_shardings: Any,
                     mesh: Mesh | None) -> list[NamedSharding]:
  """One NamedSharding per params leaf (in ``jax.tree.leaves`` order)."""
  leaves, treedef = jax.tree.flatten(params)
  if param_shardings is None:
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
      s = getattr(x, 'sharding', None)
      if s is None:
        raise ValueError(
            '`param_shardings` is None, so every params leaf must carry its '
            f'own sharding (a jax.Array, or a jax.ShapeDtypeStruct with '
            f'`sharding=`), but leaf {jax.tree_util.keystr(path)} has none.')
      out.append(s)
  elif _is_spec_leaf(param_shardings):
    out = [param_shardings] * len(leaves)
  else:
    try:
      out = treedef.flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          '`param_shardings` must be one sharding for every leaf, or a pytree '
          'of NamedSharding/PartitionSpec with the structure of the params: '
          f'{e}') from e
  result = []
  for s in out:
    if isinstance(s, PartitionSpec):
      if mesh is None:
        raise ValueError(
            '`param_shardings` given as PartitionSpecs needs `mesh=`.')
      s = NamedSharding(mesh, s)
    elif s is None:
      if mesh is None:
        raise ValueError('A `param_shardings` leaf of None (replicated) '
                         'needs `mesh=`.')
      s = NamedSharding(mesh, PartitionSpec())
    if not isinstance(s, NamedSharding):
      raise TypeError(
          '`param_shardings` leaves must be jax.sharding.NamedSharding or '
          f'PartitionSpec (with `mesh=`), got {type(s).__name__}.')
    result.append(s)
  return result


def _explicit(mesh: Mesh) -> Mesh:
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Explicit,) * len(mesh.axis_names))


def state_shardings(tx: Any,
                    params: Any,
                    param_shardings: Any = None,
                    *,
                    mesh: Mesh | None = None) -> Any:
  """The shardings of ``tx.init(params)``, given the shardings of ``params``.

  The result mirrors the state's pytree with one ``NamedSharding`` per array
  leaf, on the params' mesh, ready for ``jax.jit(tx.init,
  out_shardings=...)`` and for the ``in_shardings``/``out_shardings`` of a
  jitted train step. Nothing is computed or allocated: the state is traced
  with ``jax.eval_shape`` on an Explicit-axes copy of the mesh, where every
  array's sharding is part of its type, so each state leaf gets the sharding
  the optimizer itself gives it. For Flora states that is:

  * a compressed leaf's sketch keeps the mesh axes of the axes that are not
    compressed, its rank axis is replicated (e.g. a ``(n, m)`` kernel sharded
    ``P('data', 'model')`` and compressed along ``m`` has a ``(n, r)`` sketch
    sharded ``P('data', None)``);
  * dense moments are sharded like their params;
  * counters and keys are replicated;
  * other optax states (e.g. Adafactor's factored second moment) follow
    optax's own sharding rules.

  It works for any optax transformation whose ``init`` is traceable with
  sharded abstract inputs (as optax's own are).

  Args:
    tx: an ``optax.GradientTransformation`` (or anything with ``init``), or an
      init function ``params -> state``.
    params: the params, or their ``jax.ShapeDtypeStruct`` objects (values
      are never read).
    param_shardings: the params' shardings: a pytree matching ``params`` of
      ``NamedSharding`` (or ``PartitionSpec`` with ``mesh=``; ``None`` leaves
      mean replicated), or one sharding for all leaves. ``None`` (default)
      takes each leaf's own ``.sharding`` (sharded arrays, or
      ``ShapeDtypeStruct(..., sharding=...)``).
    mesh: the mesh for ``PartitionSpec``/``None`` entries of
      ``param_shardings``.

  Returns:
    A pytree with the structure of ``tx.init(params)`` whose leaves are
    ``NamedSharding`` on the params' mesh.

  Raises:
    ValueError: if the shardings do not match the params, or use more than
      one mesh.
    TypeError: for a sharding that is not a ``NamedSharding``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import flora_optax
    >>> # e.g. (4, 2) on 8 devices; here whatever devices there are.
    >>> mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'))
    >>> params = {'w': jax.ShapeDtypeStruct((256, 128), jnp.float32),
    ...           'b': jax.ShapeDtypeStruct((128,), jnp.float32)}
    >>> shardings = {'w': NamedSharding(mesh, P('data', 'model')),
    ...              'b': NamedSharding(mesh, P('model'))}
    >>> tx = flora_optax.flora(1e-3, rank=8)
    >>> state_sh = flora_optax.state_shardings(tx, params, shardings)
    >>> mu_sh = optax.tree.get(state_sh, 'mu')
    >>> mu_sh['w'].spec  # (256, 8): the sharding of axis 0 is kept
    P('data', None)
    >>> optax.tree.get(state_sh, 'key').spec
    P()
    >>> state = jax.jit(tx.init, in_shardings=(shardings,),
    ...                 out_shardings=state_sh)(params)
    >>> optax.tree.get(state, 'mu')['w'].sharding == mu_sh['w']
    True

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  init = _init_fn(tx)
  shardings = _param_shardings(params, param_shardings, mesh)
  leaves, treedef = jax.tree.flatten(params)
  meshes = {s.mesh for s in shardings}
  if mesh is not None:
    meshes.add(mesh)
  if not meshes:
    raise ValueError('`params` has no leaves; there is nothing to shard.')
  if len(meshes) > 1:
    raise ValueError('All `param_shardings` must use one mesh, got '
                     f'{len(meshes)} different meshes.')
  (user_mesh,) = meshes
  if not isinstance(user_mesh, Mesh):
    raise TypeError('`param_shardings` must be on a concrete '
                    f'jax.sharding.Mesh, got {type(user_mesh).__name__}.')
  explicit = _explicit(user_mesh)
  abstract = [
      jax.ShapeDtypeStruct(x.shape, x.dtype,
                           sharding=NamedSharding(explicit, s.spec))
      for x, s in zip(leaves, shardings)
  ]
  with jax.set_mesh(explicit):
    out = jax.eval_shape(init, jax.tree.unflatten(treedef, abstract))

  def back(x):
    s = getattr(x, 'sharding', None)
    spec = s.spec if isinstance(s, NamedSharding) else PartitionSpec()
    return NamedSharding(user_mesh, spec)

  return jax.tree.map(back, out)
