"""Checkpoints: Orbax and flax.serialization (msgpack) round trips.

A Linen ``TrainState`` is saved in the middle of a resample cycle (and, with
``MultiSteps``, in the middle of an accumulation cycle), restored into a
concrete target and into an abstract one (``jax.eval_shape``), and training
continues bit-identically to an uninterrupted run: the stored ``uint32`` key
data, counters and sketches are everything the projections depend on.
"""

import functools

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from flax.training import train_state

import flora_optax

pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')

# Stop after 5 micro-steps: with k=2 that is mid accumulation (mini_step 1)
# and 2 inner updates, mid resample cycle (κ=3); 5 more steps then cross both
# an accumulation boundary and a resample.
STOP, TOTAL = 5, 10


@functools.cache
def _tx(kind):
  # One optimizer object per kind: TrainState keeps tx as static aux data, so
  # a fresh one would change the treedef and retrace the train step.
  base = flora_optax.flora(3e-2, rank=3, resample_every=3, key=123,
                           multiply_by_parameter_scale=False)
  if kind == 'flora':
    return base
  return flora_optax.MultiSteps(base, every_k_schedule=2, rank=3, key=9)


_MODEL = _helpers.linen_mlp_class()()


def _create(kind, seed=0):
  params = _MODEL.init(jax.random.key(seed), jnp.zeros((1, 12)))['params']
  return train_state.TrainState.create(apply_fn=_MODEL.apply, params=params,
                                       tx=_tx(kind))


@jax.jit
def _train_step(state, batch):
  grads = jax.grad(_helpers.linen_mse)(state.params, state.apply_fn, batch)
  return state.apply_gradients(grads=grads)


def _train(state, start, stop):
  for t in range(start, stop):
    state = _train_step(state, _helpers.regression_batch(t))
  return state


def _momentum_count(opt_state):
  return int(_helpers.momentum_state(opt_state).count)


def _check_mid_cycle(kind, state):
  if kind == 'flora':
    count = _momentum_count(state.opt_state)
  else:
    assert int(state.opt_state.mini_step) == 1  # mid accumulation
    count = _momentum_count(state.opt_state.inner_opt_state)
  assert count % 3 != 0  # mid resample cycle


def _assert_same_types(a, b):
  # TrainState.step is a Python int in a fresh state (Flax's choice), so only
  # the params and the optimizer state are compared leaf type by leaf type.
  chex.assert_trees_all_equal_shapes_and_dtypes((a.params, a.opt_state),
                                                (b.params, b.opt_state))


@pytest.fixture(scope='module')
def runs():
  """Per kind: the state at STOP and after an uninterrupted run to TOTAL."""
  out = {}
  for kind in ('flora', 'multisteps'):
    mid = _train(_create(kind), 0, STOP)
    _check_mid_cycle(kind, mid)
    out[kind] = (mid, _train(mid, STOP, TOTAL))
  return out


@pytest.mark.parametrize('target', ['concrete', 'abstract'])
@pytest.mark.parametrize('kind', ['flora', 'multisteps'])
def test_orbax_round_trip_continues_bit_identically(runs, kind, target,
                                                    tmp_path):
  mid, full = runs[kind]
  path = tmp_path / 'ckpt'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, mid)
    ckptr.wait_until_finished()
    if target == 'concrete':
      like = _create(kind, seed=1)  # other values, same structure
    else:
      like = jax.eval_shape(lambda: _create(kind))
    restored = ckptr.restore(path, like)
  _assert_same_types(restored, mid)
  chex.assert_trees_all_equal(restored, mid)
  chex.assert_trees_all_equal(_train(restored, STOP, TOTAL), full)


@pytest.mark.parametrize('kind', ['flora', 'multisteps'])
def test_msgpack_round_trip_continues_bit_identically(runs, kind):
  mid, full = runs[kind]
  data = serialization.to_bytes(mid)
  restored = serialization.from_bytes(_create(kind, seed=1), data)
  _assert_same_types(restored, mid)
  chex.assert_trees_all_equal(restored, mid)
  chex.assert_trees_all_equal(_train(restored, STOP, TOTAL), full)
  # The state dict is plain numpy: no typed keys anywhere.
  as_dict = serialization.to_state_dict(mid)
  for leaf in jax.tree.leaves(as_dict):
    np.asarray(leaf)


def test_a_restored_state_with_another_key_diverges(runs):
  """The guard: the key really is restored, not re-derived from the config."""
  mid, full = runs['flora']
  restored = serialization.from_bytes(_create('flora'),
                                      serialization.to_bytes(mid))
  is_mom = _helpers.is_momentum_state
  restored = restored.replace(opt_state=jax.tree.map(
      lambda x: x._replace(key=x.key + 1) if is_mom(x) else x,
      restored.opt_state, is_leaf=is_mom))
  resumed = _train(restored, STOP, TOTAL)
  assert not np.array_equal(resumed.params['Dense_0']['kernel'],
                            full.params['Dense_0']['kernel'])
