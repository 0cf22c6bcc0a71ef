"""optax's common test suite for contributed optimizers, applied to flora.

In the spirit of ``optax/contrib/_common_test.py`` (rewritten here, public APIs
only): extra args without recompiling, convergence on the parabola,
Rosenbrock, matrix and mixed 1-D/2-D targets, ``optax.tree.map_params``,
``inject_hyperparams``, dtype preservation, ``MultiSteps``, state shape/dtype
stability under ``lax.cond`` and learning-rate schedules.

Differences from optax's suite, and why:

* 2 000 ``lax.scan`` steps with a cosine-decayed learning rate instead of
  30 000 constant ones, to fit the CI budget.
* ``rank`` is a callable giving every matrix half its smaller side, so even the
  2×2 targets are compressed (an int rank would leave them dense and the
  suite would only test Adafactor). An extra 8×16 target checks a less
  trivial compression ratio.
* ``multiply_by_parameter_scale=False``: the targets start at zero, where
  Adafactor's parameter scale (floored at 1e-3) would need far more steps.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax

pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')

STEPS = 2000


def _half_rank(path, leaf):
  del path
  return max(1, min(leaf.shape[-2:]) // 2)


def _flora(learning_rate=None, **kw):
  if learning_rate is None:
    learning_rate = optax.cosine_decay_schedule(0.1, STEPS)
  kw = dict(dict(rank=_half_rank, resample_every=10,
                 multiply_by_parameter_scale=False), **kw)
  return flora_optax.flora(learning_rate, **kw)


# --- targets (as in optax's suite, plus a larger matrix) ---------------------


def _parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return (jnp.array([-1.0, 10.0, 1.0], dtype), final,
          lambda p: jnp.sum((p - final)**2))


def _rosenbrock(dtype):
  a, b = 1.0, 100.0
  return (jnp.zeros(2, dtype), jnp.array([a, a**2], dtype),
          lambda p: (a - p[0])**2 + b * (p[1] - p[0]**2)**2)


def _matrix(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum((p - final)**2)


def _mixed(dtype):
  f1 = jnp.array([1.0, -1.0, 2.0], dtype)
  f2 = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
  return ((jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2),
          lambda p: jnp.sum((p[0] - f1)**2) + jnp.sum((p[1] - f2)**2))


def _wide_matrix(dtype):
  final = jax.random.normal(jax.random.key(3), (8, 16), dtype)
  return jnp.zeros((8, 16), dtype), final, lambda p: jnp.sum((p - final)**2)


TARGETS = [_parabola, _rosenbrock, _matrix, _mixed, _wide_matrix]


def _is_compressed(opt, params):
  state = opt.init(params)
  return any(m.shape != p.shape for m, p in zip(
      jax.tree.leaves(optax.tree.get(state, 'mu')), jax.tree.leaves(params)))


@pytest.mark.parametrize('target', TARGETS, ids=lambda t: t.__name__[1:])
def test_converges(target):
  opt = _flora()
  init, final, obj = target(jnp.float32)
  # Matrices really are compressed: this is not Adafactor in disguise.
  if target in (_matrix, _mixed, _wide_matrix):
    assert _is_compressed(opt, init)

  state = opt.init(init)
  # A no-op map_params must leave a usable state (as in optax's suite).
  state = optax.tree.map_params(opt, lambda v: v, state)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(obj)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, state), length=STEPS)[0]

  params, _ = run(init, state)
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


def test_accepts_extra_args_without_recompiling():
  opt = _flora()
  init, _, obj = _rosenbrock(jnp.float32)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    value, grads = jax.value_and_grad(obj)(params)
    updates, state = opt.update(
        grads, state, params, value=value,
        unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(params, updates), state

  params, state = init, opt.init(init)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


def test_inject_hyperparams_gives_the_same_results():
  # As optax's suite: only rank-like arguments are static, the others keep
  # their defaults.
  kw = dict(learning_rate=1e-2, rank=_half_rank, resample_every=10)
  opt = flora_optax.flora(**kw)
  opt_inject = optax.inject_hyperparams(
      flora_optax.flora, static_args=('rank',))(**kw)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  updates, state = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  updates_i, state_i = jax.jit(opt_inject.update)(
      grads, jax.jit(opt_inject.init)(params), params)
  chex.assert_trees_all_close(updates_i, updates, rtol=1e-5)
  chex.assert_trees_all_close(state_i.inner_state, state, rtol=1e-5, atol=1e-5)


def _small_params(dtype):
  return {'v': jnp.array([1.0, 2.0], dtype),
          'w': jnp.linspace(-1, 1, 24, dtype=dtype).reshape(4, 6)}


def _square_loss(params):
  return sum(jnp.sum(x.astype(jnp.float32)**2) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_preserves_dtype(dtype):
  opt = _flora()
  params = _small_params(jnp.dtype(dtype))
  grads = jax.grad(_square_loss)(params)
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(
      lambda p: p.dtype, params)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('wrapper', ['optax', 'flora_optax'])
def test_gradient_accumulation(dtype, wrapper):
  if wrapper == 'optax':
    opt = optax.MultiSteps(_flora(), every_k_schedule=4)
  else:
    opt = flora_optax.MultiSteps(_flora(), every_k_schedule=4, rank=2)
  params = _small_params(jnp.dtype(dtype))
  grads = jax.grad(_square_loss)(params)
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  # The first of 4 micro-steps emits zeros, in the params' dtype.
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32', 'float64'])
def test_state_shape_dtype_stable_under_cond(dtype):
  with jax.enable_x64(dtype == 'float64'):
    dtype = jnp.dtype(dtype)
    opt = _flora()
    params = _small_params(dtype)

    @jax.jit
    def step(params, state):
      grads = jax.grad(_square_loss)(params)
      # lax.cond requires both branches to have the same types: the updated
      # state must have exactly the init state's shapes and dtypes.
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, new_state = jax.lax.cond(
          cond, lambda: opt.update(grads, state, params),
          lambda: (params, state))
      return optax.apply_updates(params, updates), new_state

    state = opt.init(params)
    for _ in range(2):
      params, new_state = step(params, state)
      assert jax.tree.map(lambda x: x.dtype, params) == {'v': dtype, 'w': dtype}
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      state = new_state


def test_learning_rate_schedule_equals_constant():
  init, _, obj = _parabola(jnp.float32)
  sched = _flora(learning_rate=optax.constant_schedule(1e-3))
  const = _flora(learning_rate=1e-3)

  @functools.partial(jax.jit, static_argnums=0)
  def run(opt, params):
    def body(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(obj)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, opt.init(params)), length=10)[0][0]

  a, b = run(sched, init), run(const, init)
  chex.assert_trees_all_close(a, b)
  assert not np.allclose(a, init)  # it moved
