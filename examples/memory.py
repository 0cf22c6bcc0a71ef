"""Byte counts and compiled peak memory, for examples/ and benchmarks/ alike.

Everything is read from shapes and from XLA's ``memory_analysis()`` of a
compiled function; nothing is measured from the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def tree_bytes(tree: Any) -> int:
  """Bytes of all array leaves (typed keys count their key data).

  Leaves may be arrays or ``jax.ShapeDtypeStruct``s; other leaves count 0.
  """
  total = 0
  for x in jax.tree.leaves(tree):
    if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype,
                                                      jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def state_bytes(tx, params_shapes: Any) -> int:
  """Optimizer-state bytes, from shapes only (nothing is allocated)."""
  return tree_bytes(jax.eval_shape(tx.init, params_shapes))


def memory_figures(compiled) -> dict[str, int]:
  """Argument, output, temp and alias bytes of a compiled function, and
  ``peak_bytes``: arguments + outputs + temporaries - aliased."""
  m = compiled.memory_analysis()
  out = {
      'argument_bytes': int(m.argument_size_in_bytes),
      'output_bytes': int(m.output_size_in_bytes),
      'temp_bytes': int(m.temp_size_in_bytes),
      'alias_bytes': int(m.alias_size_in_bytes),
  }
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] +
                       out['temp_bytes'] - out['alias_bytes'])
  return out


def peak_bytes(compiled) -> int:
  """``memory_figures(compiled)['peak_bytes']``, or -1 where the backend
  reports no memory analysis."""
  if compiled.memory_analysis() is None:
    return -1
  return memory_figures(compiled)['peak_bytes']


def compiled_memory(fn: Callable, *args, **jit_kwargs) -> dict[str, int]:
  """:func:`memory_figures` of ``jax.jit(fn, **jit_kwargs)`` compiled for
  ``args`` (arrays or shapes: nothing is run)."""
  return memory_figures(jax.jit(fn, **jit_kwargs).lower(*args).compile())


def mib(n: float) -> float:
  return n / 2**20
