"""Study-only prototypes for issue 29's frontier and second-moment ablation.

Nothing here is part of ``flora_optax``: these are small ``jax.numpy``
transformations that the quality study trains as rows, to measure designs
before the library builds any of them. Their states are *simulated*: codes
are held one per byte (``uint8``) and sign bits one per ``bool``, but the
bytes the study reports for them (:func:`packed_state_bytes`) are what
packed codes and their scales would take.

**Low-bit block codes of the momentum** (after SOLO, Xu et al. 2025,
arXiv:2505.00347, which trains Adam-style states at 3 and 2 bits):
:func:`block_code_momentum`. The momentum ``m = β m + (1 - β) u`` sits where
``flora_optax.flora(rank=None, bits=4)`` keeps it (optax's position, after
clipping and the learning rate); this step's update is the float ``m``, and
``m`` is stored as ``bits``-bit codes in blocks of ``block_size``
consecutive entries along the last axis with a float32 absmax scale per
block (the library's layout). The maps (:func:`signed_levels`): ``'linear'``,
``'cubic'`` and ``'normal'`` are symmetric with a zero (``2L + 1`` values,
``L = 2**(bits - 1) - 1``: ternary at 2 bits, one code unused), ``'even'``
uses all ``2**bits`` codes and has no zero (``±(2i + 1)/(2**bits - 1)``);
``'lloyd'``, the Lloyd-Max levels of normal data, has no zero either and is
scaled by the block's RMS instead of its absmax (entries beyond the largest
level are clipped); ``'lloyd_zero'`` is its odd version, with a zero. Nearest rounding picks the nearest value; stochastic rounding picks a
neighbour with the probability that makes the decoded value unbiased.
Packed: ``bits/8`` bytes per entry plus 4 per block.

**Factored sign momentum**: :func:`factored_sign_momentum`. A matrix's
momentum is stored as its signs (1 bit per entry) and the rank-1 factors of
its magnitude that Adafactor uses for the second moment (Shazeer and Stern
2018): row sums ``r`` and column sums ``c`` of ``|m|``, decoded as
``sign(m) · r cᵀ / sum(r)``. That is the I-divergence-optimal rank-1 fit of a
non-negative matrix, exact when ``|m|`` is rank-1. Packed: ``1/8`` byte per
entry plus ``4 (n + m)`` per matrix (``2 (n + m)`` with the factors in
bfloat16, the ``_bf16`` row). Its like-for-like baseline,
:func:`block_code_momentum` with ``code_map='sign'``, keeps the signs and one
float32 per block (the block's mean ``|m|``, the L2-optimal scale of ±1
codes): the same ``1/8`` byte per entry, the magnitude per block instead of
per row and column.

**Rank-1 normalization of Adam's second moment** (Li, Chen and Zhu 2023,
arXiv:2309.01507): :func:`adamw_4bit` with ``nu='rank1'``. Each entry of a
matrix ``v`` is scaled by ``min(max of its row, max of its column)`` (never
below the entry), coded by a linear map without zero (``(c + 1)/16``,
``c = 0..15``), so a positive ``v`` never decodes to 0; vectors keep block
absmax. ``nu='block'`` is ``flora_optax.adamw(bits=4)``'s own scheme (blocks
of 64, codes of ``sqrt(v)``), to validate the prototype against the library;
the first moment is always the library's default 4-bit codes (the
``'cubic'`` map, blocks of 64, nearest).

Leaves under ``min_size`` (4096) entries stay float32 everywhere, as in the
library.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import flora_optax
from benchmarks import common
from benchmarks.quality.settings import ADAFACTOR

MIN_SIZE = 4096  # the library's DEFAULT_MIN_SIZE
SIGNED_MAPS = ('linear', 'cubic', 'normal', 'even', 'sign', 'lloyd',
               'lloyd_zero')
# The Lloyd-Max quantizer of a unit normal (the levels that minimise the
# mean squared error, Max 1960): positive levels for 2 and 3 bits, with
# 2**bits levels (no zero) and with 2**bits - 1 (a zero level, one code
# unused).
# Positive levels, in units of the RMS (Lloyd iterations on N(0, 1)).
LLOYD_MAX = {2: (0.4528, 1.5104), 3: (0.2451, 0.7560, 1.3440, 2.1520),
             4: (0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690,
                 2.7326)}
LLOYD_MAX_ZERO = {2: (1.2240,), 3: (0.5606, 1.1882, 2.0334),
                  4: (0.2739, 0.5548, 0.8511, 1.1749, 1.5461, 2.0065,
                      2.6809)}
NU_SCHEMES = ('block', 'rank1', 'rank1_sqrt')


def signed_levels(code_map: str, bits: int) -> tuple[float, ...]:
  """The increasing values of ``bits``-bit signed codes before the scale.

  Args:
    code_map: ``'linear'`` (``c/L``), ``'cubic'`` (the library's 4-bit map,
      ``t (0.72 + 0.28 t²)``, ``t = c/L``), ``'normal'`` (the library's
      normal quantiles, its formula at any ``bits``), each with ``2L + 1``
      values; ``'even'``: ``2**bits`` values ``±(2i + 1)/(2**bits - 1)``, no
      zero; ``'sign'`` (``bits=1`` only): ``±1``; ``'lloyd'`` (2 or 3
      bits): the Lloyd-Max levels of a normal distribution over the largest
      (``LLOYD_MAX``), no zero, used with a scale of the block's RMS times
      that largest level (:func:`block_code_momentum`); ``'lloyd_zero'``:
      the same with ``2**bits - 1`` levels, zero among them
      (``LLOYD_MAX_ZERO``).
    bits: 1 to 8.

  Returns:
    The values, in ``[-1, 1]``, ±1 included.
  """
  if code_map not in SIGNED_MAPS:
    raise ValueError(f'code_map must be one of {SIGNED_MAPS}, not '
                     f'{code_map!r}')
  if code_map == 'sign' or bits == 1:
    if (code_map, bits) != ('sign', 1):
      raise ValueError("bits=1 goes with code_map='sign' only")
    return (-1.0, 1.0)
  n = 2**bits
  if code_map in ('lloyd', 'lloyd_zero'):
    table = LLOYD_MAX if code_map == 'lloyd' else LLOYD_MAX_ZERO
    if bits not in table:
      raise ValueError(f'code_map={code_map!r} has bits {tuple(table)}')
    mags = [x / table[bits][-1] for x in table[bits]]
    zero = [0.0] if code_map == 'lloyd_zero' else []
    return tuple([-x for x in reversed(mags)] + zero + mags)
  if code_map == 'even':
    return tuple((2 * i + 1 - n) / (n - 1) for i in range(n))
  big = 2**(bits - 1) - 1
  t = [i / big for i in range(1, big + 1)]
  if code_map == 'linear':
    mags = t
  elif code_map == 'cubic':
    mags = [x * (0.72 + 0.28 * x * x) for x in t]
  else:  # the library's normal quantiles, at any bits
    inv = statistics.NormalDist().inv_cdf
    mags = [inv(0.5 + 0.4677 * x) / inv(0.9677) for x in t]
  return tuple([-x for x in reversed(mags)] + [0.0] + mags)


class BlockCodes(NamedTuple):
  """A leaf in block codes (prototype: one ``uint8`` code per entry).

  ``codes``: indices into the map's values, shape ``(..., blocks,
  block)`` (the last axis padded to whole blocks); ``scales``: float32,
  ``(..., blocks)``.
  """
  codes: jax.Array
  scales: jax.Array


class SignFactors(NamedTuple):
  """A matrix as signs and rank-1 factors of its magnitude."""
  signs: jax.Array  # bool, the matrix's shape (prototype: a byte each)
  rows: jax.Array  # float32 (..., n): row sums of |m|
  cols: jax.Array  # float32 (..., m): column sums of |m|


class Rank1Codes(NamedTuple):
  """A non-negative matrix in unsigned codes scaled per entry by
  ``min(row max, column max)``."""
  codes: jax.Array  # uint8, the matrix's shape
  row_max: jax.Array  # float32 (..., n)
  col_max: jax.Array  # float32 (..., m)


def _blocked(x: jax.Array, block: int) -> jax.Array:
  """``x`` as ``(..., blocks, block)``, the last axis zero-padded."""
  x = x.reshape((1,) if x.ndim == 0 else x.shape)
  m = x.shape[-1]
  b = min(block, m)
  nb = -(-m // b)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, nb * b - m)]
  return jnp.pad(x, pad).reshape(x.shape[:-1] + (nb, b))


def _unblocked(xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  full = xb.reshape(xb.shape[:-2] + (-1,))
  m = shape[-1] if shape else 1
  return full[..., :m].reshape(shape)


def _round_to(u: jax.Array, values: tuple[float, ...],
              noise: jax.Array | None) -> jax.Array:
  """Index of the value nearest to ``u`` (``noise`` None) or, with uniform
  ``noise`` in ``[0, 1)``, of a neighbour drawn so that the decoded value's
  mean is ``u`` (``u`` inside the values' range)."""
  vals = jnp.asarray(values, jnp.float32)
  if noise is None:
    mids = (vals[1:] + vals[:-1]) / 2
    return jnp.searchsorted(mids, u, side='right').astype(jnp.uint8)
  lo = jnp.clip(jnp.searchsorted(vals, u, side='right') - 1, 0,
                len(values) - 2)
  a, b = vals[lo], vals[lo + 1]
  p = jnp.clip((u - a) / (b - a), 0.0, 1.0)
  return (lo + (noise < p)).astype(jnp.uint8)


def encode_blocks(x: jax.Array, values: tuple[float, ...], block: int,
                  key: jax.Array | None = None,
                  scale: str | float = 'absmax') -> BlockCodes:
  """``x`` in block codes of ``values`` (see :func:`signed_levels`).

  Args:
    x: a float array.
    values: the map's increasing values, ±1 at the ends.
    block: entries per block along the last axis (at most).
    key: stochastic rounding's key; ``None``: nearest rounding.
    scale: ``'absmax'`` (every entry inside ``[-s, s]``), ``'mean'``
      (the block's mean ``|x|``: the L2-optimal scale of ±1 codes) or a
      number ``c`` (``c`` times the block's RMS: with ``'lloyd'`` values,
      the Lloyd-Max quantizer of normal data); entries beyond the scale
      are clipped to ±1.

  Returns:
    The codes and scales.
  """
  xb = _blocked(x.astype(jnp.float32), block)
  mag = jnp.abs(xb)
  if scale == 'absmax':
    s = mag.max(-1)
  elif scale == 'mean':
    s = mag.mean(-1)
  else:
    s = scale * jnp.sqrt(jnp.mean(mag * mag, -1))
  safe = jnp.where(s > 0, s, 1.0)[..., None]
  u = jnp.clip(xb / safe, -1.0, 1.0)
  noise = None if key is None else jax.random.uniform(key, u.shape)
  return BlockCodes(_round_to(u, values, noise), s)


def decode_blocks(q: BlockCodes, values: tuple[float, ...],
                  shape: tuple[int, ...]) -> jax.Array:
  vals = jnp.asarray(values, jnp.float32)
  return _unblocked(vals[q.codes.astype(jnp.int32)] * q.scales[..., None],
                    shape)


def encode_sign_factors(x: jax.Array,
                        dtype: jnp.dtype = jnp.float32) -> SignFactors:
  """Signs and the row and column sums of ``|x|`` (last two axes), the sums
  stored in ``dtype``."""
  mag = jnp.abs(x)
  return SignFactors(x >= 0, mag.sum(-1).astype(dtype),
                     mag.sum(-2).astype(dtype))


def decode_sign_factors(q: SignFactors) -> jax.Array:
  rows_ = q.rows.astype(jnp.float32)
  total = rows_.sum(-1, keepdims=True)
  rows = rows_ / jnp.where(total > 0, total, 1.0)
  mag = rows[..., :, None] * q.cols.astype(jnp.float32)[..., None, :]
  return jnp.where(q.signs, mag, -mag)


# Li et al.'s second-moment map: 16 values (c + 1)/16, no zero.
def _nu_levels(sqrt: bool) -> tuple[float, ...]:
  return tuple(((c + 1) / 16)**(2 if sqrt else 1) for c in range(16))


def encode_rank1(v: jax.Array, sqrt: bool = False) -> Rank1Codes:
  """A non-negative matrix (last two axes) in 4-bit rank-1 codes.

  Each entry's scale is ``min(max of its row, max of its column)``, at least
  the entry; ``u = v/scale ∈ [0, 1]`` goes to the nearest of
  :func:`_nu_levels` (in ``sqrt(u)`` for ``sqrt``), every one positive, so
  a positive entry never decodes to zero.
  """
  row_max, col_max = v.max(-1), v.max(-2)
  s = _rank1_scale(row_max, col_max)
  u = jnp.where(s > 0, v / jnp.where(s > 0, s, 1.0), 0.0)
  if sqrt:
    u = jnp.sqrt(u)
  codes = jnp.clip(jnp.round(16 * u) - 1, 0, 15).astype(jnp.uint8)
  return Rank1Codes(codes, row_max, col_max)


def _rank1_scale(row_max: jax.Array, col_max: jax.Array) -> jax.Array:
  return jnp.minimum(row_max[..., :, None], col_max[..., None, :])


def decode_rank1(q: Rank1Codes, sqrt: bool = False) -> jax.Array:
  vals = jnp.asarray(_nu_levels(sqrt), jnp.float32)
  return vals[q.codes.astype(jnp.int32)] * _rank1_scale(q.row_max, q.col_max)


# --- bytes --------------------------------------------------------------------


def packed_bytes(leaf_state: Any, bits: int) -> int:
  """The bytes of one prototype leaf with its codes packed at ``bits``."""
  if isinstance(leaf_state, BlockCodes):
    n = math.prod(leaf_state.codes.shape)
    return math.ceil(n * bits / 8) + 4 * leaf_state.scales.size
  if isinstance(leaf_state, SignFactors):
    n = math.prod(leaf_state.signs.shape)
    return math.ceil(n / 8) + common.tree_bytes((leaf_state.rows,
                                                 leaf_state.cols))
  if isinstance(leaf_state, Rank1Codes):
    n = math.prod(leaf_state.codes.shape)
    return (math.ceil(n * bits / 8) + 4 * (leaf_state.row_max.size +
                                           leaf_state.col_max.size))
  return common.tree_bytes(leaf_state)


def packed_state_bytes(state: Any) -> int:
  """A whole optimizer state's bytes, its prototype leaves counted packed.

  Codes held one per byte (and signs one per ``bool``) count ``bits/8``
  bytes per entry; every other array counts its real bytes. (Block codes are
  padded to whole blocks along the last axis; the padding counts, as it
  would in a packed layout.)
  """
  total = 0
  is_proto = lambda x: isinstance(x, (FrontierState, AdamProtoState))
  for s in jax.tree.leaves(state, is_leaf=is_proto):
    if isinstance(s, FrontierState):
      bits = s.bits
      for leaf in jax.tree.leaves(s.mu, is_leaf=_is_code):
        total += packed_bytes(leaf, bits)
      total += common.tree_bytes((s.key, s.count))
    elif isinstance(s, AdamProtoState):
      for tree in (s.mu, s.nu):
        for leaf in jax.tree.leaves(tree, is_leaf=_is_code):
          total += packed_bytes(leaf, 4)
      total += common.tree_bytes(s.count)
    else:
      total += common.tree_bytes(s)
  return total


def _is_code(x: Any) -> bool:
  return isinstance(x, (BlockCodes, SignFactors, Rank1Codes))


# --- the momentum prototypes --------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=('mu', 'key', 'count'), meta_fields=('bits',))
@dataclasses.dataclass(frozen=True)
class FrontierState:
  """The momentum prototypes' state; ``bits`` (static) is what each stored
  code packs to."""
  mu: Any  # per leaf: float32, BlockCodes or SignFactors
  key: jax.Array  # uint32 key data (stochastic rounding)
  count: jax.Array  # int32 step
  bits: int


def _key_data(key: Any) -> jax.Array:
  if isinstance(key, int):
    return jax.random.key_data(jax.random.key(key))
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


def _momentum_tx(decay: float, encode, decode, bits: int,
                 key: Any, min_size: int, stochastic: bool,
                 matrices_only: bool = False) -> optax.GradientTransformation:
  """``m = decay m + (1 - decay) u``, output ``m``, stored by ``encode``.

  ``encode(x, key | None)``/``decode(state, shape)`` for leaves of at least
  ``min_size`` entries (and at least 2-D with ``matrices_only``), float32
  otherwise.
  """

  def coded(p):
    return p.size >= min_size and (p.ndim >= 2 or not matrices_only)

  def init(params):
    mu = jax.tree.map(
        lambda p: encode(jnp.zeros(p.shape, jnp.float32), None) if coded(p)
        else jnp.zeros(p.shape, jnp.float32), params)
    return FrontierState(mu, _key_data(key), jnp.zeros([], jnp.int32), bits)

  def update(updates, state, params=None):
    del params
    flat, tree = jax.tree.flatten(updates)
    stored = tree.flatten_up_to(state.mu)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key),
                                  state.count)
    new_mu, out = [], []
    for i, (u, s) in enumerate(zip(flat, stored)):
      if not coded(u):
        m = decay * s + (1 - decay) * u.astype(jnp.float32)
        new_mu.append(m)
        out.append(m.astype(u.dtype))
        continue
      m = decay * decode(s, u.shape) + (1 - decay) * u.astype(jnp.float32)
      k = jax.random.fold_in(step_key, i) if stochastic else None
      new_mu.append(encode(m, k))
      out.append(m.astype(u.dtype))
    return (tree.unflatten(out),
            FrontierState(tree.unflatten(new_mu), state.key,
                          state.count + 1, state.bits))

  return optax.GradientTransformation(init, update)


