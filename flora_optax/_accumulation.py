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
import numpy as np
import optax

from flora_optax import _keys
from flora_optax import _projection
from flora_optax._projection import (DimensionNumbersSpec, Projection, RankFn,
                                     Side)


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
      leaves), in ``accumulator_dtype``.
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


# --- per-leaf primitives shared by MultiSteps and accumulate_gradients -------
# Both forms go through these, so they agree bit for bit. Projections are drawn
# once per update and reused for compression and decompression.


def _flat(projector: _projection.Projector, tree: Any):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [p for p, _ in leaves]
  plans = jax.tree.leaves(projector.plan(tree),
                          is_leaf=lambda x: isinstance(x, _projection.LeafPlan))
  return paths, plans, [x for _, x in leaves], treedef


def _compute_dtype(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _draw(projector, paths, plans, likes, cycle_key) -> list[Any]:
  """The projection of every compressed leaf (``None`` for dense leaves)."""
  items = [(path, pl, _compute_dtype(x.dtype))
           for path, pl, x in zip(paths, plans, likes)]
  return _projection.draw_projections(items, cycle_key, projector.projection)


def _accumulate(plans, ps, grads, accs, n, use_grad_mean: bool) -> list[Any]:
  """Adds one micro-gradient to the accumulators (Welford mean or sum)."""
  out = []
  for pl, p, g, acc in zip(plans, ps, grads, accs):
    c = g if pl.dense else pl.compress(g.astype(p.dtype), p,
                                       _projection.explicit_sharding(g))
    if use_grad_mean:
      # Welford's running mean, as optax.MultiSteps: stable in low precision.
      out.append(acc + (c - acc) / (n + 1))
    else:
      out.append(acc + c)
  return out


def _decompress(plans, ps, accs, likes) -> list[Any]:
  return [
      acc if pl.dense else pl.decompress(acc.astype(p.dtype), p,
                                         _projection.explicit_sharding(x))
      for pl, p, acc, x in zip(plans, ps, accs, likes)
  ]


def _sketch_zeros(projector, tree: Any, dtype) -> Any:
  plans = projector.plan(tree)
  zeros = jax.tree.map(lambda pl, x: _projection.sketch_zeros(pl, x, dtype),
                       plans, tree)
  # Flax NNX: sketches must not inherit their params' sharding names.
  return _projection.fit_nnx_metadata(tree, zeros, plans)


def _zeros_of(shape: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of a traced shape, keeping its sharding on an Explicit mesh."""
  sharding = _projection.explicit_sharding(shape)
  if sharding is None:
    return jnp.zeros(shape.shape, shape.dtype)
  return jnp.zeros(shape.shape, shape.dtype, out_sharding=sharding)


def _cast_dtypes(new: Any, old: Any) -> Any:
  """Casts ``new``'s leaves to ``old``'s dtypes (keeps ``lax.cond`` types)."""

  def f(n, o):
    if (hasattr(n, 'dtype') and hasattr(o, 'dtype') and n.dtype != o.dtype and
        not jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key)):
      return jnp.astype(n, o.dtype)
    return n

  return jax.tree.map(f, new, old)


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

  Two differences:

  * **Memory.** The accumulator of a compressed ``n×m`` matrix is the sketch
    ``S = Σ_i g_i P_jᵀ`` (or ``P_j g_i``): ``r·max(n, m)`` numbers with
    ``side='smaller'`` (``r·min(n, m)`` with ``'larger'``) instead of ``n·m``.
    Vectors, scalars and matrices whose compressed axis is ``≤ rank`` are
    accumulated densely, exactly as ``optax.MultiSteps`` does. At the end of
    cycle ``j`` the inner optimizer receives ``decompress_j(S)``, an unbiased
    estimate of the accumulated gradient. Cycle ``j`` (``gradient_step``) uses
    its own projection ``P_j``, so successive updates are not confined to one
    subspace.
  * **Compute.** The inner optimizer runs only on the last micro-step of a
    cycle, inside ``lax.cond``; ``optax.MultiSteps`` runs it on every
    micro-step and selects the result. Each micro-step instead costs one
    projection ``O(n·m·r)`` per compressed matrix, and the last one a
    decompression of the same cost.

  Args:
    opt: the wrapped optimizer (an ``optax.GradientTransformation``).
    every_k_schedule: micro-steps per update: a positive int, or a callable
      ``gradient_step -> int`` (e.g. to grow the batch over training).
    rank: the rank ``r``: a positive int, or a callable ``(path, leaf) -> int
      | None`` (see :class:`Projector`).
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
      key: Any = 0,
      use_grad_mean: bool = True,
      should_skip_update_fn: Callable[..., Any] | None = None,
      accumulator_dtype: jax.typing.DTypeLike = jnp.float32,
      projection: Projection = 'gaussian',
      side: Side = 'smaller',
      dimension_numbers: DimensionNumbersSpec = None,
  ):
    if not (hasattr(opt, 'init') and hasattr(opt, 'update') and
            callable(opt.init) and callable(opt.update)):
      raise TypeError('`opt` must be an optax.GradientTransformation (with '
                      f'init and update), got {type(opt).__name__}.')
    if isinstance(every_k_schedule, bool) or not (
        isinstance(every_k_schedule, (int, np.integer)) or
        callable(every_k_schedule)):
      raise TypeError('`every_k_schedule` must be a positive int or a callable '
                      f'gradient_step -> int, got {every_k_schedule!r}.')
    if not callable(every_k_schedule) and every_k_schedule < 1:
      raise ValueError('`every_k_schedule` must be a positive int, got '
                       f'{every_k_schedule}.')
    if not isinstance(use_grad_mean, bool):
      raise TypeError(f'`use_grad_mean` must be a bool, got {use_grad_mean!r}.')
    if should_skip_update_fn is not None and not callable(
        should_skip_update_fn):
      raise TypeError('`should_skip_update_fn` must be None or a callable '
                      '(updates, gradient_step, params) -> (bool, state), got '
                      f'{should_skip_update_fn!r}.')
    # A typed key: the PRNG implementation is fixed here, at construction.
    self._key = _keys.typed_key(key)
    self._user_key = key
    self._projector = _projection.Projector(
        rank, projection=projection, side=side,
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
    self._accumulator_dtype = _projection.check_float_dtype(accumulator_dtype,
                                                   'accumulator_dtype')

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    return self._opt

  @property
  def projector(self) -> _projection.Projector:
    """The :class:`Projector` that compresses the accumulator."""
    return self._projector

  def init(self, params: optax.Params) -> MultiStepsState:
    """Builds the initial :class:`MultiStepsState` (sketches are zeros)."""
    gradient_step = jnp.zeros([], dtype=jnp.int32)
    _, skip_state = self._should_skip_update_fn(
        optax.tree.zeros_like(params), gradient_step, params)
    return MultiStepsState(
        mini_step=jnp.zeros([], dtype=jnp.int32),
        gradient_step=gradient_step,
        inner_opt_state=self._opt.init(params),
        acc_grads=_sketch_zeros(self._projector, params,
                                self._accumulator_dtype),
        skip_state=skip_state,
        # From the user's key, made here: under an Explicit mesh an int seed
        # then gives replicated key data, as every other state leaf.
        key=_keys.key_data(self._user_key, self._key),
    )

  def update(
      self,
      updates: optax.Updates,
      state: MultiStepsState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, MultiStepsState]:
    """Accumulates ``updates``; runs the inner optimizer every ``k`` calls."""
    k_steps = self._every_k_schedule(state.gradient_step)
    should_skip, skip_state = self._should_skip_update_fn(
        updates, state.gradient_step, params)
    should_skip = jnp.asarray(should_skip)
    if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          'The `should_skip_update_fn` function should return a boolean scalar '
          f'array, but it returned an array of dtype {should_skip.dtype} and '
          f'shape {should_skip.shape}.')
    acc_dtype = self._accumulator_dtype
    paths, plans, grads, treedef = _flat(self._projector, updates)
    _projection.check_sketches(self._projector.plan(updates), state.acc_grads,
                               'gradient accumulator', params)

    def inner(g, inner_state):
      return self._opt.update(g, inner_state, params, **extra_args)

    def zero_updates():
      # Only shapes are traced here; the inner update does not run.
      shapes, _ = jax.eval_shape(inner, updates, state.inner_opt_state)
      return jax.tree.map(_zeros_of, shapes)

    def do_update(state):
      cycle_key = _keys.cycle_key(state.key, state.gradient_step,
                                  'accumulation', impl=self._key)
      ps = _draw(self._projector, paths, plans, grads, cycle_key)
      accs = _accumulate(plans, ps, grads, treedef.flatten_up_to(
          state.acc_grads), state.mini_step, self._use_grad_mean)
      emit = state.mini_step == k_steps - 1

      def boundary(accs, inner_state):
        mean = treedef.unflatten(_decompress(plans, ps, accs, grads))
        new_updates, new_inner = inner(
            optax.tree.cast_like(mean, updates), inner_state)
        zeros = [jnp.zeros_like(a, acc_dtype) for a in accs]
        return new_updates, _cast_dtypes(new_inner, inner_state), zeros

      def micro(accs, inner_state):
        return (zero_updates(), inner_state,
                [jnp.astype(a, acc_dtype) for a in accs])

      # The inner optimizer runs on the last micro-step only.
      new_updates, new_inner, new_accs = jax.lax.cond(
          emit, boundary, micro, accs, state.inner_opt_state)
      new_state = MultiStepsState(
          mini_step=optax.safe_increment(state.mini_step) % k_steps,
          gradient_step=jnp.where(emit,
                                  optax.safe_increment(state.gradient_step),
                                  state.gradient_step),
          inner_opt_state=new_inner,
          acc_grads=treedef.unflatten(new_accs),
          skip_state=skip_state,
          key=state.key,
      )
      return new_updates, new_state

    if not self._skip_given:
      return do_update(state)

    def skip_update(state):
      return zero_updates(), state._replace(skip_state=skip_state)

    return jax.lax.cond(should_skip, skip_update, do_update, state)

  def has_updated(self, state: MultiStepsState | Any) -> jax.Array:
    """Whether the last call to :meth:`update` ran the inner optimizer."""
    return jnp.logical_and(
        getattr(state, 'mini_step') == 0,
        getattr(state, 'gradient_step') > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(
        init=self.init, update=self.update)


def accumulate_gradients(
    grad_fn: Callable[..., Any],
    params: optax.Params,
    micro_batches: Any,
    *,
    projector: _projection.Projector,
    step: jax.typing.ArrayLike,
    key: Any = 0,
    use_grad_mean: bool = True,
    accumulator_dtype: jax.typing.DTypeLike = jnp.float32,
    has_aux: bool = False,
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

  Returns:
    The decompressed mean (or sum) gradient, in the dtypes ``grad_fn``
    returns; with ``has_aux=True``, ``(grads, aux)`` where ``aux`` is stacked
    over micro-batches.

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
  if not callable(grad_fn):
    raise TypeError(f'`grad_fn` must be callable, got {grad_fn!r}.')
  if not isinstance(projector, _projection.Projector):
    raise TypeError('`projector` must be a flora_optax.Projector, got '
                    f'{type(projector).__name__}.')
  if not isinstance(use_grad_mean, bool):
    raise TypeError(f'`use_grad_mean` must be a bool, got {use_grad_mean!r}.')
  acc_dtype = _projection.check_float_dtype(accumulator_dtype,
                                                   'accumulator_dtype')
  key = _keys.typed_key(key)
  sizes = {np.shape(x)[0] if np.ndim(x) else None
           for x in jax.tree.leaves(micro_batches)}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise ValueError(
        '`micro_batches` must be a non-empty pytree whose leaves share a '
        f'leading (micro-batch) axis of size >= 1; got leading sizes {sizes}.')
  (k,) = sizes

  first = jax.tree.map(lambda x: x[0], micro_batches)
  out_shapes = jax.eval_shape(grad_fn, params, first)
  grad_shapes = out_shapes[0] if has_aux else out_shapes
  paths, plans, likes, treedef = _flat(projector, grad_shapes)
  cycle_key = _keys.cycle_key(key, step, 'accumulation')
  # Drawn once, outside the loop, and shared by every micro-batch.
  ps = _draw(projector, paths, plans, likes, cycle_key)

  def body(accs, xs):
    n, batch = xs
    out = grad_fn(params, batch)
    grads, aux = out if has_aux else (out, None)
    accs = _accumulate(plans, ps, treedef.flatten_up_to(grads), accs, n,
                       use_grad_mean)
    return [jnp.astype(a, acc_dtype) for a in accs], aux

  accs0 = [_projection.sketch_zeros(pl, x, acc_dtype)
           for pl, x in zip(plans, likes)]
  accs, aux = jax.lax.scan(body, accs0,
                           (jnp.arange(k, dtype=jnp.int32), micro_batches))
  grads = [
      jnp.astype(g, x.dtype)
      for g, x in zip(_decompress(plans, ps, accs, likes), likes)
  ]
  grads = treedef.unflatten(grads)
  return (grads, aux) if has_aux else grads
