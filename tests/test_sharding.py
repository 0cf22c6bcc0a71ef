"""Sharded training: same results on any mesh, sketches keep their sharding,
no full-size gradient is ever gathered, and state types are stable on
Explicit-axes meshes. Runs on the 8 simulated CPU devices of conftest.py."""

from __future__ import annotations

import functools
import re

import _helpers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax

RANK = 2

# Small leaves covering every case: compression along axis 0 and axis 1, a
# batched (stacked) leaf, a grouped-axes leaf and a dense vector.
SHAPES = {
    'w': (32, 64),  # compressed along axis 0 (32)
    'v': (64, 32),  # compressed along axis 1 (32)
    'k': (2, 32, 64),  # batch axis 0, compressed along axis 1
    'b': (32,),  # dense
}

# name -> (mesh shape, axis names, specs per leaf)
LAYOUTS = {
    'dp_8x1': ((8, 1), ('data', 'model'), {
        'w': P(), 'v': P(), 'k': P(), 'b': P()}),
    'fsdp_8x1': ((8, 1), ('data', 'model'), {
        'w': P('data', None), 'v': P('data', None), 'k': P(None, 'data'),
        'b': P('data')}),
    'tp_4x2': ((4, 2), ('data', 'model'), {
        'w': P('data', 'model'), 'v': P('model', 'data'),
        'k': P('model', 'data', None), 'b': P('model')}),
}


def _mesh(shape, names, explicit=False, devices=None):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(names),
                       devices=devices)


def _params(seed=0, shapes=SHAPES, dtype=jnp.float32):
  # Keys in sorted order of the names.
  return _helpers.random_tree(seed, dict(sorted(shapes.items())), dtype)


def _optimizers():
  # resample_every=1 so that the second step transfers the momentum.
  return {
      'flora': flora_optax.flora(
          1e-2, RANK, resample_every=1, min_dim_size_to_factor=8,
          transfer='projected'),
      'momentum': flora_optax.compressed_momentum(
          RANK, resample_every=1, transfer='projected'),
      # Two micro-steps: the second one decompresses and runs the inner
      # optimizer.
      'multisteps': flora_optax.MultiSteps(
          optax.adam(1e-2), every_k_schedule=2, rank=RANK),
      # Quantized states: blocks of 8 along the last axis, so that every
      # shard of these small leaves holds whole blocks (shard-local).
      'momentum8': flora_optax.compressed_momentum(
          None, bits=8, block_size=8, min_quantized_size=0),
      'flora4': flora_optax.flora(
          1e-2, RANK, resample_every=1, min_dim_size_to_factor=8,
          transfer='projected', bits=4, block_size=8, min_quantized_size=0),
      'multisteps8': flora_optax.MultiSteps(
          optax.adam(1e-2), every_k_schedule=2, rank=None, bits=8,
          block_size=8, min_quantized_size=0),
  }


_GRAD_SEEDS = (1, 2)


@functools.lru_cache(maxsize=None)
def _reference(name):
  """The single-device (unsharded) run, computed once per optimizer."""
  return _run(_optimizers()[name], _params(0),
              [_params(s) for s in _GRAD_SEEDS])


def _run(tx, params, grads_seq, param_sh=None, mesh=None):
  """Runs len(grads_seq) jitted updates; sharded when param_sh is given."""
  if param_sh is None:
    init, step = jax.jit(tx.init), jax.jit(tx.update)
  else:
    state_sh = flora_optax.state_shardings(tx, params, param_sh)
    init = jax.jit(tx.init, in_shardings=(param_sh,), out_shardings=state_sh)
    step = jax.jit(tx.update, in_shardings=(param_sh, state_sh, param_sh),
                   out_shardings=(param_sh, state_sh))
    params = jax.device_put(params, param_sh)
    grads_seq = [jax.device_put(g, param_sh) for g in grads_seq]
  return _helpers.run(tx, grads_seq, params, step, init=init)


# --- 1. Same updates on every mesh -----------------------------------------


def _assert_states_close(state, ref):
  """Float leaves to float32 tolerance; quantized ones up to one code.

  A sharded sketch sums its partial products in another order, so it may
  differ from the unsharded one in the last bits, and an entry on a rounding
  boundary then gets the neighbouring code: never more than one apart.
  """
  is_q = lambda x: isinstance(x, flora_optax.QuantizedArray)  # noqa: E731
  flat, ref_flat = (jax.tree.leaves(t, is_leaf=is_q) for t in (state, ref))
  assert len(flat) == len(ref_flat)
  for x, r in zip(flat, ref_flat):
    if not is_q(x):
      chex.assert_trees_all_close(x, r, rtol=2e-5, atol=1e-6)
      continue
    chex.assert_trees_all_close(x.scales, r.scales, rtol=2e-5, atol=1e-6)
    codes = [np.asarray(c).astype(np.int32) for c in (x.codes, r.codes)]
    if x.codes.dtype == jnp.uint8:  # 4 bits: two nibbles a byte
      codes = [np.stack([c & 15, c >> 4]) for c in codes]
      codes = [np.where(c > 7, c - 16, c) for c in codes]
    diff = np.abs(codes[0] - codes[1])
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())



