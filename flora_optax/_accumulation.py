# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Flora compressed gradient accumulation (paper Algorithm 1).

Two forms of the same computation:

* :class:`MultiSteps`, a drop-in for ``optax.MultiSteps`` whose accumulator is a
  random sketch and whose inner optimizer runs only on the last micro-step of
  each cycle;
* :func:`accumulate_gradients`, the custom-loop recipe: micro-batches in a
  ``lax.scan`` inside one jitted train step, accumulating sketches and
  decompressing once.

Cycle ``j`` (the index of the optimizer update being accumulated) projects
every leaf with ``P_j``, drawn from
``fold_in(cycle_key(key, j, 'accumulation'), leaf_id)``, as
:meth:`Projector.compress` does given ``flora_optax.cycle_key(key, j,
purpose='accumulation')``. Both forms therefore give the same result for the
same key and cycle, and custom code can reproduce the projections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _checks
from flora_optax import _engine
from flora_optax import _keys
from flora_optax import _leaves
from flora_optax._leaves import Leaves
from flora_optax._projector import Projector
from flora_optax._types import (DimensionNumbersSpec, KeyLike, Projection,
                                RankFn, Side)


class MultiStepsState(NamedTuple):
  """State of :class:`MultiSteps`: ``optax.MultiStepsState`` plus a key.

  The first five fields have the names, meaning and order of
  ``optax.MultiStepsState``.

  Attributes:
    mini_step: micro-steps accumulated in the current cycle (``int32``).
    gradient_step: inner optimizer updates so far; also the index of the
      accumulation cycle, which selects its projection (``int32``).
    inner_opt_state: the state of the wrapped optimizer.
    acc_grads: per leaf, the accumulated sketch (compressed leaves, shape
      ``r×max(n, m)`` for ``side='smaller'``) or the dense accumulator (other
      leaves), in ``accumulator_dtype``; with ``bits`` set, a
      :class:`QuantizedArray` for every leaf of at least
      ``min_quantized_size`` entries.
    skip_state: what ``should_skip_update_fn`` returned last (``()`` without
      one).
    key: raw ``uint32`` key data the projections derive from.
  """

  mini_step: jax.Array  # shape=(), dtype=jnp.int32
  gradient_step: jax.Array  # shape=(), dtype=jnp.int32
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any = ()
  key: jax.Array | None = None  # shape=(2,), dtype=jnp.uint32; set by init.


def _add(acc: jax.Array, c: jax.Array, n: Any, use_grad_mean: bool):
  """One micro-gradient's sketch ``c`` added to a float accumulator."""
  if use_grad_mean:
    # Welford's running mean, as optax.MultiSteps: stable in low precision.
    return acc + (c - acc) / (n + 1)
  return acc + c


def _accumulate(leaves: Leaves, ps, grads, accs, n,
                use_grad_mean: bool) -> list[Any]:
  """Adds one micro-gradient's sketches to the float accumulators.

  Shared by :class:`MultiSteps` and :func:`accumulate_gradients`, which
  therefore agree bit for bit.
  """
  cs = leaves.compress(grads, ps)
  return [_add(acc, c, n, use_grad_mean) for c, acc in zip(cs, accs)]


def _accumulate_stored(leaves: Leaves, ps, grads, stored, n,
                       use_grad_mean: bool, dtype: Any,
                       key: jax.Array | None) -> list[Any]:
  """:func:`_accumulate` from and to stored accumulators, leaf after leaf
  (:func:`_engine.map_leaves`: a quantized one is decoded once the previous
  one is encoded again, so that one float32 copy is alive at a time)."""

  def step(order, i, c, s):
    acc = _add(order.load(s, leaves.dtypes[i]), c, n, use_grad_mean)
    return (order.store(leaves.store_one(i, acc, dtype, key)),)

  return _engine.map_leaves(step, leaves.compress(grads, ps), stored,
                            outputs=1)[0]


def _cast_dtypes(new: Any, old: Any) -> Any:
  """Casts ``new``'s leaves to ``old``'s dtypes (keeps ``lax.cond`` types)."""

  def f(n, o):
    if (hasattr(n, 'dtype') and hasattr(o, 'dtype') and n.dtype != o.dtype and
        not jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key)):
      return jnp.astype(n, o.dtype)
    return n

  return jax.tree.map(f, new, old)


