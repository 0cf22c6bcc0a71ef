"""Sharded optimizer states on an 8-device mesh: per-device bytes, compiled
peak memory and the collectives of one update.

GPT-2 shapes are sharded FSDP+TP style on a ``('data', 'model')`` 4×2 mesh
(each axis of a leaf takes the first mesh axis that divides it, ``data`` on
the first matrix axis, ``model`` on the second). Every optimizer's state gets
its shardings from :func:`flora_optax.state_shardings`, and its update is
compiled with those ``in_shardings``/``out_shardings`` (state donated).
Figures are per device, from XLA's ``memory_analysis()`` and the compiled HLO;
nothing is executed, so this runs on the 8 simulated CPU devices::

  python -m benchmarks.sharding [--size tiny|small|medium]

Everything is compared with ``optax.adafactor(momentum=0.9)`` compiled in the
same run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

if __name__ == '__main__':
  # 8 simulated devices unless the caller already chose (must precede JAX).
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

# pylint: disable=g-import-not-at-top
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax
from benchmarks import common
from benchmarks.common import BASELINE
# pylint: enable=g-import-not-at-top

_TYPE = re.compile(r'\b(f16|bf16|f32|f64|s32|u32|s8|u8|pred)\[([\d,]*)\]')
_BYTES = {'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8, 's32': 4, 'u32': 4,
          's8': 1, 'u8': 1, 'pred': 1}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')


def param_shardings(shapes, mesh):
  """FSDP+TP: matrix axes get 'data' then 'model' where they divide."""

  def spec(x):
    names = [None] * x.ndim
    free = [a for a in ('data', 'model')]
    axes = range(x.ndim - 2, x.ndim) if x.ndim >= 2 else range(x.ndim)
    if x.ndim == 1:
      free = ['model', 'data']
    for i in axes:
      for a in list(free):
        if x.shape[i] % mesh.shape[a] == 0:
          names[i] = a
          free.remove(a)
          break
    return NamedSharding(mesh, P(*names))

  return jax.tree.map(spec, shapes)


def per_device_bytes(shapes, shardings):
  total = 0
  for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def collectives(hlo: str) -> dict[str, int]:
  """Bytes produced per device by each kind of collective in an HLO dump."""
  out = {k: 0 for k in _COLLECTIVES}
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\(', line)
    if not m:
      continue
    op = m.group(2).removesuffix('-start')
    if op in out:
      out[op] += sum(
          int(np.prod([int(d) for d in dims.split(',') if d])) * _BYTES[t]
          for t, dims in _TYPE.findall(m.group(1)))
  return out


def measure(name, tx, shapes, param_sh):
  state_shapes = jax.eval_shape(tx.init, shapes)
  state_sh = flora_optax.state_shardings(tx, shapes, param_sh)

  def update(grads, state, params):
    return tx.update(grads, state, params)

  kw = dict(in_shardings=(param_sh, state_sh, param_sh),
            out_shardings=(param_sh, state_sh), donate_argnums=(1,))
  lowered = jax.jit(update, **kw).lower(shapes, state_shapes, shapes)
  compiled = lowered.compile()
  mem = common.memory_figures(compiled)
  return {
      'name': name,
      'state_bytes_total': common.tree_bytes(state_shapes),
      'state_bytes_per_device': per_device_bytes(state_shapes, state_sh),
      'update_peak_bytes_per_device': mem['peak_bytes'],
      'update_temp_bytes_per_device': mem['temp_bytes'],
      'collective_bytes_per_device': collectives(compiled.as_text()),
  }


def run(size='small', ranks=(32, 128)):
  n = jax.device_count()
  if n < 8:
    raise SystemExit(f'needs 8 devices, found {n}: run with '
                     'JAX_NUM_CPU_DEVICES=8 (set before JAX starts).')
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])
  shapes = common.gpt2_shapes(size)
  param_sh = param_shardings(shapes, mesh)
  # The baseline, adamw and flora: what sharding changes per device.
  rows = [measure(c.name, c.make(), shapes, param_sh)
          for c in common.candidates(ranks)
          if c.name in (BASELINE, 'adamw') or c.family == 'flora']
  base = next(r for r in rows if r['name'] == BASELINE)
  for r in rows:
    r['state_ratio'] = r['state_bytes_per_device'] / base[
        'state_bytes_per_device']
    r['peak_ratio'] = r['update_peak_bytes_per_device'] / base[
        'update_peak_bytes_per_device']
  return {
      'size': size,
      'mesh': dict(mesh.shape),
      'devices': str(jax.devices()[0].platform),
      'jax': jax.__version__,
      'param_bytes_total': common.tree_bytes(shapes),
      'param_bytes_per_device': per_device_bytes(shapes, param_sh),
      'baseline': BASELINE,
      'rows': rows,
  }


def to_markdown(res) -> str:
  mib = common.mib
  head = (f"GPT-2 {res['size']} on a {res['mesh']} mesh of "
          f"{res['devices']} devices (jax {res['jax']}); params "
          f"{mib(res['param_bytes_per_device']):.1f} MiB per device. "
          f"Per-device figures; ratios against {res['baseline']} in the same run. "
          'Collectives: bytes per device of the buffers each kind of '
          'collective produces in the compiled update (a ring all-reduce '
          'moves about twice that over the wire).\n\n')
  rows = []
  for r in res['rows']:
    c = r['collective_bytes_per_device']
    rows.append([
        r['name'], mib(r['state_bytes_per_device']), r['state_ratio'],
        mib(r['update_peak_bytes_per_device']), r['peak_ratio'],
        mib(c['all-reduce']), mib(c['all-gather']),
        mib(c['reduce-scatter'] + c['all-to-all'] + c['collective-permute'])
    ])
  return head + common.markdown_table(
      ['optimizer', 'state MiB/dev', 'state ×base', 'update peak MiB/dev',
       'peak ×base', 'all-reduce MiB', 'all-gather MiB', 'other coll. MiB'],
      rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', default='small', choices=('tiny', 'small',
                                                      'medium'))
  p.add_argument('--ranks', default='32,128')
  args = p.parse_args(argv)
  res = run(args.size, tuple(int(r) for r in args.ranks.split(',')))
  md = to_markdown(res)
  name = 'sharding' if args.size == 'small' else f'sharding_{args.size}'
  paths = common.write_results(name, res, md)
  print(md)
  print('wrote', *paths)
  return res


if __name__ == '__main__':
  sys.exit(main() and 0)
