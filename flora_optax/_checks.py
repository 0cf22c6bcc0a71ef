# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Argument and tree validation: every rule once, with one message each.

Public constructors call the argument checks when they are built, so a bad
argument is a ``ValueError``/``TypeError`` that names it and says what is
accepted, never a shape error deep inside ``jit``. Tree checks run at trace
time (``init``/``update``) and name the offending leaf.

Values that may arrive traced (``optax.inject_hyperparams`` passes
hyperparameters as arrays) are checked for type and shape only; their range is
checked when they are concrete. What a user is promised for bad input: the
documentation's "Guarantees and limits" page (``docs/explain/guarantees.md``).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flora_optax import _quantization
from flora_optax._types import (DimensionNumbers, KeyPath,
                                is_dimension_numbers_leaf)

_INT32_MAX = 2**31 - 1


def leaf_name(path: KeyPath) -> str:
  """How error messages name a leaf, e.g. ``['layer']['w']``."""
  return jax.tree_util.keystr(path) or '<root>'


def is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def static_hint(*names: str) -> str:
  """Why an argument that sets state shapes can not be a (traced) array."""
  return ('It sets state shapes, so it must be static: under '
          f'optax.inject_hyperparams pass static_args={tuple(names)!r}.')


# --- scalars and choices -------------------------------------------------------


def check_bool(value: Any, name: str) -> None:
  if not isinstance(value, bool):
    raise TypeError(f'`{name}` must be a bool, got {value!r}.')


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f'`{name}` must be one of {list(choices)}, got {value!r}.')


def check_callable(value: Any, name: str, accepted: str) -> None:
  if not callable(value):
    raise TypeError(f'`{name}` must be {accepted}, got {value!r}.')


def check_rank(rank: Any) -> None:
  """An int ``rank`` must be positive and static; a callable is checked per
  leaf (:func:`check_leaf_rank`); ``None`` compresses no leaf."""
  if callable(rank) or rank is None:
    return
  if _is_array(rank):
    raise TypeError(
        '`rank` must be a Python int or a callable (path, leaf) -> int | None, '
        f'got an array ({rank!r}). ' + static_hint('rank'))
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError('`rank` must be a positive int, None (no projection) or '
                    f'a callable (path, leaf) -> int | None, got {rank!r}.')
  if rank <= 0:
    raise ValueError(f'`rank` must be a positive int, got {rank}.')


def check_leaf_rank(rank: Any, d: int, path: KeyPath) -> None:
  """What a ``rank`` callable returned for one leaf (not None)."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError(f'The `rank` callable returned {rank!r} for leaf '
                    f'{leaf_name(path)}; it must return an int or None.')
  if not 1 <= rank <= d:
    raise ValueError(
        f'The `rank` callable returned {rank} for leaf {leaf_name(path)} '
        f'whose compressed axis has size {d}; accepted: 1 <= rank <= {d}, '
        'or None to keep the leaf dense.')


def check_min_dim_size_to_factor(value: Any) -> int:
  """``min_dim_size_to_factor`` as the Python int optax's Adafactor needs."""
  if value is None:
    return 128  # optax.adafactor's default
  if _is_array(value):
    # optax.scale_by_factored_rms compares it with shapes in Python: a
    # concrete array (optax.inject_hyperparams at an eager init) is read back,
    # a traced one can not be.
    if not is_concrete(value):
      raise TypeError(
          '`min_dim_size_to_factor` can not be traced (it arrived as a traced '
          'array, e.g. from optax.inject_hyperparams under jit): leave it at '
          'its default (None), or list it. ' +
          static_hint('rank', 'min_dim_size_to_factor'))
    if np.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError('`min_dim_size_to_factor` must be an int, got '
                      f'{value!r}.')
    return int(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError('`min_dim_size_to_factor` must be an int or None, got '
                    f'{value!r}.')
  return int(value)


def _check_real(value: Any, name: str, what: str,
                ok: Callable[[float], bool]) -> None:
  """A real scalar ``what`` (e.g. ``'in [0, 1)'``); ``ok`` checks its range
  when it is concrete."""
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.number, jax.Array, np.ndarray)):
    raise TypeError(f'`{name}` must be a float {what}, got {value!r}.')
  if np.ndim(value) != 0:
    raise ValueError(f'`{name}` must be a scalar {what}, got shape '
                     f'{np.shape(value)}.')
  if is_concrete(value) and not ok(float(value)):
    raise ValueError(f'`{name}` must be {what}, got {float(value)}.')