_MATCH_CASES = ([('flora', l, False) for l in ('fsdp_8x1', 'tp_4x2')] +
                [('flora', 'tp_4x2', True), ('momentum', 'tp_4x2', False),
                 ('multisteps', 'tp_4x2', False),
                 ('momentum8', 'tp_4x2', False), ('momentum8', 'tp_4x2', True),
                 ('flora4', 'tp_4x2', False), ('multisteps8', 'fsdp_8x1', False)])


@pytest.mark.parametrize(
    'name,layout,explicit', _MATCH_CASES,
    ids=[f'{n}-{l}-{"explicit" if e else "auto"}' for n, l, e in _MATCH_CASES])
def test_sharded_updates_match_single_device(name, layout, explicit):
  tx = _optimizers()[name]
  params = _params(0)
  grads_seq = [_params(s) for s in _GRAD_SEEDS]
  ref_u, ref_s = _reference(name)

  shape, names, specs = LAYOUTS[layout]
  mesh = _mesh(shape, names, explicit)
  param_sh = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  out_u, out_s = _run(tx, params, grads_seq, param_sh)

  for u, r in zip(out_u, ref_u):
    chex.assert_trees_all_close(u, r, rtol=2e-5, atol=1e-6)
  _assert_states_close(out_s, ref_s)
  # The updates come out sharded like the params (no silent re-layout).
  for n, u in out_u[-1].items():
    assert u.sharding.is_equivalent_to(param_sh[n], u.ndim), n


# --- 2. Bit-identical projections on 1, 2 and 8 devices --------------------


def _identity_grads(shapes):
  """Gradients whose sketch *is* the projection: C = P G or G Pᵀ exactly."""
  out = {}
  for n, s in shapes.items():
    if len(s) < 2:
      out[n] = jnp.zeros(s)
      continue
    out[n] = jnp.broadcast_to(jnp.eye(s[-2], s[-1]), s)
  return out


@pytest.mark.parametrize('projection,devices', [('gaussian', (2, 8)),
                                                ('orthogonal', (8,))])
def test_projections_bit_identical_across_meshes(projection, devices):
  # decay=0: the momentum after one step is the sketch of the gradient, and
  # the sketch of an identity block is P itself (products with exact 0/1).
  tx = flora_optax.compressed_momentum(
      RANK, decay=0.0, projection=projection, key=7)
  grads = _identity_grads({n: SHAPES[n] for n in ('w', 'v', 'k')})
  params = jax.tree.map(jnp.zeros_like, grads)
  layouts = {
      1: None,
      2: ((1, 2), ('data', 'model'), {
          'w': P(None, 'model'), 'v': P('model', None),
          'k': P(None, 'model', None)}),
      8: LAYOUTS['tp_4x2'],
  }
  sketches = {}
  for n_dev in (1, *devices):
    layout = layouts[n_dev]
    if layout is None:
      _, state = _run(tx, params, [grads])
    else:
      shape, names, specs = layout
      mesh = _mesh(shape, names, devices=jax.devices()[:n_dev])
      sh = {n: NamedSharding(mesh, specs[n]) for n in grads}
      _, state = _run(tx, params, [grads], sh)
      assert len(state.mu['w'].sharding.device_set) == n_dev
    sketches[n_dev] = jax.device_get(state.mu)

  for n_dev in devices:
    chex.assert_trees_all_equal(sketches[n_dev], sketches[1])

  # And they are the projections the public API reproduces.
  # Under jit like the optimizer (eager ``/ sqrt(r)`` may round differently).
  projector = flora_optax.Projector(RANK, projection=projection)
  proj = jax.jit(projector.projections)(
      params, flora_optax.cycle_key(7, 0, 'momentum'))
  np.testing.assert_array_equal(sketches[1]['w'][:, :32], proj['w'])
  np.testing.assert_array_equal(sketches[1]['v'][:32, :], proj['v'].T)
  np.testing.assert_array_equal(sketches[1]['k'][..., :32],
                                proj['k'][..., :32])


# --- 3. Communication: no full-size gradient is gathered -------------------

_TYPE = re.compile(r'\b(?:f16|bf16|f32|f64|s32|u32|pred)\[([\d,]*)\]')
_GATHERS = ('all-gather', 'all-to-all', 'collective-permute')


