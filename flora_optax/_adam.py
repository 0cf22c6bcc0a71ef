# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Adam and AdamW with both moments in block-wise 8- or 4-bit codes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flora_optax import _checks
from flora_optax import _engine
from flora_optax import _keys
from flora_optax import _leaves
from flora_optax._projector import Projector
from flora_optax._types import KeyLike

# Measured (docs/benchmarks/quality.md, "AdamW in 8 and 4 bits";
# benchmarks.quality's adamw rows): the second moment is stored as codes of
# ``sqrt(v)`` that exclude zero (``'sqrt'``); a linear map of ``v`` itself
# loses its small entries.
DEFAULT_NU_CODE_MAP = 'sqrt'


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam` with ``bits`` set.

  Attributes:
    count: number of updates so far (``int32``, saturating).
    key: raw ``uint32`` key data the noise of stochastic rounding derives
      from (unused without it).
    mu: per leaf the first moment: a :class:`QuantizedArray` of signed codes
      for leaves of at least ``min_quantized_size`` entries, else float (in
      ``mu_dtype``, default the leaf's dtype).
    nu: per leaf the second moment: a :class:`QuantizedArray` of unsigned
      codes that exclude zero, or float in the leaf's dtype.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  key: jax.Array  # shape=(2,), dtype=jnp.uint32
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    bits: int | None = None,
    block_size: int | None = None,
    code_map: str | None = None,
    nu_code_map: str = DEFAULT_NU_CODE_MAP,
    min_quantized_size: int | None = None,
    stochastic_rounding: bool = False,
    key: KeyLike = 0,
) -> optax.GradientTransformation:
  r"""``optax.scale_by_adam`` whose two moments may be 8- or 4-bit codes.

  With ``bits=None`` this *is* ``optax.scale_by_adam`` (the same function
  called with the same arguments: same results and state). With ``bits=8``
  or ``4`` the moments ``m`` and ``v`` of every leaf of at least
  ``min_quantized_size`` entries are stored block-wise along the last axis,
  one float32 absmax per block: ``m`` in signed codes (``code_map``), ``v``
  in unsigned codes that exclude zero (``nu_code_map``). Each step decodes
  them, runs Adam's float32 math exactly as optax writes it

  .. math::
    m ← β_1 m + (1-β_1) g,\quad v ← β_2 v + (1-β_2) g^2,\quad
    u = \frac{m / (1-β_1^t)}{\sqrt{v / (1-β_2^t) + ε_{root}} + ε},

  outputs ``u`` from these float32 moments, and encodes the new ones.
  ``v``'s smallest code stands for ``absmax / 2**bits`` (``'linear'``) or
  ``absmax / 4**bits`` (``'sqrt'``: codes of ``sqrt(v)``, the default), never
  zero; an entry below it is rounded up to it. Why (Li et al.'s zero-point
  problem): the documentation's pages :doc:`/explain/quantized_format`
  (``docs/explain/quantized_format.md``) and :doc:`/howto/quantized`.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: dtype of a float first moment (``None``: the leaf's).
    nesterov: Nesterov momentum (as ``optax.scale_by_adam``).
    bits: ``None`` (``optax.scale_by_adam``), ``8`` or ``4``: store both
      moments in block-wise codes (4-bit codes packed two to a byte). Static:
      under ``optax.inject_hyperparams`` list it in ``static_args``.
    block_size: entries per block along the last axis; ``None``: 256 for 8
      bits, 64 for 4 bits.
    code_map: the first moment's map (:func:`code_values`): ``'sqrt'``,
      ``'cubic'``, ``'normal'``, ``'linear'``, ``'dynamic'`` or ``'log'``;
      ``None``: ``'sqrt'`` for 8 bits, ``'cubic'`` for 4.
    nu_code_map: the second moment's map, unsigned, excluding zero:
      ``'sqrt'`` (codes of ``sqrt(v)``, the default), ``'linear'`` (codes
      of ``v``), ``'dynamic'`` or ``'log'``.
    min_quantized_size: leaves with fewer entries stay float; ``None``: 4096.
    stochastic_rounding: round codes at random, unbiased in value, with noise
      derived from ``key`` and the step.
    key: an int seed, a typed key or raw ``uint32`` key data (the noise of
      stochastic rounding only).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    TypeError: when built, for an argument of the wrong type (``b1``,
      ``b2``, ``eps``, ``eps_root``, ``mu_dtype``, ``key``, ``nesterov``,
      ``bits`` and the quantization keywords); at ``init``, for a leaf that
      is not a real floating array, naming it.
    ValueError: when built, for ``b1`` or ``b2`` outside ``[0, 1)``, a
      negative ``eps`` or ``eps_root``, ``bits`` other than None, 8 or 4, a
      quantization keyword (``stochastic_rounding`` included) without
      ``bits``, or an unknown ``code_map`` or ``nu_code_map``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.ones((256, 512)), 'b': jnp.ones((512,))}
    >>> tx = flora_optax.scale_by_adam(bits=8)
    >>> state = tx.init(params)
    >>> state.mu['w'].codes.dtype, state.nu['w'].codes.dtype
    (dtype('int8'), dtype('uint8'))
    >>> state.mu['b'].dtype  # under 4096 entries: float
    dtype('float32')
    >>> updates, state = tx.update(params, state)
    >>> float(updates['w'][0, 0])  # m̂ / sqrt(v̂) of a constant gradient
    1.0

    With ``bits=None`` it is optax's own:

    >>> type(flora_optax.scale_by_adam().init(params)).__name__
    'ScaleByAdamState'

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.

    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

    Li, Chen and Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
  """
  _checks.check_decay(b1, 'b1')
  _checks.check_decay(b2, 'b2')
  _checks.check_nonnegative(eps, 'eps')
  _checks.check_nonnegative(eps_root, 'eps_root')
  if mu_dtype is not None:
    mu_dtype = _checks.check_float_dtype(mu_dtype, 'mu_dtype')
  _checks.check_bool(nesterov, 'nesterov')
  mu_q = _leaves.quantizer(bits, block_size, code_map, min_quantized_size,
                           stochastic_rounding)
  _checks.check_nu_code_map(nu_code_map)
  if bits is None:
    if stochastic_rounding:
      raise ValueError('`stochastic_rounding` only applies to quantized '
                       'states: pass `bits` (8 or 4) too.')
    return optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype,
                               nesterov=nesterov)
  impl = _keys.key_impl(key)
  # The same blocks and minimum size for both moments, so that a leaf's two
  # states are quantized together or not at all.
  nu_q = _leaves.quantizer(bits, mu_q.block_size, nu_code_map, mu_q.min_size,
                           stochastic_rounding, signed=False)
  # Every leaf is dense: the engine's plans without projection.
  projector = Projector(None)

  def init_fn(params: optax.Params) -> ScaleByAdamState:
    _checks.check_float_leaves(params)
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        key=_keys.key_data(key, impl),
        mu=_leaves.sketch_zeros(projector, params, mu_dtype, mu_q),
        nu=_leaves.sketch_zeros(projector, params, None, nu_q))

  def update_fn(updates, state, params=None):
    mus = _leaves.Leaves.of(projector, updates, quantizer=mu_q)
    nus = _leaves.Leaves.of(projector, updates, quantizer=nu_q)
    mus.check_state(state.mu, 'first moment state', params)
    nus.check_state(state.nu, 'second moment state', params)
    del params
    count = optax.safe_increment(state.count)
    rounding = [None, None]
    if stochastic_rounding:
      rounding = [_keys.cycle_key(state.key, count, purpose, impl=impl)
                  for purpose in ('adam_mu_rounding', 'adam_nu_rounding')]

    def step(order, i, g, mu, nu):
      g32 = g.astype(mus.dtypes[i])
      # Each moment is loaded once the previous one is stored again, so that
      # one float32 copy is alive at a time. optax's arithmetic
      # (optax.tree.update_moment and update_moment_per_elem_norm), in
      # float32.
      m = (1 - b1) * g32 + b1 * order.load(mu, mus.dtypes[i])
      new_m = order.store(mus.store_one(i, m, mu.dtype, rounding[0]))
      v = (1 - b2) * (g32 * g32) + b2 * order.load(nu, nus.dtypes[i])
      new_v = order.store(nus.store_one(i, v, nu.dtype, rounding[1]))
      out = _output(g32, m, v, count, b1, b2, eps, eps_root, nesterov)
      return out.astype(g.dtype), new_m, new_v

    outs, new_mu, new_nu = _engine.map_leaves(
        step, mus.flatten(updates), mus.flatten(state.mu),
        nus.flatten(state.nu), outputs=3)
    return mus.unflatten(outs), ScaleByAdamState(
        count=count, key=state.key, mu=mus.unflatten(new_mu),
        nu=nus.unflatten(new_nu))

  return optax.GradientTransformation(init_fn, update_fn)


def _output(g, m, v, count, b1, b2, eps, eps_root, nesterov):
  """The update from the new moments, as ``optax.scale_by_adam``."""

  def unbiased(x, decay, t):  # optax.tree.bias_correction
    return x / (1 - decay**t).astype(x.dtype)

  m_hat = unbiased(m, b1, count)
  if nesterov:
    m_hat = (b1 * unbiased(m, b1, optax.safe_increment(count)) +
             (1 - b1) * unbiased(g, b1, count))
  return m_hat / (jnp.sqrt(unbiased(v, b2, count) + eps_root) + eps)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | None = None,
    *,
    nesterov: bool = False,
    bits: int | None = None,
    block_size: int | None = None,
    code_map: str | None = None,
    nu_code_map: str = DEFAULT_NU_CODE_MAP,
    min_quantized_size: int | None = None,
    stochastic_rounding: bool = False,
    key: KeyLike = 0,
) -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` whose two moments may be 8- or 4-bit codes.

  A drop-in for ``optax.adamw``: the same arguments in the same order with
  the same defaults, plus the quantization keywords of
  :func:`scale_by_adam`. It is ``optax.chain(scale_by_adam(...),
  optax.add_decayed_weights(weight_decay, mask),
  optax.scale_by_learning_rate(learning_rate))``, as ``optax.adamw``; with
  ``bits=None`` it equals ``optax.adamw`` bit for bit, state included.

  State per parameter of a large leaf: 8 bytes for ``optax.adamw``, 2 + 8 /
  256 for ``bits=8`` (0.254×) and 1 + 8 / 64 for ``bits=4`` (0.141×).

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: dtype of a float first moment (``None``: the leaf's).
    weight_decay: decoupled weight decay, a float or a schedule.
    mask: a tree of booleans, or a callable params -> tree, selecting the
      leaves that are decayed (``optax.add_decayed_weights``).
    nesterov: Nesterov momentum.
    bits: ``None`` (``optax.adamw``), ``8`` or ``4`` (see
      :func:`scale_by_adam`; static under ``optax.inject_hyperparams``).
    block_size: entries per block; ``None``: 256 (8 bits) or 64 (4 bits).
    code_map: the first moment's map; see :func:`scale_by_adam`.
    nu_code_map: the second moment's map; see :func:`scale_by_adam`.
    min_quantized_size: leaves with fewer entries stay float; ``None``: 4096.
    stochastic_rounding: unbiased random rounding of the codes.
    key: seed of the stochastic rounding's noise.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: as :func:`scale_by_adam`.
    ValueError: as :func:`scale_by_adam`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flora_optax
    >>> params = {'w': jnp.zeros((768, 3072))}
    >>> def nbytes(state):
    ...   return sum(x.nbytes for x in jax.tree.leaves(state))
    >>> full = nbytes(optax.adamw(1e-3).init(params))
    >>> print(round(nbytes(flora_optax.adamw(1e-3, bits=8).init(params))
    ...             / full, 3))
    0.254
    >>> print(round(nbytes(flora_optax.adamw(1e-3, bits=4).init(params))
    ...             / full, 3))
    0.141

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.

    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

    Li, Chen and Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
  """
  return optax.chain(
      scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
                    bits=bits, block_size=block_size, code_map=code_map,
                    nu_code_map=nu_code_map,
                    min_quantized_size=min_quantized_size,
                    stochastic_rounding=stochastic_rounding, key=key),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