def _zero_updates(inner, updates, inner_state, params) -> Any:
  """Zeros shaped like the inner optimizer's updates (only traced)."""
  shapes, _ = jax.eval_shape(inner, updates, inner_state, params)
  return _leaves.zeros_of(shapes)


# Measured (docs/benchmarks/quality.md, "Quantized states"): an accumulator
# adds K comparable terms, and nearest rounding of each partial mean biases
# the sum; stochastic rounding keeps it unbiased.
DEFAULT_ACCUMULATOR_ROUNDING = True


def _rounding_key(quantizer, key_data, cycle, micro_step, impl):
  """The stochastic-rounding key of one micro-step of one cycle (None when
  nothing is rounded at random)."""
  if quantizer is None or not quantizer.stochastic_rounding:
    return None
  k = _keys.cycle_key(key_data, cycle, 'accumulation_rounding', impl=impl)
  return jax.random.fold_in(k, micro_step)


def _never_skip(*unused_args, **unused_kwargs):
  return jnp.array(False, dtype=jnp.bool_), ()


class MultiSteps:
  r"""``optax.MultiSteps`` with a compressed accumulator (Flora Algorithm 1).

  Accumulates the gradients of ``k`` micro-steps and hands their mean (or sum)
  to the wrapped optimizer ``opt`` on the ``k``-th; the other micro-steps
  return zero updates. It has ``optax.MultiSteps``'s constructor arguments,
  methods (``init``, ``update``, ``has_updated``, ``gradient_transformation``),
  state field names and step semantics, so a user swaps one line::

    tx = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=8)
    tx = flora_optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=8,
                                rank=128)

  Two differences. **Memory:** the accumulator of a compressed ``n×m``
  matrix is a sketch of ``r·max(n, m)`` numbers (``side='smaller'``) instead
  of ``n·m``, or with ``rank=None, bits=8`` the dense accumulator in 8-bit
  codes; vectors, scalars and matrices whose compressed axis is ``≤ rank``
  are accumulated exactly. At the end of cycle ``j`` (``gradient_step``) the
  inner optimizer receives ``decompress_j`` of the sketch, an unbiased
  estimate, with a fresh projection each cycle. **Compute:** the inner
  optimizer runs only on the last micro-step of a cycle, inside
  ``lax.cond`` (``optax.MultiSteps`` runs it on every micro-step); each
  micro-step costs one ``O(n·m·r)`` projection per compressed matrix instead.
  See the documentation's pages :doc:`/howto/accumulation`
  (``docs/howto/accumulation.md``) and :doc:`/explain/flora`.

  Args:
    opt: the wrapped optimizer (an ``optax.GradientTransformation``).
    every_k_schedule: micro-steps per update: a positive int, or a callable
      ``gradient_step -> int`` (e.g. to grow the batch over training).
    rank: the rank ``r``: a positive int, or a callable ``(path, leaf) -> int
      | None`` (see :class:`Projector`); ``None`` projects no leaf (the
      accumulator of ``optax.MultiSteps``, quantized with ``bits``).
    key: an int seed, a typed key or raw ``uint32`` key data.
    use_grad_mean: average the micro-gradients (``True``) or sum them.
    should_skip_update_fn: as in ``optax.MultiSteps``, e.g.
      ``optax.skip_not_finite``: a rejected micro-step leaves the state
      untouched (except ``skip_state``) and returns zero updates.
    accumulator_dtype: dtype of the stored accumulators (float32 by default).
    projection: ``'gaussian'``, ``'rademacher'`` or ``'orthogonal'``.
    side: ``'smaller'`` or ``'larger'``, the matrix axis to compress.
    dimension_numbers: the matrix view of higher-rank leaves (see
      :class:`Projector`).
    bits: ``None`` (float accumulators in ``accumulator_dtype``), ``8`` or
      ``4``: keep the accumulator (the sketch, or with ``rank=None`` the
      dense accumulator, as ``optax.MultiSteps`` keeps) in block-wise 8- or
      4-bit codes with one float32 scale per block along the last axis. Each
      micro-step decodes it, adds the micro-gradient in float32 and encodes
      it again.
    block_size: entries per block; ``None``: 256 for 8 bits, 64 for 4.
    code_map: the map of the codes (:func:`code_values`); ``None``:
      ``'sqrt'`` for 8 bits, ``'cubic'`` for 4.
    min_quantized_size: leaves whose accumulator has fewer entries stay in
      ``accumulator_dtype``; ``None``: 4096.
    stochastic_rounding: round codes at random, unbiased in value (noise from
      ``key``, the cycle and the micro-step); ``None``: on (an accumulator
      sums its rounding errors).

  Raises:
    TypeError: when built, if ``opt`` is not an optax transformation,
      ``every_k_schedule`` is neither an int nor a callable,
      ``should_skip_update_fn`` is not callable, or ``rank``, ``key``,
      ``use_grad_mean``, ``accumulator_dtype``, ``dimension_numbers``,
      ``bits`` or a quantization keyword has the wrong type; at ``init``,
      for a leaf that is not a real floating array, naming it.
    ValueError: when built, for ``every_k_schedule < 1``, ``rank < 1``, an
      unknown ``projection`` or ``side``, ``bits`` other than None, 8 or 4,
      a quantization keyword without ``bits``; at ``init``, for a callable's
      rank above a leaf's compressed axis or ``dimension_numbers`` that do
      not fit a leaf; at ``update``, for updates that do not match the params
      of ``init`` (naming the leaf) or a ``should_skip_update_fn`` that does
      not return a boolean scalar.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros((32,))}
    >>> tx = flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2, rank=4)
    >>> state = tx.init(params)
    >>> jax.tree.map(jnp.shape, state.acc_grads)
    {'b': (32,), 'w': (64, 4)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> step = jax.jit(tx.update)
    >>> updates, state = step(grads, state, params)
    >>> bool(tx.has_updated(state)), float(jnp.abs(updates['w']).max())
    (False, 0.0)
    >>> updates, state = step(grads, state, params)
    >>> bool(tx.has_updated(state)), updates['b'][:2]
    (True, Array([-0.1, -0.1], dtype=float32))

    ``optax.MultiSteps`` with an 8-bit accumulator (no projection):

    >>> tx = flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2,
    ...                             rank=None, bits=8, min_quantized_size=0)
    >>> tx.init(params).acc_grads['w'].codes.dtype
    dtype('int8')

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: int | Callable[[jax.typing.ArrayLike],
                                       jax.typing.ArrayLike],
      *,
      rank: int | RankFn,
      key: KeyLike = 0,
      use_grad_mean: bool = True,
      should_skip_update_fn: Callable[..., Any] | None = None,
      accumulator_dtype: jax.typing.DTypeLike = jnp.float32,
      projection: Projection = 'gaussian',
      side: Side = 'smaller',
      dimension_numbers: DimensionNumbersSpec = None,
      bits: int | None = None,
      block_size: int | None = None,
      code_map: str | None = None,
      min_quantized_size: int | None = None,
      stochastic_rounding: bool | None = None,
  ):
    _checks.check_transformation(opt, 'opt')
    _checks.check_every_k_schedule(every_k_schedule)
    _checks.check_bool(use_grad_mean, 'use_grad_mean')
    if should_skip_update_fn is not None:
      _checks.check_callable(
          should_skip_update_fn, 'should_skip_update_fn',
          'None or a callable (updates, gradient_step, params) -> (bool, '
          'state)')
    # The PRNG implementation is fixed here, at construction.
    self._impl = _keys.key_impl(key)
    self._key = key
    self._projector = Projector(rank, projection=projection, side=side,
                                dimension_numbers=dimension_numbers)
    self._opt = optax.with_extra_args_support(opt)
    if callable(every_k_schedule):
      self._every_k_schedule = every_k_schedule
    else:
      k = int(every_k_schedule)
      self._every_k_schedule = lambda step: k
    self._use_grad_mean = use_grad_mean
    self._skip_given = should_skip_update_fn is not None
    self._should_skip_update_fn = should_skip_update_fn or _never_skip
    self._accumulator_dtype = _checks.check_float_dtype(accumulator_dtype,
                                                        'accumulator_dtype')
    self._quantizer = _leaves.quantizer(
        bits, block_size, code_map, min_quantized_size, stochastic_rounding,
        default_rounding=DEFAULT_ACCUMULATOR_ROUNDING)

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer (with extra-args support, as optax's)."""
    return self._opt

  @property
  def projector(self) -> Projector:
    """The :class:`Projector` that compresses the accumulator."""
    return self._projector

  def init(self, params: optax.Params) -> MultiStepsState:
    """Builds the initial :class:`MultiStepsState` (sketches are zeros).

    Args:
      params: the parameters (arrays or ``jax.ShapeDtypeStruct`` objects
        under ``jax.eval_shape``).

    Returns:
      The state: counters at zero, zero accumulators (sketches, codes or
      float), the inner optimizer's ``init(params)`` and the key data.
    """
    gradient_step = jnp.zeros([], dtype=jnp.int32)
    _, skip_state = self._should_skip_update_fn(
        optax.tree.zeros_like(params), gradient_step, params)
    return MultiStepsState(
        mini_step=jnp.zeros([], dtype=jnp.int32),
        gradient_step=gradient_step,
        inner_opt_state=self._opt.init(params),
        acc_grads=_leaves.sketch_zeros(self._projector, params,
                                       self._accumulator_dtype,
                                       self._quantizer),
        skip_state=skip_state,
        # From the user's key, made here: under an Explicit mesh an int seed
        # then gives replicated key data, as every other state leaf.
        key=_keys.key_data(self._key, self._impl),
    )

  def update(
      self,
      updates: optax.Updates,
      state: MultiStepsState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, MultiStepsState]:
    """Accumulates ``updates``; runs the inner optimizer every ``k`` calls.

    Args:
      updates: this micro-step's gradients, with the structure and shapes of
        the params given to :meth:`init`.
      state: the current :class:`MultiStepsState`.
      params: the current parameters (passed to the inner optimizer and to
        ``should_skip_update_fn``; also used to check the updates' shapes).
      **extra_args: passed to the inner optimizer's ``update``.

    Returns:
      ``(updates, state)``: zeros on every micro-step but the cycle's last,
      which returns the inner optimizer's update of the decompressed mean
      (or sum) gradient.
    """
    k_steps = self._every_k_schedule(state.gradient_step)
    should_skip, skip_state = self._should_skip_update_fn(
        updates, state.gradient_step, params)
    should_skip = jnp.asarray(should_skip)
    _checks.check_skip_result(should_skip)
    leaves = Leaves.of(self._projector, updates, quantizer=self._quantizer)
    leaves.check_state(state.acc_grads, 'gradient accumulator', params)

    # updates and params are arguments of the branches, not captured by
    # them (as in optax.MultiSteps, so that XLA can reuse their buffers).
    def inner(g, inner_state, params):
      return self._opt.update(g, inner_state, params, **extra_args)

    def micro_step(updates, state, params):
      return self._micro_step(leaves, updates, state, params, k_steps,
                              skip_state, inner)

    if not self._skip_given:
      return micro_step(updates, state, params)

    def skip(updates, state, params):
      return (_zero_updates(inner, updates, state.inner_opt_state, params),
              state._replace(skip_state=skip_state))

    return jax.lax.cond(should_skip, skip, micro_step, updates, state, params)

  def _micro_step(self, leaves: Leaves, updates, state: MultiStepsState,
                  params, k_steps, skip_state, inner):
    """Adds ``updates`` to the accumulator; on the cycle's last micro-step
    hands the decompressed mean to the inner optimizer."""
    acc_dtype = self._accumulator_dtype
    # Drawn once, for compression and decompression.
    ps = leaves.draw(_keys.cycle_key(state.key, state.gradient_step,
                                     'accumulation', impl=self._impl))
    rounding = _rounding_key(self._quantizer, state.key, state.gradient_step,
                             state.mini_step, self._impl)
    emit = state.mini_step == k_steps - 1

    def emit_update(updates, stored, inner_state, params):
      accs = _accumulate(leaves, ps, leaves.flatten(updates),
                         leaves.load(stored), state.mini_step,
                         self._use_grad_mean)
      mean = leaves.unflatten(leaves.decompress(accs, ps))
      new_updates, new_inner = inner(optax.tree.cast_like(mean, updates),
                                     inner_state, params)
      # Zero codes and scales, or float zeros: what storing zeros gives,
      # without encoding constants (XLA would fold them, slowly).
      zeros = [jax.tree.map(jnp.zeros_like, s) for s in stored]
      return new_updates, _cast_dtypes(new_inner, inner_state), zeros

    def hold(updates, stored, inner_state, params):
      # Accumulated and stored inside the branch: the float accumulators
      # of every leaf are never operands of the cond at once.
      return (_zero_updates(inner, updates, inner_state, params), inner_state,
              _accumulate_stored(leaves, ps, leaves.flatten(updates), stored,
                                 state.mini_step, self._use_grad_mean,
                                 acc_dtype, rounding))

    # The inner optimizer runs on the last micro-step only.
    new_updates, new_inner, new_accs = jax.lax.cond(
        emit, emit_update, hold, updates, leaves.flatten(state.acc_grads),
        state.inner_opt_state, params)
    return new_updates, MultiStepsState(
        mini_step=optax.safe_increment(state.mini_step) % k_steps,
        gradient_step=jnp.where(emit,
                                optax.safe_increment(state.gradient_step),
                                state.gradient_step),
        inner_opt_state=new_inner,
        acc_grads=leaves.unflatten(new_accs),
        skip_state=skip_state,
        key=state.key,
    )

  def has_updated(self, state: MultiStepsState | Any) -> jax.Array:
    """Whether the last call to :meth:`update` ran the inner optimizer.

    Args:
      state: the state that call returned.

    Returns:
      A boolean scalar array.
    """
    return jnp.logical_and(
        getattr(state, 'mini_step') == 0,
        getattr(state, 'gradient_step') > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """``init`` and ``update`` as an optax transformation (as optax's)."""
    return optax.GradientTransformationExtraArgs(
        init=self.init, update=self.update)


def accumulate_gradients(
    grad_fn: Callable[..., Any],
    params: optax.Params,
    micro_batches: Any,
    *,
    projector: Projector,
    step: jax.typing.ArrayLike,
    key: KeyLike = 0,
    use_grad_mean: bool = True,
    accumulator_dtype: jax.typing.DTypeLike = jnp.float32,
    has_aux: bool = False,
    bits: int | None = None,
    block_size: int | None = None,
    code_map: str | None = None,
    min_quantized_size: int | None = None,
    stochastic_rounding: bool | None = None,
) -> Any:
  r"""Accumulates micro-batch gradients as sketches in a ``lax.scan``.

  The custom-loop form of :class:`MultiSteps`: call it inside a jitted train
  step to turn ``k`` micro-batches into one (mean) gradient while only the
  sketches (``r·max(n, m)`` per compressed matrix for ``side='smaller'``)
  persist across micro-batches; each full-size micro-gradient is a temporary
  of one scan iteration, and the result is decompressed once at the end.

  For the same ``key`` and ``step == gradient_step``, the result equals the
  gradient that ``MultiSteps(..., rank=projector.rank, key=key,
  projection=projector.projection, side=projector.side,
  dimension_numbers=projector.dimension_numbers)`` hands its inner optimizer
  after the same micro-gradients (bit for bit with a float32 accumulator).

  Prefer this form when you write the train step yourself: the optimizer sees
  one update per step, and neither a micro-step state nor zero updates exist.
  Prefer :class:`MultiSteps` to keep a one-optimizer-call-per-batch loop (e.g.
  a Flax ``TrainState``), or when micro-batches arrive one call at a time.

  Args:
    grad_fn: ``(params, batch) -> grads``, or ``-> (grads, aux)`` with
      ``has_aux=True`` (e.g. ``jax.grad(loss_fn, has_aux=True)``).
    params: the parameters, passed to ``grad_fn`` unchanged.
    micro_batches: a pytree whose leaves share a leading axis of size ``k``;
      slice ``i`` is micro-batch ``i``.
    projector: the :class:`Projector` (rank, projection, side, matrix view).
    step: the cycle index (e.g. the optimizer's step count): each value gives
      fresh projections. Reusing one value confines every update to one
      random subspace.
    key: an int seed, a typed key or raw ``uint32`` key data.
    use_grad_mean: return the mean (``True``) or the sum of the gradients.
    accumulator_dtype: dtype of the sketches carried through the scan.
    has_aux: whether ``grad_fn`` returns ``(grads, aux)``.
    bits: ``None`` (float sketches in ``accumulator_dtype``), ``8`` or ``4``:
      carry the accumulators through the scan as block-wise codes (see
      :class:`MultiSteps`).
    block_size: see :class:`MultiSteps`.
    code_map: see :class:`MultiSteps`.
    min_quantized_size: see :class:`MultiSteps`.
    stochastic_rounding: see :class:`MultiSteps` (``None``: on).

  Returns:
    The decompressed mean (or sum) gradient, in the dtypes ``grad_fn``
    returns; with ``has_aux=True``, ``(grads, aux)`` where ``aux`` is stacked
    over micro-batches.

  Raises:
    TypeError: if ``grad_fn`` is not callable, ``projector`` is not a
      :class:`Projector`, or ``key``, ``use_grad_mean``,
      ``accumulator_dtype``, ``bits`` or a quantization keyword has the wrong
      type; for a leaf of ``params`` that is not a real floating array.
    ValueError: if the leaves of ``micro_batches`` do not share a leading
      axis of size at least 1, ``bits`` is not None, 8 or 4, a quantization
      keyword is given without ``bits``, or a leaf does not fit the
      projector's rank or ``dimension_numbers`` (naming it).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.zeros((16, 8))}
    >>> loss = lambda p, b: jnp.mean((b['x'] @ p['w'] - b['y']) ** 2)
    >>> batches = {'x': jnp.ones((4, 32, 16)), 'y': jnp.ones((4, 32, 8))}
    >>> tx = optax.sgd(0.1)
    >>> @jax.jit
    ... def train_step(params, opt_state, batches, step):
    ...   grads = flora_optax.accumulate_gradients(
    ...       jax.grad(loss), params, batches, step=step, key=0,
    ...       projector=flora_optax.Projector(rank=4))
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> opt_state = tx.init(params)
    >>> params, opt_state = train_step(params, opt_state, batches, 0)
    >>> params['w'].shape
    (16, 8)

  References:
    Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient
    Compressors <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """
  _checks.check_callable(grad_fn, 'grad_fn', 'callable')
  if not isinstance(projector, Projector):
    raise TypeError('`projector` must be a flora_optax.Projector, got '
                    f'{type(projector).__name__}.')
  _checks.check_bool(use_grad_mean, 'use_grad_mean')
  acc_dtype = _checks.check_float_dtype(accumulator_dtype, 'accumulator_dtype')
  quantizer = _leaves.quantizer(
      bits, block_size, code_map, min_quantized_size, stochastic_rounding,
      default_rounding=DEFAULT_ACCUMULATOR_ROUNDING)
  key = _keys.typed_key(key)
  k = _checks.check_micro_batches(micro_batches)

  first = jax.tree.map(lambda x: x[0], micro_batches)
  out_shapes = jax.eval_shape(grad_fn, params, first)
  grad_shapes = out_shapes[0] if has_aux else out_shapes
  leaves = Leaves.of(projector, grad_shapes, quantizer=quantizer)
  # Drawn once, outside the loop, and shared by every micro-batch.
  ps = leaves.draw(_keys.cycle_key(key, step, 'accumulation'))

  def add(accs, n, batch):
    out = grad_fn(params, batch)
    grads, aux = out if has_aux else (out, None)
    accs = _accumulate(leaves, ps, leaves.flatten(grads), leaves.load(accs),
                       n, use_grad_mean)
    return accs, aux

  def body(stored, xs):
    n, batch = xs
    out = grad_fn(params, batch)
    grads, aux = out if has_aux else (out, None)
    return _accumulate_stored(
        leaves, ps, leaves.flatten(grads), stored, n, use_grad_mean,
        acc_dtype, _rounding_key(quantizer, key, step, n, None)), aux

  accs0 = leaves.flatten(_leaves.sketch_zeros(projector, grad_shapes,
                                              acc_dtype, quantizer))
  steps = (jnp.arange(k, dtype=jnp.int32), micro_batches)
  if quantizer is None:
    accs, aux = jax.lax.scan(body, accs0, steps)
  else:
    # The last micro-batch is added in float and not stored, as in
    # MultiSteps (which hands this float mean to its inner optimizer).
    accs, aux = jax.lax.scan(body, accs0,
                             jax.tree.map(lambda x: x[:-1], steps))
    accs, last = add(accs, *jax.tree.map(lambda x: x[-1], steps))
    if has_aux:
      aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), aux,
                         last)
  accs = leaves.load(accs)
  grads = [jnp.astype(g, x.dtype) for g, x in zip(
      leaves.decompress(accs, ps), leaves.flatten(grad_shapes))]
  grads = leaves.unflatten(grads)
  return (grads, aux) if has_aux else grads
