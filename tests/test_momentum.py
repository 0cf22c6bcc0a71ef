"""compressed_momentum: exact paths, LoRA equivalence, stability, jit hygiene."""

import warnings

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from flora_optax import Projector, compressed_momentum


def _params():
  return {
      'w': jnp.zeros((12, 20)),
      'tall': jnp.zeros((24, 10)),
      'stack': jnp.zeros((3, 8, 6)),
      'b': jnp.zeros((20,)),
  }


def _grads(params, step):
  return _helpers.random_like(100 + step, params)


@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('nesterov', [False, True])
def test_full_rank_orthogonal_equals_dense_ema(nesterov, residual):
  params = _params()
  tx = compressed_momentum(_helpers.full_rank, decay=0.8, resample_every=3,
                           projection='orthogonal', nesterov=nesterov,
                           residual=residual)
  ema = optax.ema(0.8, debias=False)
  s, se = tx.init(params), ema.init(params)
  update = jax.jit(tx.update)
  for t in range(11):  # crosses three resample boundaries
    g = _grads(params, t)
    u, s = update(g, s)
    ue, se = ema.update(g, se)
    if nesterov:
      ue = jax.tree.map(lambda m, gg: 0.8 * m + 0.2 * gg, ue, g)
    chex.assert_trees_all_close(u, ue, atol=2e-5, rtol=1e-4)


def test_lora_with_frozen_a_equals_momentum_without_resampling():
  """W + B A with A frozen to P, B = 0, SGD  ==  decay=0 sketch + SGD on W."""
  n, m, r, lr = 16, 12, 4, 0.1
  x = jax.random.normal(jax.random.key(0), (32, n))
  y = jax.random.normal(jax.random.key(1), (32, m))
  w0 = 0.1 * jax.random.normal(jax.random.key(2), (n, m))
  loss = lambda w: jnp.mean((x @ w - y)**2)

  key = 123
  tx = optax.chain(
      compressed_momentum(r, decay=0.0, resample_every=None, key=key,
                          residual=False),
      optax.sgd(lr))
  # The frozen A is exactly the projection the momentum uses in cycle 0.
  a = Projector(r).projections({'w': w0}, flora_optax.cycle_key(key, 0))['w']
  assert a.shape == (r, m)  # side='smaller' compresses the 12-axis

  w, s = {'w': w0}, tx.init({'w': w0})
  b = jnp.zeros((n, r))
  lora_loss = lambda b: loss(w0 + b @ a)
  for _ in range(8):
    g = jax.grad(loss)(w['w'])
    u, s = tx.update({'w': g}, s, w)
    w = optax.apply_updates(w, u)
    b = b - lr * jax.grad(lora_loss)(b)
    chex.assert_trees_all_close(w['w'], w0 + b @ a, atol=1e-6)


def test_state_shapes_and_bytes():
  params = {'w': jnp.zeros((64, 256)), 'v': jnp.zeros((256,)),
            'stack': jnp.zeros((4, 128, 32))}
  for side, size in (('smaller', 8 * 256), ('larger', 8 * 64)):
    s = compressed_momentum(8, side=side).init(params)
    assert s.mu['w'].size == size
    assert s.mu['v'].shape == (256,)
    assert s.mu['stack'].shape == ((4, 128, 8) if side == 'smaller' else
                                   (4, 8, 32))
  s = compressed_momentum(8, accumulator_dtype=jnp.bfloat16).init(params)
  assert s.mu['w'].dtype == jnp.bfloat16 and s.mu['w'].nbytes == 2 * 8 * 256
  assert s.count.dtype == jnp.int32 and s.key.dtype == jnp.uint32


@pytest.mark.filterwarnings('ignore::flora_optax.TransferStabilityWarning')
@pytest.mark.parametrize('dtype,acc', [(jnp.float32, jnp.float32),
                                       (jnp.bfloat16, jnp.float32),
                                       (jnp.bfloat16, jnp.bfloat16),
                                       (jnp.float16, jnp.float32)])
def test_dtypes_are_stable(dtype, acc):
  params = jax.tree.map(lambda x: x.astype(dtype), _params())
  tx = compressed_momentum(4, resample_every=2, accumulator_dtype=acc)
  s = tx.init(params)
  types0 = jax.tree.map(lambda x: (x.shape, x.dtype), s)
  update = jax.jit(tx.update)
  for t in range(5):
    g = jax.tree.map(lambda x: x.astype(dtype), _grads(params, t))
    u, s = update(g, s)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), s) == types0
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(
        lambda x: x.dtype, g)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.filterwarnings('ignore::flora_optax.TransferStabilityWarning')
