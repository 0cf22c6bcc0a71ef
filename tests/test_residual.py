"""Residual momentum: the row-space projector, exact paths and rank properties.

``compressed_momentum(residual=True)`` outputs ``Π_c M + (I - Π_c) g``, with
``Π_c`` the orthogonal projector onto the row space of ``P_c``, from the same
sketch state as the paper's algorithm.
"""

import _helpers
import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from flora_optax import Projector, compressed_momentum

PROJECTIONS = ['gaussian', 'rademacher', 'orthogonal']


def _tree(seed):
  return _helpers.random_tree(seed, {'w': (12, 20), 'tall': (24, 10),
                                     'stack': (3, 8, 6), 'b': (20,)})


def _dense_projector(p):
  """``Pᵀ (P Pᵀ)⁻¹ P`` formed explicitly (``d×d``), per batch element."""
  p = np.asarray(p, np.float64)
  return np.swapaxes(p, -1, -2) @ np.linalg.solve(p @ np.swapaxes(p, -1, -2),
                                                   p)


def _apply(pi, g, plan):
  """Applies the ``d×d`` projector ``pi`` along the compressed axis of g."""
  g = np.asarray(g, np.float64)
  if plan.compress_axes == (g.ndim - 1,):
    return g @ pi
  return pi @ g


@pytest.mark.parametrize('side', ['smaller', 'larger'])
@pytest.mark.parametrize('projection', PROJECTIONS)
def test_project_is_the_orthogonal_projector_onto_the_row_space(
    projection, side):
  proj = Projector(4, projection=projection, side=side)
  g = _tree(0)
  key = jax.random.key(3)
  got = proj.project(g, key)
  again = proj.project(got, key)
  ps = proj.projections(g, key)
  plans = proj.plan(g)
  for name in g:
    plan = plans[name]
    if plan.dense:
      chex.assert_trees_all_equal(got[name], g[name])
      continue
    pi = _dense_projector(ps[name])
    np.testing.assert_allclose(pi, np.swapaxes(pi, -1, -2), atol=1e-9)
    np.testing.assert_allclose(pi @ pi, pi, atol=1e-9)  # idempotent
    want = _apply(pi, g[name], plan)
    np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4)
    # Idempotent as computed, and the residual is orthogonal to the subspace.
    np.testing.assert_allclose(again[name], got[name], rtol=1e-4, atol=1e-4)
    resid = np.asarray(g[name] - got[name], np.float64)
    np.testing.assert_allclose(_apply(pi, resid, plan), 0.0, atol=1e-4)
    # Orthogonality of the split: |g|² = |Πg|² + |g - Πg|².
    np.testing.assert_allclose(
        np.sum(np.asarray(g[name], np.float64)**2),
        np.sum(np.asarray(got[name], np.float64)**2) + np.sum(resid**2),
        rtol=1e-4)


def test_the_projector_never_forms_a_d_by_d_matrix():
  # d = 24 (the compressed axis) appears in no (24, 24) intermediate.
  params = {'w': jnp.zeros((24, 40))}
  tx = compressed_momentum(4, resample_every=2)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)({'w': jnp.ones((24, 40))}, state)

  def shapes(jx):
    for eqn in jx.eqns:
      for v in eqn.outvars:
        yield tuple(getattr(v.aval, 'shape', ()))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  found = set(shapes(jaxpr.jaxpr))
  assert (4, 4) in found  # the Gram matrix is there
  assert not any(s[-2:] == (24, 24) for s in found if len(s) >= 2), found


def _reference(key, kappa, grads, decay, projection, nesterov=False):
  """Residual momentum from explicit projections, in float64.

  The state is the projected momentum ``Π_c M`` held in full size, so the
  transfer is ``Π_new (Π_old M)`` by construction.
  """
  proj = Projector(4, projection=projection)
  like = grads[0]
  plans = proj.plan(like)
  m = jax.tree.map(lambda x: np.zeros(x.shape), like)
  outs = []
  for t, g in enumerate(grads, start=1):
    c = (t - 1) // kappa
    ps = proj.projections(like, flora_optax.cycle_key(key, c))
    out = {}
    for name in g:
      gg = np.asarray(g[name], np.float64)
      if plans[name].dense:
        m[name] = decay * m[name] + (1 - decay) * gg
        out[name] = (decay * m[name] + (1 - decay) * gg if nesterov else
                     m[name])
        continue
      pi = _dense_projector(ps[name])
      proj_g = _apply(pi, gg, plans[name])
      m[name] = decay * _apply(pi, m[name], plans[name]) + (1 - decay) * proj_g
      inside = (decay * m[name] + (1 - decay) * proj_g if nesterov else
                m[name])
      out[name] = inside + gg - proj_g
    outs.append(out)
  return outs


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('projection', PROJECTIONS)
def test_residual_momentum_matches_explicit_projections(projection, nesterov):
  key, kappa, decay = 7, 3, 0.8
  grads = [{k: v for k, v in _tree(t).items() if k != 'stack'}
           for t in range(8)]
  tx = compressed_momentum(4, decay=decay, resample_every=kappa, key=key,
                           projection=projection, nesterov=nesterov)
  ref = _reference(key, kappa, grads, decay, projection, nesterov)
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  for g, want in zip(grads, ref):  # crosses two resample boundaries
    out, state = update(g, state)
    for name in g:
      np.testing.assert_allclose(out[name], want[name], rtol=2e-3, atol=2e-4)


