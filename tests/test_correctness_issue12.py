"""Correctness across JAX configurations and containers (issue 12).

x64 mode, every PRNG implementation JAX ships, errors that name the leaf,
``inject_hyperparams`` with only ``rank`` static, warnings attributed to the
user's line, projection identity across containers, and a demo that leaves
the checkout clean.
"""

import os
import subprocess
import sys
import textwrap

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
