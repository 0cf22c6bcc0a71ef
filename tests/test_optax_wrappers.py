"""flora inside optax's wrappers: inject_hyperparams, masked, partition,
MultiSteps, apply_if_finite, extra args and optax.tree.map_params.

Every test compares against an independent computation (plain flora on the
same leaves, adamw, a hand-made mean gradient), so a wrapper that changes the
numbers, the keys or the leaf paths makes it fail.
"""

import functools

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax

# The transfer-stability warning is expected with these tiny shapes.
pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')

# Small, but every kind of leaf: factored and compressed matrix, a batch of
# matrices, a vector, a scalar.
SHAPES = {'w': (12, 8), 'e': (2, 6, 10), 'b': (8,), 's': ()}
KW = dict(rank=3, resample_every=2, min_dim_size_to_factor=4)
STATIC = ('rank', 'min_dim_size_to_factor')


def _params():
  return _helpers.random_tree(0, SHAPES)


def _grads(step):
  # Keys in sorted order of the names.
  return _helpers.random_tree(jax.random.fold_in(jax.random.key(1), step),
                              dict(sorted(SHAPES.items())))


def _run(tx, steps, update=None):
  return _helpers.run(tx, [_grads(t) for t in range(steps)], _params(),
                      update)


# One reference optimizer, compiled once for the whole module.
_FLORA = flora_optax.flora(1e-2, **KW)
_FLORA_STEP = jax.jit(_FLORA.update)


@functools.cache
def _reference(steps):
  """Plain flora's updates and final state after ``steps`` steps."""
  return _run(_FLORA, steps, _FLORA_STEP)


# --- inject_hyperparams ------------------------------------------------------


def test_inject_hyperparams_matches_plain_flora():
  inj = optax.inject_hyperparams(flora_optax.flora, static_args=STATIC)(
      1e-2, **KW)
  # 5 steps with resample_every=2: two transfers are crossed.
  outs, state = _reference(5)
  outs_i, state_i = _run(inj, 5)
  chex.assert_trees_all_close(outs_i, outs, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_i.inner_state, state, rtol=1e-5,
                              atol=1e-6)


def test_every_numeric_hyperparameter_is_injected_and_used():
  inj = optax.inject_hyperparams(flora_optax.flora, static_args=STATIC)(
      1e-2, **KW)
  state = inj.init(_params())
  # Everything numeric that is not shape-setting is a (traceable) array.
  assert {'learning_rate', 'momentum', 'resample_every', 'decay_rate',
          'decay_offset', 'clipping_threshold', 'eps'} <= set(state.hyperparams)
  traces = []

  @jax.jit
  def step(g, state, params):
    traces.append(None)
    return inj.update(g, state, params)

  new = dict(learning_rate=0.05, momentum=0.5, resample_every=3,
             decay_rate=0.7, clipping_threshold=0.5)
  hp = dict(state.hyperparams)
  for k, v in new.items():
    hp[k] = jnp.asarray(v, hp[k].dtype)
  state = state._replace(hyperparams=hp)
  ref_tx = flora_optax.flora(
      new['learning_rate'], rank=3, resample_every=3, momentum=0.5,
      decay_rate=0.7, clipping_threshold=0.5, min_dim_size_to_factor=4)
  ref_outs, ref_state = _run(ref_tx, 4)
  params = _params()
  for t in range(4):  # crosses the resample at step 4 (not at 3, as κ=2 would)
    u, state = step(_grads(t), state, params)
    chex.assert_trees_all_close(u, ref_outs[t], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-5,
                              atol=1e-6)
  # Changing the injected values did not retrace.
  assert len(traces) == 1


