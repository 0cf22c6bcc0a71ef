"""Correctness across JAX configurations and containers (issue 12).

x64 mode, every PRNG implementation JAX ships, ``inject_hyperparams`` with
only ``rank`` static, warnings attributed to the user's line, projection
identity across containers, and a demo that leaves the checkout clean. (The
issue's errors that name the leaf, and its refused keys, are checked in
test_validation.py with the other bad-argument rules.)
"""

import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, *args: str, **env_overrides) -> str:
  """Runs ``code`` in a fresh interpreter (JAX flags are process-wide)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             **env_overrides)
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args],
                        env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


# --- 1. jax_enable_x64 --------------------------------------------------------

X64_SCRIPT = '''
import re
import warnings

import jax
import jax.numpy as jnp
import optax

import flora_optax

assert jax.config.jax_enable_x64
warnings.simplefilter('ignore', flora_optax.TransferStabilityWarning)

params = {'w': jnp.ones((16, 8), jnp.float32),
          'e': jnp.ones((2, 6, 10), jnp.float32),
          'b': jnp.ones((8,), jnp.float32)}
grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)


def no_float64_arrays(fn, *args):
  # A float64 scalar constant folded into a float32 op is harmless (optax's
  # own transforms have some); a float64 array means float64 arithmetic.
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  bad = re.findall(r'f64\\[\\d[^\\]]*\\]', jaxpr)
  assert not bad, (fn, bad[:3])


def check(name, tx):
  state = tx.init(params)
  step = jax.jit(tx.update)
  no_float64_arrays(tx.update, grads, state, params)
  for _ in range(3):  # crosses a resample (resample_every=2) and a cycle
    updates, new_state = step(grads, state, params)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(
        lambda p: p.dtype, params), name
    # The state keeps its dtypes (what lax.cond and scan carry require).
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
        lambda x: x.dtype, state), name
    state = new_state


for projection in ('gaussian', 'rademacher', 'orthogonal'):
  kw = dict(projection=projection)
  check(f'momentum {projection}', flora_optax.compressed_momentum(
      2, resample_every=2, **kw))
  check(f'flora {projection}', flora_optax.flora(
      0.1, 2, resample_every=2, min_dim_size_to_factor=4, **kw))
  check(f'multisteps {projection}', flora_optax.MultiSteps(
      optax.sgd(0.1), every_k_schedule=2, rank=2, **kw))
  proj = flora_optax.Projector(2, **kw)
  key = jax.random.key(0)
  no_float64_arrays(lambda g: proj.decompress(proj.compress(g, key), key, g),
                    grads)
  no_float64_arrays(lambda g: proj.transfer(
      proj.compress(g, key), key, jax.random.key(1), g), grads)
  batches = {'x': jnp.ones((3, 4, 16), jnp.float32)}
  no_float64_arrays(lambda p, b: flora_optax.accumulate_gradients(
      jax.grad(lambda p, b: jnp.sum(b['x'] @ p['w'])), p, b, projector=proj,
      step=0), params, batches)

import sys
import numpy as np
out = {}
for projection in ('gaussian', 'rademacher', 'orthogonal'):
  ps = flora_optax.Projector(2, projection=projection).projections(
      params, flora_optax.cycle_key(0, 1))
  out.update({f'{projection}_{k}': np.asarray(v) for k, v in ps.items()
              if v is not None})
np.savez(sys.argv[1], **out)
print('ok')
'''


def _projections(params):
  out = {}
  for projection in ('gaussian', 'rademacher', 'orthogonal'):
    ps = flora_optax.Projector(2, projection=projection).projections(
        params, flora_optax.cycle_key(0, 1))
    out.update({f'{projection}_{k}': v for k, v in ps.items() if v is not None})
  return out


def test_x64_float32_leaves_stay_float32(tmp_path):
  path = tmp_path / 'x64.npz'
  out = _run_python(X64_SCRIPT, str(path), JAX_ENABLE_X64='1')
  assert out.strip().endswith('ok')
  # Under x64 the projections of float32 leaves are those drawn without it.
  params = {'w': jnp.ones((16, 8), jnp.float32),
            'e': jnp.ones((2, 6, 10), jnp.float32),
            'b': jnp.ones((8,), jnp.float32)}
  want = _projections(params)
  with np.load(path) as got:
    assert sorted(got.files) == sorted(want)
    for k, v in want.items():
      assert got[k].dtype == np.float32, k
      np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)


# Core properties, rerun with x64 on: every array the tests build without an
# explicit dtype is then float64, and explicit float32 ones must not change.
X64_CORE_TESTS = [
    'tests/test_momentum.py::test_full_rank_orthogonal_equals_dense_ema',
    'tests/test_momentum.py::test_lora_with_frozen_a_equals_momentum_without_resampling',
    'tests/test_momentum.py::test_dtypes_are_stable',
    'tests/test_projection.py::test_transfer_equals_compress_new_of_decompress_old',
    'tests/test_projection.py::test_transfer_uses_the_old_key_to_decompress',
    'tests/test_accumulation.py::test_scan_recipe_equals_multisteps',
    'tests/test_flora.py::test_compression_off_equals_the_optax_chain',
]


def test_core_tests_pass_with_x64():
  env = dict(os.environ, JAX_ENABLE_X64='1', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p',
       'no:cacheprovider', *X64_CORE_TESTS], env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


# --- 3. PRNG implementations ------------------------------------------------

IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')


def _params_and_grads():
  k = jax.random.split(jax.random.key(1), 3)
  params = {'w': jax.random.normal(k[0], (16, 8)),
            'e': jax.random.normal(k[1], (2, 6, 10)),
            'b': jnp.ones((8,))}
  grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1.0)), params)
           for i in range(3)]
  return params, grads


def _plain(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize('impl', IMPLS)
def test_projector_with_every_prng_impl(impl):
  params, (g, *_) = _params_and_grads()
  key = jax.random.key(7, impl=impl)
  proj = flora_optax.Projector(2)
  ps = proj.projections(params, key)
  c = proj.compress(g, key)
  np.testing.assert_allclose(c['w'], g['w'] @ ps['w'].T, rtol=1e-5, atol=1e-6)
  d = proj.decompress(c, key, g)
  np.testing.assert_allclose(d['w'], c['w'] @ ps['w'], rtol=1e-5, atol=1e-6)
  new = jax.random.key(8, impl=impl)
  t = proj.transfer(c, key, new, g)
  np.testing.assert_allclose(
      t['w'], proj.compress(proj.decompress(c, key, g), new)['w'], rtol=1e-4,
      atol=1e-5)
  # The implementation is really used: the same seed with another one
  # draws other projections.
  other = jax.random.key(7, impl='rbg' if impl != 'rbg' else 'threefry2x32')
  assert not np.allclose(ps['w'], proj.projections(params, other)['w'])


@pytest.mark.parametrize('impl', IMPLS)
def test_multisteps_and_accumulate_gradients_with_every_prng_impl(impl):
  params, grads = _params_and_grads()
  key = jax.random.key(7, impl=impl)
  proj = flora_optax.Projector(2)
  tx = flora_optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2, rank=2,
                              key=key)
  state = tx.init(params)
  # Checkpoints stay plain arrays: raw key data of the implementation.
  assert state.key.dtype == jnp.uint32
  assert state.key.shape == jax.random.key_data(key).shape
  step = jax.jit(tx.update)
  _, state = step(grads[0], state, params)
  state = _plain(state)  # as restored from a checkpoint
  updates, state = step(grads[1], state, params)
  assert bool(tx.has_updated(state))
  micro = jax.tree.map(lambda *x: jnp.stack(x), *grads[:2])
  want = flora_optax.accumulate_gradients(
      lambda p, b: b, params, micro, projector=proj, step=0, key=key)
  ck = flora_optax.cycle_key(key, 0, purpose='accumulation')
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads[:2])
  manual = proj.decompress(proj.compress(mean, ck), ck, mean)
  for ref in (want, manual):
    chex_close(jax.tree.map(jnp.negative, updates), ref)


def chex_close(a, b, rtol=1e-4, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _momentum_matches_manual(key, **kw):
  """Two compressed-momentum steps (one transfer) against Projector."""
  params, grads = _params_and_grads()
  decay = 0.5
  tx = flora_optax.compressed_momentum(2, decay=decay, resample_every=1,
                                       key=key, residual=False, **kw)
  state = tx.init(params)
  assert state.key.dtype == jnp.uint32
  step = jax.jit(tx.update)
  u1, state = step(grads[0], state, params)
  u2, state = step(grads[1], _plain(state), params)
  proj = flora_optax.Projector(2)
  k0 = flora_optax.cycle_key(key, 0)
  k1 = flora_optax.cycle_key(key, 1)
  m = jax.tree.map(lambda x: (1 - decay) * x, proj.compress(grads[0], k0))
  chex_close(u1, proj.decompress(m, k0, params))
  m = proj.transfer(m, k0, k1, params)
  m = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, m,
                   proj.compress(grads[1], k1))
  chex_close(u2, proj.decompress(m, k1, params))


@pytest.mark.parametrize('impl', IMPLS[1:])
def test_compressed_momentum_and_flora_with_every_prng_impl(impl):
  key = jax.random.key(7, impl=impl)
  _momentum_matches_manual(key)
  params, grads = _params_and_grads()
  tx = flora_optax.flora(1e-2, 2, resample_every=1, key=key,
                         min_dim_size_to_factor=4)
  state = tx.init(params)
  for g in grads:
    updates, state = jax.jit(tx.update)(g, _plain(state), params)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_compressed_momentum_with_the_default_prng_impl():
  # Int seeds and typed keys of the default implementation agree with the
  # projections custom code derives through cycle_key.
  _momentum_matches_manual(jax.random.key(7))
  _momentum_matches_manual(7)


NON_DEFAULT_IMPL_SCRIPT = '''
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_optax

warnings.simplefilter('ignore', flora_optax.TransferStabilityWarning)
assert jax.config.jax_default_prng_impl == 'rbg'
which = sys.argv[1]
params = {'w': jnp.linspace(-1, 1, 128).reshape(16, 8), 'b': jnp.ones((8,))}
grads = jax.tree.map(jnp.cos, params)
proj = flora_optax.Projector(2)


def close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def build(seed):
  if which == 'accumulation':
    return flora_optax.MultiSteps(optax.sgd(-1.0), every_k_schedule=1,
                                  rank=2, key=seed)
  return optax.chain(flora_optax.compressed_momentum(
      2, decay=0.0, resample_every=1, key=seed, residual=False))


def expected(impl):
  k = flora_optax.cycle_key(jax.random.key(3, impl=impl), 0, purpose=which)
  return proj.decompress(proj.compress(grads, k), k, grads)


# An int seed takes the default implementation of the moment the optimizer
# is built; later changes of the default do not affect it.
tx = build(3)
state = tx.init(params)
assert state[0].key.shape == (4,) if which == 'momentum' else (
    state.key.shape == (4,))
close(jax.jit(tx.update)(grads, state, params)[0], expected('rbg'))
jax.config.update('jax_default_prng_impl', 'threefry2x32')
close(jax.jit(tx.update)(grads, state, params)[0], expected('rbg'))
state = tx.init(params)  # init after the change too
close(jax.jit(tx.update)(grads, state, params)[0], expected('rbg'))
tx = build(3)  # built under threefry
close(jax.jit(tx.update)(grads, tx.init(params), params)[0],
      expected('threefry2x32'))
print('ok')
'''


def test_non_default_prng_impl_accumulation():
  out = _run_python(NON_DEFAULT_IMPL_SCRIPT, 'accumulation',
                    JAX_DEFAULT_PRNG_IMPL='rbg')
  assert out.strip().endswith('ok')


def test_non_default_prng_impl_momentum():
  out = _run_python(NON_DEFAULT_IMPL_SCRIPT, 'momentum',
                    JAX_DEFAULT_PRNG_IMPL='rbg')
  assert out.strip().endswith('ok')


# --- 7. Projection identity across containers -------------------------------


class _Layer(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def _containers():
  """The same parameters held in six kinds of containers."""
  from flax.core import FrozenDict  # pylint: disable=g-import-not-at-top
  nnx, model = _helpers.nnx_model()
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  assert set(pure['layers']) == {0, 1}  # nnx.List: int dict keys
  as_list = dict(pure, layers=[pure['layers'][0], pure['layers'][1]])
  as_tuples = dict(pure, layers=[_Layer(**pure['layers'][i]) for i in (0, 1)])
  return {
      'dict': pure,
      'frozen': FrozenDict(pure),
      'nnx_state': state,  # leaves under Variables: paths end in `.value`
      'nnx_pure_state': jax.tree.map(lambda v: v[...], state,
                                     is_leaf=lambda x: isinstance(
                                         x, nnx.Variable)),
      'list': as_list,
      'namedtuple': as_tuples,
  }


def _by_name(tree):
  """Leaves by a container-independent name, for comparison."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    names = [str(getattr(e, 'key', getattr(e, 'name', getattr(e, 'idx', e))))
             for e in path]
    if names[-1] == 'value':
      names.pop()
    out['/'.join(names)] = np.asarray(x)
  return out


