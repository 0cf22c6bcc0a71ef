# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""The per-leaf engine: every transformation's loop, and any leaf-separable
optax transformation run one parameter leaf at a time on it.

:func:`map_leaves` is the loop that :func:`compressed_momentum`,
:func:`scale_by_adam`, :class:`MultiSteps`, :func:`accumulate_gradients` and
:func:`quantized` all run: per leaf a step loads its stored state through one
:class:`LeafOrder` (a stored state decodes by its own format), runs that
transformation's float math and stores the result, and the next leaf's loads
come after it. The transformations hold only their float math.

:func:`flora_optax.quantized` stores some state leaves of an arbitrary inner
transformation in codes. To keep one leaf's float copy alive at a time it
loads leaf ``k``'s state, runs the inner's update on leaf ``k`` alone, stores
the result, and orders leaf ``k + 1``'s loading after it. "Leaf ``k`` alone"
is optax's own convention for absent leaves: the updates, params and the
inner's state with ``None`` in place of every other parameter leaf.

Which state leaves belong to which parameter is read off the inner's own
``init``, not guessed from the state's shapes or field names: a state leaf
belongs to parameter ``k`` if ``init`` of the params with only leaf ``k``
present makes it and ``init`` with no leaf present does not (the latter are
shared: a step count, injected hyperparameters). Whether the update is
separable at all is read off its jaxpr (:mod:`flora_optax._separable`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flora_optax import _checks
from flora_optax import _nnx
from flora_optax import _quantization
from flora_optax import _separable
from flora_optax._quantization import Quantizer, is_quantized
from flora_optax._types import KeyPath


def _is_param_leaf(x: Any) -> bool:
  """Parameter leaves: arrays, or Flax NNX Variables as a whole."""
  variable = _nnx._variable_type()  # pylint: disable=protected-access
  return variable is not None and isinstance(x, variable)


def _shape_of(x: Any) -> Any:
  """A leaf (array or NNX Variable) as its shape and dtype, sharding kept."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a),
                                     sharding=getattr(a, 'sharding', None)
                                     if isinstance(a, jax.Array) and
                                     not isinstance(a, jax.core.Tracer)
                                     else None), x)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which state leaves belong to which parameter leaf (static).

  Attributes:
    treedef: the params' structure (NNX Variables as leaves).
    param_paths: per parameter leaf its key path.
    param_shapes: per parameter leaf its array's shape.
    state_treedef: the structure of the inner's state (array leaves).
    state_paths: per state leaf its key path.
    owner: per state leaf the index of its parameter leaf, or -1 if shared.
    calls: per parameter leaf, the structure of its one-leaf state and the
      indices of the state leaves it holds (its own and the shared ones).
  """

  treedef: Any
  param_paths: tuple[KeyPath, ...]
  param_shapes: tuple[tuple[int, ...], ...]
  state_treedef: Any
  state_paths: tuple[KeyPath, ...]
  owner: tuple[int, ...]
  calls: tuple[tuple[Any, tuple[int, ...]], ...]

  def restrict(self, tree: Any, k: int) -> Any:
    """``tree`` (params-shaped) with ``None`` in place of all leaves but
    ``k``; ``None`` stays ``None``."""
    if tree is None:
      return None
    leaves = self.treedef.flatten_up_to(tree)
    return self.treedef.unflatten(
        [x if i == k else None for i, x in enumerate(leaves)])


def layout_of(init: Callable[[Any], Any], params: Any) -> Layout:
  """The :class:`Layout` of ``init``'s state for ``params`` (traced only)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_param_leaf)
  like = treedef.unflatten([_shape_of(x) for _, x in flat])
  n = len(flat)

  def restrict(k):
    return treedef.unflatten([x if i == k else None for i, x in
                              enumerate(treedef.flatten_up_to(like))])

  full, state_treedef = jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(init, like))
  index = {path: i for i, (path, _) in enumerate(full)}
  shared = {path for path, _ in jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(init, restrict(-1)))[0]}
  owner = [-1] * len(full)
  calls = []
  for k in range(n):
    leaves, treedef_k = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(init, restrict(k)))
    indices = []
    for path, _ in leaves:
      if path not in index:
        raise ValueError(
            'quantized: the inner transformation\'s state for parameter '
            f'{_checks.leaf_name(flat[k][0])} alone has a leaf '
            f'{_checks.leaf_name(path)} that its state for all parameters '
            'lacks: its state is not separable over parameter leaves.')
      i = index[path]
      if path not in shared:
        if owner[i] not in (-1, k):
          raise ValueError(
              f'quantized: the inner transformation\'s state leaf '
              f'{_checks.leaf_name(path)} belongs to parameters '
              f'{_checks.leaf_name(flat[owner[i]][0])} and '
              f'{_checks.leaf_name(flat[k][0])}: it couples leaves, which '
              'quantized does not support (its state must be separable over '
              'parameter leaves).')
        owner[i] = k
      indices.append(i)
    calls.append((treedef_k, tuple(indices)))
  for i, (path, _) in enumerate(full):
    if owner[i] == -1 and path not in shared:
      raise ValueError(
          f'quantized: the inner transformation\'s state leaf '
          f'{_checks.leaf_name(path)} is made by no single parameter: its '
          'state is not separable over parameter leaves.')
  return Layout(treedef, tuple(p for p, _ in flat),
                tuple(tuple(jnp.shape(x)) for _, x in flat), state_treedef,
                tuple(p for p, _ in full), tuple(owner), tuple(calls))


def check_separable(update: Callable[..., Any], layout: Layout,
                    updates: Any, state: Any, params: Any,
                    extra_args: dict[str, Any]) -> None:
  """Raises a ``ValueError`` if ``update``'s outputs for one parameter leaf
  depend on another leaf's gradient, parameter or state (e.g.
  ``optax.clip_by_global_norm``), or a shared state leaf on any leaf's."""
  n = len(layout.param_paths)
  bit = lambda k: 0 if k < 0 else 1 << k  # noqa: E731
  g = [bit(k) for k in range(n)]
  s = [bit(k) for k in layout.owner]
  p = g if params is not None else []
  args = (updates, layout.state_treedef.unflatten(
      jax.tree.leaves(state)), params)
  # Extra args (e.g. ``value``) are shared: label 0.
  extra = [0] * len(jax.tree.leaves(extra_args))
  outs = _separable.output_labels(
      lambda u, st, pa, ex: update(u, st, pa, **ex), (*args, extra_args),
      g + s + p + extra)
  out_updates, out_state = outs[:n], outs[n:]

  def check(mask, k, what, advice):
    coupled = [layout.param_paths[j] for j in range(n)
               if mask >> j & 1 and j != k]
    if coupled:
      raise ValueError(
          'quantized: the inner transformation couples parameter leaves: '
          f'its {what} depends on '
          + ', '.join(_checks.leaf_name(q) for q in coupled[:3]) + advice)

  for k, mask in enumerate(out_updates):
    check(mask, k, f'update of {_checks.leaf_name(layout.param_paths[k])}',
          ' (e.g. a global norm, as in optax.clip_by_global_norm). Put such '
          'transformations outside quantized, e.g. optax.chain('
          'optax.clip_by_global_norm(1.0), quantized(optax.adam(1e-3))).')
  for i, (mask, k) in enumerate(zip(out_state, layout.owner)):
    check(mask, k, f'state leaf {_checks.leaf_name(layout.state_paths[i])}',
          '. quantized runs only transformations whose update is separable '
          'over parameter leaves.')


