r"""Sharded training with flora: the same script on 8 simulated CPU devices, a
multi-GPU host, a TPU slice or several hosts.

The mesh is built from ``jax.devices()`` as ``('data', 'model')``: ``model``
is 2 when the device count is even, ``data`` takes the rest. A two-layer MLP
learns a fixed random teacher; its kernels are sharded FSDP+TP style
(``w1: P('data', 'model')``, ``w2: P('model', 'data')``) and the batch over
``data``. The optimizer state's shardings come from
:func:`flora_optax.state_shardings`, so the jitted ``init`` creates every
sketch already sharded, and the step never gathers a full gradient (per
compressed kernel it all-reduces one ``r``-column sketch block).

Run::

  python -m examples.sharded_training --cpu-devices 8      # laptop / CI
  python -m examples.sharded_training                      # GPUs / TPU host
  # several hosts: same command on every host, same --seed everywhere
  python -m examples.sharded_training --distributed

With ``--check`` the first steps are replayed on one device and compared.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--cpu-devices', type=int,
                 default=int(os.environ.get('FLORA_CPU_DEVICES', 0)) or None,
                 help='simulate this many CPU devices (or env '
                 'FLORA_CPU_DEVICES); must be set before JAX starts')
  p.add_argument('--distributed', action='store_true',
                 help='call jax.distributed.initialize() first (multi-host)')
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--width', type=int, default=256,
                 help='input/output width (hidden is 4x)')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--rank', type=int, default=16)
  p.add_argument('--resample-every', type=int, default=50)
  p.add_argument('--learning-rate', type=float, default=3e-2)
  p.add_argument('--seed', type=int, default=0,
                 help='the same on every host: it fixes params, data and '
                 'every projection')
  p.add_argument('--check', action='store_true',
                 help='replay 3 steps on one device and compare')
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  if args.cpu_devices:
    # Only effective before the first JAX computation (a no-op afterwards,
    # e.g. when the tests call main() in a process that already has 8).
    try:
      jax.config.update('jax_num_cpu_devices', args.cpu_devices)
    except RuntimeError:
      pass
  if args.distributed:
    jax.distributed.initialize()  # reads the cluster from the environment

  # Imported after the device count is set.
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import flora_optax
  from examples.memory import tree_bytes

  n = jax.device_count()
  model = 2 if n % 2 == 0 else 1
  mesh = jax.make_mesh((n // model, model), ('data', 'model'),
                       axis_types=(AxisType.Auto, AxisType.Auto))
  if jax.process_index() == 0:
    print(f'{n} devices ({jax.devices()[0].platform}), '
          f'{jax.process_count()} process(es), mesh {dict(mesh.shape)}')

  d, h = args.width, 4 * args.width
  if d % mesh.shape['data'] or h % mesh.shape['model'] or (
      args.batch_size % mesh.shape['data']):
    raise SystemExit('--width and --batch-size must divide by the mesh axes '
                     f'{dict(mesh.shape)}.')
  specs = {'w1': P('data', 'model'), 'b1': P('model'),
           'w2': P('model', 'data'), 'b2': P()}
  param_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  batch_sh = NamedSharding(mesh, P('data', None))

  root = jax.random.key(args.seed)  # the same on every host
  k_init, k_teacher, k_data = jax.random.split(root, 3)

  def init_params(key):
    k1, k2 = jax.random.split(key)
    return {'w1': jax.random.normal(k1, (d, h)) / jnp.sqrt(d),
            'b1': jnp.zeros((h,)),
            'w2': jax.random.normal(k2, (h, d)) / jnp.sqrt(h),
            'b2': jnp.zeros((d,))}

  teacher = init_params(k_teacher)

  def forward(params, x):
    return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2'] + params[
        'b2']

  def batch(step):
    x = jax.random.normal(jax.random.fold_in(k_data, step),
                          (args.batch_size, d))
    x = jax.lax.with_sharding_constraint(x, batch_sh)
    return x, forward(teacher, x)

  def loss_fn(params, x, y):
    return jnp.mean((forward(params, x) - y)**2)

  tx = flora_optax.flora(args.learning_rate, rank=args.rank,
                         resample_every=args.resample_every, key=args.seed,
                         transfer='projected')

  # Shardings of every state leaf, from the params' shardings. The jitted
  # init then creates the state in place: no full-size buffer anywhere.
  shapes = jax.eval_shape(init_params, k_init)
  state_sh = flora_optax.state_shardings(tx, shapes, param_sh)
  params = jax.jit(init_params, out_shardings=param_sh)(k_init)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)

  def train_step(params, state, step):
    x, y = batch(step)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  scalar = NamedSharding(mesh, P())
  step_fn = jax.jit(train_step, in_shardings=(param_sh, state_sh, scalar),
                    out_shardings=(param_sh, state_sh, scalar),
                    donate_argnums=(0, 1))

  def state_bytes_per_device(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree)
               for s in x.addressable_shards
               if s.device == jax.local_devices()[0])

  report = {'devices': n, 'mesh': dict(mesh.shape),
            'state_bytes_per_device': state_bytes_per_device(state)}
  adamw_state = jax.eval_shape(optax.adamw(1e-3).init, shapes)
  report['adamw_state_bytes_per_device'] = tree_bytes(adamw_state) // n

  if args.check:  # the first steps again, on one device, unsharded
    ref_params = init_params(k_init)
    ref_state = tx.init(ref_params)
    ref_step = jax.jit(train_step)
    p_sh, s_sh = params, state
    p_sh = jax.tree.map(lambda x: x.copy(), p_sh)  # keep params (donation)
    s_sh = jax.tree.map(lambda x: x.copy(), s_sh)
    worst = 0.0
    for i in range(3):
      ref_params, ref_state, _ = ref_step(ref_params, ref_state, i)
      p_sh, s_sh, _ = step_fn(p_sh, s_sh, jnp.int32(i))
      for a, b in zip(jax.tree.leaves(p_sh), jax.tree.leaves(ref_params)):
        worst = max(worst, float(jnp.max(jnp.abs(a - b))))
    report['max_abs_diff_vs_single_device'] = worst
    print(f'3 steps sharded vs one device: max |diff| = {worst:.2e}')

  t0 = time.perf_counter()
  losses = []
  for i in range(args.steps):
    params, state, loss = step_fn(params, state, jnp.int32(i))
    if i == 0 or (i + 1) % max(1, args.steps // 5) == 0:
      losses.append((i + 1, float(loss)))
      if jax.process_index() == 0:
        print(f'step {i + 1:5d}  loss {float(loss):.4f}')
  report['losses'] = losses
  report['seconds'] = time.perf_counter() - t0
  if jax.process_index() == 0:
    print(f"optimizer state per device: {report['state_bytes_per_device']:,} "
          f"bytes (adamw: {report['adamw_state_bytes_per_device']:,})")
  return report


if __name__ == '__main__':
  main()