def test_within_a_cycle_residual_updates_are_full_rank_and_paper_ones_rank_r():
  params = {'w': jnp.zeros((16, 32))}
  r = 3
  outs = {}
  for residual in (False, True):
    tx = compressed_momentum(r, resample_every=None, residual=residual)
    state = tx.init(params)
    total = jnp.zeros((16, 32))
    for t in range(6):
      g = {'w': jax.random.normal(jax.random.key(t), (16, 32))}
      out, state = tx.update(g, state)
      total = total + out['w']
      outs[residual] = (np.linalg.matrix_rank(np.asarray(out['w'])),
                        np.linalg.matrix_rank(np.asarray(total)))
  assert outs[False] == (r, r)  # every update and their sum: rank r
  assert outs[True] == (16, 16)  # full rank


@pytest.mark.parametrize('residual', [False, True])
def test_state_is_the_same_in_both_modes(residual):
  params = _tree(0)
  shapes = lambda tx: jax.tree.map(lambda x: (x.shape, x.dtype),
                                   tx.init(params))
  assert shapes(compressed_momentum(4, residual=residual)) == shapes(
      compressed_momentum(4, residual=not residual))
  fl = lambda res: jax.tree.map(
      lambda x: (x.shape, x.dtype),
      optax.tree.get(flora_optax.flora(1e-2, 4, residual=res).init(params),
                     'mu'))
  assert fl(residual) == fl(not residual)


def test_projected_transfer_never_increases_the_momentum():
  # residual + projection scale: the transfer is Π_new applied to Π_old M.
  params = {'w': jnp.zeros((8, 64))}
  tx = compressed_momentum(2, decay=0.9, resample_every=1)
  state = tx.init(params)
  norms = []
  for t in range(30):
    g = {'w': jax.random.normal(jax.random.key(t), (8, 64))}
    _, state = tx.update(g, state)
    norms.append(float(jnp.linalg.norm(state.mu['w'])))
  assert max(norms) < 10 * norms[0]


# --- resample_every changed at run time (issue: momentum silently wrong) -----


@pytest.mark.parametrize('residual', [False, True])
def test_changing_resample_every_at_run_time_stays_exact(residual):
  # Full-rank orthogonal projections: the momentum must equal optax.ema
  # whatever the cycles, also when kappa changes from 4 to 3 mid-run (the
  # cycle index then jumps; the sketch must be transferred from the
  # projection it is really in).
  params = {'w': jnp.zeros((6, 10)), 'b': jnp.zeros((10,))}
  tx = optax.inject_hyperparams(compressed_momentum,
                                static_args=('rank', 'residual'))(
                                    _helpers.full_rank, decay=0.8,
                                    resample_every=4,
                                    projection='orthogonal', residual=residual)
  ema = optax.ema(0.8, debias=False)
  s, se = tx.init(params), ema.init(params)
  update = jax.jit(tx.update)
  for t in range(14):
    if t == 6:
      s.hyperparams['resample_every'] = jnp.asarray(3)
    g = {k: jax.random.normal(jax.random.key(t), v.shape)
         for k, v in params.items()}
    u, s = update(g, s)
    ue, se = ema.update(g, se)
    chex.assert_trees_all_close(u, ue, atol=2e-5, rtol=1e-4)
  # 14 steps, kappa 3 from step 7 on: cycle (14 - 1) // 3.
  assert int(s.inner_state.cycle) == 13 // 3


def test_changing_resample_every_transfers_from_the_stored_cycle():
  # Low rank: after a change of kappa the state's sketch is moved from the
  # projection of its stored cycle to the new one (paper mode, so the
  # reference is Projector.transfer).
  params = {'w': jnp.zeros((6, 10))}
  key, r, decay = 4, 2, 0.5
  tx = optax.inject_hyperparams(compressed_momentum,
                                static_args=('rank', 'residual'))(
                                    r, decay=decay, resample_every=4, key=key,
                                    residual=False)
  s = tx.init(params)
  proj = Projector(r)
  mu, cycle = proj.compress(jax.tree.map(jnp.zeros_like, params),
                            flora_optax.cycle_key(key, 0)), 0
  for t in range(1, 10):
    if t == 6:
      s.hyperparams['resample_every'] = jnp.asarray(2)
    kappa = 4 if t < 6 else 2
    g = {'w': jax.random.normal(jax.random.key(t), (6, 10))}
    new = (t - 1) // kappa
    if new != cycle:
      mu = proj.transfer(mu, flora_optax.cycle_key(key, cycle),
                         flora_optax.cycle_key(key, new), params)
      cycle = new
    k = flora_optax.cycle_key(key, cycle)
    mu = jax.tree.map(lambda c, m: (1 - decay) * c + decay * m,
                      proj.compress(g, k), mu)
    out, s = tx.update(g, s)
    chex.assert_trees_all_close(out, proj.decompress(mu, k, params),
                                rtol=1e-4, atol=1e-5)
    assert int(s.inner_state.cycle) == cycle