def test_resample_every_injection_changes_the_projection_schedule():
  """A guard against a test above passing because the value is ignored."""
  inj = optax.inject_hyperparams(flora_optax.flora, static_args=STATIC)(
      1e-2, **KW)
  params = _params()
  s2 = inj.init(params)
  s5 = s2._replace(hyperparams={**s2.hyperparams,
                                'resample_every': jnp.asarray(5)})
  step = jax.jit(inj.update)
  for t in range(3):
    u2, s2 = step(_grads(t), s2, params)
    u5, s5 = step(_grads(t), s5, params)
  # Step 3 starts a new cycle for κ=2 only; dense leaves are unaffected.
  assert not np.allclose(u2['w'], u5['w'])
  chex.assert_trees_all_close(u2['b'], u5['b'], rtol=1e-6)


def test_inject_compressed_momentum():
  plain = optax.chain(
      flora_optax.compressed_momentum(3, decay=0.8, resample_every=2),
      optax.scale(-0.1))
  inj = optax.chain(
      optax.inject_hyperparams(flora_optax.compressed_momentum,
                               static_args='rank')(
                                   3, decay=0.8, resample_every=2),
      optax.scale(-0.1))
  outs, state = _run(plain, 4)
  outs_i, state_i = _run(inj, 4)
  chex.assert_trees_all_close(outs_i, outs, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_i[0].inner_state, state[0], rtol=1e-5,
                              atol=1e-6)


# A non-static rank, a traced min_dim_size_to_factor and a callable dtype
# are refused with a clear error: see test_validation.py.


def test_injected_min_dim_size_to_factor_is_read_back_when_concrete():
  inj = optax.inject_hyperparams(flora_optax.flora, static_args=('rank',))(
      1e-2, **KW)
  # An eager init reads the concrete value back: the same state as flora.
  chex.assert_trees_all_equal_shapes_and_dtypes(
      inj.init(_params()).inner_state, _FLORA.init(_params()))


def test_dtype_momentum_under_inject_hyperparams():
  # A callable dtype would be taken for a schedule (refused, see
  # test_validation.py); a string or a static argument works, and the dtype
  # is honoured.
  for tx in (
      optax.inject_hyperparams(flora_optax.flora, static_args=STATIC)(
          1e-2, dtype_momentum='bfloat16', **KW),
      optax.inject_hyperparams(
          flora_optax.flora, static_args=STATIC + ('dtype_momentum',))(
              1e-2, dtype_momentum=jnp.bfloat16, **KW)):
    _, state = _run(tx, 2)
    mu = optax.tree.get(state.inner_state, 'mu')
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}


# --- masked and partition ----------------------------------------------------


def test_masked_equals_flora_on_the_selected_leaves():
  mask = {'w': True, 'e': True, 'b': False, 's': False}
  tx = optax.masked(flora_optax.flora(1e-2, **KW), mask)
  outs, _ = _run(tx, 4)
  ref, _ = _reference(4)
  for t in range(4):
    # Leaf paths (hence projections) are unchanged by the mask.
    chex.assert_trees_all_close(outs[t]['w'], ref[t]['w'], rtol=1e-6)
    chex.assert_trees_all_close(outs[t]['e'], ref[t]['e'], rtol=1e-6)
    # Masked-out leaves pass through untouched.
    chex.assert_trees_all_equal(outs[t]['b'], _grads(t)['b'])
    chex.assert_trees_all_equal(outs[t]['s'], _grads(t)['s'])


def test_partition_flora_and_adamw():
  labels = {'w': 'flora', 'e': 'flora', 'b': 'adamw', 's': 'adamw'}
  tx = optax.partition(
      {'flora': flora_optax.flora(1e-2, **KW), 'adamw': optax.adamw(1e-3)},
      labels)
  outs, state = _run(tx, 4)
  ref_f, _ = _reference(4)
  ref_a, _ = _run(optax.adamw(1e-3), 4)
  for t in range(4):
    for n in ('w', 'e'):
      chex.assert_trees_all_close(outs[t][n], ref_f[t][n], rtol=1e-6)
    for n in ('b', 's'):
      chex.assert_trees_all_close(outs[t][n], ref_a[t][n], rtol=1e-6)
  # The flora part keeps sketches, not full moments.
  mu = optax.tree.get(state.inner_states['flora'].inner_state, 'mu')
  assert mu['w'].shape == (12, 3)


