# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Flora compressed momentum (paper Algorithm 2) as an optax transformation."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _checks
from flora_optax import _engine
from flora_optax import _keys
from flora_optax import _leaves
from flora_optax._leaves import Leaves, Quantizer
from flora_optax._projector import Projector
from flora_optax._types import (TRANSFERS, DimensionNumbersSpec, KeyLike,
                                Projection, RankFn, Side, Transfer)


class TransferStabilityWarning(UserWarning):
  """Unbiased transfers can make the momentum grow without bound."""


class CompressedMomentumState(NamedTuple):
  """State of :func:`compressed_momentum`.

  Attributes:
    count: number of updates so far (``int32``, saturating).
    cycle: the resample cycle whose projection the sketches are in
      (``int32``). Kept rather than derived from ``count``, so that a
      ``resample_every`` changed at run time (``optax.inject_hyperparams``)
      transfers the sketches from the projection they are really in.
    key: raw ``uint32`` key data the projections derive from.
    mu: per leaf, the momentum sketch (compressed leaves) or the dense first
      moment (other leaves), in ``accumulator_dtype``; with ``bits`` set, a
      :class:`QuantizedArray` (codes and block scales) for every leaf of at
      least ``min_quantized_size`` entries.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  cycle: jax.Array  # shape=(), dtype=jnp.int32
  key: jax.Array  # shape=(2,), dtype=jnp.uint32
  mu: optax.Updates


def _warn_unstable(compressed: Any, decay: Any, resample_every: Any,
                   transfer: str) -> None:
  """Warns when ``decay**resample_every * sqrt(d/r) > 1`` for some leaf of
  ``compressed`` (``(path, plan)`` pairs)."""
  if transfer != 'unbiased' or resample_every is None:
    return
  if not (_checks.is_concrete(decay) and
          _checks.is_concrete(resample_every)):
    return
  shrink = float(decay)**int(resample_every)
  bad = []
  for path, plan in compressed:
    if shrink * math.sqrt(plan.d / plan.rank) > 1.0:
      bad.append(f'{jax.tree_util.keystr(path)} (d/r={plan.d}/{plan.rank})')
  if bad:
    warnings.warn(
        'Unbiased momentum transfer is unstable here: decay**resample_every * '
        f'sqrt(d/r) = {float(decay)}**{int(resample_every)} * sqrt(d/r) > 1 for '
        f'{len(bad)} leaves, e.g. {", ".join(bad[:3])}; the momentum norm will '
        'grow without bound. Resample less often, raise the rank, or pass '
        "transfer='projected' (or 'reset').",
        TransferStabilityWarning,
        # init may run inside flora, optax.chain, jit or nnx.Optimizer.
        stacklevel=_checks.user_stacklevel())


# Measured (docs/benchmarks/quality.md, "Which momentum"): residual=True is
# the default, with the part of the momentum inside the subspace output as
# its orthogonal projection (``Π M``; ``decompress(M)``, about d/r times
# larger, trained worse).
DEFAULT_RESIDUAL = True


def compressed_momentum(
    rank: int | RankFn,
    *,
    decay: float = 0.9,
    resample_every: int | None = 1000,
    nesterov: bool = False,
    key: KeyLike = 0,
    accumulator_dtype: jax.typing.DTypeLike = jnp.dtype('float32'),
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
  r"""An exponential moving average of updates kept as a random sketch.

  For a compressed leaf, the momentum ``M`` is a sketch ``C`` of size
  ``r·max(n, m)`` (``side='smaller'``). At step ``t`` (from 1), in cycle
  ``c = (t - 1) // resample_every`` with projection ``P_c``:

  1. on the first step of a new cycle, ``C ← transfer(C, P_{c-1}, P_c)``;
  2. ``C ← β C + (1 - β) compress_c(g_t)``;
  3. the update is, with ``residual=True`` (the default),
     ``Π_c M + (I - Π_c) g_t``: the momentum inside the row space of
     ``P_c`` (``Π_c = P_cᵀ (P_c P_cᵀ)⁻¹ P_c``, its orthogonal projector,
     applied through the ``r×r`` Gram matrix) plus the part of the current
     update that the sketch can not hold, passed through without state.
     With ``residual=False`` (the paper's Algorithm 2) it is the unbiased
     ``decompress_c(C)``.

  ``nesterov=True`` replaces the momentum term by ``β·(momentum) + (1 - β)·
  (its input)``, restricted to the subspace in residual mode.

  Leaves that are not compressed keep an exact dense EMA (``optax.ema``
  without debiasing) in both modes. With ``bits`` the stored momentum (the
  sketch, or with ``rank=None`` the dense momentum of every leaf) is kept in
  block-wise 8- or 4-bit codes and decoded for each step's float32 math;
  ``rank=r, bits=8`` stores Flora's sketch in 8 bits.

  Why residual is the default (measured), why unbiased transfers can make
  paper-mode momentum diverge (:class:`TransferStabilityWarning`), and what
  the quantized momentum keeps: see the documentation's page
  :doc:`/explain/flora` (``docs/explain/flora.md``); long runs and
  non-finite gradients: :doc:`/explain/guarantees`
  (``docs/explain/guarantees.md``).

  Args:
    rank: the rank, an int or a callable ``(path, leaf) -> int | None`` (see
      :class:`Projector`); ``None`` compresses no leaf (a dense momentum,
      quantized with ``bits``).
    decay: the EMA decay ``β`` in ``[0, 1)``.
    resample_every: ``κ``, steps per projection; ``None`` never resamples.
      It may change at run time (``optax.inject_hyperparams``): the state
      keeps the cycle its sketches are in.
    nesterov: use the Nesterov-style output.
    key: an int seed, a typed key or raw ``uint32`` key data.
    accumulator_dtype: dtype of the stored sketches and moments (float32 by
      default; bfloat16 halves the state). Arithmetic is in float32.
    projection: ``'gaussian'``, ``'rademacher'`` or ``'orthogonal'``.
    side: ``'smaller'`` or ``'larger'``, the matrix axis to compress.
    dimension_numbers: the matrix view of higher-rank leaves (see
      :class:`Projector`).
    transfer: how a sketch moves to a new cycle's projection:
      ``'unbiased'`` (the paper's), ``'projected'`` (through the
      pseudo-inverse of the new projection: never increases the norm) or
      ``'reset'`` (zeros). In residual mode ``'unbiased'`` and
      ``'projected'`` coincide; in paper mode ``init`` warns where
      ``decay**resample_every * sqrt(d/r) > 1`` makes ``'unbiased'``
      unstable.
    residual: output the momentum inside the subspace plus the current
      update outside it (``True``, the default), or the paper's decompressed
      sketch (``False``, Algorithm 2 bit for bit).
    bits: ``None`` (float states in ``accumulator_dtype``), ``8`` or ``4``:
      store the momentum in block-wise 8- or 4-bit codes (4-bit codes packed
      two to a byte). Static: under ``optax.inject_hyperparams`` list it in
      ``static_args``.
    block_size: entries per block (one float32 scale each) along the last
      axis; ``None``: 256 for 8 bits, 64 for 4 bits.
    code_map: the map of the codes (:func:`code_values`): ``'sqrt'``,
      ``'cubic'``, ``'normal'``, ``'linear'``, ``'dynamic'`` or ``'log'``;
      ``None``: ``'sqrt'`` for 8 bits, ``'cubic'`` for 4 (measured: the
      least error at the peers' bounds, and the best 4-bit momentum).
    min_quantized_size: leaves whose state has fewer entries stay in
      ``accumulator_dtype``; ``None``: 4096.
    stochastic_rounding: round codes at random, unbiased in value, with noise
      derived from ``key`` and the step (measured worse than nearest rounding
      for an EMA, so off by default).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: when built, for an argument of the wrong type (``rank``,
      ``decay``, ``resample_every``, ``key``, ``nesterov``, ``residual``,
      ``accumulator_dtype``, ``dimension_numbers``, ``bits`` and the
      quantization keywords); at ``init``, for a leaf that is not a real
      floating array, naming it.
    ValueError: when built, for a value out of range (``rank < 1``,
      ``decay`` outside ``[0, 1)``, ``resample_every`` outside ``[1,
      2**31 - 1]``, an unknown ``projection``, ``side`` or ``transfer``,
      ``bits`` other than None, 8 or 4, a quantization keyword without
      ``bits``); at ``init``, for a callable's rank above a leaf's compressed
      axis or ``dimension_numbers`` that do not fit a leaf, naming it; at
      ``update``, for updates whose tree or shapes differ from the params of
      ``init``, naming the leaf.

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

    The first update of a residual momentum is the gradient itself (the
    momentum inside the subspace is the gradient's projection there):

    >>> tx = flora_optax.compressed_momentum(rank=8, decay=0.0)
    >>> out, _ = tx.update(grads, tx.init(params))
    >>> bool(jnp.allclose(out['w'], grads['w'], atol=1e-5))
    True

    Momentum in 8-bit codes, every direction kept (``rank=None``); leaves
    under ``min_quantized_size`` entries stay float32:

    >>> tx = flora_optax.compressed_momentum(None, bits=8)
    >>> mu = tx.init({'w': jnp.zeros((256, 512)), 'b': jnp.zeros((512,))}).mu
    >>> mu['w'].codes.dtype, mu['w'].codes.shape, mu['w'].scales.shape
    (dtype('int8'), (256, 512), (256, 2))
    >>> mu['b'].dtype
    dtype('float32')

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.

    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_,
    2024.

    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024.

    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

    Li, Chen and Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
  """
  projector = Projector(rank, projection=projection, side=side,
                        dimension_numbers=dimension_numbers)
  _checks.check_decay(decay)
  _checks.check_resample_every(resample_every)
  _checks.check_choice(transfer, 'transfer', TRANSFERS)
  # The PRNG implementation is fixed here; states keep raw key data.
  impl = _keys.key_impl(key)
  _checks.check_bool(nesterov, 'nesterov')
  _checks.check_bool(residual, 'residual')
  acc_dtype = _checks.check_float_dtype(accumulator_dtype, 'accumulator_dtype')
  quantizer = _leaves.quantizer(bits, block_size, code_map,
                                min_quantized_size, stochastic_rounding)
  steps = _Momentum(projector, decay, resample_every, nesterov, transfer,
                    residual, acc_dtype, quantizer, key, impl)
  return optax.GradientTransformationExtraArgs(steps.init, steps.update)


@dataclasses.dataclass(frozen=True, eq=False)
class _Momentum:
  """The steps of :func:`compressed_momentum`, with its checked arguments.

  ``key`` is the user's (the state's key data is made from it in ``init``),
  ``impl`` the name of its PRNG implementation, fixed at construction.
  """

  projector: Projector
  decay: Any
  resample_every: Any
  nesterov: bool
  transfer: str
  residual: bool
  acc_dtype: Any
  quantizer: Quantizer | None
  key: KeyLike
  impl: str

  @property
  def projected_state(self) -> bool:
    """In residual mode the state's momentum is ``Π M`` and a transfer
    projects it onto the new subspace, a contraction."""
    return self.residual

  def init(self, params: optax.Params) -> CompressedMomentumState:
    if not self.projected_state:
      _warn_unstable(_leaves.compressed_plans(self.projector.plan(params)),
                     self.decay, self.resample_every, self.transfer)
    mu = _leaves.sketch_zeros(self.projector, params, self.acc_dtype,
                              self.quantizer)
    # Two arrays, not one: a jitted step that donates the state would
    # otherwise donate one buffer twice.
    return CompressedMomentumState(
        count=jnp.zeros([], jnp.int32), cycle=jnp.zeros([], jnp.int32),
        # From the user's key, made here: under an Explicit mesh an int seed
        # then gives replicated key data, as every other state leaf.
        key=_keys.key_data(self.key, self.impl), mu=mu)

  def _key(self, key_data: jax.Array, cycle: jax.Array,
           purpose: str = 'momentum') -> jax.Array:
    return _keys.cycle_key(key_data, cycle, purpose, impl=self.impl)

  def _cycles(self, state: CompressedMomentumState):
    """The step count, the cycle of this step, and whether it is new."""
    count = optax.safe_increment(state.count)
    if self.resample_every is None:
      return count, state.cycle, None
    # A saturated counter (2**31 - 1) no longer advances: the cycle, and with
    # it the projection, then stays fixed and nothing is transferred.
    k = jnp.asarray(self.resample_every, jnp.int32)
    cycle = jnp.where(count > state.count, (count - 1) // k, state.cycle)
    return count, cycle, cycle != state.cycle

  def _gram_invs(self, leaves: Leaves, ps, needed: bool) -> list[Any]:
    if not needed:
      return [None] * len(ps)
    return leaves.gram_inverses(ps)  # None where Gram = (d/r) I exactly

  def _carry(self, plan, m, p_old, p_new, sharding, gram_inv_old):
    """The sketch ``m`` made with ``p_old``, moved to ``p_new``."""
    if self.projected_state and self.transfer != 'reset':
      # compress_new(Π_old M): the r×r matrix (P_old P_oldᵀ)⁻¹ P_old P_newᵀ.
      rows_old = plan.dual_rows(p_old, gram_inverse=gram_inv_old)
      return plan.transfer(m, rows_old, p_new, 'unbiased', sharding)
    return plan.transfer(m, p_old, p_new, self.transfer, sharding)

  def _transferred(self, leaves: Leaves, ps, key_data, old_cycle, sketches):
    """The sketches of the old cycle moved to this cycle's projections."""
    # The old projections are only drawn on the first step of a cycle.
    olds = leaves.draw(self._key(key_data, old_cycle))
    invs = self._gram_invs(leaves, olds,
                           self.projected_state and self.transfer != 'reset')
    return {i: self._carry(leaves.plans[i], m, olds[i], ps[i],
                           leaves.shardings[i], invs[i])
            for i, m in sketches.items()}

  def _output(self, plan, g, s, new_m, p, sharding, gram_inv):
    """The update of a compressed leaf from its input ``g``, ``s = C(g)``."""
    decay = self.decay
    if not self.residual:
      out = plan.decompress(new_m, p, sharding)
      return decay * out + (1 - decay) * g if self.nesterov else out
    # out = (I - Π) g + Π M = g + Π (M - g) = g + decompress(coef), with
    # (P Pᵀ)⁻¹ P as rows: one decompression, as in paper mode, and r²·d
    # flops for the r×r factor instead of n·r² on the sketch.
    coef = new_m - s
    if self.nesterov:  # β·(momentum) + (1-β)·Π g inside the subspace
      coef = decay * coef
    return g + plan.decompress(
        coef, plan.dual_rows(p, gram_inverse=gram_inv), sharding)

  def _step_leaves(self, leaves: Leaves, gs, ps, stored, sketches, rounding):
    """Every leaf's update and stored new momentum, leaf after leaf."""
    invs = self._gram_invs(leaves, ps, self.residual)
    decay = self.decay

    def step(order, i, g, old, p, inv):
      item, sh = leaves.items[i], leaves.shardings[i]
      g32 = g.astype(item.dtype)
      if item.plan.dense:  # an exact EMA
        new_m = (1 - decay) * g32 + decay * order.load(old, item.dtype)
        out = decay * new_m + (1 - decay) * g32 if self.nesterov else new_m
      else:
        s = item.plan.compress(g32, p, sh)
        new_m = (1 - decay) * s + decay * sketches[i]
        out = self._output(item.plan, g32, s, new_m, p, sh, inv)
      return out.astype(g.dtype), order.store(
          leaves.store_one(i, new_m, self.acc_dtype, rounding))

    return _engine.map_leaves(step, gs, stored, ps, invs, outputs=2)

  def update(self, updates, state, params=None, **extra_args):
    del extra_args
    leaves = Leaves.of(self.projector, updates, quantizer=self.quantizer)
    # Trace-time checks: a mismatched tree would broadcast silently.
    leaves.check_state(state.mu, 'momentum state', params)
    del params
    count, cycle, new_cycle = self._cycles(state)
    gs = leaves.flatten(updates)
    stored = leaves.flatten(state.mu)
    ps = leaves.draw(self._key(state.key, cycle))
    # The sketches of compressed leaves, loaded here when a new cycle may
    # transfer them; dense leaves are loaded one at a time below.
    sketches = {i: leaves.load_one(i, stored[i])
                for i, item in enumerate(leaves.items) if not item.plan.dense}
    if new_cycle is not None and sketches:
      sketches = jax.lax.cond(
          new_cycle, functools.partial(self._transferred, leaves, ps,
                                       state.key, state.cycle),
          lambda ms: ms, sketches)
    rounding = None
    if self.quantizer is not None and self.quantizer.stochastic_rounding:
      rounding = self._key(state.key, count, 'momentum_rounding')
    outs, new_mu = self._step_leaves(leaves, gs, ps, stored, sketches,
                                     rounding)
    return leaves.unflatten(outs), CompressedMomentumState(
        count=count, cycle=cycle, key=state.key, mu=leaves.unflatten(new_mu))
