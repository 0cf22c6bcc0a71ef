"""The training that tests/test_multihost.py runs in 2 processes and in 1.

Importing this module does nothing but define functions (pytest imports it
for doctests). Run as a script it is either one of the two processes of a
``jax.distributed`` job on localhost, each with 4 CPU devices and gloo
collectives, or the one-process reference with 8 devices::

  python tests/_multihost_child.py PORT 0 2 OUT_DIR &   # the two processes
  python tests/_multihost_child.py PORT 1 2 OUT_DIR &
  python tests/_multihost_child.py PORT2 0 1 OUT_DIR    # the reference

Every optimizer trains the same tiny two-layer model, sharded over a
``('data', 'model')`` (2, 4) mesh of all 8 devices (so ``data`` spans the
two processes), for ``TOTAL`` steps; after ``STOP`` steps the two
processes save the params and optimizer states of all optimizers in one
Orbax checkpoint. The reference trains the same way, then restores that
checkpoint on its 8 devices and on 1 device and trains on to ``TOTAL``.
Each side writes its gathered results (``.npz``, one array per leaf) and
a report (``.json``, last) to ``OUT_DIR`` for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import flora_optax

STOP, TOTAL = 3, 6  # the checkpoint: mid accumulation, mid resample cycle
D, H, BATCH = 16, 64, 8
SPECS = {'w1': P('data', 'model'), 'b1': P('model'),
         'w2': P('model', 'data')}
# Quantized leaves in blocks of 16 along the last axis: w1's blocks lie
# within one shard, w2's (last axis split in 2 halves of 8) span two
# devices, of different processes.
Q = {'bits': 8, 'block_size': 16, 'min_quantized_size': 0}


def optimizers() -> dict[str, optax.GradientTransformation]:
  return {
      'adamw8': flora_optax.adamw(1e-2, **Q),
      'lion8': flora_optax.quantized(optax.lion(1e-3), **Q),
      'flora': flora_optax.flora(1e-2, rank=2, resample_every=2, key=7,
                                 min_dim_size_to_factor=8),
      'multisteps8': flora_optax.MultiSteps(
          optax.adam(1e-2), every_k_schedule=2, rank=2, key=3, **Q),
  }


# The 8 devices in process order (0-3 are process 0's, 4-7 process 1's),
# laid out as a checkerboard: every row ('model' group) and every column
# ('data' group) of the mesh holds devices of both processes, so every
# collective of a step crosses processes and every sharded leaf has shards
# on both (a process holds only half of a leaf sharded over both axes).
CHECKERBOARD = [[0, 5, 2, 7],
                [4, 1, 6, 3]]


def make_mesh() -> Mesh:
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array([[devices[i] for i in row] for row in CHECKERBOARD]),
              ('data', 'model'), axis_types=(AxisType.Auto,) * 2)


def param_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, s) for k, s in SPECS.items()}


def init_params(key=None):
  key = jax.random.key(0) if key is None else key
  k1, k2 = jax.random.split(key)
  return {'w1': jax.random.normal(k1, (D, H)) / np.sqrt(D),
          'b1': jnp.zeros((H,)),
          'w2': jax.random.normal(k2, (H, D)) / np.sqrt(H)}


def _forward(params, x):
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2']


def loss_fn(params, step):
  data = jax.random.fold_in(jax.random.key(1), step)
  x = jax.random.normal(data, (BATCH, D))
  y = _forward(init_params(jax.random.key(2)), x)  # a random teacher
  return jnp.mean((_forward(params, x) - y) ** 2)


def make_step(tx):
  def step(params, state, t):
    grads = jax.grad(loss_fn)(params, t)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


class Run:
  """One optimizer on one mesh (or on one device when ``mesh`` is None)."""

  def __init__(self, tx, mesh: Mesh | None):
    self.tx = tx
    shapes = jax.eval_shape(init_params)
    if mesh is None:
      single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      self.param_sh = jax.tree.map(lambda _: single, shapes)
      self.state_sh = jax.tree.map(lambda _: single,
                                   jax.eval_shape(tx.init, shapes))
      scalar = single
    else:
      self.param_sh = param_shardings(mesh)
      self.state_sh = flora_optax.state_shardings(tx, shapes, self.param_sh)
      scalar = NamedSharding(mesh, P())
    self.init = jax.jit(init_params, out_shardings=self.param_sh)
    self.init_state = jax.jit(tx.init, out_shardings=self.state_sh)
    self.step = jax.jit(make_step(tx),
                        in_shardings=(self.param_sh, self.state_sh, scalar),
                        out_shardings=(self.param_sh, self.state_sh))

  def start(self):
    params = self.init()
    return params, self.init_state(params)

  def train(self, params, state, start, stop):
    for t in range(start, stop):
      params, state = self.step(params, state, jnp.int32(t))
    return params, state

  def abstract(self):
    """The restore target: shapes, dtypes, formats and shardings."""
    shapes = jax.eval_shape(init_params)
    tree = {'params': shapes, 'opt_state': jax.eval_shape(self.tx.init,
                                                          shapes)}
    sh = {'params': self.param_sh, 'opt_state': self.state_sh}
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree, sh)


def sharding_mismatches(tree, shardings, where: str) -> list[str]:
  """Leaves of ``tree`` not on their sharding in ``shardings``."""
  out = []
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree.leaves(shardings)):
    if not x.sharding.is_equivalent_to(s, x.ndim):
      out.append(f'{where}{jax.tree_util.keystr(path)}: {x.sharding} '
                 f'is not {s}')
  return out


def explicit_mismatches(tx, mesh: Mesh, state_sh, where: str) -> list[str]:
  """Whether ``tx.init`` on an Explicit-axes mesh, where every array's
  sharding is part of its type, puts each state leaf where
  ``state_shardings`` says (it traces the same init; this runs it)."""
  explicit = Mesh(mesh.devices, mesh.axis_names,
                  axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
  with jax.set_mesh(explicit):
    params = jax.jit(init_params, out_shardings=param_shardings(explicit))()
    state = jax.jit(tx.init)(params)
  if jax.tree.structure(state) != jax.tree.structure(state_sh):
    return [f'{where}: explicit init gives another state structure']
  out = []
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state),
                          jax.tree.leaves(state_sh)):
    if x.sharding.spec != s.spec and not x.sharding.is_equivalent_to(
        NamedSharding(explicit, s.spec), x.ndim):
      out.append(f'{where}{jax.tree_util.keystr(path)}: explicit init gives '
                 f'{x.sharding.spec}, state_shardings {s.spec}')
  return out


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
  """Global values of every leaf (gathered across processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return {prefix + jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def save(path: str, tree) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def restore(path: str, target):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def make_runs(mesh: Mesh | None) -> dict[str, Run]:
  return {name: Run(tx, mesh) for name, tx in optimizers().items()}


def train_all(runs: dict[str, Run], mesh: Mesh, ckpt_dir: str | None = None):
  """Every optimizer for TOTAL steps on ``mesh``: the results at STOP and
  at TOTAL, the sharding report, and (with ``ckpt_dir``) one checkpoint of
  every optimizer's params and state at STOP."""
  at_stop, at_total, report, split = {}, {}, [], {}
  for name, run in runs.items():
    tx = run.tx
    params, state = run.start()
    split[name] = split_across_processes(state)
    report += sharding_mismatches(state, run.state_sh, f'{name} init ')
    report += explicit_mismatches(tx, mesh, run.state_sh, f'{name} ')
    params, state = run.train(params, state, 0, STOP)
    at_stop[name] = {'params': params, 'opt_state': state}
    params, state = run.train(params, state, STOP, TOTAL)
    report += sharding_mismatches(state, run.state_sh, f'{name} trained ')
    at_total[name] = {'params': params, 'opt_state': state}
  if ckpt_dir is not None:
    save(ckpt_dir, at_stop)
  return flatten(at_stop, ''), flatten(at_total, ''), report, split


def split_across_processes(tree) -> tuple[int, int]:
  """How many leaves are sharded (not replicated) over devices of both
  processes, and how many of them this process holds only part of."""

  def held(x):  # entries on this process's devices (shards are tiles)
    return sum({str(s.index): s.data.size
                for s in x.addressable_shards}.values())

  leaves = [x for x in jax.tree.leaves(tree)
            if not x.is_fully_replicated and not x.is_fully_addressable]
  return len(leaves), sum(held(x) < x.size for x in leaves)


def resume(runs: dict[str, Run], restored) -> tuple[dict, list[str]]:
  """Every optimizer from its restored STOP state to TOTAL."""
  out, report = {}, []
  for name, run in runs.items():
    params, state = restored[name]['params'], restored[name]['opt_state']
    report += sharding_mismatches(state, run.state_sh, f'{name} restored ')
    params, state = run.train(params, state, STOP, TOTAL)
    out[name] = {'params': params, 'opt_state': state}
  return out, report


def _write(out_dir: str, name: str, results: dict, report: dict) -> None:
  for k, arrays in results.items():
    np.savez(os.path.join(out_dir, f'{name}_{k}.npz'), **arrays)
  tmp = os.path.join(out_dir, f'{name}.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(report, f)
  os.replace(tmp, os.path.join(out_dir, f'{name}.json'))


def _wait_for(path: str, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f'{path} did not appear in {timeout_s} s')
    time.sleep(0.2)


def multihost(out_dir: str) -> None:
  """One of the two processes: trains, checkpoints at STOP (both write)."""
  mesh = make_mesh()
  # Which process owns which devices of the mesh.
  owners = [[d.process_index for d in row] for row in mesh.devices]
  at_stop, at_total, report, split = train_all(
      make_runs(mesh), mesh, os.path.join(out_dir, 'ckpt'))
  if jax.process_index() == 0:  # the checkpoint is complete by now
    _write(out_dir, 'multihost', {'stop': at_stop, 'total': at_total},
           {'mismatches': report, 'owners': owners, 'split': split,
            'devices': jax.device_count(), 'processes': jax.process_count()})


def reference(out_dir: str, timeout_s: float) -> None:
  """One process, 8 devices: the uninterrupted run, then the two
  processes' checkpoint restored on 8 devices and on 1, and resumed."""
  mesh = make_mesh()
  runs = make_runs(mesh)
  at_stop, at_total, report, _ = train_all(runs, mesh)
  results = {'stop': at_stop, 'total': at_total}
  _wait_for(os.path.join(out_dir, 'multihost.json'), timeout_s)
  ckpt = os.path.join(out_dir, 'ckpt')
  for suffix, these in (('8', runs), ('1', make_runs(None))):
    restored = restore(ckpt, {n: r.abstract() for n, r in these.items()})
    results['restored' + suffix] = flatten(restored, '')
    resumed, mismatches = resume(these, restored)
    report += mismatches
    results['resumed' + suffix] = flatten(resumed, '')
  _write(out_dir, 'reference', results,
         {'mismatches': report, 'devices': jax.device_count(),
          'processes': jax.process_count()})


def main(argv: list[str]) -> None:
  """``PORT PROCESS_ID NUM_PROCESSES OUT_DIR [TIMEOUT_S]``: 2 processes
  (4 devices each) train; 1 process (8 devices) is the reference."""
  port, process_id, num_processes, out_dir = argv[:4]
  timeout_s = float(argv[4]) if len(argv) > 4 else 240.0
  num_processes = int(num_processes)
  # Before JAX's backends start. gloo in the reference too: XLA:CPU's
  # default in-process all-reduce adds the devices' values in device order,
  # gloo's in another, so a one-process run without gloo differs from the
  # two processes in the last bits (35 of the 65 leaves after 3 steps);
  # with gloo in both they agree bit for bit.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 8 // num_processes)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                             num_processes=num_processes,
                             process_id=int(process_id),
                             initialization_timeout=int(timeout_s))
  assert jax.device_count() == 8
  assert jax.process_count() == num_processes
  if num_processes == 2:
    multihost(out_dir)
  else:
    reference(out_dir, timeout_s)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1:])
