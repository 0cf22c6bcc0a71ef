"""Numerics: low-precision leaves, extreme gradient scales, Adafactor's parts.

* bf16/f16 params and gradients: sketches and projections are float32; the
  update is exactly the float32 computation on the upcast gradient, cast back
  once at the end (so float16 can only overflow in that final cast, when a
  decompressed entry exceeds 65504; the state stays finite).
* Compression is linear and computed in float32: scaling the gradients by
  ``2**k`` scales updates and sketches by exactly ``2**k`` (bit for bit) over
  the whole float32/bfloat16 range used here (about 1e-30 … 1e30): no overflow
  or underflow inside the projections.
* ``flora``'s Adafactor parts are optax's, bit for bit, at every scale.
"""

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax

SHAPES = {'w': (12, 20), 'b': (20,)}


def _grads(seed, dtype=jnp.float32, scale=1.0):
  return _helpers.numpy_tree(seed, SHAPES, dtype, scale)


_STEPS = {}


def _run(tx, grads_seq, params=None):
  # One jitted step per transformation, reused across tests (compiles
  # dominate this module's time).
  step = _STEPS.setdefault(id(tx), (tx, jax.jit(tx.update)))[1]
  return _helpers.run(tx, grads_seq, params, step)


def _upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


# resample_every=1: every step after the first transfers between projections.
MOMENTUM = dict(rank=3, decay=0.8, resample_every=1, key=4)
TX = {p: flora_optax.compressed_momentum(projection=p, **MOMENTUM)
      for p in ('gaussian', 'orthogonal')}


@pytest.mark.parametrize('dtype,scale', [(jnp.bfloat16, 1.0),
                                         (jnp.bfloat16, 1e30),
                                         (jnp.float16, 1.0),
                                         (jnp.float16, 1.5e4)])
def test_low_precision_is_float32_math_cast_once(dtype, scale):
  tx = TX['gaussian']
  grads = [_grads(t, dtype, scale) for t in range(3)]
  outs, state = _run(tx, grads)
  ref_outs, ref_state = _run(tx, [_upcast(g) for g in grads])
  # The float32 result rounded once (inf where it exceeds float16's range);
  # XLA may fuse the two programs differently, hence one rounding step of
  # slack.
  eps = float(jnp.finfo(dtype).eps)
  for out, ref in zip(outs, ref_outs):
    chex.assert_trees_all_equal_dtypes(out, grads[0])
    chex.assert_trees_all_close(
        _upcast(out), _upcast(jax.tree.map(lambda r, g: r.astype(g.dtype),
                                           ref, grads[0])),
        rtol=eps, atol=eps * scale * 1e-3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.mu))
  chex.assert_trees_all_close(state.mu, ref_state.mu, rtol=1e-6,
                              atol=1e-6 * scale)
  chex.assert_tree_all_finite((grads, state.mu))


def test_float16_overflows_only_in_the_final_cast():
  # The documented limit: a decompressed estimate is not bounded by the
  # gradient's largest entry, so float16 gradients near 65504 can give inf
  # updates; the float32 state stays finite and the infs are exactly where
  # the float32 result rounds beyond float16's range.
  tx = flora_optax.compressed_momentum(3, decay=0.0, key=4, residual=False)
  g = {'w': jnp.full((12, 20), 6e4, jnp.float16),
       'b': jnp.full((20,), 6e4, jnp.float16)}
  (out,), state = _run(tx, [g])
  (ref,), _ = _run(tx, [_upcast(g)])
  chex.assert_tree_all_finite(state.mu)
  overflow = np.abs(np.asarray(ref['w'])) >= 65520  # rounds to inf
  assert overflow.any() and not overflow.all()
  np.testing.assert_array_equal(np.isinf(np.asarray(out['w'])), overflow)
  np.testing.assert_array_equal(out['b'], g['b'])  # dense: exact
  # The residual output of a decay-0 momentum is g itself (its projection
  # plus the rest): bounded by g, so no overflow.
  (out,), _ = _run(flora_optax.compressed_momentum(3, decay=0.0, key=4), [g])
  np.testing.assert_allclose(np.asarray(out['w'], np.float32), 6e4, rtol=1e-3)


@pytest.mark.parametrize('dtype,exponents', [
    (jnp.float32, [-99, -50, 0, 50, 99]),
    (jnp.bfloat16, [-99, 99]),
])
@pytest.mark.parametrize('projection', ['gaussian', 'orthogonal'])
def test_power_of_two_scaling_is_exact(dtype, exponents, projection):
  tx = TX[projection]
  base = [_grads(t, dtype) for t in range(3)]
  base_outs, base_state = _run(tx, base)
  for k in exponents:
    s = 2.0**k
    outs, state = _run(tx, [jax.tree.map(lambda x: x * s, g) for g in base])
    for out, ref in zip(outs, base_outs):
      chex.assert_tree_all_finite(out)
      chex.assert_trees_all_equal(out, jax.tree.map(lambda x: x * s, ref))
    chex.assert_trees_all_equal(
        state.mu, jax.tree.map(lambda x: x * s, base_state.mu))


