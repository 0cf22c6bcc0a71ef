"""Flora compressed momentum (paper Algorithm 2) as an optax transformation."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flora_optax import _keys
from flora_optax import _projection
from flora_optax._projection import (DimensionNumbersSpec, Projection,
                                     RankFn, Side, Transfer)


class TransferStabilityWarning(UserWarning):
  """Unbiased transfers can make the momentum grow without bound."""


class CompressedMomentumState(NamedTuple):
  """State of :func:`compressed_momentum`.

  Attributes:
    count: number of updates so far (``int32``, saturating).
    key: raw ``uint32`` key data the projections derive from.
    mu: per leaf, the momentum sketch (compressed leaves) or the dense first
      moment (other leaves), in ``accumulator_dtype``.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  key: jax.Array  # shape=(2,), dtype=jnp.uint32
  mu: optax.Updates


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


_INT32_MAX = 2**31 - 1


def check_decay(decay: Any, name: str = 'decay') -> None:
  if isinstance(decay, bool) or not isinstance(
      decay, (int, float, np.number, jax.Array, np.ndarray)):
    raise TypeError(f'`{name}` must be a float in [0, 1), got {decay!r}.')
  if np.ndim(decay) != 0:
    raise ValueError(f'`{name}` must be a scalar in [0, 1), got shape '
                     f'{np.shape(decay)}.')
  if _is_concrete(decay):
    if not 0.0 <= float(decay) < 1.0:
      raise ValueError(f'`{name}` must be in [0, 1), got {float(decay)}.')


def check_resample_every(value: Any, name: str = 'resample_every') -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer, jax.Array, np.ndarray)):
    raise TypeError(f'`{name}` must be a positive int or None (never '
                    f'resample), got {value!r}.')
  if np.ndim(value) != 0:
    raise ValueError(f'`{name}` must be a scalar, got shape '
                     f'{np.shape(value)}.')
  if isinstance(value, (jax.Array, np.ndarray)):
    if not jnp.issubdtype(value.dtype, jnp.integer) and _is_concrete(value):
      if float(value) != int(value):
        raise TypeError(f'`{name}` must be a positive int, got {value!r}.')
  if _is_concrete(value) and not 0 < int(value) <= _INT32_MAX:
    # The step counter is int32 (see the docstring's note on long runs).
    raise ValueError(f'`{name}` must be a positive int at most 2**31 - 1, or '
                     f'None (never resample), got {int(value)}.')


def _warn_unstable(plans: Any, decay: Any, resample_every: Any,
                   transfer: str) -> None:
  """Warns when ``decay**resample_every * sqrt(d/r) > 1`` for some leaf."""
  if transfer != 'unbiased' or resample_every is None:
    return
  if not (_is_concrete(decay) and _is_concrete(resample_every)):
    return
  shrink = float(decay)**int(resample_every)
  bad = []
  for path, plan in jax.tree_util.tree_leaves_with_path(
      plans, is_leaf=lambda x: isinstance(x, _projection.LeafPlan)):
    if not plan.dense and shrink * math.sqrt(plan.d / plan.rank) > 1.0:
      bad.append(f'{jax.tree_util.keystr(path)} (d/r={plan.d}/{plan.rank})')
  if bad:
    warnings.warn(
        'Unbiased momentum transfer is unstable here: decay**resample_every * '
        f'sqrt(d/r) = {float(decay)}**{int(resample_every)} * sqrt(d/r) > 1 for '
        f'{len(bad)} leaves, e.g. {", ".join(bad[:3])}; the momentum norm will '
        'grow without bound. Resample less often, raise the rank, or pass '
        "transfer='projected' (or 'reset').",
        TransferStabilityWarning,
        stacklevel=3)