def block_code_momentum(decay: float, *, bits: int, code_map: str,
                        block_size: int, stochastic: bool = False,
                        key: Any = 0, min_size: int = MIN_SIZE
                        ) -> optax.GradientTransformation:
  """An EMA (``optax.ema(decay, debias=False)``) kept in ``bits``-bit block
  codes between steps (module docstring). ``code_map='sign'`` with
  ``bits=1``: ±(the block's mean ``|m|``); ``'lloyd'``: scaled by the
  block's RMS (not its absmax), so that most entries land on distinct
  levels and the few beyond the largest level are clipped."""
  values = signed_levels(code_map, bits)
  scale = {'sign': 'mean', 'lloyd': LLOYD_MAX.get(bits, [0])[-1],
           'lloyd_zero': LLOYD_MAX_ZERO.get(bits, [0])[-1]}.get(
               code_map, 'absmax')
  return _momentum_tx(
      decay,
      lambda x, k: encode_blocks(x, values, block_size, k, scale),
      lambda q, shape: decode_blocks(q, values, shape),
      bits, key, min_size, stochastic)


def factored_sign_momentum(decay: float, *, min_size: int = MIN_SIZE,
                           factor_dtype: jnp.dtype = jnp.float32
                           ) -> optax.GradientTransformation:
  """An EMA kept as signs and rank-1 factors of its magnitude (module
  docstring), the factors in ``factor_dtype`` (bfloat16: half their bytes,
  which on small matrices are a third of the state); leaves under
  ``min_size`` entries, and vectors, in float32."""
  return _momentum_tx(decay,
                      lambda x, k: encode_sign_factors(x, factor_dtype),
                      lambda q, shape: decode_sign_factors(q), 1, 0,
                      min_size, False, matrices_only=True)


