"""Projector: unbiasedness, exact paths, transfer, shapes and the matrix view."""

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flora_optax
from flora_optax import DimensionNumbers, Projector

PROJECTIONS = ('gaussian', 'rademacher', 'orthogonal')


def _rand(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _mean_reconstruction(proj, g, n_keys):
  keys = jax.random.split(jax.random.key(42), n_keys)
  one = lambda k: proj.decompress(proj.compress(g, k), k, like=g)
  return jnp.mean(jax.vmap(one)(keys), axis=0)


@pytest.mark.parametrize('projection', PROJECTIONS)
@pytest.mark.parametrize('side', ['smaller', 'larger'])
def test_unbiased_and_error_falls_like_inverse_sqrt(projection, side):
  proj = Projector(4, projection=projection, side=side)
  g = _rand((12, 20))
  rel = lambda n: float(
      jnp.linalg.norm(_mean_reconstruction(proj, g, n) - g) /
      jnp.linalg.norm(g))
  e_small, e_large = rel(256), rel(4096)
  # 16x more samples: error / 4 (1/sqrt(N)), with sampling slack.
  assert 0.15 < e_large / e_small < 0.4, (e_small, e_large)
  assert e_large < 0.08


def test_gaussian_one_sample_error_is_sqrt_d_plus_1_over_r():
  d, r = 64, 8
  proj = Projector(r)  # side='smaller' compresses the 64-axis of (64, 200).
  g = _rand((d, 200))
  keys = jax.random.split(jax.random.key(1), 400)
  one = lambda k: proj.decompress(proj.compress(g, k), k, like=g)
  err2 = jax.vmap(lambda k: jnp.sum((one(k) - g)**2))(keys) / jnp.sum(g**2)
  measured = float(jnp.sqrt(jnp.mean(err2)))
  np.testing.assert_allclose(measured, np.sqrt((d + 1) / r), rtol=0.05)


@pytest.mark.parametrize('shape', [(8, 8), (6, 10), (3, 5, 7)])
def test_orthogonal_full_rank_reconstructs_exactly(shape):
  proj = Projector(_helpers.full_rank, projection='orthogonal')
  g = _rand(shape)
  k = jax.random.key(3)
  out = proj.decompress(proj.compress(g, k), k, like=g)
  chex.assert_trees_all_close(out, g, atol=2e-5)


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_projection_second_moment_is_identity(projection):
  r, d = 3, 10
  proj = Projector(r, projection=projection)
  like = jnp.zeros((d, 40))  # compresses the rows (d=10)
  keys = jax.random.split(jax.random.key(0), 3000)
  ptp = jax.vmap(lambda k: (lambda p: p.T @ p)(proj.projections(like, k)))(keys)
  np.testing.assert_allclose(jnp.mean(ptp, 0), np.eye(d), atol=0.1)


@pytest.mark.parametrize('projection', PROJECTIONS)
@pytest.mark.parametrize('shape,dn', [((16, 40), None), ((40, 16), None),
                                      ((2, 12, 30), None),
                                      ((6, 4, 5), DimensionNumbers(0, (1, 2)))])
def test_transfer_equals_compress_new_of_decompress_old(projection, shape, dn):
  proj = Projector(4, projection=projection, dimension_numbers=dn)
  g = _rand(shape)
  k_old, k_new = jax.random.key(1), jax.random.key(2)
  c = proj.compress(g, k_old)
  expected = proj.compress(proj.decompress(c, k_old, like=g), k_new)
  got = proj.transfer(c, k_old, k_new, like=g)
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-4)


def test_transfer_uses_the_old_key_to_decompress():
  """At full orthogonal rank a transfer preserves the decompressed value.

  Transferring with the new key on both sides (or the old on both) would
  change it, so this fails for that known bug.
  """
  full = lambda path, x: min(x.shape)
  proj = Projector(full, projection='orthogonal')
  g = _rand((10, 10))
  k_old, k_new = jax.random.key(1), jax.random.key(2)
  c_old = proj.compress(g, k_old)
  c_new = proj.transfer(c_old, k_old, k_new, like=g)
  chex.assert_trees_all_close(proj.decompress(c_new, k_new, like=g), g,
                              atol=3e-5)
  buggy = proj.transfer(c_old, k_old, k_old, like=g)
  assert float(jnp.max(jnp.abs(proj.decompress(buggy, k_new, like=g) - g))) > 0.1


def test_projected_transfer_never_grows_and_reset_zeroes():
  proj = Projector(4)
  g = _rand((32, 64))
  k_old, k_new = jax.random.key(1), jax.random.key(2)
  c = proj.compress(g, k_old)
  before = jnp.linalg.norm(proj.decompress(c, k_old, like=g))
  for seed in range(5):
    k_new = jax.random.key(10 + seed)
    t = proj.transfer(c, k_old, k_new, like=g, method='projected')
    after = jnp.linalg.norm(proj.decompress(t, k_new, like=g))
    assert float(after) <= float(before) * (1 + 1e-5)
  z = proj.transfer(c, k_old, k_new, like=g, method='reset')
  assert float(jnp.max(jnp.abs(z))) == 0.0


@pytest.mark.parametrize('side,n,m,expected', [
    ('smaller', 64, 32, (64, 8)),
    ('smaller', 32, 64, (8, 64)),
    ('larger', 64, 32, (8, 32)),
    ('larger', 32, 64, (32, 8)),
    ('smaller', 32, 32, (32, 8)),
])
def test_sketch_shapes_follow_side(side, n, m, expected):
  proj = Projector(8, side=side)
  shapes = proj.sketch_shapes({'w': jax.ShapeDtypeStruct((n, m), jnp.float32)})
  assert shapes['w'].shape == expected
  size = int(np.prod(expected))
  assert size == (8 * max(n, m) if side == 'smaller' else 8 * min(n, m))