def _collectives(hlo: str):
  """(op, [result numels]) for every collective instruction of an HLO dump."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\(', line)
    if not m:
      continue
    op = m.group(2).removesuffix('-start')
    if op in _GATHERS + ('all-reduce', 'reduce-scatter'):
      numels = [int(np.prod([int(d) for d in dims.split(',') if d]))
                for dims in _TYPE.findall(m.group(1))]
      out.append((op, numels))
  return out


def _compiled_update(tx, layout, explicit=False, corrupt=False):
  shape, names, specs = LAYOUTS[layout]
  mesh = _mesh(shape, names, explicit)
  param_sh = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  shapes = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in SHAPES.items()}
  state_sh = flora_optax.state_shardings(tx, shapes, param_sh)

  def step(grads, state, params):
    if corrupt:  # what a naive implementation might do: gather the gradient
      grads = jax.lax.with_sharding_constraint(
          grads, NamedSharding(mesh, P()))
    return tx.update(grads, state, params)

  return jax.jit(step, in_shardings=(param_sh, state_sh, param_sh),
                 out_shardings=(param_sh, state_sh)).lower(
                     shapes, jax.eval_shape(tx.init, shapes),
                     shapes).compile().as_text()


def _sketch_numels(tx_rank=RANK):
  plans = flora_optax.Projector(tx_rank).plan(
      {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in SHAPES.items()})
  return {n: int(np.prod(pl.sketch_shape)) for n, pl in plans.items()
          if not pl.dense}


def _gathered_too_much(hlo):
  # A gathered gradient (even one axis of it) is far larger than any sketch:
  # the smallest local gradient block here (256) exceeds the largest sketch.
  limit = max(_sketch_numels().values())
  return [(op, n) for op, numels in _collectives(hlo) for n in numels
          if op in _GATHERS and n > limit]


@pytest.mark.parametrize('name,layout,explicit', [
    ('flora', 'tp_4x2', False), ('flora', 'tp_4x2', True),
    ('flora4', 'tp_4x2', False), ('momentum8', 'tp_4x2', False)])
def test_update_never_gathers_a_full_size_gradient(name, layout, explicit):
  # Quantized states too: blocks lie along an axis, so codes and scales are
  # made shard-locally (no gather of the state or of the gradient).
  tx = _optimizers()[name]
  hlo = _compiled_update(tx, layout, explicit)
  assert not _gathered_too_much(hlo), _collectives(hlo)


def test_gather_detector_catches_a_gathered_gradient():
  # The check above must be able to fail: gather the gradient on purpose.
  hlo = _compiled_update(_optimizers()['momentum'], 'tp_4x2', corrupt=True)
  assert _gathered_too_much(hlo)


def test_momentum_communication_is_bounded_by_the_sketches():
  # Per compressed leaf and step: one all-reduce of the local sketch block
  # (plus an r×r one on the first step of a cycle). Everything the step
  # communicates together is below the sum of the full sketches and r×r
  # transfer matrices, i.e. far below one gradient.
  hlo = _compiled_update(_optimizers()['momentum'], 'tp_4x2')
  colls = _collectives(hlo)
  assert not [c for c in colls if c[0] in _GATHERS], colls
  reduced = sum(sum(n) for op, n in colls if op in ('all-reduce',
                                                    'reduce-scatter'))
  sketches = _sketch_numels()
  bound = sum(sketches.values()) + len(sketches) * 2 * RANK * RANK
  assert 0 < reduced <= bound, (reduced, bound, colls)
  assert reduced < min(np.prod(SHAPES[n]) for n in sketches)


# --- 4. Explicit-axes meshes: state types stable, in and out of jit ---------


@pytest.mark.parametrize('name,dtype', [
    ('flora', jnp.float32), ('momentum', jnp.bfloat16),
    ('multisteps', jnp.float32), ('momentum8', jnp.float32),
    ('flora4', jnp.float32)])
def test_explicit_mesh_state_types_stable(name, dtype):
  tx = _optimizers()[name]
  shape, names, specs = LAYOUTS['tp_4x2']
  mesh = _mesh(shape, names, explicit=True)
  with jax.set_mesh(mesh):
    # 'v' is left out to keep the op-by-op (eager) steps short; the
    # sharded-equals-single-device test covers it on an Explicit mesh.
    sub = {n: SHAPES[n] for n in ('w', 'k', 'b')}
    params = {n: jax.device_put(x, NamedSharding(mesh, specs[n]))
              for n, x in _params(0, sub, dtype).items()}
    grads = {n: jax.device_put(x, NamedSharding(mesh, specs[n]))
             for n, x in _params(1, sub, dtype).items()}
    types = lambda t: jax.tree.map(jax.typeof, t)

    state0 = tx.init(params)
    chex.assert_trees_all_equal(types(jax.jit(tx.init)(params)),
                                types(state0))
    # Out of jit (one step: op-by-op dispatch on 8 devices is slow) ...
    u, state = tx.update(grads, state0, params)
    assert types(state) == types(state0)
    assert types(u) == types(grads)
    # ... and in jit, across a resample (transfer) and a MultiSteps cycle.
    jstate = state0
    for _ in range(2):
      ju, jstate = jax.jit(tx.update)(grads, jstate, params)
      assert types(jstate) == types(state0)
      assert types(ju) == types(grads)

  # And the state is what the helper predicts for these params.
  expected = flora_optax.state_shardings(
      tx, params, {n: NamedSharding(mesh, specs[n]) for n in params})
  for e, x in zip(jax.tree.leaves(expected), jax.tree.leaves(state0)):
    assert e.is_equivalent_to(x.sharding, x.ndim), (e, x.sharding)


# --- 5. init on abstract params, and the state_shardings helper ------------


@pytest.mark.parametrize('name', ['flora', 'momentum'])
def test_init_on_shape_dtype_structs(name):
  tx = _optimizers()[name]
  shapes = _helpers.shape_structs(_params(0))
  state = tx.init(shapes)  # would fail if init read any value
  ref = tx.init(_params(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(state, ref)
  chex.assert_trees_all_equal(state, ref)  # zeros, counters and the key


def test_state_shardings_rules():
  mesh = _mesh((4, 2), ('data', 'model'))
  shapes = {
      'w': jax.ShapeDtypeStruct((32, 64), jnp.float32),  # compress axis 0
      'v': jax.ShapeDtypeStruct((64, 32), jnp.float32),  # compress axis 1
      'k': jax.ShapeDtypeStruct((2, 32, 64), jnp.float32),  # batched
      'e': jax.ShapeDtypeStruct((16, 4, 8), jnp.float32),  # grouped axes
      'b': jax.ShapeDtypeStruct((32,), jnp.float32),
  }
  specs = {'w': P('data', 'model'), 'v': P('data', 'model'),
           'k': P('model', 'data', None), 'e': P('data', 'model', None),
           'b': P('model')}
  dn = lambda path, x: (None if x.ndim < 2 else
                        flora_optax.DimensionNumbers(0, (1, 2))
                        if jax.tree_util.keystr(path) == "['e']" else
                        flora_optax.DimensionNumbers(x.ndim - 2, x.ndim - 1))
  tx = flora_optax.compressed_momentum(RANK, dimension_numbers=dn)
  out = flora_optax.state_shardings(
      tx, shapes, {n: NamedSharding(mesh, s) for n, s in specs.items()})
  # The rank axis is replicated, the other axes keep their mesh axes, and the
  # other grouped compressed axes disappear with their mesh axes.
  expected = {
      'w': (None, 'model'),  # (2, 64)
      'v': ('data', None),  # (64, 2)
      'k': ('model', None, None),  # (2, 2, 64)
      'e': (None, 'model', None),  # (2, 4, 8)
      'b': ('model',),  # dense
  }
  for n, spec in expected.items():
    got = tuple(out.mu[n].spec)
    assert got + (None,) * (len(spec) - len(got)) == spec, (n, got)
  assert out.count.spec == P() and out.key.spec == P()
  assert all(s.mesh == mesh for s in jax.tree.leaves(out))


def test_state_shardings_place_a_jitted_init():
  mesh = _mesh((4, 2), ('data', 'model'))
  _, _, specs = LAYOUTS['tp_4x2']
  param_sh = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  tx = _optimizers()['flora']
  shapes = _helpers.shape_structs(_params(0))
  state_sh = flora_optax.state_shardings(tx, shapes, param_sh)
  # PartitionSpecs with mesh= give the same answer.
  chex.assert_trees_all_equal(
      state_sh, flora_optax.state_shardings(tx, shapes, specs, mesh=mesh))
  state = jax.jit(tx.init, out_shardings=state_sh)(shapes)
  for s, x in zip(jax.tree.leaves(state_sh), jax.tree.leaves(state)):
    assert x.sharding == s
  mu = optax.tree.get(state, 'mu')['w']  # (RANK, 64), P(None, 'model'): 2 columns blocks
  assert {sh.data.shape for sh in mu.addressable_shards} == {(RANK, 32)}


# --- 6. The example script -------------------------------------------------


def test_sharded_training_example_smoke():
  from examples import sharded_training  # pylint: disable=g-import-not-at-top
  report = sharded_training.main(['--steps', '4', '--width', '32', '--batch-size', '8',
                        '--rank', '4', '--check'])
  assert report['devices'] == jax.device_count()
  assert report['max_abs_diff_vs_single_device'] < 1e-5
  assert report['state_bytes_per_device'] < report[
      'adamw_state_bytes_per_device']
  assert all(np.isfinite(l) for _, l in report['losses'])