def adafactor_with(learning_rate: optax.ScalarOrSchedule,
                   momentum_tx: optax.GradientTransformation,
                   ) -> optax.GradientTransformation:
  """The study's Adafactor (``settings.ADAFACTOR``) with ``momentum_tx`` in
  the momentum's place: where ``optax.adafactor`` and
  ``flora_optax.flora(rank=None, bits=4)`` keep theirs (after clipping, the
  learning rate and the parameter scale)."""
  tx = [optax.scale_by_factored_rms(
      factored=True, decay_rate=0.8, step_offset=0,
      min_dim_size_to_factor=ADAFACTOR['min_dim_size_to_factor'],
      epsilon=1e-30)]
  if ADAFACTOR['clipping_threshold'] is not None:
    tx.append(optax.clip_by_block_rms(ADAFACTOR['clipping_threshold']))
  tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if ADAFACTOR['multiply_by_parameter_scale']:
    tx.append(optax.scale_by_param_block_rms())
  tx += [momentum_tx, optax.scale(-1)]
  return optax.chain(*tx)


# --- the AdamW prototype (second moment's scheme) -----------------------------


class AdamProtoState(NamedTuple):
  count: jax.Array
  mu: Any  # float32 or BlockCodes (4-bit cubic, blocks of 64)
  nu: Any  # float32, BlockCodes (unsigned sqrt map) or Rank1Codes


