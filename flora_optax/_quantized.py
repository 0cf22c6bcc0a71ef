# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Any optax optimizer with 8- or 4-bit states: :func:`quantized`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from flora_optax import _checks
from flora_optax import _engine
from flora_optax import _leaves
from flora_optax import _quantization
from flora_optax._quantization import QuantizedArray, is_quantized


def quantized(
    inner: optax.GradientTransformation,
    bits: int | None = 8,
    *,
    block_size: int | None = None,
    code_map: str | None = None,
    min_quantized_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""``inner`` with its large float state leaves kept in 8- or 4-bit codes.

  Wraps any optax transformation whose update is separable over parameter
  leaves (Adam, AdamW, Lion, SGD with momentum, RMSprop, Adafactor, Muon,
  AdEMAMix, ADOPT, ... and chains, ``inject_hyperparams``, ``masked`` and
  ``partition`` of them). Between steps every float state leaf that has its
  parameter's shape and at least ``min_quantized_size`` entries is stored
  as a :class:`QuantizedArray`: block-wise codes along the last axis and
  one float32 absmax per block. Scalars (the step count, injected
  hyperparameters) and small or factored leaves stay as they are. The state
  keeps the inner's structure, so ``optax.tree.get(state, 'mu')`` still
  finds the first moment (its large leaves in codes).

  Each update runs the inner's own float math one parameter leaf at a time:
  it decodes leaf ``k``'s state to its dtype, calls ``inner.update`` on leaf
  ``k`` alone (the other leaves ``None``, optax's convention for absent
  leaves), encodes the new state and orders leaf ``k + 1`` after it, so one
  leaf's float state is alive at a time. The update returned is computed
  from this step's float state, as the inner computes it.

  Codes: each block is signed (``code_map``) unless it holds
  no negative entry, in which case it is stored in unsigned codes of
  ``sqrt(x)`` that exclude zero and its scale is negated. Why: a second
  moment (or any non-negative state) keeps twice the resolution and never
  decodes a small positive entry to zero (which would make ``m / sqrt(v)``
  explode), decided from the data for any optimizer, not from names. A block
  of zeros stays exactly zero; a NaN or Inf poisons only its block.

  Which leaves are whose is read off ``inner.init`` (a state leaf belongs to
  parameter ``k`` if ``init`` of leaf ``k`` alone makes it). At ``init`` the
  inner's update is traced once and its data flow checked: if a leaf's
  update or state depends on another leaf's (``optax.clip_by_global_norm``,
  ``optax.apply_if_finite``, a global learning-rate rule), ``init`` raises a
  ``ValueError`` naming the leaves. Put such transformations outside:
  ``optax.chain(optax.clip_by_global_norm(1.0), quantized(optax.adam(lr)))``.

  Args:
    inner: an ``optax.GradientTransformation`` separable over parameter
      leaves.
    bits: ``8``, ``4`` (codes packed two to a byte) or ``None`` (``inner``
      itself, returned unchanged). Static.
    block_size: entries per block along the last axis; ``None``: 256 for 8
      bits, 64 for 4 bits.
    code_map: the map of signed blocks (:func:`code_values`): ``'sqrt'``,
      ``'cubic'``, ``'normal'``, ``'linear'``, ``'dynamic'`` or ``'log'``;
      ``None``: ``'sqrt'`` for 8 bits, ``'cubic'`` for 4.
    min_quantized_size: state leaves with fewer entries stay float;
      ``None``: 4096 (as bitsandbytes' ``min_8bit_size``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments are passed
    to ``inner``).

  Raises:
    TypeError: if ``inner`` is not a transformation, or a keyword has the
      wrong type.
    ValueError: if ``bits`` is not None, 8 or 4, a keyword is out of range
      or given without ``bits``; at ``init``, if ``inner`` couples
      parameter leaves.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.ones((256, 512)), 'b': jnp.ones((512,))}
    >>> tx = flora_optax.quantized(optax.lion(1e-4), bits=8)
    >>> state = tx.init(params)
    >>> mu = optax.tree.get(state, 'mu')
    >>> mu['w'].codes.dtype, mu['w'].codes.shape, mu['b'].dtype
    (dtype('uint8'), (256, 512), dtype('float32'))
    >>> updates, state = jax.jit(tx.update)(params, state, params)
    >>> optax.tree.get(flora_optax.to_float_state(state), 'mu')['w'].dtype
    dtype('float32')

    A transformation that couples leaves is refused when it is initialized:

    >>> tx = flora_optax.quantized(
    ...     optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9)))
    >>> tx.init(params)
    Traceback (most recent call last):
    ...
    ValueError: quantized: the inner transformation couples parameter leaves: ...

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

    Li, Chen and Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
  """
  _checks.check_transformation(inner, 'inner')
  quantizer = _leaves.quantizer(bits, block_size, code_map,
                                min_quantized_size, signed=None)
  if quantizer is None:
    return inner

  def quantizer_of(path, leaf, param_shape):
    del path
    shape = tuple(jnp.shape(leaf))
    return (quantizer if shape == param_shape and quantizer.quantizes(shape)
            else None)

  engine = _engine.Engine(inner, quantizer_of)

  def update_fn(updates, state, params=None, **extra_args):
    return engine.update(updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(engine.init, update_fn)


def to_float_state(state: Any) -> Any:
  """The plain optax state a quantized state stands for.

  Every :class:`QuantizedArray` in ``state`` is decoded, from its own
  format, to a float array of its shape and dtype; everything else is kept.
  For a state of ``quantized(inner)`` the result is a state of ``inner``
  itself (e.g. an ``optax.adamw`` state), to save as a float checkpoint, to
  inspect, or to continue training in float.

  Args:
    state: any pytree, e.g. an optimizer state.

  Returns:
    ``state`` with its quantized leaves decoded.

  Raises:
    ValueError: if a quantized leaf carries no format (written by
      flora_optax < 0.4).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.ones((64, 128))}
    >>> tx = flora_optax.quantized(optax.adam(1e-3))
    >>> state = flora_optax.to_float_state(tx.init(params))
    >>> jax.tree.structure(state) == jax.tree.structure(
    ...     optax.adam(1e-3).init(params))
    True
  """
  return jax.tree.map(
      lambda x: _quantization.decode(x) if is_quantized(x) else x, state,
      is_leaf=is_quantized)


def from_float_state(float_state: Any, like: Any) -> Any:
  """A float optax state in the quantized form of ``like``.

  The inverse of :func:`to_float_state`: every leaf of ``float_state`` at a
  place where ``like`` holds a :class:`QuantizedArray` is encoded with that
  array's format; every other leaf is taken as it is. Use it to restore a
  checkpoint of ``optax.adamw`` into ``quantized(optax.adamw(...))``, or to
  switch a run from float to 8-bit states mid-training.

  Args:
    float_state: a state of the inner transformation (float leaves).
    like: a state of the quantized transformation (e.g. its ``init``), for
      the structure and the formats; its values are not used.

  Returns:
    ``float_state`` quantized as ``like`` is.

  Raises:
    ValueError: if ``float_state``'s structure or a leaf's shape does not
      fit ``like``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.ones((64, 128))}
    >>> float_state = optax.adam(1e-3).init(params)
    >>> tx = flora_optax.quantized(optax.adam(1e-3), bits=4)
    >>> state = flora_optax.from_float_state(float_state, tx.init(params))
    >>> optax.tree.get(state, 'mu')['w'].format.bits
    4
  """
  treedef = jax.tree.structure(like, is_leaf=is_quantized)
  try:
    leaves = treedef.flatten_up_to(float_state)
  except (ValueError, TypeError) as e:
    raise ValueError(
        'from_float_state: `float_state` does not have the structure of '
        f'`like` (the quantized state): {e}') from None
  out = []
  for path_leaf, x in zip(jax.tree_util.tree_flatten_with_path(
      like, is_leaf=is_quantized)[0], leaves):
    path, q = path_leaf
    if is_quantized(q):
      if tuple(jnp.shape(x)) != q.shape:
        raise ValueError(
            f'from_float_state: leaf {_checks.leaf_name(path)} has shape '
            f'{tuple(jnp.shape(x))}, but `like` stores shape {q.shape}.')
      x = _quantization.Quantizer.of(q.format).encode(
          jnp.asarray(x), dtype=q.format.dtype)
    out.append(x)
  return treedef.unflatten(out)