def check_decay(decay: Any, name: str = 'decay') -> None:
  """A scalar in ``[0, 1)`` (its range checked when it is concrete)."""
  _check_real(decay, name, 'in [0, 1)', lambda x: 0.0 <= x < 1.0)


def check_nonnegative(value: Any, name: str) -> None:
  """A real scalar ``>= 0`` (its range checked when it is concrete)."""
  _check_real(value, name, '>= 0', lambda x: x >= 0.0)


def check_resample_every(value: Any, name: str = 'resample_every') -> None:
  """A positive int32 scalar, or None (never resample)."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer, jax.Array, np.ndarray)):
    raise TypeError(f'`{name}` must be a positive int or None (never '
                    f'resample), got {value!r}.')
  if np.ndim(value) != 0:
    raise ValueError(f'`{name}` must be a scalar, got shape '
                     f'{np.shape(value)}.')
  if _is_array(value) and is_concrete(value) and not jnp.issubdtype(
      value.dtype, jnp.integer) and float(value) != int(value):
    raise TypeError(f'`{name}` must be a positive int, got {value!r}.')
  if is_concrete(value) and not 0 < int(value) <= _INT32_MAX:
    # The step counter is int32 and saturates there.
    raise ValueError(f'`{name}` must be a positive int at most 2**31 - 1, or '
                     f'None (never resample), got {int(value)}.')


def check_every_k_schedule(value: Any) -> None:
  if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) or
                                     callable(value)):
    raise TypeError('`every_k_schedule` must be a positive int or a callable '
                    f'gradient_step -> int, got {value!r}.')
  if not callable(value) and value < 1:
    raise ValueError('`every_k_schedule` must be a positive int, got '
                     f'{value}.')


def check_float_dtype(value: Any, name: str) -> jnp.dtype:
  """Returns ``jnp.dtype(value)``, or raises naming ``name`` if not floating."""
  if _is_array(value):
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


def check_bits(bits: Any, name: str = 'bits') -> None:
  """``None`` (float states), 8 or 4, as a static Python int."""
  if bits is None:
    return
  if _is_array(bits):
    raise TypeError(f'`{name}` must be None, 8 or 4 as a Python int, got an '
                    f'array ({bits!r}). ' + static_hint('rank', name))
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f'`{name}` must be None, 8 or 4, got {bits!r}.')
  if int(bits) not in (8, 4):
    raise ValueError(f'`{name}` must be None, 8 or 4, got {int(bits)}.')


def check_quantization(bits: Any, block_size: Any, code_map: Any,
                       min_quantized_size: Any,
                       stochastic_rounding: Any) -> None:
  """The quantization keywords; each but ``bits`` only applies with it."""
  check_bits(bits)
  given = {'block_size': block_size, 'code_map': code_map,
           'min_quantized_size': min_quantized_size}
  for name, value in given.items():
    if value is not None and bits is None:
      raise ValueError(f'`{name}` only applies to quantized states: pass '
                       f'`bits` (8 or 4) too, got bits=None and {name}='
                       f'{value!r}.')
  for name in ('block_size', 'min_quantized_size'):
    value, low = given[name], 1 if name == 'block_size' else 0
    if value is None:
      continue
    if _is_array(value) or isinstance(value, bool) or not isinstance(
        value, (int, np.integer)):
      raise TypeError(f'`{name}` must be an int >= {low} or None, got '
                      f'{value!r}. ' + static_hint('rank', 'bits', name))
    if value < low:
      raise ValueError(f'`{name}` must be an int >= {low} or None, got '
                       f'{value}.')
  if code_map is not None:
    check_choice(code_map, 'code_map', _quantization.CODE_MAPS)
  if stochastic_rounding is not None:
    check_bool(stochastic_rounding, 'stochastic_rounding')


def check_nu_code_map(value: Any) -> None:
  """A second moment's map: one of the unsigned maps."""
  check_choice(value, 'nu_code_map', _quantization.UNSIGNED_CODE_MAPS)