_MU_VALUES = flora_optax.code_values('cubic', 4)
_NU_SQRT = _nu_levels(True)  # the library's unsigned 'sqrt' values


def _encode_nu(v: jax.Array, scheme: str) -> Any:
  if scheme != 'block' and v.ndim >= 2:
    return encode_rank1(v, sqrt=scheme == 'rank1_sqrt')
  values = _NU_SQRT if scheme in ('block', 'rank1_sqrt') else _nu_levels(False)
  # Unsigned values: the nearest in sqrt(v) for the sqrt map (the library
  # rounds codes of sqrt(v)), in v for the linear one.
  xb = _blocked(v, 64)
  s = xb.max(-1)
  u = xb / jnp.where(s > 0, s, 1.0)[..., None]
  if values is _NU_SQRT:
    u = jnp.sqrt(u)
  codes = jnp.clip(jnp.round(16 * u) - 1, 0, 15).astype(jnp.uint8)
  return BlockCodes(codes, s)


def _decode_nu(q: Any, scheme: str, shape: tuple[int, ...]) -> jax.Array:
  if isinstance(q, Rank1Codes):
    return decode_rank1(q, sqrt=scheme == 'rank1_sqrt')
  values = _NU_SQRT if scheme in ('block', 'rank1_sqrt') else _nu_levels(False)
  return decode_blocks(q, values, shape)


