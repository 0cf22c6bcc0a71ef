"""Non-finite gradients: what they do to sketches, and how to keep a run clean.

Documented behaviour (docs/explain/guarantees.md, "Guarantees and limits"):

* ``compressed_momentum``: a non-finite entry ``G[i, j]`` of a compressed
  leaf poisons the whole line of the sketch that shares its *kept* index (row
  ``i`` when the last axis is compressed, column ``j`` when the second-last
  is), and that line of every later update, across resamples; all other
  entries stay finite and exact. Dense leaves are poisoned element-wise.
* ``flora``: Adafactor's row/column statistics and the block-RMS clip spread a
  non-finite entry to its whole leaf, for good; other leaves are unaffected.
* ``optax.apply_if_finite`` and ``should_skip_update_fn`` (optax's or flora's
  ``MultiSteps``) skip such steps: the state, and with it every projection
  (they derive from the key and the step counters only), is bit-for-bit what
  it was, and the run continues exactly as if the step had never happened.
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

_grads = _helpers.numpy_tree  # (seed, shapes): float32 N(0, 1)


def _nonfinite(x):
  return ~np.isfinite(np.asarray(x))


@pytest.mark.parametrize('bad,shape,line_axis', [(np.nan, (4, 9), 1),
                                                  (np.inf, (9, 4), 0),
                                                  (-np.inf, (4, 9), 1)])
def test_non_finite_entry_poisons_one_line_for_good(bad, shape, line_axis):
  # (4, 9): the rows (4) are compressed, so column j is poisoned;
  # (9, 4): the columns are compressed, so row i is poisoned.
  i, j = 2, 3
  shapes = {'w': shape, 'b': (5,)}
  tx = flora_optax.compressed_momentum(2, resample_every=1)
  step = jax.jit(tx.update)
  state = tx.init(_grads(0, shapes))
  g = _grads(1, shapes)
  g = {'w': g['w'].at[i, j].set(bad), 'b': g['b'].at[1].set(bad)}
  expected = np.zeros(shape, bool)
  if line_axis == 1:
    expected[:, j] = True
  else:
    expected[i, :] = True
  expected_b = np.zeros(5, bool)
  expected_b[1] = True
  updates, state = step(g, state)
  np.testing.assert_array_equal(_nonfinite(updates['w']), expected)
  np.testing.assert_array_equal(_nonfinite(updates['b']), expected_b)
  # Finite gradients afterwards, with a new projection (and a transfer) at
  # every step: the poisoned line stays poisoned, the rest stays finite.
  for t in range(2, 5):
    updates, state = step(_grads(t, shapes), state)
    np.testing.assert_array_equal(_nonfinite(updates['w']), expected)
    np.testing.assert_array_equal(_nonfinite(updates['b']), expected_b)
  sketch_line = expected.any(axis=1 - line_axis)
  mu_bad = _nonfinite(state.mu['w']).all(axis=1 - line_axis)
  np.testing.assert_array_equal(mu_bad, sketch_line)


def test_flora_non_finite_entry_poisons_its_leaf_only():
  shapes = {'w': (8, 6), 'v': (8, 6), 'b': (6,)}
  tx = flora_optax.flora(1e-2, 2, min_dim_size_to_factor=2, resample_every=2)
  params = _grads(0, shapes)
  state = tx.init(params)
  step = jax.jit(tx.update)
  g = _grads(1, shapes)
  g['w'] = g['w'].at[3, 1].set(jnp.nan)
  for t in range(4):
    updates, state = step(g, state, params)
    assert _nonfinite(updates['w']).all()
    assert np.isfinite(updates['v']).all() and np.isfinite(updates['b']).all()
    g = _grads(t + 2, shapes)


# Updates and states after each step, under jit.
_run = functools.partial(_helpers.run, every_state=True)


@pytest.mark.parametrize('make,bad_at', [
    # A bad step mid-cycle, and one where a resample would have happened.
    (lambda: flora_optax.compressed_momentum(2, resample_every=2, decay=0.5),
     1),
    (lambda: flora_optax.compressed_momentum(2, resample_every=2, decay=0.5),
     2),
    (lambda: flora_optax.flora(1e-2, 2, resample_every=2,
                               min_dim_size_to_factor=2), 2),
])
def test_apply_if_finite_run_equals_run_without_the_bad_step(make, bad_at):
  shapes = {'w': (6, 10), 'b': (10,)}
  params = _grads(100, shapes)
  good = [_grads(t, shapes) for t in range(5)]
  bad = dict(good[0], w=good[0]['w'].at[0, 0].set(jnp.inf))
  with_bad = good[:bad_at] + [bad] + good[bad_at:]
  ref_outs, ref_states = _run(make(), good, params)
  tx = optax.apply_if_finite(make(), max_consecutive_errors=2)
  outs, states = _run(tx, with_bad, params)
  # The bad step returns zeros and leaves the inner state bit-identical.
  chex.assert_trees_all_equal(outs[bad_at],
                              jax.tree.map(jnp.zeros_like, outs[bad_at]))
  before = states[bad_at - 1].inner_state
  chex.assert_trees_all_equal(states[bad_at].inner_state, before)
  # Every later step is bit-identical to the run that never saw it: the
  # projections (keys and counters) did not move.
  for t in range(bad_at, len(good)):
    chex.assert_trees_all_equal(outs[t + 1], ref_outs[t])
    chex.assert_trees_all_equal(states[t + 1].inner_state, ref_states[t])


def test_optax_multisteps_skip_leaves_compressed_momentum_untouched():
  shapes = {'w': (6, 10), 'b': (10,)}
  params = _grads(100, shapes)
  inner = flora_optax.compressed_momentum(2, resample_every=1)
  tx = optax.MultiSteps(inner, every_k_schedule=2,
                        should_skip_update_fn=optax.skip_not_finite)
  good = [_grads(t, shapes) for t in range(4)]
  bad = dict(good[0], b=good[0]['b'].at[0].set(jnp.nan))
  step = jax.jit(tx.update)
  ref_outs, ref_states = _run(tx, good, params, step)
  outs, states = _run(tx, good[:2] + [bad] + good[2:], params, step)
  strip = lambda s: s._replace(skip_state=())  # noqa: E731
  chex.assert_trees_all_equal(strip(states[2]), strip(states[1]))
  for t in range(2, 4):
    chex.assert_trees_all_equal(outs[t + 1], ref_outs[t])
    chex.assert_trees_all_equal(strip(states[t + 1]), strip(ref_states[t]))


def _skip_large(updates, gradient_step, params):
  return optax.skip_large_updates(updates, gradient_step, params,
                                  max_squared_norm=1e6)


# A skipped micro-step mid-cycle, and one at the first micro-step of a cycle.
@pytest.mark.parametrize('skip_fn,bad_at', [(optax.skip_not_finite, 2),
                                            (_skip_large, 1)])
def test_flora_multisteps_skipped_micro_step_changes_nothing(skip_fn, bad_at):
  shapes = {'w': (6, 10), 'v': (3, 5, 8), 'b': (10,)}
  params = _grads(100, shapes)

  tx = flora_optax.MultiSteps(
      optax.adam(1e-2), every_k_schedule=2, rank=2, key=7,
      should_skip_update_fn=skip_fn)
  step = jax.jit(tx.update)

  good = [_grads(t, shapes) for t in range(6)]
  bad = dict(good[0], v=good[0]['v'].at[1, 2, 3].set(
      jnp.nan if skip_fn is optax.skip_not_finite else 1e9))
  ref_outs, ref_states = _run(tx, good, params, step)
  outs, states = _run(tx, good[:bad_at] + [bad] + good[bad_at:], params, step)
  strip = lambda s: s._replace(skip_state=())  # noqa: E731
  chex.assert_trees_all_equal(outs[bad_at],
                              jax.tree.map(jnp.zeros_like, outs[bad_at]))
  chex.assert_trees_all_equal(strip(states[bad_at]),
                              strip(states[bad_at - 1]))
  assert bool(states[bad_at].skip_state['should_skip'])
  for t in range(bad_at, len(good)):
    chex.assert_trees_all_equal(outs[t + 1], ref_outs[t])
    chex.assert_trees_all_equal(strip(states[t + 1]), strip(ref_states[t]))
  assert int(states[-1].gradient_step) == 3