def compressed_momentum(
    rank: int | RankFn,
    *,
    decay: float = 0.9,
    resample_every: int | None = 1000,
    nesterov: bool = False,
    key: Any = 0,
    accumulator_dtype: Any = jnp.dtype('float32'),
    projection: Projection = 'gaussian',
    side: Side = 'smaller',
    dimension_numbers: DimensionNumbersSpec = None,
    transfer: Transfer = 'unbiased',
) -> optax.GradientTransformationExtraArgs:
  r"""An exponential moving average of updates kept as a random sketch.

  For a compressed leaf, the momentum ``M`` is a sketch ``C`` of size
  ``r·max(n, m)`` (``side='smaller'``). At step ``t`` (from 1), in cycle
  ``c = (t - 1) // resample_every`` with projection ``P_c``:

  1. on the first step of a new cycle, ``C ← transfer(C, P_{c-1}, P_c)``;
  2. ``C ← β C + (1 - β) compress_c(g_t)``;
  3. the update is ``decompress_c(C)``, or with ``nesterov=True``
     ``β decompress_c(C) + (1 - β) g_t``.

  Leaves that are not compressed keep an exact dense EMA (``optax.ema`` without
  debiasing). With ``resample_every=None`` the projection never changes: the
  result equals LoRA with a frozen random ``A``.

  Transfer stability: an unbiased transfer multiplies the expected norm of the
  carried momentum by about ``sqrt(d/r)`` while the EMA shrinks it by
  ``β**resample_every`` between transfers. When ``β**κ · sqrt(d/r) > 1`` the
  momentum grows without bound; ``init`` then warns
  (:class:`TransferStabilityWarning`). ``transfer='projected'`` re-projects
  through the pseudo-inverse of the new projection instead (never increases
  the norm, biased towards zero by about ``r/d``); ``transfer='reset'`` starts
  each cycle from zero.

  Limits: the step counter is ``int32`` and saturates at ``2**31 - 1``; from
  then on the cycle, and so the projection, stays fixed (no more transfers).
  A non-finite gradient entry poisons its line of the sketch (the entries
  sharing its uncompressed index) for good: wrap the optimizer in
  ``optax.apply_if_finite`` to skip such steps, which leaves the state
  bit-identical.

  Args:
    rank: the rank, an int or a callable ``(path, leaf) -> int | None`` (see
      :class:`Projector`).
    decay: the EMA decay ``β`` in ``[0, 1)``.
    resample_every: ``κ``, steps per projection; ``None`` never resamples.
    nesterov: use the Nesterov-style output.
    key: an int seed, a typed key or raw ``uint32`` key data.
    accumulator_dtype: dtype of the stored sketches and moments (float32 by
      default; bfloat16 halves the state). Arithmetic is in float32.
    projection: ``'gaussian'``, ``'rademacher'`` or ``'orthogonal'``.
    side: ``'smaller'`` or ``'larger'``, the matrix axis to compress.
    dimension_numbers: the matrix view of higher-rank leaves (see
      :class:`Projector`).
    transfer: ``'unbiased'`` (the paper's), ``'projected'`` or ``'reset'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros((32,))}
    >>> tx = optax.chain(flora_optax.compressed_momentum(rank=8),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> state = tx.init(params)
    >>> jax.tree.map(jnp.shape, state[0].mu)
    {'b': (32,), 'w': (64, 8)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (32,), 'w': (64, 32)}

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  projector = _projection.Projector(
      rank, projection=projection, side=side,
      dimension_numbers=dimension_numbers)
  check_decay(decay)
  check_resample_every(resample_every)
  _projection.check_choice(transfer, 'transfer', _projection.TRANSFERS)
  _keys.check_key(key)
  if not isinstance(nesterov, bool):
    raise TypeError(f'`nesterov` must be a bool, got {nesterov!r}.')
  acc_dtype = _projection.check_float_dtype(accumulator_dtype,
                                            'accumulator_dtype')

  def init_fn(params: optax.Params) -> CompressedMomentumState:
    plans = projector.plan(params)
    _warn_unstable(plans, decay, resample_every, transfer)
    mu = jax.tree.map(
        lambda pl, x: _projection.sketch_zeros(pl, x, acc_dtype), plans, params)
    mu = _projection.fit_nnx_metadata(params, mu, plans)
    return CompressedMomentumState(
        count=jnp.zeros([], jnp.int32), key=_keys.key_data(key), mu=mu)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    plans = projector.plan(updates)
    # Trace-time checks: a mismatched tree would broadcast silently.
    _projection.check_sketches(plans, state.mu, 'momentum state', params)
    del params
    count = optax.safe_increment(state.count)
    if resample_every is None:
      cycle = jnp.zeros([], jnp.int32)
      new_cycle = jnp.zeros([], bool)
    else:
      k = jnp.asarray(resample_every, jnp.int32)
      cycle = (count - 1) // k
      # A saturated counter (2**31 - 1) no longer advances: the cycle, and
      # with it the projection, then stays fixed and nothing is transferred.
      new_cycle = (count > state.count) & (count > 1) & (
          (count - 1) % k == 0)
    new_key = _keys.cycle_key(state.key, cycle, 'momentum')
    old_key = _keys.cycle_key(state.key, cycle - 1, 'momentum')

    def leaf(path, plan, g, m):
      dt = jnp.promote_types(g.dtype, jnp.float32)
      g32 = g.astype(dt)
      if plan.dense:
        new_m = (1 - decay) * g32 + decay * m.astype(dt)
        out = new_m
      else:
        sharding = _projection.explicit_sharding(g)
        p = plan.projection(_keys.leaf_key(new_key, path), projection, dt)
        m = m.astype(dt)
        if resample_every is not None:
          # The old projection is only drawn on the first step of a cycle.
          m = jax.lax.cond(
              new_cycle,
              lambda m: plan.transfer(
                  m,
                  plan.projection(_keys.leaf_key(old_key, path), projection,
                                  dt), p, transfer, sharding),
              lambda m: m, m)
        new_m = (1 - decay) * plan.compress(g32, p, sharding) + decay * m
        out = plan.decompress(new_m, p, sharding)
      if nesterov:
        out = decay * out + (1 - decay) * g32
      return out.astype(g.dtype), new_m.astype(acc_dtype)

    pairs = jax.tree_util.tree_map_with_path(leaf, plans, updates, state.mu)
    new_updates = jax.tree.map(lambda _, x: x[0], plans, pairs)
    new_mu = jax.tree.map(lambda _, x: x[1], plans, pairs)
    return new_updates, CompressedMomentumState(
        count=count, key=state.key, mu=new_mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