def adamw_4bit(learning_rate: optax.ScalarOrSchedule, *, nu: str = 'rank1',
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, min_size: int = MIN_SIZE
               ) -> optax.GradientTransformation:
  """``optax.adamw`` (its defaults) with both moments in 4-bit codes.

  The first moment as ``flora_optax.adamw(bits=4)`` stores it (the
  ``'cubic'`` map, blocks of 64, nearest); the second by ``nu``:
  ``'block'`` (the library's: blocks of 64, codes of ``sqrt(v)`` without
  zero), ``'rank1'`` (Li et al.: rank-1 normalization, linear map without
  zero) or ``'rank1_sqrt'`` (rank-1 normalization, the library's ``sqrt``
  map). This step's update uses the float moments of this step.
  """
  if nu not in NU_SCHEMES:
    raise ValueError(f'nu must be one of {NU_SCHEMES}, not {nu!r}')

  def coded(p):
    return p.size >= min_size

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    mu = jax.tree.map(
        lambda p: encode_blocks(zeros(p), _MU_VALUES, 64) if coded(p)
        else zeros(p), params)
    nu_ = jax.tree.map(
        lambda p: _encode_nu(zeros(p), nu) if coded(p) else zeros(p), params)
    return AdamProtoState(jnp.zeros([], jnp.int32), mu, nu_)

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    flat, tree = jax.tree.flatten(updates)
    mus = tree.flatten_up_to(state.mu)
    nus = tree.flatten_up_to(state.nu)
    out, new_mu, new_nu = [], [], []
    c1 = 1 - b1**count.astype(jnp.float32)
    c2 = 1 - b2**count.astype(jnp.float32)
    for g, m_s, v_s in zip(flat, mus, nus):
      g32 = g.astype(jnp.float32)
      if coded(g):
        m_prev = decode_blocks(m_s, _MU_VALUES, g.shape)
        v_prev = _decode_nu(v_s, nu, g.shape)
      else:
        m_prev, v_prev = m_s, v_s
      m = b1 * m_prev + (1 - b1) * g32
      v = b2 * v_prev + (1 - b2) * g32 * g32
      out.append(((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype))
      if coded(g):
        new_mu.append(encode_blocks(m, _MU_VALUES, 64))
        new_nu.append(_encode_nu(v, nu))
      else:
        new_mu.append(m)
        new_nu.append(v)
    return tree.unflatten(out), AdamProtoState(
        count, tree.unflatten(new_mu), tree.unflatten(new_nu))

  return optax.chain(
      optax.GradientTransformation(init, update),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))


