"""Long runs: the int32 step counters at and past their limit, and 10⁵ updates.

The counters are ``int32`` and saturate at ``2**31 - 1`` (``optax.
safe_increment``). Documented and checked here: up to the limit every cycle
and key is exactly what the unbounded formulas give; once saturated the cycle,
and so the projection, stays fixed and no transfer happens again (before the
fix, a saturated counter with ``(2**31 - 2) % resample_every == 0`` re-ran the
transfer ``P_{c-1} → P_c`` at every step on a sketch already in ``P_c``).
"""

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax

INT32_MAX = 2**31 - 1
RANK = 2


def _tree(seed):
  return _helpers.numpy_tree(seed, {'w': (6, 10), 'b': (10,)})


def _reference_momentum(key, kappa, count, mu, grads_seq, decay):
  """Algorithm 2 with unbounded Python counters, then saturation."""
  proj = flora_optax.Projector(RANK)
  like = grads_seq[0]
  outs = []
  for g in grads_seq:
    new = min(count + 1, INT32_MAX)
    c = (new - 1) // kappa
    key_c = flora_optax.cycle_key(key, c, 'momentum')
    if new > count and new > 1 and (new - 1) % kappa == 0:
      mu = proj.transfer(mu, flora_optax.cycle_key(key, c - 1, 'momentum'),
                         key_c, like)
    mu = jax.tree.map(lambda c_, m: (1 - decay) * c_ + decay * m,
                      proj.compress(g, key_c), mu)
    outs.append(proj.decompress(mu, key_c, like))
    count = new
  return outs, mu, count


@pytest.mark.parametrize('kappa', [1, 2, 3])
def test_momentum_cycles_up_to_and_past_int32_max(kappa):
  key, decay, start = 5, 0.5, INT32_MAX - 5
  tx = flora_optax.compressed_momentum(RANK, decay=decay, resample_every=kappa,
                                       key=key, residual=False)
  like = _tree(0)
  mu0 = flora_optax.Projector(RANK).compress(_tree(1), jax.random.key(9))
  # The state after `start` steps: its sketch is in the cycle of step start.
  state = tx.init(like)._replace(
      count=jnp.asarray(start, jnp.int32),
      cycle=jnp.asarray((start - 1) // kappa, jnp.int32), mu=mu0)
  grads = [_tree(t + 2) for t in range(9)]
  ref_outs, ref_mu, ref_count = _reference_momentum(key, kappa, start, mu0,
                                                    grads, decay)
  step = jax.jit(tx.update)
  for g, ref in zip(grads, ref_outs):
    out, state = step(g, state)
    chex.assert_trees_all_close(out, ref, rtol=2e-5, atol=2e-6)
  assert int(state.count) == ref_count == INT32_MAX
  chex.assert_trees_all_close(state.mu, ref_mu, rtol=2e-5, atol=2e-6)


def test_saturated_counter_neither_resamples_nor_transfers():
  # kappa = 1: every non-saturated step is a new cycle, so a spurious
  # transfer at the limit would show at once.
  tx = flora_optax.compressed_momentum(RANK, decay=0.5, resample_every=1,
                                       residual=False)
  like = _tree(0)
  proj = flora_optax.Projector(RANK)
  key_c = flora_optax.cycle_key(0, INT32_MAX - 1, 'momentum')
  mu = proj.compress(_tree(1), key_c)
  state = tx.init(like)._replace(count=jnp.asarray(INT32_MAX, jnp.int32),
                                 cycle=jnp.asarray(INT32_MAX - 1, jnp.int32),
                                 mu=mu)
  for t in range(3):
    g = _tree(t + 2)
    out, state = tx.update(g, state)
    mu = jax.tree.map(lambda c, m: 0.5 * c + 0.5 * m, proj.compress(g, key_c),
                      mu)
    chex.assert_trees_all_close(out, proj.decompress(mu, key_c, like),
                                rtol=2e-5, atol=2e-6)
    assert int(state.count) == INT32_MAX


def test_multisteps_cycles_past_int32_max():
  # Cycle j accumulates with P_j, j = gradient_step; once gradient_step
  # saturates every further cycle reuses the last projection, each cycle
  # still decompressing exactly what it compressed.
  key, k = 3, 2
  tx = flora_optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k, rank=RANK,
                              key=key)
  proj = flora_optax.Projector(RANK)
  like = _tree(0)
  state = tx.init(like)._replace(
      gradient_step=jnp.asarray(INT32_MAX - 1, jnp.int32))
  step = jax.jit(tx.update)
  j = INT32_MAX - 1
  for cycle in range(3):
    gs = [_tree(10 * cycle + i) for i in range(k)]
    for g in gs:
      out, state = step(g, state, like)
    key_j = flora_optax.cycle_key(key, j, 'accumulation')
    mean = jax.tree.map(lambda *x: sum(x) / k,
                        *[proj.compress(g, key_j) for g in gs])
    want = jax.tree.map(jnp.negative, proj.decompress(mean, key_j, like))
    chex.assert_trees_all_close(out, want, rtol=2e-5, atol=2e-6)
    assert bool(tx.has_updated(state))
    j = min(j + 1, INT32_MAX)
    assert int(state.gradient_step) == j


# --- 10⁵ updates inside one lax.scan ----------------------------------------

N_STEPS = 100_000


def _regression():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  y = a @ jnp.asarray(rng.standard_normal((8, 12)), jnp.float32) + 0.5

  def loss(p):
    return 0.5 * jnp.mean((a @ p['w'] + p['b'] - y)**2)

  return loss, {'w': jnp.zeros((8, 12)), 'b': jnp.zeros((12,))}


@pytest.mark.parametrize('name', ['compressed_momentum', 'flora'])
def test_hundred_thousand_updates_stay_finite_and_converge(name):
  loss, params = _regression()
  if name == 'flora':
    tx = flora_optax.flora(
        optax.cosine_decay_schedule(3e-3, N_STEPS), RANK, resample_every=100,
        min_dim_size_to_factor=4, multiply_by_parameter_scale=False)
  else:
    tx = optax.chain(
        flora_optax.compressed_momentum(RANK, resample_every=100),
        optax.scale_by_learning_rate(
            optax.cosine_decay_schedule(0.1, N_STEPS)))

  @jax.jit
  def train(params, state):
    def body(carry, _):
      p, s = carry
      value, g = jax.value_and_grad(loss)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), value

    return jax.lax.scan(body, (params, state), None, length=N_STEPS)

  (params, state), losses = train(params, tx.init(params))
  losses = np.asarray(losses)
  assert np.isfinite(losses).all()
  chex.assert_tree_all_finite((params, state))
  # 1000 resamples (and transfers) later, the loss is at the optimum.
  assert float(loss(params)) < 1e-8 * losses[0]
  momentum = _helpers.momentum_state(state)
  assert int(momentum.cycle) == (N_STEPS - 1) // 100
  counts = [x for x in jax.tree.leaves(state)
            if x.dtype == jnp.int32 and x is not momentum.cycle]
  assert counts and all(int(c) == N_STEPS for c in counts)