def load(stored: Any, dtype: Any = None) -> Any:
  """A stored state leaf as a float: codes decoded by their own format, a
  float leaf cast; in ``dtype``, by default its own promoted to float32 (the
  compute dtype). Non-float leaves (counts, keys) come back as they are."""
  if is_quantized(stored):
    if dtype is None:
      dtype = jnp.promote_types(stored.dtype, jnp.float32)
    return _quantization.decode(stored, dtype)
  if not _is_float(stored):
    return stored
  return stored.astype(jnp.promote_types(stored.dtype, jnp.float32)
                       if dtype is None else dtype)


class LeafOrder:
  """The loads and stores of one update, one leaf after the other.

  Decoding a stored state makes a float copy of it. A load made through this
  object is ordered after the last quantized state stored through it
  (``_quantization.after``), so that one float copy is alive at a time
  instead of every leaf's (XLA:CPU's scheduler otherwise keeps them all).
  """

  def __init__(self):
    self._prev = None

  def load(self, stored: Any, dtype: Any = None) -> Any:
    """:func:`load` of ``stored``, after the last quantized leaf stored."""
    if self._prev is not None and is_quantized(stored):
      stored = _quantization.after(self._prev, stored)
    return load(stored, dtype)

  def store(self, stored: Any) -> Any:
    """Records a leaf as stored (the next loads come after it); returns
    it."""
    if is_quantized(stored):
      self._prev = stored
    return stored