# --- the study's rows ---------------------------------------------------------

# name -> (label, keywords of block_code_momentum). Which maps and block
# sizes became rows was measured on the small tasks first (docs).
BLOCK_ROWS: dict[str, dict[str, Any]] = {}
for _bits in (2, 3):
  for _map in ('linear', 'cubic', 'normal', 'even'):
    if _bits == 2 and _map in ('cubic', 'normal'):
      continue  # at 2 bits these are the ternary linear map
    for _block in (64, 256):
      for _sr in (False, True):
        BLOCK_ROWS[f'momentum_{_bits}bit_{_map}_b{_block}' +
                   ('_sr' if _sr else '')] = dict(
                       bits=_bits, code_map=_map, block_size=_block,
                       stochastic=_sr)
# MSE-optimal levels for normal data, scaled by the block's RMS (added
# after the absmax maps lost at 2 bits: most entries fell in the zero code
# or on the smallest level).
# Then with a zero level: without one, an entry with no gradient decodes
# to ±0.3 of the scale every step and drifts (2 bits, blocks of 64: NaN on
# mlp and autoencoder).
# And at 4 bits: does the RMS scale beat the library's absmax 'cubic' codes
# where 4-bit momentum missed (regression)?
for _map in ('lloyd', 'lloyd_zero'):
  for _bits in (2, 3, 4):
    for _block in (64, 256):
      BLOCK_ROWS[f'momentum_{_bits}bit_{_map}_b{_block}'] = dict(
          bits=_bits, code_map=_map, block_size=_block, stochastic=False)
