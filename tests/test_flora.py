"""flora: the Adafactor chain with compressed momentum."""

import _helpers
import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import flora_optax

DENSE = _helpers.keep_dense  # compression off for every leaf


def _params():
  return _helpers.random_tree(0, {'w': (160, 130), 'u': (24, 40),
                                  'b': (130,)})


def _grads(params, t):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.fold_in(jax.random.key(t),
                                                     x.size), x.shape), params)


def _reference_chain(lr, momentum, weight_decay, position='paper'):
  """The same chain from optax's public transforms, momentum at ``position``.

  ``'paper'``: the paper's order (flora with ``residual=False``); ``'optax'``:
  ``optax.adafactor``'s.
  """
  ema = [optax.ema(momentum, debias=False)]
  return optax.chain(
      optax.scale_by_factored_rms(),
      *(ema if position == 'paper' else []),
      optax.clip_by_block_rms(1.0),
      optax.scale_by_learning_rate(lr, flip_sign=False),
      optax.scale_by_param_block_rms(),
      *(ema if position == 'optax' else []),
      optax.add_decayed_weights(weight_decay),
      optax.scale(-1),
  )


def _position(residual):
  """Where flora puts the momentum: optax.adafactor's place in residual
  mode, the paper's (right after the second moment) otherwise."""
  return 'optax' if residual else 'paper'


@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('lr', [1e-2, optax.linear_schedule(1e-2, 1e-3, 5)])
def test_compression_off_equals_the_optax_chain(lr, residual):
  params = _params()
  ours = flora_optax.flora(lr, DENSE, momentum=0.9, weight_decay_rate=1e-3,
                           residual=residual)
  ref = _reference_chain(lr, 0.9, 1e-3, _position(residual))
  p1, p2 = params, params
  s1, s2 = ours.init(p1), ref.init(p2)
  for t in range(6):
    g = _grads(params, t)
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


def test_residual_compression_off_is_optax_adafactor_in_its_order():
  # In optax.adafactor's order (the residual default, measured best), flora
  # without compression is optax.adafactor with momentum, bit for bit.
  params = _params()
  ours = flora_optax.flora(1e-2, DENSE, momentum=0.9, weight_decay_rate=1e-3)
  ref = optax.adafactor(1e-2, momentum=0.9, weight_decay_rate=1e-3)
  s1, s2 = ours.init(params), ref.init(params)
  for t in range(4):
    g = _grads(params, t)
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    chex.assert_trees_all_equal(u1, u2)


def test_without_momentum_equals_optax_adafactor():
  params = _params()
  ours, ref = flora_optax.flora(1e-2, 8, momentum=None), optax.adafactor(1e-2)
  s1, s2 = ours.init(params), ref.init(params)
  for t in range(3):
    g = _grads(params, t)
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6)


@pytest.mark.parametrize('residual', [False, True])
def test_full_rank_orthogonal_equals_the_optax_chain(residual):
  params = _params()
  full = lambda path, x: min(x.shape)
  ours = flora_optax.flora(1e-2, full, projection='orthogonal',
                           resample_every=2, residual=residual)
  ref = _reference_chain(1e-2, 0.9, 0.0, _position(residual))
  s1, s2 = ours.init(params), ref.init(params)
  update = jax.jit(ours.update)
  for t in range(5):
    g = _grads(params, t)
    u1, s1 = update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-3, atol=1e-6)


def test_state_is_smaller_than_adafactor_with_momentum():
  shapes = {'w': jax.ShapeDtypeStruct((1024, 512), jnp.float32),
            'b': jax.ShapeDtypeStruct((512,), jnp.float32)}
  nbytes = lambda tx: sum(x.size * x.dtype.itemsize
                          for x in jax.tree.leaves(jax.eval_shape(tx.init,
                                                                  shapes)))
  ours = nbytes(flora_optax.flora(1e-3, 32))
  ada = nbytes(optax.adafactor(1e-3, momentum=0.9))
  # Momentum sketch 1024x32 instead of 1024x512; factored rms the same.
  # Minus flora's key data (2 uint32) and resample cycle (one int32).
  assert ada - ours == 4 * (1024 * 512 - 1024 * 32) - 8 - 4
  assert ours < 0.1 * ada


def test_converges_on_a_least_squares_problem():
  x = jax.random.normal(jax.random.key(0), (256, 64))
  w_true = jax.random.normal(jax.random.key(1), (64, 48))
  y = x @ w_true
  loss = lambda p: jnp.mean((x @ p['w'] - y)**2)
  params = {'w': jnp.zeros((64, 48))}
  opt = flora_optax.flora(0.05, 16, resample_every=20,
                          multiply_by_parameter_scale=False)

  def step(c, _):
    p, s = c
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=400)[0])
  final, _ = run(params)
  assert loss(final) < 0.1 * loss(params)
