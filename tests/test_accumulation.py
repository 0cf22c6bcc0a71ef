"""Tests of flora_optax.MultiSteps and flora_optax.accumulate_gradients.

The equivalence tests rebuild the scenarios of optax's own MultiSteps tests
(optax/transforms/_accumulation_test.py) and run them side by side with
``optax.MultiSteps``: with ``projection='orthogonal'`` and ``r == d`` on every
matrix the projection is an orthogonal change of basis, so the two must agree
to float tolerance.
"""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import full_rank, random_tree

import flora_optax
from flora_optax import _keys


def exact_multisteps(opt, every_k_schedule, **kwargs):
  return flora_optax.MultiSteps(opt, every_k_schedule, rank=full_rank,
                                projection='orthogonal', key=3, **kwargs)


class Loss(flax.linen.Module):
  """optax's test model: a 7 -> 10 dense layer."""

  @flax.linen.compact
  def __call__(self, x, dtype=jnp.float32, param_dtype=jnp.float32):
    return jnp.sum(
        flax.linen.Dense(10, dtype=dtype, param_dtype=param_dtype)(x)**2)


SHAPES = {'w': (12, 20), 'v': (9, 5), 'b': (20,), 's': ()}


def assert_compressed(state, params):
  """Guards the equivalence tests: the matrices really go through P."""
  plans = flora_optax.Projector(
      full_rank, projection='orthogonal').plan(params)
  assert any(not pl.dense for pl in jax.tree.leaves(
      plans, is_leaf=lambda x: isinstance(x, flora_optax.LeafPlan)))
  chex.assert_trees_all_equal_shapes(state.acc_grads, params)


# --- equivalence with optax.MultiSteps (r == d, orthogonal) -----------------


def test_multi_steps_matches_optax_training():
  """optax's test_multi_steps: adam + weight decay, jitted, 5 cycles of 4."""
  k_steps, data = 4, jnp.ones([32, 7])
  loss = Loss()
  params = loss.init({'params': jax.random.key(0)}, data)['params']
  loss_apply = lambda p, x: loss.apply({'params': p}, x)
  inner = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2),
                      optax.scale(-1e-4))
  ours, ref = exact_multisteps(inner, k_steps), optax.MultiSteps(inner, k_steps)

  def make_step(opt):
    @jax.jit
    def step(x, opt_state, params):
      grad = jax.grad(loss_apply)(params, x)
      return opt.update(grad, opt_state, params)
    return step

  step, ref_step = make_step(ours), make_step(ref)
  state, ref_state = ours.init(params), ref.init(params)
  assert_compressed(state, params)
  p, ref_p = params, params
  prev_loss = loss_apply(p, data)
  for idx in range(5 * k_steps):
    updates, state = step(data, state, p)
    ref_updates, ref_state = ref_step(data, ref_state, ref_p)
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-9)
    p = optax.apply_updates(p, updates)
    ref_p = optax.apply_updates(ref_p, ref_updates)
    chex.assert_trees_all_close(p, ref_p, rtol=1e-5, atol=1e-7)
    assert bool(ours.has_updated(state)) == bool(ref.has_updated(ref_state))
    new_loss = loss_apply(p, data)
    if idx % k_steps < k_steps - 1:
      assert not ours.has_updated(state)
      assert new_loss == prev_loss
    else:
      assert ours.has_updated(state)
      assert new_loss < prev_loss
      prev_loss = new_loss
  for field in ('mini_step', 'gradient_step'):
    assert int(getattr(state, field)) == int(getattr(ref_state, field))
  chex.assert_trees_all_close(state.inner_opt_state, ref_state.inner_opt_state,
                              rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('use_grad_mean', [True, False])
def test_callable_schedule_matches_optax(use_grad_mean):
  """optax's test_multi_steps_every_k_schedule, with values compared too."""
  schedule = lambda grad_step: jnp.where(grad_step < 2, 1, 3)
  ours = exact_multisteps(optax.sgd(0.1), schedule,
                          use_grad_mean=use_grad_mean)
  ref = optax.MultiSteps(optax.sgd(0.1), schedule, use_grad_mean=use_grad_mean)
  params = random_tree(0, SHAPES)
  state, ref_state = ours.init(params), ref.init(params)
  assert_compressed(state, params)
  step, ref_step = jax.jit(ours.update), jax.jit(ref.update)
  expected_updated = [True, True] + [False, False, True] * 3
  for i, want in enumerate(expected_updated):
    grads = random_tree(100 + i, SHAPES)
    updates, state = step(grads, state, params)
    ref_updates, ref_state = ref_step(grads, ref_state, params)
    assert bool(ours.has_updated(state)) == want
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == 5


@pytest.mark.parametrize('use_grad_mean, expected', [(True, 2.5),
                                                     (False, 10.0)])
def test_mean_or_sum(use_grad_mean, expected):
  """optax's test_multi_steps_computes_mean, on a matrix and a scalar."""
  ours = exact_multisteps(optax.scale(1.0), 4, use_grad_mean=use_grad_mean)
  ref = optax.MultiSteps(optax.scale(1.0), 4, use_grad_mean=use_grad_mean)
  params = {'a': jnp.zeros([]), 'm': jnp.zeros((6, 8))}
  base = random_tree(1, {'a': (), 'm': (6, 8)})
  state, ref_state = ours.init(params), ref.init(params)
  step, ref_step = jax.jit(ours.update), jax.jit(ref.update)
  for i in [1, 2, 3, 4]:
    grads = jax.tree.map(lambda x: x * i, base)
    updates, state = step(grads, state, params)
    ref_updates, ref_state = ref_step(grads, ref_state, params)
  assert ours.has_updated(state)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda x: x * expected,
                                                    base), rtol=1e-5)
  chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-6)


