"""Leaves with a zero-length axis, in every position, for every entry point.

Issue 21: ``(0, 8, 8)`` (an empty batch of matrices) crashed the first update
of every optimizer with a ``ZeroDivisionError`` while drawing projections.
Such leaves are valid: they stay dense (a zero-length compressed axis) or have
empty sketches and projections (a zero-length batch or uncompressed axis).
These are explicit cases, not only what a property test may draw; every case
holds all the shapes in one tree (one compile per case).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax

# Every position of a zero-length axis, for 1-, 2- and 3-axis leaves.
ZERO_SHAPES = [(0,), (0, 8), (8, 0), (0, 8, 8), (8, 0, 8), (8, 8, 0),
               (0, 0), (0, 8, 0), (0, 6, 8)]
RANK = 2


def _params():
  """The zero-size leaves next to a compressed matrix (its projection is
  drawn in the same update) and a vector."""
  tree = {f'z{i}': jnp.zeros(s) for i, s in enumerate(ZERO_SHAPES)}
  return tree | {'w': jnp.arange(48.0).reshape(8, 6) / 48, 'b': jnp.ones((6,))}


def _sketch_shape(shape, side='smaller'):
  plan = flora_optax.Projector(RANK, side=side).plan({'x': jnp.zeros(shape)})
  return plan['x'].sketch_shape


def _check_sketches(sketches, side='smaller'):
  for i, shape in enumerate(ZERO_SHAPES):
    assert sketches[f'z{i}'].shape == _sketch_shape(shape, side), shape
  assert sketches['w'].shape == _sketch_shape((8, 6), side)
  assert sketches['w'].shape != (8, 6)  # the matrix is compressed


def _check_updates(updates, params):
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert (u.shape, u.dtype) == (p.shape, p.dtype)
    assert bool(jnp.all(jnp.isfinite(u)))


def _run(tx, params, steps):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = step(params, state, params)
    _check_updates(updates, params)
  return state


@pytest.mark.parametrize('side', ['smaller', 'larger'])
def test_some_zero_size_leaves_are_compressed(side):
  # Not only dense leaves: empty sketches and projections are exercised
  # (empty batches of matrices, and with side='larger' empty sketches of
  # non-empty projections).
  plans = flora_optax.Projector(RANK, side=side).plan(_params())
  assert sum(not plans[f'z{i}'].dense for i in range(len(ZERO_SHAPES))) >= 2


@pytest.mark.parametrize('residual,projection', [
    (True, 'gaussian'), (False, 'gaussian'), (True, 'orthogonal'),
    (False, 'rademacher')])
def test_compressed_momentum(residual, projection):
  tx = flora_optax.compressed_momentum(
      RANK, residual=residual, projection=projection, resample_every=1,
      transfer='projected')
  state = _run(tx, _params(), steps=2)  # resample_every=1: a transfer
  _check_sketches(state.mu)


@pytest.mark.parametrize('side', ['smaller', 'larger'])
def test_flora(side):
  tx = flora_optax.flora(1e-3, rank=RANK, side=side, resample_every=2)
  state = _run(tx, _params(), steps=3)
  _check_sketches(optax.tree.get(state, 'mu'), side)


def test_multisteps():
  tx = flora_optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2,
                              rank=RANK)
  state = _run(tx, _params(), steps=4)
  _check_sketches(state.acc_grads)
  assert int(state.gradient_step) == 2


def test_accumulate_gradients():
  params = _params()
  batches = {'x': jnp.ones((3, 6))}

  def grad_fn(p, b):
    return jax.tree.map(lambda x: x * jnp.sum(b['x']), p)

  grads = jax.jit(lambda p, b: flora_optax.accumulate_gradients(
      grad_fn, p, b, projector=flora_optax.Projector(RANK), step=1))(
          params, batches)
  _check_updates(grads, params)
  # Dense leaves are exact: the mean of the micro-gradients.
  np.testing.assert_allclose(grads['b'], 6.0 * params['b'], rtol=1e-6)


@pytest.mark.parametrize('projection', ['gaussian', 'orthogonal'])
def test_projector(projection):
  params = _params()
  proj = flora_optax.Projector(RANK, projection=projection)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  sketches = proj.compress(params, k1)
  _check_sketches(sketches)
  assert (jax.tree.map(jnp.shape, sketches) ==
          jax.tree.map(lambda s: s.shape, proj.sketch_shapes(params)))
  moved = proj.transfer(sketches, k1, k2, like=params)
  for tree in (proj.decompress(moved, k2, like=params),
               proj.project(params, k1)):
    _check_updates(tree, params)
  ps, plans = proj.projections(params, k1), proj.plan(params)
  for i in range(len(ZERO_SHAPES)):
    plan, p = plans[f'z{i}'], ps[f'z{i}']
    assert p is None if plan.dense else (p.shape, p.size) == (plan.p_shape, 0)


def test_state_shardings():
  mesh = jax.make_mesh((2, 4), ('data', 'model'))
  params = _params()
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  tx = flora_optax.flora(1e-3, rank=RANK)
  state_sh = flora_optax.state_shardings(tx, shapes, NamedSharding(mesh, P()))
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  _check_sketches(optax.tree.get(state, 'mu'))