def test_projections_do_not_depend_on_the_container():
  trees = _containers()
  key = flora_optax.cycle_key(0, 1)
  proj = flora_optax.Projector(2)
  ref = _by_name(proj.compress(trees['dict'], key))
  assert set(ref) == {'embed', 'layers/0/kernel', 'layers/0/bias',
                      'layers/1/kernel', 'layers/1/bias'}
  for name, tree in trees.items():
    got = _by_name(proj.compress(tree, key))
    assert got.keys() == ref.keys(), name
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f'{name} {k}')


def test_checkpoint_restored_into_another_container_resumes_exactly():
  trees = _containers()
  tx = flora_optax.compressed_momentum(2, resample_every=1)
  grads = {n: jax.tree.map(jnp.cos, t) for n, t in trees.items()}

  def run(name, steps, state=None):
    params = trees[name]
    state = tx.init(params) if state is None else state
    for _ in range(steps):
      updates, state = tx.update(grads[name], state, params)
    return updates, state

  ref, _ = run('dict', 3)
  _, state = run('dict', 2)
  for name in ('frozen', 'nnx_pure_state', 'list', 'namedtuple'):
    # Restore the dict run's sketches into this container's state.
    template = tx.init(trees[name])
    mu = jax.tree.unflatten(jax.tree.structure(template.mu),
                            [_by_name(state.mu)[k]
                             for k in _by_name(template.mu)])
    updates, _ = run(name, 1, template._replace(
        count=state.count, mu=mu, **{
            f: getattr(state, f) for f in template._fields
            if f not in ('count', 'mu')}))
    got, want = _by_name(updates), _by_name(ref)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7,
                                 err_msg=f'{name} {k}')