def check_transformation(value: Any, name: str) -> None:
  """Anything with callable ``init`` and ``update``."""
  if not (callable(getattr(value, 'init', None)) and
          callable(getattr(value, 'update', None))):
    raise TypeError(f'`{name}` must be an optax.GradientTransformation (with '
                    f'init and update), got {type(value).__name__}.')


def check_skip_result(should_skip: jax.Array) -> None:
  """What ``should_skip_update_fn`` returned: a boolean scalar."""
  if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
    raise ValueError(
        'The `should_skip_update_fn` function should return a boolean scalar '
        f'array, but it returned an array of dtype {should_skip.dtype} and '
        f'shape {should_skip.shape}.')


def check_micro_batches(micro_batches: Any) -> int:
  """The number of micro-batches: the leaves' common leading axis."""
  sizes = {np.shape(x)[0] if np.ndim(x) else None
           for x in jax.tree.leaves(micro_batches)}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise ValueError(
        '`micro_batches` must be a non-empty pytree whose leaves share a '
        f'leading (micro-batch) axis of size >= 1; got leading sizes {sizes}.')
  (k,) = sizes
  return int(k)


# --- dimension numbers ---------------------------------------------------------


def check_dimension_numbers(dn: Any) -> None:
  """A DimensionNumbers, a callable, or a pytree of ``DimensionNumbers |
  None`` (matched against the params at init)."""
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
  for leaf in jax.tree.leaves(dn, is_leaf=is_dimension_numbers_leaf):
    if not is_dimension_numbers_leaf(leaf):
      raise TypeError(
          '`dimension_numbers` must be None, a DimensionNumbers, a callable '
          '(path, leaf) -> DimensionNumbers | None, or a pytree of those '
          f'matching the params; found a leaf {leaf!r}.')
    if leaf is not None:
      check_dimension_numbers(leaf)


def normalize_axes(field: int | Sequence[int], ndim: int,
                   path: KeyPath) -> tuple[int, ...]:
  """One field of a DimensionNumbers as non-negative axes of a leaf."""
  axes = (field,) if isinstance(field, (int, np.integer)) else tuple(field)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f'`dimension_numbers` axis {a} is out of range for leaf '
          f'{leaf_name(path)} with {ndim} axes.')
    out.append(int(a) % ndim)
  return tuple(out)


def check_matrix_axes(dn: DimensionNumbers, rows: Sequence[int],
                      cols: Sequence[int], shape: tuple[int, ...],
                      path: KeyPath) -> None:
  if set(rows) & set(cols) or len(set(rows)) != len(rows) or len(
      set(cols)) != len(cols):
    raise ValueError(
        f'`dimension_numbers` {dn} names an axis twice for leaf '
        f'{leaf_name(path)} of shape {shape}.')


# --- trees ---------------------------------------------------------------------


def check_float_leaf(path: KeyPath, leaf: Any) -> None:
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
        f'Leaf {leaf_name(path)} has {kind}; flora_optax handles real '
        'floating-point leaves only (float16, bfloat16, float32, float64). '
        'Keep other leaves out of the optimizer with optax.masked or '
        'optax.partition.')


