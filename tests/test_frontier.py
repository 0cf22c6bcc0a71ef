"""The quality study's frontier prototypes (benchmarks/quality/frontier.py).

They are study rows, not library code, but the study's conclusions rest on
them doing what their docs say: codes that get better with more bits,
unbiased stochastic rounding, a second moment that never decodes to zero,
a factored momentum exact where its design is, bytes counted as packed, and
4-bit versions equal to the library's own 4-bit states.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from benchmarks.quality import frontier
from benchmarks.quality.settings import ADAFACTOR


def _randn(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _round_trip(x, values, block, scale='absmax'):
  q = frontier.encode_blocks(x, values, block, scale=scale)
  return frontier.decode_blocks(q, values, x.shape)


def _round_trip_error(x, code_map, bits, block=64):
  values = frontier.signed_levels(code_map, bits)
  return float(jnp.mean(jnp.abs(_round_trip(x, values, block) - x)))


@pytest.mark.parametrize('code_map', ['linear', 'cubic', 'normal', 'even'])
def test_round_trip_error_decreases_with_bits(code_map):
  x = _randn((64, 256))
  errors = [_round_trip_error(x, code_map, b) for b in (2, 3, 4, 8)]
  assert errors == sorted(errors, reverse=True), errors
  assert errors[-1] < 0.01 < errors[0]


def test_lloyd_levels_fit_normal_data_better_than_absmax():
  x = _randn((64, 256))
  for bits in (2, 3):
    lloyd = frontier.signed_levels('lloyd', bits)
    decoded = _round_trip(x, lloyd, 64, frontier.LLOYD_MAX[bits][-1])
    mse = float(jnp.mean((decoded - x)**2))
    even = frontier.signed_levels('even', bits)
    absmax = float(jnp.mean((_round_trip(x, even, 64) - x)**2))
    # Max's optimum for a unit normal: 0.1175 (2 bits), 0.03454 (3 bits).
    assert mse < {2: 0.125, 3: 0.037}[bits] < absmax, (bits, mse, absmax)


def test_levels_are_symmetric_and_span_the_scale():
  for code_map in ('linear', 'cubic', 'normal', 'even', 'lloyd'):
    for bits in (2, 3) if code_map == 'lloyd' else (2, 3, 4):
      v = np.asarray(frontier.signed_levels(code_map, bits))
      assert v[0] == -1 and v[-1] == 1
      np.testing.assert_allclose(v, -v[::-1], atol=1e-12)
      assert np.all(np.diff(v) > 0)
      full = code_map in ('even', 'lloyd')  # no zero: every code used
      assert len(v) == (2**bits if full else 2**bits - 1)
  # The library's tabled 4-bit maps, rebuilt.
  for code_map in ('cubic', 'normal'):
    np.testing.assert_allclose(frontier.signed_levels(code_map, 4),
                               flora_optax.code_values(code_map, 4),
                               atol=1e-6)
  with pytest.raises(ValueError, match='code_map'):
    frontier.signed_levels('tree', 3)


@pytest.mark.parametrize('code_map,bits', [('linear', 2), ('even', 2),
                                           ('cubic', 3)])
def test_stochastic_rounding_is_unbiased(code_map, bits):
  x = _randn((1, 64), seed=1)
  values = frontier.signed_levels(code_map, bits)
  keys = jax.random.split(jax.random.key(2), 4000)
  decode = jax.jit(jax.vmap(lambda k: frontier.decode_blocks(
      frontier.encode_blocks(x, values, 64, k), values, x.shape)))
  draws = decode(keys)
  scale = float(jnp.abs(x).max())
  # Each draw is one of two neighbours at most a code step apart: the
  # mean of 4000 is within a few standard errors of the value.
  np.testing.assert_allclose(draws.mean(0), x, atol=0.05 * scale)
  nearest = _round_trip(x, values, 64)
  assert (float(jnp.abs(draws.mean(0) - x).mean()) <
          0.5 * float(jnp.abs(nearest - x).mean()))


def test_rank1_never_decodes_positive_to_zero():
  # Entries over twelve decades, rows and columns of very different size.
  k = jax.random.split(jax.random.key(3), 3)
  v = (jnp.exp(12 * jax.random.uniform(k[0], (48, 80)) - 12) *
       jnp.exp(4 * jax.random.normal(k[1], (48, 1))) *
       jnp.exp(4 * jax.random.normal(k[2], (1, 80))))
  @functools.partial(jax.jit, static_argnums=1)
  def round_trip(v, sqrt):
    q = frontier.encode_rank1(v, sqrt=sqrt)
    return (frontier._rank1_scale(q.row_max, q.col_max),  # pylint: disable=protected-access
            frontier.decode_rank1(q, sqrt=sqrt))

  for sqrt in (False, True):
    scale, decoded = round_trip(v, sqrt)
    assert bool(jnp.all(scale >= v))
    assert bool(jnp.all(decoded > 0))
    assert bool(jnp.all(decoded <= scale))
  # A zero matrix stays zero.
  zero = frontier.decode_rank1(frontier.encode_rank1(jnp.zeros((4, 5))))
  assert not bool(jnp.any(zero))


def _run(tx, params, grads_fn, steps=6):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for i in range(steps):
    updates, state = update(grads_fn(i, params), state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


def test_factored_sign_momentum_is_exact_on_rank1_magnitudes():
  k = jax.random.split(jax.random.key(4), 3)
  a = jnp.abs(jax.random.normal(k[0], (96, 1))) + 0.1
  b = jnp.abs(jax.random.normal(k[1], (1, 64))) + 0.1
  signs = jnp.where(jax.random.bernoulli(k[2], 0.5, (96, 64)), 1.0, -1.0)
  params = {'w': jnp.zeros((96, 64)), 'b': jnp.zeros((64,))}
  # Every gradient is signs ⊙ (a bᵀ) times a positive step factor: the
  # momentum keeps those signs and a rank-1 magnitude.
  grads = lambda i, p: {'w': (1 + i) * signs * a * b,
                        'b': jnp.full((64,), 1.0 + i)}
  got, state = _run(frontier.factored_sign_momentum(0.9, min_size=0),
                    params, grads)
  want, _ = _run(optax.ema(0.9, debias=False), params, grads)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g['w'], w['w'], rtol=2e-5)
    np.testing.assert_allclose(g['b'], w['b'], rtol=1e-6)
  assert isinstance(state.mu['w'], frontier.SignFactors)
  assert state.mu['b'].dtype == jnp.float32  # vectors stay float


def _shapes(init, params):
  # Shapes and dtypes only: the counts need no arrays (and no compute).
  return jax.eval_shape(init, params)


def test_bytes_are_counted_packed():
  params = {'w': jnp.zeros((128, 256)), 'b': jnp.zeros((64,))}
  key_and_count = 8 + 4
  for bits, block in ((2, 64), (3, 256), (1, 64)):
    code_map = 'sign' if bits == 1 else 'linear'
    state = _shapes(frontier.block_code_momentum(
        0.9, bits=bits, code_map=code_map, block_size=block).init, params)
    codes = 128 * 256 * bits // 8
    scales = 4 * 128 * (256 // block)
    assert frontier.packed_state_bytes(state) == (codes + scales + 64 * 4 +
                                                  key_and_count)
  state = _shapes(frontier.factored_sign_momentum(0.9).init, params)
  assert frontier.packed_state_bytes(state) == (
      128 * 256 // 8 + 4 * (128 + 256) + 64 * 4 + key_and_count)
  # AdamW: two 4-bit moments; rank-1 scales are a row and a column.
  state = _shapes(frontier.adamw_4bit(0.1, nu='rank1').init, params)
  mu = 128 * 256 // 2 + 4 * 128 * 4
  nu = 128 * 256 // 2 + 4 * (128 + 256)
  assert frontier.packed_state_bytes(state) == mu + nu + 2 * 64 * 4 + 4
  # Leaves under 4096 entries stay float32, counted as they are.
  small = {'w': jnp.zeros((32, 64))}
  state = _shapes(frontier.block_code_momentum(
      0.9, bits=2, code_map='linear', block_size=64).init, small)
  assert frontier.packed_state_bytes(state) == 32 * 64 * 4 + key_and_count


def _grads(i, p):
  return jax.tree.map(lambda x: jnp.sin(x * (i + 1)) + 0.1 * x, p)


def test_4bit_prototypes_equal_the_library():
  params = {'w': _randn((128, 64)), 'b': jnp.zeros((64,))}
  proto, _ = _run(frontier.adafactor_with(
      1e-2, frontier.block_code_momentum(0.9, bits=4, code_map='cubic',
                                         block_size=64)), params, _grads, 4)
  lib, _ = _run(flora_optax.flora(1e-2, None, momentum=0.9, bits=4,
                                  **ADAFACTOR), params, _grads, 4)
  for a, b in zip(proto, lib):
    np.testing.assert_allclose(a['w'], b['w'], atol=1e-7)
  proto, _ = _run(frontier.adamw_4bit(1e-2, nu='block'), params, _grads, 4)
  lib, _ = _run(flora_optax.adamw(1e-2, bits=4), params, _grads, 4)
  for a, b in zip(proto, lib):
    np.testing.assert_allclose(a['w'], b['w'], atol=1e-7)
  with pytest.raises(ValueError, match='nu must be'):
    frontier.adamw_4bit(1e-2, nu='tree')


def test_float_path_equals_adafactor():
  # At 8 bits with a linear map the codes are near exact; below the
  # minimum size nothing is coded: the chain is optax.adafactor's.
  params = {'w': _randn((32, 64)), 'b': jnp.zeros((64,))}
  proto, _ = _run(frontier.adafactor_with(
      1e-2, frontier.block_code_momentum(0.9, bits=2, code_map='linear',
                                         block_size=64)), params, _grads, 4)
  ref, _ = _run(optax.adafactor(1e-2, momentum=0.9, **ADAFACTOR), params,
                _grads, 4)
  for a, b in zip(proto, ref):
    np.testing.assert_allclose(a['w'], b['w'], atol=1e-7)


def test_bfloat16_factors_halve_their_bytes_and_stay_close():
  params = {'w': _randn((96, 64))}
  grads = lambda i, p: jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p)  # noqa: E731
  f32, s32 = _run(frontier.factored_sign_momentum(0.9, min_size=0), params,
                  grads, 3)
  bf16, s16 = _run(frontier.factored_sign_momentum(
      0.9, min_size=0, factor_dtype=jnp.bfloat16), params, grads, 3)
  assert (frontier.packed_state_bytes(s32) -
          frontier.packed_state_bytes(s16)) == 2 * (96 + 64)
  np.testing.assert_allclose(bf16[-1]['w'], f32[-1]['w'], rtol=0.02,
                             atol=1e-3)