def map_leaves(step: Callable[..., tuple[Any, ...]],
               *columns: Sequence[Any], outputs: int) -> tuple[list[Any], ...]:
  """The per-leaf loop of every transformation of flora_optax.

  Calls ``step(order, k, *(column[k] for column in columns))`` for each leaf
  ``k`` in turn, with one :class:`LeafOrder` for the whole update: ``step``
  loads its stored states through it, runs its float math for leaf ``k``
  and stores the results through it, and the next leaf's loads come after.

  Args:
    step: ``(order, k, *args) -> tuple`` of ``outputs`` values.
    *columns: per-leaf arguments, one sequence per argument (equal lengths).
    outputs: how many values ``step`` returns.

  Returns:
    ``outputs`` lists: the values ``step`` returned, per leaf.
  """
  order = LeafOrder()
  results = [step(order, k, *args)
             for k, args in enumerate(zip(*columns, strict=True))]
  if not results:
    return tuple([] for _ in range(outputs))
  return tuple(list(r) for r in zip(*results, strict=True))


def run(update: Callable[..., Any], layout: Layout, updates: Any,
        stored: Sequence[Any], params: Any, extra_args: dict[str, Any],
        store: Callable[[int, Any], Any]) -> tuple[Any, list[Any]]:
  """The inner ``update`` applied one parameter leaf at a time
  (:func:`map_leaves`), each state leaf it owns loaded in its own dtype, at
  least float32 (:func:`load`).

  Args:
    update: the inner transformation's update function.
    layout: the state's :class:`Layout`.
    updates: the gradients (params-shaped).
    stored: the stored state's leaves, in the order of
      ``layout.state_treedef``.
    params: the params or None.
    extra_args: passed to every call of ``update``.
    store: ``(i, float_leaf) -> stored leaf``.

  Returns:
    The new updates and the new stored state's leaves.
  """
  if not layout.calls:  # no parameter leaves: one call does it all
    out, new_state = update(updates, layout.state_treedef.unflatten(stored),
                            params, **extra_args)
    return out, layout.state_treedef.flatten_up_to(new_state)

  def step(order, k, call):
    treedef_k, indices = call
    state_k = treedef_k.unflatten(
        [order.load(stored[i]) if layout.owner[i] == k else stored[i]
         for i in indices])
    upd_k, new_k = update(layout.restrict(updates, k), state_k,
                          layout.restrict(params, k), **extra_args)
    new_k = {i: order.store(store(i, value)) if layout.owner[i] == k
             else value
             for i, value in zip(indices, treedef_k.flatten_up_to(new_k))}
    return layout.treedef.flatten_up_to(upd_k)[k], new_k

  outs, news = map_leaves(step, layout.calls, outputs=2)
  new: dict[int, Any] = {}
  for new_k in news:  # a shared leaf is the same in every call: the first's
    for i, value in new_k.items():
      new.setdefault(i, value)
  return layout.treedef.unflatten(outs), [new[i] for i in range(len(stored))]


