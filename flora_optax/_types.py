# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""The types of flora_optax's arguments, in one place for every module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Union, get_args

import jax
import numpy as np

Projection = Literal['gaussian', 'rademacher', 'orthogonal']
Side = Literal['smaller', 'larger']
Transfer = Literal['unbiased', 'projected', 'reset']
PROJECTIONS: tuple[str, ...] = get_args(Projection)
SIDES: tuple[str, ...] = get_args(Side)
TRANSFERS: tuple[str, ...] = get_args(Transfer)

# A leaf's path, as ``jax.tree_util.tree_flatten_with_path`` gives it.
KeyPath = tuple[Any, ...]

# An int seed, a typed key (``jax.random.key``) or raw ``uint32`` key data
# (``jax.random.PRNGKey``).
KeyLike = Union[int, np.integer, jax.Array, np.ndarray]

# A PRNG implementation: None (the default one), its name, or a typed key
# whose implementation is meant.
ImplLike = Union[None, str, jax.Array]

# The rank of each leaf, from its path and the leaf (an array or a
# ``jax.ShapeDtypeStruct``); None keeps the leaf dense.
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


# Per leaf, from its path and the leaf; None keeps the leaf dense.
DimensionNumbersFn = Callable[[KeyPath, Any], Union[DimensionNumbers, None]]

# A pytree with the structure of the params (or a prefix of it, e.g. one entry
# per Flax NNX Variable) whose leaves are DimensionNumbers or None.
DimensionNumbersTree = Union[DimensionNumbers, None,
                             Mapping[Any, 'DimensionNumbersTree'],
                             Sequence['DimensionNumbersTree']]

DimensionNumbersSpec = Union[None, DimensionNumbers, DimensionNumbersFn,
                             DimensionNumbersTree]


def is_dimension_numbers_leaf(x: Any) -> bool:
  """The leaves of a :data:`DimensionNumbersTree`."""
  return x is None or isinstance(x, DimensionNumbers)