def check_float_leaves(tree: Any) -> None:
  """:func:`check_float_leaf` on every leaf of ``tree``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    check_float_leaf(path, leaf)


def _show(names) -> str:
  return ', '.join(sorted(names)[:5]) or 'none'


def check_same_tree(tree: Any, init_tree: Any, what: str) -> None:
  """Raises a ValueError naming the leaves when two trees' structures differ.

  Runs at trace time: ``jax.tree.map`` would otherwise fail with a generic
  message, or not at all when a container type alone differs.
  """
  if jax.tree.structure(tree) == jax.tree.structure(init_tree):
    return

  def paths(t):
    return {leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}

  got, want = paths(tree), paths(init_tree)
  detail = (f'leaves missing: {_show(want - got)}; unexpected leaves: '
            f'{_show(got - want)}')
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

  def under(p, q):
    return p[:len(q)] == q

  missing = {leaf_name(p) for p in got if not any(under(p, q) for q in want)}
  unused = {leaf_name(q) for q in want if not any(under(p, q) for p in got)}
  detail = (f'params leaves it lacks: {_show(missing)}; its entries for no '
            f'params leaf: {_show(unused)}')
  if not missing and not unused:
    detail = (f'same paths but different containers: {treedef} vs '
              f'{jax.tree.structure(tree)}')
  raise ValueError(f'{what} as a pytree must match the structure of the '
                   f'params ({detail}).')


def check_like_params(updates: Any, params: Any) -> None:
  """Raises a ValueError naming the leaf where updates and params differ.

  Args:
    updates: the updates, or their plan tree (leaves with a ``shape``).
    params: the params passed to ``update``.
  """
  check_same_tree(updates, params, 'updates')

  def f(path, u, x):
    shape = getattr(u, 'shape', None)
    shape = tuple(np.shape(u)) if shape is None else tuple(shape)
    if shape != tuple(np.shape(x)):
      raise ValueError(
          f'Leaf {leaf_name(path)}: the update has shape {shape} but '
          f'the param has shape {tuple(np.shape(x))}.')

  jax.tree_util.tree_map_with_path(f, updates, params)


def check_sketches(plans: Any,
                   sketches: Any,
                   what: str = 'state',
                   params: Any = None,
                   stored_shape: Callable[[Any], Any] | None = None,
                   is_stored: Callable[[Any], bool] | None = None) -> None:
  """Checks at trace time that stored sketches fit the plans of an update.

  An update whose leaf shapes differ from the params given to ``init`` would
  otherwise broadcast silently or fail deep inside an einsum. A change of the
  compressed axis alone keeps the sketch's shape; ``params``, when given with
  the updates' structure, reveal it.

  Args:
    plans: the ``LeafPlan`` tree of the incoming updates.
    sketches: the tree held in the state (built at ``init``).
    what: the name of that tree in the error message.
    params: the ``params`` passed to ``update`` (or None).
    stored_shape: ``plan -> shape`` of what the state stores for a leaf: the
      sketch's shape (the default), or for a quantized state a tuple of the
      shapes of its arrays.
    is_stored: tells a quantized state (codes and scales), which stands for
      one leaf.
  """
  if stored_shape is None:
    stored_shape = lambda plan: plan.sketch_shape  # noqa: E731
  if is_stored is None:
    is_stored = lambda x: False  # noqa: E731
  check_same_tree(plans, jax.tree.map(lambda s: 0, sketches,
                                      is_leaf=is_stored), 'updates')

  def shape_of(s):
    if is_stored(s):
      return (tuple(s.codes.shape), tuple(s.scales.shape))
    return tuple(s.shape)

  def f(path, plan, s):
    want, got = stored_shape(plan), shape_of(s)
    if got != want:
      raise ValueError(
          f'Leaf {leaf_name(path)}: an update of shape {plan.shape} needs a '
          f'{what} of shape {want}, but the {what} holds {got}. Updates must '
          'have the shapes of the params given to init.')

  jax.tree_util.tree_map_with_path(f, plans, sketches, is_leaf=is_stored)
  if params is not None and (jax.tree.structure(params) ==
                             jax.tree.structure(plans)):
    check_like_params(plans, params)


# --- warnings ------------------------------------------------------------------

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
