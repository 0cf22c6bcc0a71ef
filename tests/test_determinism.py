"""The same key gives bit-identical results across processes and runs.

Two fresh Python processes (different ``PYTHONHASHSEED``, device counts and
dict insertion orders) run the same short training with ``flora``,
``MultiSteps`` and ``Projector``; their outputs must match byte for byte, and
match this process's. Leaf ids are CRC32 hashes of key paths, never Python's
salted ``hash``, and projections derive only from the key and the counters.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import flora_optax

SCRIPT = textwrap.dedent('''
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import flora_optax


    def run(reverse):
      names = ['dense', 'attn', 'bias']
      shapes = {'dense': (8, 6), 'attn': (4, 3, 5), 'bias': (6,)}
      if reverse:  # dict insertion order must not matter
        names = names[::-1]

      def tree(seed):
        # Each leaf's values depend on its name only, not on the order.
        return {'layer': {n: jnp.asarray(np.random.default_rng(
            [seed, sorted(shapes).index(n)]).standard_normal(shapes[n]),
                                         jnp.float32)
                          for n in names}}

      params = tree(0)
      out = {}
      tx = flora_optax.flora(1e-2, 2, resample_every=2,
                             key=jax.random.key(11), min_dim_size_to_factor=2)
      state = tx.init(params)
      step = jax.jit(tx.update)
      p = params
      for t in range(5):
        u, state = step(tree(t + 1), state, p)
        p = optax.apply_updates(p, u)
      out['flora_params'] = p
      out['flora_mu'] = optax.tree.get(state, 'mu')
      ms = flora_optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2,
                                  rank=2, key=3)
      state = ms.init(params)
      step = jax.jit(ms.update)
      for t in range(5):
        u, state = step(tree(t + 10), state, params)
      out['multisteps_updates'] = u
      out['multisteps_acc'] = state.acc_grads
      proj = flora_optax.Projector(2, projection='orthogonal')
      out['projections'] = proj.projections(
          params, flora_optax.cycle_key(7, 5, 'accumulation'))
      flat = jax.tree_util.tree_flatten_with_path(out)[0]
      return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


    if __name__ == '__main__':
      arrays = run(reverse=sys.argv[2] == 'reverse')
      np.savez(sys.argv[1], **arrays)
      print(jax.device_count())
''')


def _spawn(tmp_path, name, hash_seed, devices, order):
  script = tmp_path / 'train.py'
  script.write_text(SCRIPT)
  env = dict(os.environ, PYTHONHASHSEED=str(hash_seed),
             JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices))
  # The same XLA flags as this process (conftest's work-arounds), without a
  # device count of its own.
  env['XLA_FLAGS'] = ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if 'force_host_platform_device_count' not in f)
  out = tmp_path / f'{name}.npz'
  return out, subprocess.Popen(
      [sys.executable, str(script), str(out), order], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_two_processes_and_this_one_agree_bit_for_bit(tmp_path):
  a_path, a = _spawn(tmp_path, 'a', 1, 1, 'forward')
  b_path, b = _spawn(tmp_path, 'b', 4242, 4, 'reverse')
  outs = []
  for proc in (a, b):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    outs.append(stdout.split()[-1])
  assert outs == ['1', '4']  # the processes really differed in devices
  ra, rb = _load(a_path), _load(b_path)
  namespace = {}
  exec(compile(SCRIPT, 'train.py', 'exec'), namespace)  # pylint: disable=exec-used
  here = namespace['run'](reverse=False)
  assert sorted(ra) == sorted(rb) == sorted(here)
  assert len(ra) == 14  # 3 leaves x 4 trees, 2 compressed projections
  for k in ra:
    assert ra[k].dtype == rb[k].dtype == here[k].dtype, k
    assert ra[k].tobytes() == rb[k].tobytes(), k
    assert ra[k].tobytes() == here[k].tobytes(), k


def test_projections_identical_in_and_out_of_jit():
  like = {'w': jnp.zeros((16, 24)), 'k': jnp.zeros((3, 10, 12))}
  for projection in ('gaussian', 'orthogonal'):
    proj = flora_optax.Projector(4, projection=projection)
    key = flora_optax.cycle_key(123, 9, 'momentum')
    eager = proj.projections(like, key)
    jitted = jax.jit(proj.projections)(like, key)
    again = jax.jit(proj.projections)(like, key)
    for n in like:
      assert np.asarray(eager[n]).tobytes() == np.asarray(jitted[n]).tobytes()
      assert np.asarray(again[n]).tobytes() == np.asarray(jitted[n]).tobytes()
    other = proj.projections(like, flora_optax.cycle_key(124, 9, 'momentum'))
    assert not np.array_equal(eager['w'], other['w'])


def test_key_forms_are_equivalent():
  # An int seed, the typed key and the raw uint32 key data of the same seed
  # give the same projections (and so the same optimizer).
  params = {'w': jnp.ones((6, 10))}
  grads = {'w': jnp.arange(60.).reshape(6, 10)}
  outs = []
  for key in (5, jax.random.key(5), jax.random.PRNGKey(5)):
    tx = flora_optax.compressed_momentum(2, key=key)
    u, _ = tx.update(grads, tx.init(params))
    outs.append(np.asarray(u['w']).tobytes())
  assert outs[0] == outs[1] == outs[2]
  tx = flora_optax.compressed_momentum(2, key=6)
  u, _ = tx.update(grads, tx.init(params))
  assert np.asarray(u['w']).tobytes() != outs[0]
