"""PRNG keys: how a user's key becomes the projections of every leaf and cycle.

Only raw ``uint32`` key data is ever stored in an optimizer state (typed keys
break ``np.asarray``, msgpack and ``optax.tree`` casts). A projection's key is

  ``fold_in(fold_in(fold_in(root, purpose), cycle), leaf_id)``

where ``purpose`` separates momentum from accumulation (one user key never
yields the same projection for both), ``cycle`` numbers resample cycles, and
``leaf_id`` is a stable hash of the leaf's key path, so adding a parameter
does not reshuffle the projections of the others.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Distinct constants folded into the root key per use of the projections.
MOMENTUM_PURPOSE = 0x6D6F6D  # 'mom'
ACCUMULATION_PURPOSE = 0x616363  # 'acc'

KeyLike = Any  # int | jax.Array (typed key or raw uint32 key data)


def _default_key_data_shape() -> tuple[int, ...]:
  return jax.random.key_data(jax.random.key(0)).shape


def check_key(key: KeyLike, name: str = 'key') -> None:
  """Raises a clear error at build time for a key that can not be used.

  Traced values (e.g. under ``optax.inject_hyperparams``) are accepted as they
  are; only their dtype is checked.
  """
  if isinstance(key, bool):
    raise TypeError(f'`{name}` must be an int seed or a JAX PRNG key, got a '
                    'bool.')
  if isinstance(key, (int, np.integer)):
    return
  if isinstance(key, (jax.Array, np.ndarray)):
    dtype = key.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return
    if jnp.issubdtype(dtype, jnp.integer):
      shape = tuple(key.shape)
      if shape == () or (dtype == jnp.uint32 and
                         shape == _default_key_data_shape()):
        return
      raise ValueError(
          f'`{name}` as an integer array must be a scalar seed or raw uint32 '
          f'key data of shape {_default_key_data_shape()}, got shape {shape} '
          f'and dtype {dtype}.')
  raise TypeError(
      f'`{name}` must be an int seed, a typed key (jax.random.key) or raw '
      f'uint32 key data (jax.random.PRNGKey), got {type(key).__name__}.')


def key_data(key: KeyLike) -> jax.Array:
  """Canonicalises ``key`` to the raw ``uint32`` key data kept in states."""
  if isinstance(key, (int, np.integer)):
    return jax.random.key_data(jax.random.key(int(key)))
  key = jnp.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.ndim == 0:  # an integer seed, possibly traced
    return jax.random.key_data(jax.random.key(key))
  return key.astype(jnp.uint32)


def wrap(data: jax.Array) -> jax.Array:
  """Raw key data back to a typed key (default implementation)."""
  return jax.random.wrap_key_data(data)


def leaf_id(path: Any) -> int:
  """A stable 31-bit id of a leaf's key path (the same in every process)."""
  return zlib.crc32(jax.tree_util.keystr(path).encode('utf-8')) & 0x7FFFFFFF


def leaf_key(step_key: jax.Array, path: Any) -> jax.Array:
  """The key of one leaf's projection from a (typed) per-cycle key."""
  return jax.random.fold_in(step_key, leaf_id(path))


_PURPOSES = {'momentum': MOMENTUM_PURPOSE, 'accumulation': ACCUMULATION_PURPOSE}


def cycle_key(key: KeyLike, cycle: jax.typing.ArrayLike,
              purpose: str = 'momentum') -> jax.Array:
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
    purpose: ``'momentum'`` or ``'accumulation'``.

  Returns:
    A typed PRNG key.

  Examples:
    >>> import jax, flora_optax
    >>> k = flora_optax.cycle_key(0, 3, purpose='accumulation')
    >>> jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    True
  """
  if purpose not in _PURPOSES:
    raise ValueError(f'`purpose` must be one of {list(_PURPOSES)}, got '
                     f'{purpose!r}.')
  root = wrap(key_data(key))
  return jax.random.fold_in(jax.random.fold_in(root, _PURPOSES[purpose]),
                            cycle)