def test_no_recompilation_across_resample_boundaries():
  params = _params()
  tx = compressed_momentum(4, resample_every=2)
  traces = []

  def step(g, s):
    traces.append(1)
    return tx.update(g, s)

  step = jax.jit(step)
  s = tx.init(params)
  for t in range(7):
    _, s = step(_grads(params, t), s)
  assert len(traces) == 1


@pytest.mark.filterwarnings('ignore::flora_optax.TransferStabilityWarning')
def test_deterministic_in_and_out_of_jit():
  params = _params()
  tx = compressed_momentum(4, resample_every=2, key=jax.random.key(9))
  def trajectory(update):
    s, outs = tx.init(params), []
    for t in range(5):
      u, s = update(_grads(params, t), s)
      outs.append(u)
    return outs

  a = trajectory(jax.jit(tx.update))
  b = trajectory(jax.jit(tx.update))
  c = trajectory(tx.update)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_close(a, c, rtol=1e-5, atol=1e-5)


def test_projection_changes_each_cycle_and_not_within():
  params = {'w': jnp.zeros((16, 32))}
  tx = compressed_momentum(4, decay=0.0, resample_every=2, key=0,
                           residual=False)
  g = {'w': jax.random.normal(jax.random.key(0), (16, 32))}
  s = tx.init(params)
  outs = []
  for _ in range(4):
    u, s = tx.update(g, s)
    outs.append(u['w'])
  # decay=0: the update is decompress_c(compress_c(g)); same within a cycle.
  chex.assert_trees_all_close(outs[0], outs[1])
  chex.assert_trees_all_close(outs[2], outs[3])
  assert not np.allclose(outs[1], outs[2])
  proj = Projector(4)
  k1 = flora_optax.cycle_key(0, 1)
  chex.assert_trees_all_close(
      outs[2], proj.decompress(proj.compress(g, k1), k1, like=g)['w'],
      rtol=1e-5, atol=1e-5)


def _run_norms(transfer, steps=150, residual=False):
  params = {'w': jnp.zeros((8, 64))}  # d/r = 8 with r = 1
  tx = compressed_momentum(1, decay=0.9, resample_every=1, transfer=transfer,
                           residual=residual)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', flora_optax.TransferStabilityWarning)
    s = tx.init(params)

  def body(s, t):
    g = {'w': jax.random.normal(jax.random.fold_in(jax.random.key(0), t),
                                (8, 64))}
    u, s = tx.update(g, s)
    return s, jnp.linalg.norm(u['w'])

  _, norms = jax.lax.scan(body, s, jnp.arange(steps))
  return np.asarray(norms)


def test_unbiased_transfer_diverges_when_unstable_and_safe_options_do_not():
  with pytest.warns(flora_optax.TransferStabilityWarning, match='sqrt'):
    compressed_momentum(1, decay=0.9, resample_every=1, residual=False).init(
        {'w': jnp.zeros((8, 64))})
  unsafe = _run_norms('unbiased')
  assert not np.isfinite(unsafe[-1]) or unsafe[-1] > 1e10
  for method in ('projected', 'reset'):
    safe = _run_norms(method)
    assert np.all(np.isfinite(safe)) and safe.max() < 1e3, (method, safe.max())
  # Residual mode carries the projected momentum: a contraction, whatever
  # the transfer argument (no warning either).
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    compressed_momentum(1, decay=0.9, resample_every=1).init(
        {'w': jnp.zeros((8, 64))})
  for method in ('unbiased', 'projected'):
    safe = _run_norms(method, residual=True)
    assert np.all(np.isfinite(safe)) and safe.max() < 1e3, (method, safe.max())


def test_no_warning_when_stable():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    compressed_momentum(8, decay=0.9, resample_every=100).init(
        {'w': jnp.zeros((64, 64))})
    compressed_momentum(1, decay=0.9, resample_every=1,
                        transfer='projected').init({'w': jnp.zeros((8, 64))})


def test_works_with_masked_and_extra_args():
  params = {'w': jnp.zeros((16, 32)), 'b': jnp.zeros((32,))}
  tx = optax.masked(compressed_momentum(4), {'w': True, 'b': False})
  s = tx.init(params)
  u, s = tx.update(jax.tree.map(jnp.ones_like, params), s, params,
                   unknown_extra_arg=3)
  assert u['w'].shape == (16, 32)
  chex.assert_trees_all_equal(u['b'], jnp.ones((32,)))
