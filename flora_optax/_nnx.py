"""Flax NNX: the metadata of optimizer-state leaves built from ``Variable``s.

``nnx.Optimizer`` initialises the state from ``nnx.Variable`` params, so a
``jax.tree.map`` over them wraps each state leaf in the param's Variable type
with the param's metadata, sharding names included, which NNX then applies
eagerly (``nnx.Optimizer`` re-creates every Variable). Names for an ``(n, m)``
param on an ``(r, m)`` sketch mis-shard it, and on a leaf with fewer axes
they fail. This module fixes that; it never imports Flax.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from flora_optax import _sharding

# Metadata keys under which NNX keeps a Variable's per-axis sharding names.
_SHARDING_KEYS = ('out_sharding', 'sharding_names', 'optimizer_sharding')


def _variable_type() -> type | None:
  # Looked up only if Flax NNX is already imported: no dependency on Flax.
  nnx = sys.modules.get('flax.nnx')
  return getattr(nnx, 'Variable', None) if nnx is not None else None


def fit_metadata(params: Any, tree: Any, plans: Any = None) -> Any:
  """Fixes NNX metadata on state leaves whose shape differs from the param's.

  Sketches (leaves matching ``plans``, a ``LeafPlan`` tree) get the param's
  sharding names with the rank axis replicated, as
  :func:`flora_optax._sharding.sketch_spec`; other leaves of another shape
  (factored rows, ``(1,)`` placeholders) become plain arrays. Leaves of the
  param's shape keep its metadata. Without Flax NNX in use ``tree`` is
  returned unchanged.
  """
  variable = _variable_type()
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
    if (plan is None or not hasattr(plan, 'sketch_shape') or plan.dense or
        np.shape(value) != plan.sketch_shape):
      return value
    metadata = dict(s.get_metadata())
    for k in _SHARDING_KEYS:
      names = metadata.get(k)
      if isinstance(names, (tuple, list)) and len(names) == len(plan.shape):
        metadata[k] = tuple(_sharding.sketch_spec(plan, PartitionSpec(*names)))
    return type(s)(value, **metadata)

  if plans is None:
    return jax.tree.map(fit, params, tree, is_leaf=is_var)
  return jax.tree.map(fit, params, tree, plans, is_leaf=is_var)
