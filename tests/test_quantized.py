"""quantized(inner): any leaf-separable optax optimizer with 8-/4-bit states.

What is checked: the supported optimizers train like their float selves and
keep the inner's state structure; bits=None is the inner; per-leaf runs equal
the whole-tree update; coupling transformations are refused at init;
non-negative states never decode a positive entry to zero; a NaN stays in its
leaf; jit traces once; the state round-trips to float (to_float_state /
from_float_state, Orbax, msgpack) and restores an optax checkpoint; it
composes with chain, inject_hyperparams, masked, partition, MultiSteps and a
Flax TrainState; peak memory is leaf by leaf.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import flora_optax
from flora_optax import QuantizedArray

is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731

LR = 1e-2
STEPS = 12

# Every optimizer the docs list as supported (docs/howto/quantized.md).
SUPPORTED = {
    'adam': lambda: optax.adam(LR),
    'adamw': lambda: optax.adamw(LR, weight_decay=0.1),
    'lion': lambda: optax.lion(LR / 10),
    'sgd_momentum': lambda: optax.sgd(LR, momentum=0.9),
    'sgd_nesterov': lambda: optax.sgd(LR, momentum=0.9, nesterov=True),
    'rmsprop': lambda: optax.rmsprop(LR, momentum=0.9),
    'adafactor_momentum': lambda: optax.adafactor(LR, momentum=0.9,
                                                  min_dim_size_to_factor=16),
    'muon': lambda: optax.contrib.muon(LR),
    'ademamix': lambda: optax.contrib.ademamix(LR),
    'adopt': lambda: optax.contrib.adopt(LR),
    'inject_hyperparams': lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=LR, b1=0.9),
    'adam_bf16_mu': lambda: optax.adam(LR, mu_dtype=jnp.bfloat16),
}


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {'w': jax.random.normal(k[0], (64, 128)),
          'k': jax.random.normal(k[1], (2, 32, 128)),
          'b': jax.random.normal(k[2], (128,))}


def _loss(p):
  # Different curvatures per entry, so that every state has work to do.
  scales = jax.tree.map(lambda x: 1 + jnp.arange(x.size).reshape(x.shape) %
                        7, p)
  return sum(jnp.sum(s * jnp.sin(x)**2) for s, x in
             zip(jax.tree.leaves(scales), jax.tree.leaves(p)))


def _train(tx, params=None, steps=STEPS):
  params = _params() if params is None else params
  return _train_from(tx, params, tx.init(params), steps)


def _drift(params, ref, start):
  """How far ``params`` ended from ``ref``, relative to how far ``ref``
  moved from ``start``."""
  num = sum(float(jnp.sum((a - b)**2)) for a, b in
            zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
  den = sum(float(jnp.sum((b - c)**2)) for b, c in
            zip(jax.tree.leaves(ref), jax.tree.leaves(start)))
  return (num / den)**0.5


@pytest.mark.parametrize('name', list(SUPPORTED))
def test_supported_optimizers_train_like_float(name):
  inner = SUPPORTED[name]()
  tx = flora_optax.quantized(inner, bits=8, min_quantized_size=1024)
  ref_params, ref_state = _train(inner)
  params, state = _train(tx)
  # The inner's structure, its large param-shaped leaves in codes.
  flat_ref = jax.tree_util.tree_flatten_with_path(ref_state)[0]
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_q)[0]
  assert [p for p, _ in flat] == [p for p, _ in flat_ref]
  big = {(64, 128), (2, 32, 128)}
  n_quantized = 0
  for (path, x), (_, r) in zip(flat, flat_ref):
    if is_q(x):
      n_quantized += 1
      assert x.shape == r.shape and x.dtype == r.dtype, path
      assert x.shape in big
    elif jnp.issubdtype(r.dtype, jnp.floating) and r.shape in big:
      raise AssertionError(f'{path}: a large float state left in float')
    else:
      assert x.dtype == r.dtype and x.shape == r.shape, path
  assert n_quantized >= 2
  # to_float_state is the inner's own state type, structure and dtypes.
  float_state = flora_optax.to_float_state(state)
  chex.assert_trees_all_equal_shapes_and_dtypes(float_state, ref_state)
  assert jax.tree.structure(float_state) == jax.tree.structure(ref_state)
  # Trains like the float optimizer: 8-bit drift of a few % of the movement.
  assert _drift(params, ref_params, _params()) < 0.06


@pytest.mark.parametrize('name', ['adam', 'muon', 'lion'])
def test_four_bits_train_close_to_float(name):
  inner = SUPPORTED[name]()
  ref_params, _ = _train(inner)
  params8, _ = _train(flora_optax.quantized(inner, 8))
  params4, state4 = _train(flora_optax.quantized(inner, 4))
  assert any(is_q(x) and x.format.bits == 4 for x in
             jax.tree.leaves(state4, is_leaf=is_q))
  d8, d4 = (_drift(p, ref_params, _params()) for p in (params8, params4))
  assert d4 < 0.35
  if name != 'lion':  # Lion's update is a sign: a few flips either way
    assert d8 < d4


def test_bits_none_is_the_inner_itself():
  inner = optax.adam(1e-3)
  assert flora_optax.quantized(inner, bits=None) is inner


def test_one_leaf_at_a_time_equals_the_whole_tree_with_float_codes():
  # With every leaf below min_quantized_size nothing is quantized: the
  # per-leaf engine alone must compute what the inner computes.
  for name in ('adam', 'muon', 'adafactor_momentum', 'inject_hyperparams'):
    inner = SUPPORTED[name]()
    tx = flora_optax.quantized(inner, bits=8, min_quantized_size=10**9)
    ref_params, ref_state = _train(inner, steps=3)
    params, state = _train(tx, steps=3)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state, ref_state, rtol=1e-6, atol=1e-6)


def test_same_as_flora_optax_adamw_bits():
  # AdamW in codes reached two ways: the wrapper and flora_optax.adamw.
  ref, _ = _train(flora_optax.adamw(LR, bits=8))
  params, _ = _train(flora_optax.quantized(optax.adamw(LR), bits=8))
  assert _drift(params, ref, _params()) < 2e-3


@pytest.mark.parametrize('inner, what', [
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
     'update of'),
    (lambda: optax.apply_if_finite(optax.adam(1e-3), 3), 'couples'),
    (lambda: optax.chain(optax.scale_by_trust_ratio(), optax.adam(1e-3)),
     None),
])
def test_coupling_is_refused_at_init(inner, what):
  tx = flora_optax.quantized(inner())
  if what is None:  # the trust ratio is per leaf: separable, accepted
    _train(tx, steps=1)
    return
  with pytest.raises(ValueError, match='couples parameter leaves'):
    tx.init(_params())


def test_bad_arguments_are_refused_when_built():
  with pytest.raises(TypeError, match='inner'):
    flora_optax.quantized(lambda x: x)
  with pytest.raises(ValueError, match='bits'):
    flora_optax.quantized(optax.adam(1e-3), bits=3)
  with pytest.raises(ValueError, match='code_map'):
    flora_optax.quantized(optax.adam(1e-3), code_map='bogus')
  with pytest.raises(ValueError, match='block_size'):
    flora_optax.quantized(optax.adam(1e-3), bits=None, block_size=64)
  with pytest.raises(TypeError, match='min_quantized_size'):
    flora_optax.quantized(optax.adam(1e-3), min_quantized_size=1.5)


def test_state_of_other_params_is_refused():
  tx = flora_optax.quantized(optax.adam(1e-3))
  state = tx.init(_params())
  other = {'w': jnp.ones((64, 128))}
  with pytest.raises(ValueError, match='does not fit the updates'):
    tx.update(other, state, other)


@pytest.mark.parametrize('bits', [8, 4])
def test_non_negative_states_never_decode_a_positive_entry_to_zero(bits):
  # Adam's second moment over a block with a 1e6 dynamic range.
  tx = flora_optax.quantized(optax.adam(1e-3), bits=bits,
                             min_quantized_size=0)
  g = jnp.geomspace(1e-3, 1e3, 4096).reshape(16, 256)
  g = g * jnp.where(jnp.arange(256) % 2, 1.0, -1.0)  # signed gradients
  _, state = tx.update({'w': g}, tx.init({'w': g}), {'w': g})
  nu = flora_optax.to_float_state(state)[0].nu['w']
  assert bool(jnp.all(nu > 0))
  # Its blocks are stored unsigned (negative scales), mu's signed.
  assert bool(jnp.all(state[0].nu['w'].scales < 0))
  assert bool(jnp.all(state[0].mu['w'].scales > 0))
  # The update stays bounded (no m / sqrt(0)).
  u, _ = tx.update({'w': g}, state, {'w': g})
  assert float(jnp.max(jnp.abs(u['w']))) < 10


def test_nan_in_one_leaf_stays_in_that_leaf():
  tx = flora_optax.quantized(optax.adam(1e-3), min_quantized_size=0)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  grads['w'] = grads['w'].at[3, 5].set(jnp.nan)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert not bool(jnp.all(jnp.isfinite(u['w'])))
  for name in ('k', 'b'):
    assert bool(jnp.all(jnp.isfinite(u[name])))
    x = flora_optax.to_float_state(state)[0].mu[name]
    assert bool(jnp.all(jnp.isfinite(x)))
  # In 'w' only the NaN's block is poisoned.
  mu_w = flora_optax.to_float_state(state)[0].mu['w']
  bad = ~jnp.isfinite(mu_w)
  assert 0 < int(bad.sum()) <= 256 and bool(jnp.all(bad.sum(1)[
      jnp.arange(64) != 3] == 0))


def test_jit_traces_once():
  tx = flora_optax.quantized(optax.contrib.muon(1e-3))
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.grad(_loss)(p), s, p)
    return optax.apply_updates(p, u), s

  params, state = _params(), tx.init(_params())
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


def test_format_is_static_and_self_describing():
  tx = flora_optax.quantized(optax.adam(1e-3, mu_dtype=jnp.bfloat16), bits=4,
                             block_size=32)
  state = tx.init(_params())
  q = state[0].mu['w']
  assert q.format == flora_optax.QuantizedFormat(
      bits=4, block_size=32, code_map='cubic', signed=None, shape=(64, 128),
      dtype='bfloat16', unsigned_map='sqrt')
  assert q.codes.shape == (64, 64) and q.scales.shape == (64, 4)
  assert jax.tree.leaves(q) == [q.codes, q.scales]  # the format: no leaf
  # Decoding needs no optimizer, and keeps the state's dtype.
  assert flora_optax.to_float_state(state)[0].mu['w'].dtype == jnp.bfloat16


def test_from_float_state_inverts_to_float_state():
  tx = flora_optax.quantized(optax.adamw(LR))
  _, state = _train(tx, steps=3)
  again = flora_optax.from_float_state(flora_optax.to_float_state(state),
                                       state)
  chex.assert_trees_all_equal(again, state)


def test_an_optax_checkpoint_restores_into_the_8bit_optimizer():
  # Train 4 steps with optax.adamw, switch to 8 bits, go on: as good as
  # going on in float, and far from restarting with a fresh state.
  params, float_state = _train(optax.adamw(LR), steps=4)
  tx = flora_optax.quantized(optax.adamw(LR))
  state = flora_optax.from_float_state(float_state, tx.init(params))
  assert int(state[0].count) == 4
  switched, _ = _train_from(tx, params, state)
  ref, _ = _train_from(optax.adamw(LR), params, float_state)
  fresh, _ = _train_from(tx, params, tx.init(params))
  assert _drift(switched, ref, params) < 0.05 < _drift(fresh, ref, params)


def _train_from(tx, params, state, steps=4):
  """``steps`` jitted steps on ``_loss`` from ``params`` and ``state``."""
  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(_loss)(p), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_from_float_state_refuses_a_wrong_state():
  tx = flora_optax.quantized(optax.adam(1e-3))
  like = tx.init(_params())
  with pytest.raises(ValueError, match='structure'):
    flora_optax.from_float_state(optax.sgd(0.1, 0.9).init(_params()), like)
  wrong = optax.adam(1e-3).init({**_params(), 'w': jnp.ones((128, 64))})
  with pytest.raises(ValueError, match="'w'"):
    flora_optax.from_float_state(wrong, like)


def test_orbax_round_trips_both_directions(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  tx = flora_optax.quantized(optax.lion(1e-3))
  params, state = _train(tx, steps=3)
  with ocp.StandardCheckpointer() as ckpt:
    # The quantized state itself, restored into its own structure.
    ckpt.save(tmp_path / 'q', state)
    ckpt.save(tmp_path / 'f', flora_optax.to_float_state(state))
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / 'q', tx.init(params))
    float_restored = ckpt.restore(tmp_path / 'f',
                                  optax.lion(1e-3).init(params))
  chex.assert_trees_all_equal(restored, state)
  # The float checkpoint is an optax.lion state, and comes back in codes.
  chex.assert_trees_all_equal(
      flora_optax.from_float_state(float_restored, state), state)
  a, _ = _train_from(tx, params, restored)
  b, _ = _train_from(tx, params, state)
  chex.assert_trees_all_equal(a, b)


def test_msgpack_round_trip():
  serialization = pytest.importorskip('flax.serialization')
  tx = flora_optax.quantized(optax.adam(1e-3), bits=4)
  _, state = _train(tx, steps=2)
  data = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(_params()), data)
  chex.assert_trees_all_equal(restored, state)
  assert restored[0].mu['w'].format == state[0].mu['w'].format


def test_composes_with_chain_masked_partition_and_multisteps():
  params = _params()
  label = lambda p: jax.tree.map(lambda x: 'm' if x.ndim == 2 else 'a', p)  # noqa: E731
  cases = {
      'chain': optax.chain(optax.clip_by_global_norm(1.0),
                           flora_optax.quantized(optax.adam(LR))),
      'masked_tree': flora_optax.quantized(optax.masked(
          optax.adam(LR), {'w': True, 'k': False, 'b': True})),
      'partition': flora_optax.quantized(optax.partition(
          {'m': optax.sgd(LR, momentum=0.9), 'a': optax.adam(LR)}, label)),
      'multi_steps_outside': optax.MultiSteps(
          flora_optax.quantized(optax.adam(LR)), 2).gradient_transformation(),
      'multi_steps_inside': flora_optax.quantized(
          optax.MultiSteps(optax.adam(LR), 2).gradient_transformation()),
      'inject_outside': optax.inject_hyperparams(
          lambda learning_rate: flora_optax.quantized(
              optax.adam(learning_rate)))(learning_rate=LR),
  }
  refs = {
      'chain': optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)),
      'masked_tree': optax.masked(optax.adam(LR),
                                  {'w': True, 'k': False, 'b': True}),
      'partition': optax.partition(
          {'m': optax.sgd(LR, momentum=0.9), 'a': optax.adam(LR)}, label),
      'multi_steps_outside': optax.MultiSteps(
          optax.adam(LR), 2).gradient_transformation(),
      'multi_steps_inside': optax.MultiSteps(
          optax.adam(LR), 2).gradient_transformation(),
      'inject_outside': optax.inject_hyperparams(optax.adam)(
          learning_rate=LR),
  }
  for name, tx in cases.items():
    ref, _ = _train(refs[name], params, steps=6)
    got, state = _train(tx, params, steps=6)
    assert any(is_q(x) for x in jax.tree.leaves(state, is_leaf=is_q)), name
    assert _drift(got, ref, params) < 0.06, name


def test_flax_train_state():
  train_state = pytest.importorskip('flax.training.train_state')
  tx = flora_optax.quantized(optax.contrib.muon(LR))
  ts = train_state.TrainState.create(apply_fn=None, params=_params(), tx=tx)
  ts = jax.jit(lambda ts: ts.apply_gradients(
      grads=jax.grad(_loss)(ts.params)))(ts)
  assert int(ts.step) == 1
  assert any(is_q(x) for x in jax.tree.leaves(ts.opt_state, is_leaf=is_q))


def test_state_shardings_and_sharded_equals_unsharded():
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: I001
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {'w': P('data', 'model'), 'k': P(None, 'data', 'model'),
           'b': P('model')}
  param_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = flora_optax.quantized(optax.adam(LR), block_size=32,
                             min_quantized_size=0)
  params = jax.device_put(_params(), param_sh)
  state_sh = flora_optax.state_shardings(tx, params, param_sh)
  # Codes shard like their params; block scales too (blocks are shard-local).
  mu_sh = state_sh[0].mu['w']
  assert mu_sh.codes.spec == P('data', 'model')
  assert mu_sh.scales.spec == P('data', 'model')
  init = jax.jit(tx.init, out_shardings=state_sh)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(_loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert state[0].mu['w'].codes.sharding.spec == P('data', 'model')
  # No all-gather of a state: the compiled step's collectives are the
  # gradient's own (none here: the loss is elementwise).
  hlo = step.lower(params, state).compile().as_text()
  assert 'all-gather' not in hlo
  ref_params, ref_state = _train(tx, steps=3)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(flora_optax.to_float_state(state),
                              flora_optax.to_float_state(ref_state),
                              rtol=1e-5, atol=1e-5)


def _adam_update_temp_bytes(params):
  tx = flora_optax.quantized(optax.adam(1e-3))
  state = tx.init(params)
  compiled = jax.jit(tx.update, donate_argnums=1).lower(
      params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_peak_is_leaf_by_leaf(monkeypatch):
  # Eight 256x1024 leaves: the quantized update's temporaries hold about one
  # leaf's float moments, not every leaf's (which optax.adam's state is).
  # Leaves are chained as on one device (the suite has 8: see
  # _quantization.chains_leaves).
  from flora_optax import _quantization  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_quantization, 'chains_leaves', lambda: True)
  params = {f'l{i}': jnp.zeros((256, 1024)) for i in range(8)}
  temp = _adam_update_temp_bytes(params)
  one_leaf_moments = 2 * 256 * 1024 * 4
  assert temp < 3 * one_leaf_moments, temp / one_leaf_moments
  float_state_bytes = 8 * one_leaf_moments
  assert temp < float_state_bytes / 2
  # With a small float leaf (a bias, kept in float) after each matrix the
  # order must not break at it: no more temporaries than without (jax 0.10
  # with the suite's XLA flags: 0.65 leaves' moments both ways, 1.65 with
  # biases when it broke; jax 0.8.2's scheduler: 2.27 both ways).
  params.update({f'l{i}_b': jnp.zeros((1024,)) for i in range(8)})
  with_biases = _adam_update_temp_bytes(params)
  assert with_biases < temp + one_leaf_moments / 4, (
      with_biases / one_leaf_moments, temp / one_leaf_moments)


def test_a_0_3_0_orbax_checkpoint_restores(tmp_path):
  # 0.3.0's QuantizedArray had two fields (codes, scales) and no format.
  ocp = pytest.importorskip('orbax.checkpoint')
  from typing import NamedTuple  # noqa: I001

  class OldQuantizedArray(NamedTuple):
    codes: jax.Array
    scales: jax.Array

  tx = flora_optax.compressed_momentum(None, bits=8, min_quantized_size=0)
  params = _params()
  _, state = _train(tx, steps=2)
  old = jax.tree.map(lambda q: OldQuantizedArray(q.codes, q.scales)
                     if is_q(q) else q, state,
                     is_leaf=is_q)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'old', old)
    ckpt.wait_until_finished()
    # The docs' recipe (docs/howto/checkpoints.md): restore into the new
    # state's codes and scales without their formats, then put each leaf's
    # format back.
    like = tx.init(params)
    bare = jax.tree.map(lambda q: {'codes': q.codes, 'scales': q.scales}
                        if is_q(q) else q, like, is_leaf=is_q)
    restored = ckpt.restore(tmp_path / 'old', bare)
  restored = jax.tree.map(lambda q, r: q._replace(**r) if is_q(q) else r,
                          like, restored, is_leaf=is_q)
  chex.assert_trees_all_equal(restored, state)
