# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""PRNG keys: how a user's key becomes the projections of every leaf and cycle.

Only raw ``uint32`` key data is ever stored in an optimizer state (typed keys
break ``np.asarray``, msgpack and ``optax.tree`` casts). A projection's key is

  ``fold_in(fold_in(fold_in(root, purpose), cycle), leaf_id)``

where ``purpose`` separates momentum from accumulation (and from the noise of
stochastic rounding), ``cycle`` numbers resample cycles, and ``leaf_id`` is a
CRC32 of the leaf's key path reduced to its keys, names and indices (a final
NNX ``.value`` dropped), not of its containers (:func:`leaf_id`). The PRNG
implementation is static: a typed key's own, or ``jax_default_prng_impl``
when the optimizer is built (:func:`key_impl`); stored key data is rewrapped
with it (``impl=`` of :func:`cycle_key`).

Why, and what it guarantees (the same projections in any container holding
the same parameter names, after a restore, on any mesh): the documentation's
"Keys and determinism" page (``docs/explain/keys.md``).
"""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flora_optax import _checks
from flora_optax._types import ImplLike, KeyLike

# Distinct constants folded into the root key per use of the projections.
MOMENTUM_PURPOSE = 0x6D6F6D  # 'mom'
ACCUMULATION_PURPOSE = 0x616363  # 'acc'
# The noise of stochastic rounding of quantized states (never a projection).
MOMENTUM_ROUNDING_PURPOSE = 0x6D726E  # 'mrn'
ACCUMULATION_ROUNDING_PURPOSE = 0x61726E  # 'arn'
ADAM_MU_ROUNDING_PURPOSE = 0x616D72  # 'amr'
ADAM_NU_ROUNDING_PURPOSE = 0x616E72  # 'anr'

def _is_typed(key: Any) -> bool:
  return isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key)


def as_typed(key: Any) -> jax.Array:
  """A typed key as it is, other keys wrapped (default implementation)."""
  return key if _is_typed(key) else wrap(key_data(key))


def impl_name(impl: ImplLike = None) -> str:
  """The name of a PRNG implementation.

  Args:
    impl: ``None`` (the current ``jax_default_prng_impl``), a name such as
      ``'rbg'``, or a typed key (its implementation).

  Returns:
    The implementation's name, e.g. ``'threefry2x32'``.
  """
  if impl is None:
    return str(jax.config.jax_default_prng_impl)
  if _is_typed(impl):
    return str(jax.random.key_impl(impl))
  return str(impl)


@functools.lru_cache(maxsize=None)
def key_data_shape(impl: str) -> tuple[int, ...]:
  """The shape of the raw key data of PRNG implementation ``impl``."""
  # eval_shape: no device work, and usable while tracing.
  return tuple(jax.eval_shape(
      lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape)


def check_key(key: KeyLike, name: str = 'key') -> str:
  """Raises a clear error at build time for a key that can not be used.

  Traced values (e.g. under ``optax.inject_hyperparams``) are accepted as they
  are; only their dtype is checked.

  Returns:
    The name of the PRNG implementation the key is used with: a typed key's
    own, otherwise the current default.
  """
  if isinstance(key, bool):
    raise TypeError(f'`{name}` must be an int seed or a JAX PRNG key, got a '
                    'bool.')
  if isinstance(key, (int, np.integer)):
    return impl_name()
  if isinstance(key, (jax.Array, np.ndarray)):
    dtype = key.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(f'`{name}` must be a single typed key, got a key '
                         f'array of shape {tuple(key.shape)}.')
      return impl_name(key)
    if jnp.issubdtype(dtype, jnp.integer):
      shape = tuple(key.shape)
      default_shape = key_data_shape(impl_name())
      if shape == () or (dtype == jnp.uint32 and shape == default_shape):
        return impl_name()
      raise ValueError(
          f'`{name}` as an integer array must be a scalar seed or raw uint32 '
          f'key data of shape {default_shape} (the default PRNG '
          f'implementation, {impl_name()}), got shape {shape} and dtype '
          f'{dtype}. For another implementation pass a typed key, e.g. '
          "jax.random.wrap_key_data(data, impl='rbg').")
  raise TypeError(
      f'`{name}` must be an int seed, a typed key (jax.random.key) or raw '
      f'uint32 key data (jax.random.PRNGKey), got {type(key).__name__}.')


def check_key_data(data: Any, impl: str) -> None:
  """Stored raw key data must fit the implementation it is rewrapped with."""
  want = key_data_shape(impl)
  if tuple(np.shape(data)) != want:
    raise ValueError(
        f'Raw key data of shape {tuple(np.shape(data))} does not fit the PRNG '
        f'implementation {impl!r} (key data of shape {want}). Was the state '
        'made with another implementation? Build the optimizer with a typed '
        "key of that implementation, e.g. jax.random.key(seed, impl='rbg').")


def typed_key(key: KeyLike, name: str = 'key') -> jax.Array:
  """Checks ``key`` and returns it as a typed key; call it at construction.

  An int seed or raw key data gets the default implementation of the moment,
  so it is fixed when the optimizer is built. Pass the result as ``impl=`` to
  :func:`cycle_key` with the raw key data stored in the state.
  """
  impl = check_key(key, name)
  if _is_typed(key):
    return key
  # A concrete key even if the optimizer is built inside a trace (it may be
  # used outside it); a traced seed stays traced.
  with jax.ensure_compile_time_eval():
    return wrap(key_data(key, impl), impl)


def key_impl(key: KeyLike, name: str = 'key') -> str:
  """Checks ``key`` as :func:`typed_key` does and returns the name of its
  PRNG implementation, fixed at construction: an optimizer keeps the user's
  key (its state's key data is made from it in ``init``) and this name (for
  ``impl=`` of :func:`key_data` and :func:`cycle_key`)."""
  return impl_name(typed_key(key, name))


def key_data(key: KeyLike, impl: ImplLike = None) -> jax.Array:
  """Canonicalises ``key`` to the raw ``uint32`` key data kept in states.

  Args:
    key: an int seed, a typed key or raw key data.
    impl: the implementation an int seed is expanded with (default: the
      current default implementation); a typed key keeps its own.
  """
  if isinstance(key, (int, np.integer)):
    return jax.random.key_data(jax.random.key(int(key), impl=impl_name(impl)))
  key = jnp.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.ndim == 0:  # an integer seed, possibly traced
    return jax.random.key_data(jax.random.key(key, impl=impl_name(impl)))
  return key.astype(jnp.uint32)


def wrap(data: jax.Array, impl: ImplLike = None) -> jax.Array:
  """Raw key data back to a typed key of implementation ``impl``."""
  name = impl_name(impl)
  check_key_data(data, name)
  return jax.random.wrap_key_data(data, impl=name)


def _path_entry(entry: Any) -> int | str:
  if isinstance(entry, jax.tree_util.DictKey):
    k = entry.key
  elif isinstance(entry, jax.tree_util.GetAttrKey):
    k = entry.name
  elif isinstance(entry, jax.tree_util.SequenceKey):
    k = entry.idx
  elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
    k = entry.key
  else:
    k = entry
  if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
    return int(k)
  return k if isinstance(k, str) else repr(k)


def leaf_id(path: Any) -> int:
  """A stable 31-bit id of a leaf's key path (the same in every process).

  Each entry of the path is reduced to its key, name or index
  (``DictKey.key``, ``GetAttrKey.name``, ``SequenceKey.idx``,
  ``FlattenedIndexKey.key``; keys of other types by ``repr``), a final
  ``.value`` (a Flax NNX ``Variable``'s array) is dropped, and the CRC32 of
  the entries as JSON is taken: it depends only on the path's keys, names
  and indices (and on whether each is an int or a string), not on the
  containers that hold the leaf.
  """
  entries = [_path_entry(e) for e in path]
  if entries and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      entries[-1] == 'value'):
    entries.pop()  # a Flax NNX Variable's array
  text = json.dumps(entries, separators=(',', ':'), ensure_ascii=False)
  return zlib.crc32(text.encode('utf-8')) & 0x7FFFFFFF


def leaf_key(step_key: jax.Array, path: Any) -> jax.Array:
  """The key of one leaf's projection from a (typed) per-cycle key."""
  return jax.random.fold_in(step_key, leaf_id(path))


_PURPOSES = {'momentum': MOMENTUM_PURPOSE, 'accumulation': ACCUMULATION_PURPOSE,
             'momentum_rounding': MOMENTUM_ROUNDING_PURPOSE,
             'accumulation_rounding': ACCUMULATION_ROUNDING_PURPOSE,
             'adam_mu_rounding': ADAM_MU_ROUNDING_PURPOSE,
             'adam_nu_rounding': ADAM_NU_ROUNDING_PURPOSE}


def cycle_key(key: KeyLike, cycle: jax.typing.ArrayLike,
              purpose: str = 'momentum', *, impl: ImplLike = None) -> jax.Array:
  """The key that the optimizers pass to :class:`Projector` in one cycle.

  With it, custom code reproduces the optimizers' projections exactly, e.g.
  ``Projector(...).projections(params, cycle_key(key, 0))`` is the frozen
  ``A`` of the LoRA that ``compressed_momentum(resample_every=None)``
  equals.

  Args:
    key: the ``key`` given to the optimizer (int seed, typed key or raw
      ``uint32`` key data).
    cycle: the resample cycle of :func:`compressed_momentum` (``(t - 1) //
      resample_every``) or the ``gradient_step`` of :class:`MultiSteps`.
    purpose: ``'momentum'`` or ``'accumulation'`` (projections), or
      ``'momentum_rounding'`` / ``'accumulation_rounding'`` (the noise of
      stochastic rounding of quantized states: in step ``t`` of the
      momentum, or micro-step ``i`` of accumulation cycle ``j`` with
      ``cycle = j`` and ``fold_in(·, i)``; per leaf ``fold_in(·, leaf_id)``),
      ``'adam_mu_rounding'`` / ``'adam_nu_rounding'`` (the same for the
      moments of :func:`scale_by_adam`, with ``cycle`` its step ``t``).
    impl: the PRNG implementation of an int seed or raw key data (e.g. the
      ``key`` field of a state): a name such as ``'rbg'``, or a typed key
      whose implementation to use, such as the typed key the optimizer was
      built with. ``None``: a typed ``key``'s own, otherwise the default
      implementation.

  Returns:
    A typed PRNG key.

  Raises:
    ValueError: for an unknown ``purpose``, or raw key data of the wrong
      shape for ``impl``.
    TypeError: for a ``key`` that is neither an int seed, a PRNG key nor raw
      ``uint32`` key data.

  Examples:
    >>> import jax, flora_optax
    >>> k = flora_optax.cycle_key(0, 3, purpose='accumulation')
    >>> jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    True
  """
  _checks.check_choice(purpose, 'purpose', list(_PURPOSES))
  if _is_typed(key):
    root = key
  else:
    root = wrap(key_data(key, impl), impl)
  return jax.random.fold_in(jax.random.fold_in(root, _PURPOSES[purpose]),
                            cycle)
