"""flora and flora_optax.MultiSteps in Flax Linen's ``TrainState``.

``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``
with no extra args; the results must equal a hand-written optax loop exactly.
"""

import _helpers
import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state

import flora_optax

pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')


_data = _helpers.regression_batch
_loss = _helpers.linen_mse


def _tx(kind):
  base = flora_optax.flora(3e-2, rank=3, resample_every=3,
                           multiply_by_parameter_scale=False)
  if kind == 'flora':
    return base
  return flora_optax.MultiSteps(base, every_k_schedule=2, rank=3, key=1)


@pytest.mark.parametrize('kind', ['flora', 'multisteps'])
def test_train_state_matches_a_plain_optax_loop(kind):
  model = _helpers.linen_mlp_class()()
  params = model.init(jax.random.key(0), jnp.zeros((1, 12)))['params']
  tx = _tx(kind)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  # Sketches, not full-size momenta, for the compressed kernels.
  mu = optax.tree.get(
      state.opt_state.inner_opt_state if kind == 'multisteps' else
      state.opt_state, 'mu')
  assert mu['Dense_0']['kernel'].shape == (3, 16)
  assert mu['Dense_1']['kernel'].shape == (16, 3)
  traces = []

  @jax.jit
  def train_step(state, batch):
    traces.append(None)
    grads = jax.grad(_loss)(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads)

  @jax.jit
  def manual_step(params, opt_state, batch):
    grads = jax.grad(_loss)(params, model.apply, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for t in range(12):
    state = train_step(state, _data(t))
    params, opt_state = manual_step(params, opt_state, _data(t))
  chex.assert_trees_all_equal(state.params, params)
  chex.assert_trees_all_equal(state.opt_state, opt_state)
  assert int(state.step) == 12
  assert len(traces) == 1  # the static tx does not cause retracing
  # Training does something: the loss on a fixed batch goes down.
  before = _loss(model.init(jax.random.key(0), jnp.zeros((1, 12)))['params'],
                 model.apply, _data(0))
  assert float(_loss(state.params, model.apply, _data(0))) < float(before)