def test_leaf_id_depends_on_keys_not_on_their_rendering():
  from flora_optax import _keys  # pylint: disable=g-import-not-at-top
  tu = jax.tree_util
  same = [(tu.DictKey('a'), tu.SequenceKey(0)),
          (tu.GetAttrKey('a'), tu.DictKey(0)),
          (tu.DictKey('a'), tu.FlattenedIndexKey(0)),
          (tu.DictKey('a'), tu.SequenceKey(0), tu.GetAttrKey('value'))]
  assert len({_keys.leaf_id(p) for p in same}) == 1
  # An int key and a string key that render alike are different leaves.
  assert _keys.leaf_id((tu.DictKey(0),)) != _keys.leaf_id((tu.DictKey('0'),))
  assert _keys.leaf_id((tu.DictKey('a'), tu.DictKey('b'))) != _keys.leaf_id(
      (tu.DictKey('a.b'),))


# --- 6. Warnings and errors point at the user --------------------------------


def _unstable_momentum():
  # decay**1 * sqrt(16/2) > 1: the unbiased transfer is unstable.
  return flora_optax.compressed_momentum(2, resample_every=1, residual=False)


def _warned_at(build):
  params = {'w': jnp.ones((16, 32)), 'b': jnp.ones((32,))}
  tx = build()
  with pytest.warns(flora_optax.TransferStabilityWarning) as record:
    line = sys._getframe().f_lineno + 1  # pylint: disable=protected-access
    tx.init(params)
  (w,) = [w for w in record
          if issubclass(w.category, flora_optax.TransferStabilityWarning)]
  return w.filename, w.lineno, line