def test_skip_not_finite_matches_optax():
  """optax's test_multi_steps_skip_not_finite, with NaN and inf micro-steps."""
  kw = dict(should_skip_update_fn=optax.skip_not_finite)
  ours = exact_multisteps(optax.sgd(1.0), 2, **kw)
  ref = optax.MultiSteps(optax.sgd(1.0), 2, **kw)
  params = {'a': jnp.zeros([]), 'm': jnp.zeros((5, 3))}
  good = {'a': jnp.ones([]), 'm': jnp.arange(15.).reshape(5, 3) / 10}
  nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), good)
  inf = {'a': jnp.array(jnp.inf), 'm': good['m']}
  step, ref_step = jax.jit(ours.update), jax.jit(ref.update)
  state, ref_state = jax.jit(ours.init)(params), jax.jit(ref.init)(params)
  p = ref_p = params
  # good, good | inf, nan (skipped) | good, nan (skipped), good
  for grads, mini_step in [(good, 1), (good, 0), (inf, 0), (nan, 0), (good, 1),
                           (nan, 1), (good, 0)]:
    updates, state = step(grads, state, p)
    ref_updates, ref_state = ref_step(grads, ref_state, ref_p)
    assert int(state.mini_step) == int(ref_state.mini_step) == mini_step
    assert bool(state.skip_state['should_skip']) == bool(
        ref_state.skip_state['should_skip'])
    assert int(state.skip_state['num_not_finite']) == int(
        ref_state.skip_state['num_not_finite'])
    chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(state.acc_grads)
    p = optax.apply_updates(p, updates)
    ref_p = optax.apply_updates(ref_p, ref_updates)
    chex.assert_trees_all_close(p, ref_p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p['a'], -2.0)
  np.testing.assert_allclose(p['m'], -2 * good['m'], rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == 2


def test_zero_nans_inner():
  """optax's test_multi_steps_zero_nans: the inner chain may hold zero_nans."""
  inner = optax.chain(optax.zero_nans(), optax.sgd(1e-4))
  ours = exact_multisteps(inner, 2)
  params = {'a': jnp.zeros([]), 'm': jnp.zeros((4, 3))}
  updates, _ = jax.jit(ours.update)(optax.tree.zeros_like(params),
                                    ours.init(params), params)
  chex.assert_trees_all_equal(updates, optax.tree.zeros_like(params))


def test_mixed_precision_matches_optax():
  """optax's test_multi_steps_mixed_precision (adam, lr 0.1).

  A subset of optax's 2 x 9 cases that puts every dtype on both the update
  and the param side. Update dtypes must match optax.MultiSteps's (which
  optax checks against the bare optimizer); param dtypes must be preserved;
  values must match.
  """
  k_steps, loss = 4, Loss()
  f32, f16, bf16 = jnp.float32, jnp.float16, jnp.bfloat16
  for upd_dtype, param_dtype, mu_dtype in [(bf16, f32, None),
                                           (f32, bf16, f32),
                                           (f16, bf16, None),
                                           (f16, f16, f32)]:
    adam = optax.adam(0.1, mu_dtype=mu_dtype)
    ours, ref = exact_multisteps(adam, k_steps), optax.MultiSteps(adam, k_steps)

    def train_step(data, opt_state, params, update_fn):
      grad = jax.grad(lambda p: loss.apply({'params': p}, data))(params)
      grad = jax.tree.map(lambda g: g.astype(upd_dtype), grad)
      return update_fn(grad, opt_state, params)

    step = jax.jit(functools.partial(train_step, update_fn=ours.update))
    ref_step = jax.jit(functools.partial(train_step, update_fn=ref.update))
    data = jnp.ones([32, 7], param_dtype)
    params = loss.init({'params': jax.random.key(0)}, data,
                       param_dtype=param_dtype)['params']
    state, ref_state = ours.init(params), ref.init(params)
    p = ref_p = params
    for _ in range(k_steps + 1):
      updates, state = step(data, state, p)
      ref_updates, ref_state = ref_step(data, ref_state, ref_p)
      chex.assert_trees_all_equal_dtypes(updates, ref_updates)
      chex.assert_trees_all_close(updates, ref_updates, rtol=2e-2, atol=2e-2)
      new_p = optax.apply_updates(p, updates)
      chex.assert_trees_all_equal_dtypes(new_p, params)
      p, ref_p = new_p, optax.apply_updates(ref_p, ref_updates)
    assert int(state.gradient_step) == 1 and int(state.mini_step) == 1
    chex.assert_trees_all_equal_dtypes(state.acc_grads, ref_state.acc_grads)
    chex.assert_trees_all_equal_dtypes(state.inner_opt_state,
                                       ref_state.inner_opt_state)


def test_scan_dtype_stability():
  """optax's test_multi_steps_scan_dtype_stability, on bf16 matrices."""
  ours = exact_multisteps(optax.sgd(1e-4), 2, accumulator_dtype=jnp.float32)
  ref = optax.MultiSteps(optax.sgd(1e-4), 2, accumulator_dtype=jnp.float32)
  params = {'a': jnp.zeros([], jnp.bfloat16),
            'm': jnp.zeros((6, 4), jnp.bfloat16)}
  grads = {'a': jnp.ones([], jnp.bfloat16),
           'm': jnp.linspace(-1, 1, 24).reshape(6, 4).astype(jnp.bfloat16)}

  def run(opt):
    def body(state, _):
      updates, state = opt.update(grads, state, params)
      return state, updates
    return jax.lax.scan(body, opt.init(params), jnp.arange(4))

  (state, updates), (ref_state, ref_updates) = run(ours), run(ref)
  chex.assert_trees_all_equal_dtypes(state.acc_grads,
                                     {'a': jnp.zeros([]), 'm': jnp.zeros([])})
  chex.assert_trees_all_equal_dtypes(updates, ref_updates)
  chex.assert_trees_all_close(updates, ref_updates, rtol=1e-2, atol=1e-6)


# --- low rank --------------------------------------------------------------


def _one_cycle(tx, params, micro_grads, key):
  """The gradient handed to the inner optimizer after one cycle (identity)."""
  state = tx.init(params)._replace(key=key)
  for g in micro_grads:
    updates, state = tx.update(g, state, params)
  return updates


def test_low_rank_mean_is_unbiased_over_keys():
  shapes = {'w': (24, 40), 'b': (40,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  micro = [random_tree(10 + i, shapes) for i in range(3)]
  true_mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
  tx = flora_optax.MultiSteps(optax.identity(), 3, rank=4)
  n = 4000
  keys = jax.vmap(lambda i: jax.random.key_data(jax.random.key(i)))(
      jnp.arange(n))
  outs = jax.jit(jax.vmap(lambda k: _one_cycle(tx, params, micro, k)))(keys)
  # Dense leaves are exact for every key.
  np.testing.assert_allclose(outs['b'], jnp.broadcast_to(
      true_mean['b'], outs['b'].shape), rtol=1e-5)
  w = np.asarray(outs['w'])
  err = w.mean(0) - np.asarray(true_mean['w'])
  stderr = w.std(0) / np.sqrt(n)
  # One estimate is far off (relative error ~ sqrt(d/r)); the mean is not.
  assert np.linalg.norm(w[0] - true_mean['w']) > 0.5 * np.linalg.norm(
      true_mean['w'])
  assert np.abs(err / stderr).max() < 5.0
  assert np.abs(err / stderr).mean() < 1.0
  assert np.linalg.norm(err) < 0.05 * np.linalg.norm(true_mean['w'])


def test_cycles_use_fresh_projections():
  """Cycle j compresses with cycle_key(key, j, purpose='accumulation').

  The key derivation is also checked by hand, so a change of cycle_key that
  moved MultiSteps along with it would still be caught.
  """
  shapes = {'w': (16, 24), 'b': (24,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  g = random_tree(4, shapes)
  tx = flora_optax.MultiSteps(optax.identity(), 2, rank=3, key=7)
  proj = flora_optax.Projector(rank=3)
  step = jax.jit(tx.update)
  state = tx.init(params)
  sketches, outputs = [], []
  for j in range(2):
    _, state = step(g, state, params)
    sketches.append(state.acc_grads)
    updates, state = step(g, state, params)
    outputs.append(updates)
    cycle_key = flora_optax.cycle_key(7, j, purpose='accumulation')
    assert (jax.random.key_data(cycle_key) == jax.random.key_data(
        jax.random.fold_in(jax.random.fold_in(
            jax.random.key(7), _keys.ACCUMULATION_PURPOSE), j))).all()
    # After one micro-step, the mean sketch is compress_j(g).
    chex.assert_trees_all_close(sketches[j], proj.compress(g, cycle_key),
                                rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        updates, proj.decompress(proj.compress(g, cycle_key), cycle_key, g),
        rtol=1e-5, atol=1e-6)
  # Same gradient, different cycle: different sketch and estimate.
  assert not np.allclose(sketches[0]['w'], sketches[1]['w'], atol=1e-3)
  assert not np.allclose(outputs[0]['w'], outputs[1]['w'], atol=1e-3)
  np.testing.assert_array_equal(outputs[0]['b'], outputs[1]['b'])
  # Momentum and accumulation never share projections for one key.
  mom_key = flora_optax.cycle_key(7, 0, purpose='momentum')
  assert not np.allclose(proj.compress(g, mom_key)['w'], sketches[0]['w'],
                         atol=1e-3)


def test_state_bytes_follow_formula():
  shapes = {'w': (64, 32), 'v': (16, 48), 'b': (32,),
            'stack': (3, 20, 40), 'small': (6, 100)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  r = 8
  for side, pick in [('smaller', max), ('larger', min)]:
    tx = flora_optax.MultiSteps(optax.sgd(0.1), 4, rank=r, side=side)
    state = jax.eval_shape(tx.init, params)
    acc_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(state.acc_grads))
    # r·max(n, m) per compressed matrix ('smaller'), r·min(n, m) ('larger');
    # a matrix whose compressed axis is <= r stays dense.
    small = 6 * 100 if side == 'smaller' else r * 6
    expected = 4 * (r * pick(64, 32) + r * pick(16, 48) + 32 +
                    3 * r * pick(20, 40) + small)
    assert acc_bytes == expected
  ref = jax.eval_shape(optax.MultiSteps(optax.sgd(0.1), 4).init, params)
  ref_bytes = sum(x.size * 4 for x in jax.tree.leaves(ref.acc_grads))
  assert ref_bytes == 4 * (64 * 32 + 16 * 48 + 32 + 3 * 20 * 40 + 600)
  bf16 = jax.eval_shape(flora_optax.MultiSteps(
      optax.sgd(0.1), 4, rank=r, accumulator_dtype=jnp.bfloat16).init, params)
  dtypes = {x.dtype for x in jax.tree.leaves(bf16.acc_grads)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


# --- the inner optimizer runs once per cycle, with no recompilation ----------


def counting(opt, counter):
  """Wraps ``opt`` so that every executed inner update bumps ``counter``."""

  def update(updates, state, params=None, **extra):
    jax.debug.callback(lambda: counter.append(1))
    return opt.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(opt.init, update)


def test_inner_update_runs_once_per_cycle_without_recompiling():
  params = random_tree(0, SHAPES)
  k, cycles = 3, 3
  runs, ref_runs, traces = [], [], []

  def make_step(opt):
    def step(g, state, params):
      traces.append(1)  # Python side effect: counts traces.
      return opt.update(g, state, params)
    return jax.jit(step)

  ours = flora_optax.MultiSteps(counting(optax.adam(1e-2), runs), k, rank=2)
  ref = optax.MultiSteps(counting(optax.adam(1e-2), ref_runs), k)
  step = make_step(ours)
  state = ours.init(params)
  for i in range(k * cycles):
    _, state = step(random_tree(i, SHAPES), state, params)
  jax.effects_barrier()
  assert len(runs) == cycles
  assert len(traces) == 1
  assert int(state.inner_opt_state[0].count) == cycles
  # optax's MultiSteps runs it on every micro-step (and selects the result).
  ref_state = ref.init(params)
  ref_step = make_step(ref)
  for i in range(k * cycles):
    _, ref_state = ref_step(random_tree(i, SHAPES), ref_state, params)
  jax.effects_barrier()
  assert len(ref_runs) == k * cycles


def test_no_recompilation_with_callable_schedule_and_skip():
  params = random_tree(0, SHAPES)
  traces = []
  tx = flora_optax.MultiSteps(
      optax.adamw(1e-3), lambda s: jnp.minimum(s + 1, 3), rank=2,
      should_skip_update_fn=optax.skip_not_finite)

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state, params)

  state = tx.init(params)
  for i in range(8):
    _, state = step(random_tree(i, SHAPES), state)
  assert len(traces) == 1
  chex.assert_trees_all_equal_structs(state, tx.init(params))
  chex.assert_trees_all_equal_dtypes(state, tx.init(params))
  assert int(state.gradient_step) == 3  # 1 + 2 + 3 micro-steps, then 2 more.
  assert int(state.mini_step) == 2


# --- the scan recipe -------------------------------------------------------


def _mlp_loss(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - batch['y'])**2)


@jax.jit
def _per_batch_grads(params, batches):
  return jax.vmap(jax.grad(_mlp_loss), in_axes=(None, 0))(params, batches)


@pytest.mark.parametrize('projection, use_grad_mean', [('gaussian', True),
                                                        ('orthogonal', False)])
def test_scan_recipe_equals_multisteps(projection, use_grad_mean):
  params = random_tree(0, {'w1': (10, 24), 'b1': (24,), 'w2': (24, 6)})
  k = 4
  batches = {'x': jax.random.normal(jax.random.key(1), (k, 16, 10)),
             'y': jax.random.normal(jax.random.key(2), (k, 16, 6))}
  rank, key, step_index = 3, jax.random.key(11), 2
  tx = flora_optax.MultiSteps(optax.identity(), k, rank=rank, key=key,
                              projection=projection,
                              use_grad_mean=use_grad_mean)

  @jax.jit
  def multisteps(params, batches):
    state = tx.init(params)._replace(
        gradient_step=jnp.asarray(step_index, jnp.int32))
    def body(state, batch):
      updates, state = tx.update(jax.grad(_mlp_loss)(params, batch), state,
                                 params)
      return state, updates
    _, updates = jax.lax.scan(body, state, batches)
    return jax.tree.map(lambda u: u[-1], updates)

  @jax.jit
  def recipe(params, batches, step):
    # jax.grad(..., has_aux=True) order: (grads, aux); aux = the losses.
    grad_fn = jax.grad(lambda p, b: (_mlp_loss(p, b),) * 2, has_aux=True)
    return flora_optax.accumulate_gradients(
        grad_fn, params, batches, step=step, key=key, has_aux=True,
        projector=flora_optax.Projector(rank, projection=projection),
        use_grad_mean=use_grad_mean)

  want = multisteps(params, batches)
  grads, losses = recipe(params, batches, step_index)
  if projection == 'orthogonal':
    # Same projections and sums, but XLA:CPU may compile the two programs'
    # float32 products of QR-made projections differently: measured 1-2 ulp
    # apart under x64 (jax 0.10.2 and 0.8.2; also before 0.3.0).
    chex.assert_trees_all_close(grads, want, rtol=1e-6, atol=1e-6)
  else:
    chex.assert_trees_all_equal(grads, want)
  assert losses.shape == (k,)
  # The exact mean/sum over micro-batches is what both estimate.
  exact = jax.tree.map(lambda g: g.sum(0) / (k if use_grad_mean else 1),
                       _per_batch_grads(params, batches))
  np.testing.assert_allclose(grads['b1'], exact['b1'], rtol=1e-5, atol=1e-7)
  if projection == 'orthogonal':  # rank 3 < d: still only an estimate.
    assert not np.allclose(grads['w1'], exact['w1'], atol=1e-4)
  # Another step: other projections.
  other, _ = recipe(params, batches, step_index + 1)
  assert not np.allclose(other['w1'], grads['w1'], atol=1e-4)


def test_scan_recipe_full_rank_is_exact():
  params = random_tree(0, {'w1': (10, 24), 'b1': (24,), 'w2': (24, 6)})
  batches = {'x': jax.random.normal(jax.random.key(1), (3, 8, 10)),
             'y': jax.random.normal(jax.random.key(2), (3, 8, 6))}
  grads = jax.jit(lambda p, b: flora_optax.accumulate_gradients(
      jax.grad(_mlp_loss), p, b, step=0,
      projector=flora_optax.Projector(full_rank, projection='orthogonal')))(
          params, batches)
  exact = jax.tree.map(lambda g: g.mean(0), _per_batch_grads(params, batches))
  chex.assert_trees_all_close(grads, exact, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal_dtypes(grads, params)
