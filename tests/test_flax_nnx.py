"""flora and flora_optax.MultiSteps with Flax NNX's ``nnx.Optimizer``.

Includes params annotated with ``nnx.with_partitioning`` on an 8-device mesh:
NNX copies a param's sharding names onto every optimizer-state leaf built from
it, and applies them eagerly. Sketches and Adafactor's factored rows have
other shapes than their params, so they must get names of their own (the
param's, with the rank axis replicated) instead of failing or being sharded
along the rank axis.
"""

import functools

import _helpers
import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

import flora_optax

pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')

RANK = 3
STEPS = 4


class MLP(nnx.Module):

  def __init__(self, rngs, partitioned=False):
    def init(names):
      base = nnx.initializers.lecun_normal()
      return nnx.with_partitioning(base, names) if partitioned else base

    bias = (nnx.with_partitioning(nnx.initializers.zeros_init(), ('b',))
            if partitioned else nnx.initializers.zeros_init())
    # Kernel (8, 16): its rows are compressed, sketch (r, 16). Kernel
    # (16, 4): its columns are compressed, sketch (16, r).
    self.l1 = nnx.Linear(8, 16, kernel_init=init(('a', 'b')),
                         bias_init=bias, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, kernel_init=init((None, 'b')), rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


# Quantized momentum: blocks of 4 so that each shard of the 16-wide axis
# (named 'b', 4 devices) holds whole blocks.
_QUANTIZED = {'flora8': dict(rank=None, bits=8),
              'flora4_sketch': dict(rank=RANK, bits=4)}


@functools.cache
def _tx(kind):
  if kind == 'quantized':
    return flora_optax.quantized(optax.adamw(3e-2), bits=8, block_size=4,
                                 min_quantized_size=0)
  if kind in _QUANTIZED:
    return flora_optax.flora(3e-2, resample_every=3, min_dim_size_to_factor=4,
                             multiply_by_parameter_scale=False, block_size=4,
                             min_quantized_size=0, **_QUANTIZED[kind])
  base = flora_optax.flora(3e-2, rank=RANK, resample_every=3,
                           min_dim_size_to_factor=4,
                           multiply_by_parameter_scale=False)
  if kind == 'flora':
    return base
  return flora_optax.MultiSteps(base, every_k_schedule=2, rank=RANK, key=5)


def _batch(step):
  return _helpers.regression_batch(step, in_features=8)


def _loss(model, x, y):
  return jnp.mean((model(x) - y)**2)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  grads = nnx.grad(_loss)(model, x, y)
  optimizer.update(model, grads)


def _train_nnx(model, optimizer, steps):
  for t in range(steps):
    _nnx_step(model, optimizer, *_batch(t))
  return nnx.as_pure(nnx.state(model, nnx.Param))


@functools.cache
def _train_optax(kind, steps=STEPS):
  """The same training with a plain optax loop on NNX's pure params."""
  tx = _tx(kind)
  graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
  params = nnx.as_pure(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(params):
      return _loss(nnx.merge(graphdef, params, rest), x, y)

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for t in range(steps):
    params, opt_state = step(params, opt_state, *_batch(t))
  return params, opt_state


def _mu(opt_state, kind):
  inner = opt_state.inner_opt_state if kind == 'multisteps' else opt_state
  return optax.tree.get(inner, 'mu')


@pytest.mark.parametrize('kind', ['flora', 'multisteps', 'quantized'])
def test_nnx_optimizer_matches_a_plain_optax_loop(kind):
  tx = _tx(kind)
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  mu = _mu(optimizer.opt_state, kind)
  if kind == 'quantized':  # any optax optimizer, its moments in codes
    assert isinstance(mu['l1']['kernel'], flora_optax.QuantizedArray)
    assert mu['l1']['kernel'].codes.shape == (8, 16)
  else:
    assert mu['l1']['kernel'].shape == (RANK, 16)
    assert mu['l2']['kernel'].shape == (16, RANK)
  params = _train_nnx(model, optimizer, STEPS)
  ref_params, ref_state = _train_optax(kind)
  chex.assert_trees_all_equal(params, ref_params)
  chex.assert_trees_all_equal(nnx.as_pure(optimizer.opt_state), ref_state)


def _spec(variable):
  value = variable[...]
  return tuple(value.sharding.spec) + (None,) * (
      value.ndim - len(value.sharding.spec))


def _mesh(axis_type):
  return jax.make_mesh((2, 4), ('a', 'b'), axis_types=(axis_type,) * 2)


@pytest.mark.parametrize('kind, axis_type', [
    ('flora', AxisType.Explicit),
    ('multisteps', AxisType.Explicit),
    ('multisteps', AxisType.Auto),
], ids=['flora-explicit', 'multisteps-explicit', 'multisteps-auto'])
def test_with_partitioning_shards_sketches_on_their_kept_axis(kind, axis_type):
  mesh = _mesh(axis_type)
  with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0), partitioned=True)
    optimizer = nnx.Optimizer(model, _tx(kind), wrt=nnx.Param)
    mu = _mu(optimizer.opt_state, kind)
    k1, k2 = mu['l1']['kernel'], mu['l2']['kernel']
    # l1: (8, 16) named ('a', 'b'), rows compressed: (r, 16), (None, 'b').
    assert k1.shape == (RANK, 16)
    assert k1.get_metadata()['out_sharding'] == (None, 'b')
    assert _spec(k1) == (None, 'b')
    # l2: (16, 4) named (None, 'b'), columns compressed: (16, r), replicated.
    assert k2.shape == (16, RANK)
    assert k2.get_metadata()['out_sharding'] == (None, None)
    assert _spec(k2) == (None, None)
    if kind == 'multisteps':
      assert _spec(optimizer.opt_state.acc_grads['l1']['kernel']) == (None,
                                                                       'b')
    params = _train_nnx(model, optimizer, STEPS)
    # The layout survives training steps.
    assert _spec(_mu(optimizer.opt_state, kind)['l1']['kernel']) == (None, 'b')
  # Sharded training computes what unsharded training does.
  ref_params, _ = _train_optax(kind)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', [*_QUANTIZED, 'quantized'])
def test_quantized_states_keep_sharding_metadata(kind):
  # Codes and block scales have the state's axes: each gets the sharding
  # names of what it stores (the param's, or the sketch's), applied eagerly.
  with jax.set_mesh(_mesh(AxisType.Explicit)):
    model = MLP(nnx.Rngs(0), partitioned=True)
    optimizer = nnx.Optimizer(model, _tx(kind), wrt=nnx.Param)
    q = _mu(optimizer.opt_state, kind)['l1']['kernel']
    assert isinstance(q, flora_optax.QuantizedArray)
    names = ('a', 'b') if kind != 'flora4_sketch' else (None, 'b')
    for part in (q.codes, q.scales):
      assert part.get_metadata()['out_sharding'] == names
      assert _spec(part) == names
    if kind == 'flora8':
      assert q.codes.shape == (8, 16) and q.codes[...].dtype == jnp.int8
    elif kind == 'quantized':  # per-block signedness: bytes
      assert q.codes.shape == (8, 16) and q.codes[...].dtype == jnp.uint8
    else:
      assert q.codes.shape == (RANK, 8) and q.codes[...].dtype == jnp.uint8
    params = _train_nnx(model, optimizer, STEPS)
    q = _mu(optimizer.opt_state, kind)['l1']['kernel']
    assert _spec(q.codes) == names  # kept through training
  ref_params, ref_state = _train_optax(kind)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