@pytest.mark.parametrize('build', [
    _unstable_momentum,
    lambda: optax.chain(_unstable_momentum(), optax.scale(-0.1)),
    lambda: flora_optax.flora(0.1, 2, resample_every=1, residual=False),
    lambda: flora_optax.MultiSteps(
        flora_optax.flora(0.1, 2, resample_every=1, residual=False), 2,
        rank=2),
    lambda: optax.inject_hyperparams(
        flora_optax.flora, static_args=('rank',))(
            0.1, 2, resample_every=1, residual=False),
    lambda: optax.masked(_unstable_momentum(), {'w': True, 'b': False}),
    lambda: _Jitted(optax.chain(_unstable_momentum())),
], ids=['direct', 'chain', 'flora', 'multisteps', 'inject', 'masked', 'jit'])
def test_stability_warning_points_at_the_users_line(build):
  filename, lineno, line = _warned_at(build)
  assert os.path.abspath(filename) == os.path.abspath(__file__)
  assert lineno == line


class _Jitted:

  def __init__(self, tx):
    self.init = jax.jit(tx.init)


def test_stability_warning_under_nnx_optimizer_points_at_the_user():
  nnx, model = _helpers.nnx_model()
  with pytest.warns(flora_optax.TransferStabilityWarning) as record:
    line = sys._getframe().f_lineno + 1  # pylint: disable=protected-access
    nnx.Optimizer(model, _unstable_momentum(), wrt=nnx.Param)
  w = [w for w in record
       if issubclass(w.category, flora_optax.TransferStabilityWarning)][0]
  assert (os.path.abspath(w.filename), w.lineno) == (
      os.path.abspath(__file__), line)