# --- MultiSteps, apply_if_finite ---------------------------------------------


def test_optax_multisteps_of_flora_sees_the_mean_gradient():
  k = 3
  tx = optax.MultiSteps(flora_optax.flora(1e-2, **KW), every_k_schedule=k)
  params = _params()
  state, ref_state = tx.init(params), _FLORA.init(params)
  step = jax.jit(tx.update)
  for c in range(2):
    gs = [_grads(c * k + i) for i in range(k)]
    for i, g in enumerate(gs):
      u, state = step(g, state, params)
      if i < k - 1:
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
    mean = jax.tree.map(lambda *x: sum(x) / k, *gs)
    ref_u, ref_state = _FLORA_STEP(mean, ref_state, params)
    chex.assert_trees_all_close(u, ref_u, rtol=1e-5, atol=1e-6)


def test_apply_if_finite_skips_bad_steps_without_touching_the_state():
  tx = optax.apply_if_finite(flora_optax.flora(1e-2, **KW),
                             max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  ref_outs, ref_state = _reference(4)
  step = jax.jit(tx.update)
  for t in range(4):
    u, state = step(_grads(t), state, params)
    chex.assert_trees_all_close(u, ref_outs[t], rtol=1e-5, atol=1e-6)
    if t == 1:
      bad = dict(_grads(t), w=_grads(t)['w'].at[0, 0].set(jnp.nan))
      before = state
      u, state = step(bad, state, params)
      chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
      chex.assert_trees_all_equal(state.inner_state, before.inner_state)
      assert int(state.notfinite_count) == 1
  chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-5,
                              atol=1e-6)


# --- extra args, map_params --------------------------------------------------


@pytest.mark.parametrize('wrapper', ['none', 'multisteps'])
def test_extra_args_are_accepted_without_recompiling(wrapper):
  tx = flora_optax.flora(1e-2, **KW)
  if wrapper == 'multisteps':
    tx = flora_optax.MultiSteps(tx, every_k_schedule=2, rank=3)
  traces = []

  @jax.jit
  def step(params, state, t):
    traces.append(None)
    g = jax.tree.map(lambda p: jnp.sin(p * t), params)
    u, state = tx.update(g, state, params, value=jnp.float32(1.0),
                         unexpected_extra_arg=t)
    return optax.apply_updates(params, u), state

  params = _params()
  state = tx.init(params)
  for t in range(3):
    params, state = step(params, state, jnp.float32(t))
  assert len(traces) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_map_params_touches_only_param_shaped_subtrees():
  tx = _FLORA
  params = _params()
  _, state = _reference(3)
  same = optax.tree.map_params(tx, lambda v: v, state)
  chex.assert_trees_all_equal(same, state)
  bumped = optax.tree.map_params(tx, lambda v: v + 1, state)
  i = next(i for i, s in enumerate(state)
           if isinstance(s, flora_optax.CompressedMomentumState))
  fs, mom = bumped[0], bumped[i]
  # Counters and the key are not params: untouched.
  chex.assert_trees_all_equal(mom.count, state[i].count)
  chex.assert_trees_all_equal(mom.cycle, state[i].cycle)
  chex.assert_trees_all_equal(mom.key, state[i].key)
  chex.assert_trees_all_equal(fs.count, state[0].count)
  # Sketches sit at the params' positions, so they are mapped.
  chex.assert_trees_all_close(mom.mu['w'], state[i].mu['w'] + 1)
  # And training continues from the mapped state.
  u, _ = _FLORA_STEP(_grads(3), same, params)
  assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)


def test_accumulator_dtype_under_inject_hyperparams():
  # jnp.bfloat16 (a callable, taken for a schedule) is refused: see
  # test_validation.py.
  factory = optax.inject_hyperparams(flora_optax.compressed_momentum,
                                     static_args='rank')
  state = factory(3, accumulator_dtype='bfloat16').init(_params())
  assert state.inner_state.mu['w'].dtype == jnp.bfloat16