# The library's default 4-bit momentum, rebuilt: validates the prototype.
BLOCK_ROWS['momentum_4bit_cubic_b64_proto'] = dict(
    bits=4, code_map='cubic', block_size=64, stochastic=False)
# 1 bit: signs and the block's mean |m| (factored momentum's baseline).
for _block in (64, 256):
  BLOCK_ROWS[f'momentum_1bit_sign_b{_block}'] = dict(
      bits=1, code_map='sign', block_size=_block, stochastic=False)


def block_label(options: dict[str, Any]) -> str:
  return (f"momentum in {options['bits']}-bit block codes (prototype, "
          f"storage simulated; '{options['code_map']}', blocks of "
          f"{options['block_size']}, "
          f"{'stochastic' if options['stochastic'] else 'nearest'} rounding)")


def make_block(options: dict[str, Any], momentum: float):
  def make(lr, rank, key, resample_every):
    del rank, resample_every
    return adafactor_with(lr, block_code_momentum(momentum, key=key,
                                                  **options))
  return make


def make_factored(momentum: float, factor_dtype: jnp.dtype = jnp.float32):
  def make(lr, rank, key, resample_every):
    del rank, key, resample_every
    return adafactor_with(lr, factored_sign_momentum(
        momentum, factor_dtype=factor_dtype))
  return make


def make_adamw(nu: str):
  def make(lr, rank, key, resample_every):
    del rank, key, resample_every
    return adamw_4bit(lr, nu=nu)
  return make