def test_batch_axes_and_dimension_numbers_shapes():
  like = {
      'stacked': jnp.zeros((5, 64, 32)),  # 5 layers, each its own projection
      'attn': jnp.zeros((64, 4, 16)),
  }
  proj = Projector(8)
  s = jax.tree.map(jnp.shape, proj.compress(like, jax.random.key(0)))
  # attn by default: 64 batch elements of 4x16 matrices, d=4 <= r: dense.
  assert s == {'stacked': (5, 64, 8), 'attn': (64, 4, 16)}
  dn = lambda path, x: (DimensionNumbers(0, (1, 2))
                        if 'attn' in jax.tree_util.keystr(path) else
                        DimensionNumbers(1, 2))
  proj = Projector(8, dimension_numbers=dn)
  s = jax.tree.map(jnp.shape, proj.compress(like, jax.random.key(0)))
  # attn: embed(64) x heads*head_dim(64), tie -> compress the output axes.
  assert s == {'stacked': (5, 64, 8), 'attn': (64, 8)}
  # A pytree of dimension numbers, None keeps a leaf dense.
  proj = Projector(8, dimension_numbers={'stacked': None,
                                         'attn': DimensionNumbers((0, 1), 2)})
  s = jax.tree.map(jnp.shape, proj.compress(like, jax.random.key(0)))
  assert s == {'stacked': (5, 64, 32), 'attn': (64, 4, 8)}


def test_batch_elements_get_distinct_projections():
  proj = Projector(4)
  p = proj.projections(jnp.zeros((3, 16, 32)), jax.random.key(0))
  assert p.shape == (3, 4, 16)
  assert not np.allclose(p[0], p[1]) and not np.allclose(p[1], p[2])


def test_dense_fallback():
  like = {'s': jnp.zeros(()), 'v': jnp.zeros((100,)), 'small': jnp.zeros((8, 50)),
          'big': jnp.zeros((9, 50))}
  plans = Projector(8).plan(like)
  assert [plans[k].dense for k in ('s', 'v', 'small', 'big')] == [
      True, True, True, False]
  g = jax.tree.map(lambda x: x + 1.0, like)
  out = Projector(8).compress(g, jax.random.key(0))
  chex.assert_trees_all_equal(out['v'], g['v'])
  chex.assert_trees_all_equal(out['small'], g['small'])


def test_rank_callable_is_applied_as_given():
  # Its range and type are checked in test_validation.py.
  like = {'a': jnp.zeros((8, 50)), 'b': jnp.zeros((8, 50))}
  rank = lambda path, x: 8 if path[0].key == 'a' else None
  plans = Projector(rank).plan(like)
  assert plans['a'].rank == 8 and plans['b'].dense


def test_leaf_projection_is_stable_when_params_are_added():
  k = jax.random.key(0)
  a = Projector(4).projections({'w': jnp.zeros((16, 32))}, k)['w']
  b = Projector(4).projections(
      {'w': jnp.zeros((16, 32)), 'new': jnp.zeros((16, 32))}, k)
  chex.assert_trees_all_equal(a, b['w'])
  assert not np.allclose(b['w'], b['new'])


def test_key_forms_agree():
  like = jnp.zeros((16, 32))
  p_int = Projector(4).projections(like, 7)
  p_typed = Projector(4).projections(like, jax.random.key(7))
  p_raw = Projector(4).projections(like, jax.random.PRNGKey(7))
  chex.assert_trees_all_equal(p_int, p_typed, p_raw)


def test_momentum_and_accumulation_keys_differ():
  k_m = flora_optax.cycle_key(0, 0, purpose='momentum')
  k_a = flora_optax.cycle_key(0, 0, purpose='accumulation')
  assert not np.array_equal(jax.random.key_data(k_m), jax.random.key_data(k_a))


def test_compress_in_and_out_of_jit_agree():
  proj = Projector(4, projection='orthogonal')
  g = {'w': _rand((16, 32)), 'b': _rand((32,))}
  k = jax.random.key(5)
  eager = proj.compress(g, k)
  jitted = jax.jit(proj.compress)(g, k)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(jitted, jax.jit(proj.compress)(g, k))


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
@pytest.mark.parametrize('projection', ['gaussian', 'rademacher', 'orthogonal'])
def test_grouped_draws_are_the_per_leaf_projections_bit_for_bit(
    projection, impl):
  # The optimizers draw same-shaped projections in one vmapped call (a much
  # smaller compiled program); every leaf must still get exactly the
  # projection of its own key, in and out of jit.
  from flora_optax import _keys, _projection  # pylint: disable=g-import-not-at-top
  like = {'a': jnp.zeros((8, 24)), 'b': jnp.zeros((8, 24)),
          'c': jnp.zeros((24, 8)), 'd': jnp.zeros((2, 8, 24)),
          'e': jnp.zeros((8, 30)), 'v': jnp.zeros((24,))}
  proj = flora_optax.Projector(4, projection=projection)
  key = jax.random.key(5, impl=impl)
  flat, _ = _projection.flatten_plans(proj.plan(like))
  items = [(path, plan, jnp.float32) for path, plan in flat]

  def per_leaf(key):
    return [None if plan.dense else plan.projection(
        _keys.leaf_key(key, path), projection, jnp.float32)
            for path, plan in flat]

  for draw in (lambda k: _projection.draw_projections(items, k),
               jax.jit(lambda k: _projection.draw_projections(items, k))):
    got = draw(key)
    for (path, _), g, w in zip(flat, got, per_leaf(key)):
      if w is None:
        assert g is None
      else:
        np.testing.assert_array_equal(g, w, err_msg=str(path))
