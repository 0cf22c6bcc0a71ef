# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""The ``flora`` optimizer: Adafactor whose momentum is Flora-compressed."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from flora_optax import _checks
from flora_optax import _leaves
from flora_optax._momentum import DEFAULT_RESIDUAL, compressed_momentum
from flora_optax._types import (DimensionNumbersSpec, KeyLike, Projection,
                                RankFn, Side, Transfer)


def flora(
    learning_rate: optax.ScalarOrSchedule | None,
    rank: int | RankFn,
    *,
    resample_every: int | None = 1000,
    momentum: float | None = 0.9,
    key: KeyLike = 0,
    nesterov: bool = False,
    min_dim_size_to_factor: int | None = None,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    # A dtype instance, not the callable jnp.float32: optax.inject_hyperparams
    # would take a callable for a schedule.
    dtype_momentum: jax.typing.DTypeLike = jnp.dtype('float32'),
    weight_decay_rate: float | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: optax.Params | Callable[[optax.Params], optax.Params] | None = None,
    projection: Projection = 'gaussian',
    side: Side = 'smaller',
    dimension_numbers: DimensionNumbersSpec = None,
    transfer: Transfer = 'unbiased',
    residual: bool = DEFAULT_RESIDUAL,
    bits: int | None = None,
    block_size: int | None = None,
    code_map: str | None = None,
    min_quantized_size: int | None = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adafactor with Flora-compressed momentum.

  The chain is ``optax.adafactor``'s with the momentum replaced:
  ``scale_by_factored_rms`` → ``clip_by_block_rms`` → learning rate →
  parameter scale → :func:`compressed_momentum` (residual) → decayed weights →
  sign flip. With compression off for every leaf it is ``optax.adafactor``
  bit for bit. With ``residual=False`` it is the paper's algorithm in the
  paper's order: the momentum right after ``scale_by_factored_rms``. The
  second moment is Adafactor's factored one (never randomly projected: a
  projected second moment can go negative); the first moment of every matrix
  is kept as an ``r·max(n, m)`` sketch instead of ``n·m``. Arguments shared
  with ``optax.adafactor`` have its names and defaults. The math, and why
  residual momentum sits in optax's position: the documentation's pages
  :doc:`/explain/flora` (``docs/explain/flora.md``) and
  :doc:`/benchmarks/quality`; which compressor for which memory budget:
  :doc:`/choosing`.

  Args:
    learning_rate: a float or an ``optax`` schedule; ``None`` leaves updates
      unscaled (as in ``optax.adafactor``).
    rank: the rank of the momentum sketches: an int or a callable ``(path,
      leaf) -> int | None`` (see :class:`Projector`); ``None`` projects no
      leaf (with ``bits``, a quantized dense momentum).
    resample_every: steps between fresh projections; ``None`` never resamples.
    momentum: the momentum decay ``β``; ``None`` disables momentum (plain
      Adafactor, nothing compressed).
    key: an int seed, a typed key or raw ``uint32`` key data.
    nesterov: Nesterov-style momentum output.
    min_dim_size_to_factor: as in ``optax.adafactor``; ``None`` (the default)
      is its default, 128. It sets state shapes: under
      ``optax.inject_hyperparams`` leave it at ``None`` or pass an int, which
      an eager ``init`` reads back; a value traced under ``jit`` must be
      listed in ``static_args``.
    decay_rate: as in ``optax.adafactor``.
    decay_offset: as in ``optax.adafactor``.
    multiply_by_parameter_scale: as in ``optax.adafactor``.
    clipping_threshold: as in ``optax.adafactor``.
    dtype_momentum: dtype of the momentum sketches.
    weight_decay_rate: as in ``optax.adafactor``.
    eps: as in ``optax.adafactor``.
    factored: as in ``optax.adafactor``.
    weight_decay_mask: as in ``optax.adafactor``.
    projection: ``'gaussian'``, ``'rademacher'`` or ``'orthogonal'``.
    side: ``'smaller'`` or ``'larger'``.
    dimension_numbers: the matrix view of higher-rank leaves.
    transfer: ``'unbiased'``, ``'projected'`` or ``'reset'`` (see
      :func:`compressed_momentum`).
    residual: ``True`` (the default): the momentum's output is its part
      inside the sketch's subspace plus the current update outside it, and
      it sits after clipping, learning rate and parameter scale, as in
      ``optax.adafactor``. ``False``: the paper's algorithm and chain order,
      bit for bit (see :func:`compressed_momentum`).
    bits: ``None`` (a float momentum in ``dtype_momentum``), ``8`` or ``4``:
      the momentum (Flora's sketch, or with ``rank=None`` the dense momentum)
      kept in block-wise 8- or 4-bit codes (see :func:`compressed_momentum`).
      Static under ``optax.inject_hyperparams``.
    block_size: see :func:`compressed_momentum`.
    code_map: see :func:`compressed_momentum`.
    min_quantized_size: see :func:`compressed_momentum`.
    stochastic_rounding: see :func:`compressed_momentum`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: when built, for an argument of the wrong type (``rank``,
      ``momentum``, ``dtype_momentum``, ``key``, ``nesterov``, ``residual``,
      ``bits`` and the quantization keywords, ``min_dim_size_to_factor``); at
      ``init``, for a leaf that is not a real floating array, naming it.
    ValueError: when built, for a value out of range (``rank < 1``,
      ``momentum`` outside ``[0, 1)``, ``resample_every`` outside ``[1,
      2**31 - 1]``, an unknown ``projection``, ``side`` or ``transfer``,
      ``bits`` other than None, 8 or 4, a quantization keyword without
      ``bits``); at ``init``, for a callable's rank above a leaf's compressed
      axis or ``dimension_numbers`` that do not fit a leaf, naming it; at
      ``update``, for updates whose tree or shapes differ from the params of
      ``init``, naming the leaf.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.ones((256, 128)), 'b': jnp.zeros((128,))}
    >>> opt = flora_optax.flora(learning_rate=1e-2, rank=16)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params['w'].shape
    (256, 128)

    Every numeric hyperparameter can be injected except ``rank``, which sets
    state shapes and must be static:

    >>> opt = optax.inject_hyperparams(
    ...     flora_optax.flora, static_args=('rank',))(
    ...         learning_rate=1e-2, rank=16, resample_every=100)
    >>> state = opt.init(params)
    >>> state.hyperparams['momentum']
    Array(0.9, dtype=float32)

    Adafactor with its momentum in 8-bit codes in every direction, no
    projection (about a quarter of the float32 momentum's bytes):

    >>> opt = flora_optax.flora(1e-2, rank=None, bits=8, min_quantized_size=0)
    >>> mu = optax.tree.get(opt.init(params), 'mu')
    >>> mu['w'].codes.dtype, mu['w'].codes.shape
    (dtype('int8'), (256, 128))

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.

    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  # Measured (docs/benchmarks/quality.md, "Which momentum"): in residual
  # mode the momentum sits where optax.adafactor puts it, after clipping,
  # learning rate and parameter scale; the paper's puts it right after
  # scale_by_factored_rms.
  paper_position = not residual
  # rank and min_dim_size_to_factor set state shapes. Under
  # optax.inject_hyperparams a number not in static_args arrives as an array
  # (an int default too: hence min_dim_size_to_factor=None).
  _checks.check_rank(rank)
  min_dim_size_to_factor = _checks.check_min_dim_size_to_factor(
      min_dim_size_to_factor)
  # Checked here so that errors name flora's arguments, not the inner ones.
  _checks.check_quantization(bits, block_size, code_map, min_quantized_size,
                             stochastic_rounding)
  if momentum is not None:
    _checks.check_decay(momentum, 'momentum')
    _checks.check_float_dtype(dtype_momentum, 'dtype_momentum')
  tx = [
      optax.scale_by_factored_rms(factored, decay_rate, decay_offset,
                                  min_dim_size_to_factor, eps)
  ]
  momentum_tx = None
  if momentum is not None:
    momentum_tx = compressed_momentum(
        rank,
        decay=momentum,
        resample_every=resample_every,
        nesterov=nesterov,
        key=key,
        accumulator_dtype=dtype_momentum,
        projection=projection,
        side=side,
        dimension_numbers=dimension_numbers,
        transfer=transfer,
        residual=residual,
        bits=bits,
        block_size=block_size,
        code_map=code_map,
        min_quantized_size=min_quantized_size,
        stochastic_rounding=stochastic_rounding)
  if momentum_tx is not None and paper_position:
    tx.append(momentum_tx)
  if clipping_threshold is not None:
    tx.append(optax.clip_by_block_rms(clipping_threshold))
  if learning_rate is not None:
    tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(optax.scale_by_param_block_rms())
  if momentum_tx is not None and not paper_position:
    tx.append(momentum_tx)
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate,
                                        mask=weight_decay_mask))
  tx.append(optax.scale(-1))
  return _checked(optax.chain(*tx))


def _checked(chain: optax.GradientTransformationExtraArgs
            ) -> optax.GradientTransformationExtraArgs:
  """``chain`` (flora's) with its inputs checked and its Adafactor state's
  Flax NNX metadata fitted."""

  def update_fn(updates, state, params=None, **extra_args):
    # Adafactor's parts would fail on a mismatched tree with a bare
    # broadcasting error, or broadcast silently: name the leaf instead.
    if params is not None:
      _checks.check_like_params(updates, params)
    return chain.update(updates, state, params, **extra_args)

  def init_fn(params):
    # Adafactor's parts would fail on a Python scalar or an int leaf with an
    # error from inside optax that does not name the leaf.
    _checks.check_float_leaves(params)
    state = chain.init(params)
    # Flax NNX: Adafactor's factored rows and (1,) placeholders must not
    # inherit their params' sharding metadata (see _nnx.fit_metadata).
    factored = state[0]
    factored = factored._replace(**{
        f: _leaves.fit_metadata(params, getattr(factored, f))
        for f in ('v_row', 'v_col', 'v')})
    return (factored,) + tuple(state[1:])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