def _is_float(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


# (state leaf path, state leaf, its parameter's shape) -> how it is stored.
QuantizerOf = Callable[[KeyPath, Any, tuple[int, ...]], Quantizer | None]


class Engine:
  """An inner transformation run one leaf at a time, some state leaves
  stored in codes between steps (what ``quantized`` is built on).

  Args:
    inner: the float transformation.
    quantizer_of: per state leaf owned by a parameter, its quantizer, or
      None to keep it as it is; shared leaves are never quantized.
  """

  def __init__(self, inner: Any, quantizer_of: QuantizerOf):
    self.inner = inner
    self.quantizer_of = quantizer_of
    self._layouts: dict[Any, Layout] = {}
    self._out_dtypes: dict[Any, list[Any]] = {}

  def layout(self, params: Any) -> Layout:
    """The layout of ``params``'s state, computed once per structure."""
    # The structure down to arrays: NNX Variables (at init) and pure arrays
    # (in nnx.Optimizer's update) make different states.
    leaves, treedef = jax.tree.flatten(params)
    key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in self._layouts:
      self._layouts[key] = layout_of(self.inner.init, params)
    return self._layouts[key]

  def _check(self, layout, updates, stored, params, extra_args) -> list[Any]:
    """Checks (once per structure) that the inner is separable; returns the
    dtypes of its updates, per parameter leaf."""
    key = (id(layout), params is None, jax.tree.structure(extra_args))
    if key not in self._out_dtypes:
      floats = layout.state_treedef.unflatten([
          jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x
          for x in stored])
      check_separable(self.inner.update, layout, updates, floats, params,
                      extra_args)
      out, _ = jax.eval_shape(
          lambda u, s, p, e: self.inner.update(u, s, p, **e), updates,
          floats, params, extra_args)
      self._out_dtypes[key] = [
          getattr(x, 'dtype', None) for x in layout.treedef.flatten_up_to(out)]
    return self._out_dtypes[key]

  def _quantizer(self, layout: Layout, i: int, leaf: Any) -> Any:
    k = layout.owner[i]
    if k < 0 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return None
    return self.quantizer_of(layout.state_paths[i], leaf,
                             layout.param_shapes[k])

  def init(self, params: Any) -> Any:
    """The inner's state, its chosen leaves encoded."""
    layout = self.layout(params)
    leaves = layout.state_treedef.flatten_up_to(self.inner.init(params))
    try:
      self._check(layout, params, leaves, params, {})
    except TypeError:
      pass  # it needs extra arguments: checked at the first update instead
    stored = []
    for i, x in enumerate(leaves):
      q = self._quantizer(layout, i, x)
      if q is not None:
        # A barrier: under jit the inner's zeros are a constant, and XLA:CPU
        # spent seconds a leaf constant-folding their encoding.
        x = q.encode(jax.lax.optimization_barrier(x),
                     dtype=jnp.result_type(x))
      stored.append(x)
    return _nnx.quantized_outside(layout.state_treedef.unflatten(stored))

  def update(self, updates: Any, state: Any, params: Any,
             extra_args: dict[str, Any]) -> tuple[Any, Any]:
    """The inner's update, one leaf at a time."""
    layout = self.layout(updates)
    stored, treedef = jax.tree.flatten(state, is_leaf=is_quantized)
    if treedef != layout.state_treedef:
      raise ValueError(
          'the optimizer state does not fit the updates: its structure is '
          f'{treedef}, while init of params shaped like the updates makes '
          f'{layout.state_treedef}. Pass the state that init of the same '
          'params returned (updates must have the params\' shapes).')
    out_dtypes = self._check(layout, updates, stored, params, extra_args)

    # The inner's math runs in float32 at least: a parameter's state is
    # loaded in it (and stored back in its own dtype), and the gradients are;
    # the update is cast to the dtype the inner itself returns.
    def store(i, value):
      old = stored[i]
      if not is_quantized(old):
        return value.astype(old.dtype) if _is_float(old) else value
      q = self._quantizer(layout, i, value)
      return q.encode(value, dtype=old.format.dtype)

    # Gradients too: float16 squares underflow (Adam's second moment).
    updates32 = jax.tree.map(
        lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32))
        if _is_float(g) else g, updates)
    new_updates, new = run(self.inner.update, layout, updates32, stored,
                           params, extra_args, store)
    new_updates = layout.treedef.unflatten([
        u if dt is None or u is None else u.astype(dt) for u, dt in zip(
            layout.treedef.flatten_up_to(new_updates), out_dtypes)])
    return new_updates, layout.state_treedef.unflatten(new)