# --- 5. inject_hyperparams with only rank static -----------------------------


def test_inject_hyperparams_with_only_rank_static_under_jit():
  params, grads = _params_and_grads()
  kw = dict(rank=2, resample_every=2)
  plain = flora_optax.flora(1e-2, **kw)
  inj = optax.inject_hyperparams(flora_optax.flora, static_args=('rank',))(
      1e-2, **kw)
  state, state_i = jax.jit(plain.init)(params), jax.jit(inj.init)(params)
  step, step_i = jax.jit(plain.update), jax.jit(inj.update)
  for g in grads:
    u, state = step(g, state, params)
    u_i, state_i = step_i(g, state_i, params)
    chex_close(u_i, u, rtol=1e-5, atol=1e-6)
  chex_close(state_i.inner_state, state, rtol=1e-5, atol=1e-6)


def test_min_dim_size_to_factor_keeps_adafactors_default_and_behaviour():
  params = {'w': jnp.ones((128, 130)), 'v': jnp.ones((127, 130))}
  state = flora_optax.flora(1e-2, 8).init(params)
  ref = optax.adafactor(1e-2).init(params)
  # The same factored / unfactored leaves as optax.adafactor (128).
  chex_close(jax.tree.map(jnp.shape, state[0]), jax.tree.map(jnp.shape, ref[0]))
  assert state[0].v['w'].shape == (1,) and state[0].v['v'].shape == (127, 130)
  for value in (np.int64(4), jnp.asarray(4)):  # read back as an int
    s = flora_optax.flora(1e-2, 8, min_dim_size_to_factor=value).init(
        {'w': jnp.ones((4, 6))})
    assert s[0].v_row['w'].shape == (4,)
  # Values that are not ints are refused: see test_validation.py.


# --- 8. The demo leaves the checkout clean ----------------------------------


def _train_lm():
  from examples import train_lm  # pylint: disable=g-import-not-at-top
  return train_lm


def test_demo_writes_to_an_untracked_directory_by_default():
  out = _train_lm().parse_args([]).out
  assert os.path.abspath(out) == os.path.join(ROOT, 'runs', 'train_lm')
  # Ignored by git, and no tracked file lives there.
  proc = subprocess.run(['git', 'check-ignore', '-q', out], cwd=ROOT)
  assert proc.returncode == 0
  tracked = subprocess.run(['git', 'ls-files', out], cwd=ROOT,
                           capture_output=True, text=True).stdout
  assert not tracked.strip()


def test_demo_results_record_no_machine_path(tmp_path):
  train_lm = _train_lm()
  train_lm.main(['--d-model', '16', '--layers', '1', '--heads', '2',
                 '--seq-len', '8', '--batch-size', '2', '--eval-batches', '1',
                 '--rank', '2', '--data', 'topics', '--steps', '2',
                 '--eval-every', '2', '--warmup-steps', '1', '--no-progress',
                 '--no-update-peak', '--optimizers', 'flora',
                 '--out', str(tmp_path)])
  text = (tmp_path / 'results.json').read_text()
  assert str(tmp_path) not in text and ROOT not in text
  # Nor does the reference output in the repository.
  ref = os.path.join(ROOT, 'examples', 'results', 'train_lm', 'results.json')
  with open(ref) as f:
    assert ROOT not in f.read() and '"out"' not in open(ref).read()
