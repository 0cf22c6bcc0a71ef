# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

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

from flora_optax import _projection
from flora_optax import _sharding
from flora_optax._quantization import QuantizedArray

# Metadata keys under which NNX keeps a Variable's per-axis sharding names.
_SHARDING_KEYS = ('out_sharding', 'sharding_names', 'optimizer_sharding')


def _variable_type() -> type | None:
  # Looked up only if Flax NNX is already imported: no dependency on Flax.
  nnx = sys.modules.get('flax.nnx')
  return getattr(nnx, 'Variable', None) if nnx is not None else None


def fit_metadata(params: Any, tree: Any, plans: Any = None) -> Any:
  """Fixes NNX metadata on state leaves whose shape differs from the param's.

  Sketches (leaves matching ``plans``, a ``LeafPlan`` tree) get the param's
  sharding names with the rank axis replicated, as their sketches are
  sharded (``_projection.spec_on``); other leaves of another shape
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

  mesh = jax.sharding.get_abstract_mesh()
  axis_sizes = ({} if mesh.empty else
                dict(zip(mesh.axis_names, mesh.axis_sizes)))

  def with_names(s, value, plan):
    """``value`` in ``s``'s Variable type, sharded like ``plan``'s sketch
    (names that do not divide ``value``'s axes dropped)."""
    metadata = dict(s.get_metadata())
    for k in _SHARDING_KEYS:
      names = metadata.get(k)
      if isinstance(names, (tuple, list)) and len(names) == len(plan.shape):
        names = tuple(_projection.spec_on(plan, plan.sketch_axes,
                                          PartitionSpec(*names)))
        metadata[k] = _sharding.fit_names(names, np.shape(value), axis_sizes)
    return type(s)(value, **metadata)

  def fit(p, s, plan=None):
    if not (is_var(p) and is_var(s)):
      return s
    value = s.get_value()
    plan = plan.get_value() if is_var(plan) else plan
    is_plan = plan is not None and hasattr(plan, 'sketch_shape')
    if isinstance(value, QuantizedArray):
      # Codes and block scales have the sketch's axes (the last one shorter):
      # each is sharded as the sketch is.
      if not is_plan:
        return value
      return value._replace(codes=with_names(s, value.codes, plan),
                            scales=with_names(s, value.scales, plan))
    if np.shape(value) == np.shape(p.get_value()):
      return s
    if (not is_plan or plan.dense or np.shape(value) != plan.sketch_shape):
      return value
    return with_names(s, value, plan)

  if plans is None:
    return jax.tree.map(fit, params, tree, is_leaf=is_var)
  return jax.tree.map(fit, params, tree, plans, is_leaf=is_var)


def quantized_outside(tree: Any) -> Any:
  """``tree`` with each NNX Variable that holds a :class:`QuantizedArray`
  turned inside out: a QuantizedArray whose codes and scales are Variables
  of that type, with its metadata (sharding names that do not divide an
  axis of the codes or scales dropped), as ``nnx.Optimizer`` keeps array
  leaves in Variables. Without Flax NNX in use, ``tree`` unchanged."""
  variable = _variable_type()
  if variable is None:
    return tree
  mesh = jax.sharding.get_abstract_mesh()
  axis_sizes = ({} if mesh.empty else
                dict(zip(mesh.axis_names, mesh.axis_sizes)))

  def wrap(var, value):
    metadata = dict(var.get_metadata())
    for k in _SHARDING_KEYS:
      names = metadata.get(k)
      if isinstance(names, (tuple, list)):
        metadata[k] = _sharding.fit_names(tuple(names), np.shape(value),
                                          axis_sizes)
    return type(var)(value, **metadata)

  def fix(x):
    if isinstance(x, variable) and isinstance(x.get_value(), QuantizedArray):
      q = x.get_value()
      return q._replace(codes=wrap(x, q.codes), scales=wrap(x, q.scales))
    return x

  return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, variable))