@pytest.mark.parametrize('scale', [1e-30, 1e30])
def test_decimal_extreme_scales_stay_relative(scale):
  tx = TX['gaussian']
  base = [_grads(t) for t in range(3)]
  base_outs, _ = _run(tx, base)
  outs, state = _run(tx, [_grads(t, scale=scale) for t in range(3)])
  chex.assert_tree_all_finite((outs, state.mu))
  for out, ref in zip(outs, base_outs):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x / scale, out), ref,
                                rtol=1e-4, atol=1e-5)


def test_float16_small_gradients_keep_relative_accuracy():
  # float16's normal range starts at 6.1e-5; the float32 sketches keep
  # gradients of 1e-3 as accurate, relative to their scale, as those of 1.
  tx = TX['gaussian']
  ref_outs, _ = _run(tx, [_grads(t) for t in range(3)])
  grads = [_grads(t, jnp.float16, 1e-3) for t in range(3)]
  outs, _ = _run(tx, grads)
  ref_small, _ = _run(tx, [_upcast(g) for g in grads])
  for out, ref in zip(outs, ref_small):
    chex.assert_trees_all_close(_upcast(out), ref, rtol=1e-3, atol=1e-7)
  for out, ref in zip(ref_small, ref_outs):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x / 1e-3, out), ref,
                                rtol=2e-2, atol=2e-2)


# --- Adafactor's parts ---------------------------------------------------------

ADAFACTOR = dict(min_dim_size_to_factor=4, decay_rate=0.8,
                 clipping_threshold=1.0, multiply_by_parameter_scale=True)


def _params(dtype=jnp.float32):
  return jax.tree.map(lambda x: 0.1 * x, _grads(99, dtype))


# Adafactor squares gradients: above ~1.8e19 (sqrt of float32's max) its
# second moment overflows, in optax.adafactor and in flora alike.
ADAFACTOR_SCALES = [1e-30, 1.0, 1e18, 1e30]


@pytest.mark.parametrize('scale', ADAFACTOR_SCALES)
def test_without_momentum_flora_is_optax_adafactor_bit_for_bit(scale):
  params = _params()
  grads = [_grads(t, scale=scale) for t in range(3)]
  outs, _ = _run(flora_optax.flora(1e-2, 3, momentum=None, **ADAFACTOR),
                 grads, params)
  ref, _ = _run(optax.adafactor(1e-2, momentum=None, **ADAFACTOR), grads,
                params)
  for out, r in zip(outs, ref):
    if scale < 1e19:
      chex.assert_tree_all_finite(out)
    chex.assert_trees_all_equal(out, r)  # non-finite at the same places


@pytest.mark.parametrize('scale', ADAFACTOR_SCALES[:3])
def test_dense_flora_is_optax_parts_in_flora_order(scale):
  params = _params()
  grads = [_grads(t, scale=scale) for t in range(3)]
  tx = flora_optax.flora(1e-2, _helpers.keep_dense, momentum=0.9,
                         residual=False, **ADAFACTOR)
  ref_tx = optax.chain(
      optax.scale_by_factored_rms(decay_rate=0.8, min_dim_size_to_factor=4),
      optax.ema(0.9, debias=False),
      optax.clip_by_block_rms(1.0),
      optax.scale_by_learning_rate(1e-2, flip_sign=False),
      optax.scale_by_param_block_rms(),
      optax.scale(-1))
  outs, _ = _run(tx, grads, params)
  ref, _ = _run(ref_tx, grads, params)
  for out, r in zip(outs, ref):
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out, r, rtol=1e-6, atol=0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_compressed_flora_is_scale_invariant_where_adafactor_is(dtype):
  # Adafactor normalises by the RMS, so its updates do not depend on the
  # gradient scale while g**2 stays well above eps (1e-30). Compression sits
  # after the normalisation, so flora keeps that property.
  params = _params(dtype)
  tx = flora_optax.flora(1e-2, 3, resample_every=2, **ADAFACTOR)
  base, state = _run(tx, [_grads(t, dtype) for t in range(3)], params)
  assert optax.tree.get(state, 'mu')['w'].dtype == jnp.float32
  for scale in (1e-10, 1e10):
    outs, _ = _run(tx, [_grads(t, dtype, scale) for t in range(3)], params)
    for out, ref in zip(outs, base):
      chex.assert_trees_all_equal_dtypes(out, params)
      tol = 1e-4 if dtype == jnp.float32 else 5e-2
      chex.assert_trees_all_close(_upcast(out), _upcast(ref), rtol=tol,
                                  atol=tol * 1e-2)
  for scale in (1e-30, 1e18):  # finite even where Adafactor's eps dominates
    outs, state = _run(tx, [_grads(t, dtype, scale) for t in range(3)],
                       params)
    chex.assert_tree_all_finite((outs, state))


def test_state_dtypes_stable_in_scan_with_bf16_params():
  params = _params(jnp.bfloat16)
  tx = flora_optax.flora(1e-2, 3, resample_every=2, **ADAFACTOR)
  state = tx.init(params)
  types = jax.tree.map(lambda x: (x.shape, x.dtype), state)

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  grads = jax.tree.map(lambda *x: jnp.stack(x),
                       *[_grads(t, jnp.bfloat16) for t in range(4)])
  (params2, state2), _ = jax.jit(lambda c, g: jax.lax.scan(body, c, g))(
      (params, state), grads)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state2) == types
  chex.assert_trees_all_equal_dtypes(params2, params)
  chex.assert_tree_all_finite(params2)
