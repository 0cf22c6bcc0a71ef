"""Compile time and HLO size of quantized updates, per layer leaf or stacked.

Issue 30 asks why a quantized update compiles slower than its float peer.
Each quantized leaf's update is its own code in the compiled program: the
decode, the float math, the block absmax and the encode. The number of
instructions of the optimized HLO (:func:`benchmarks.common.hlo_ops`) shows
how much code there is.

This module compiles ``optax.adamw``, ``optax.lion``, AdEMAMix and Adafactor
with momentum next to their 8- (and 4-) bit versions, for two layouts of GPT-2 small's parameters:

* one leaf per layer (12 copies of each block's matrices), as
  ``benchmarks.quantized`` uses;
* the blocks stacked on a leading axis of 12, as a model that scans over its
  layers keeps them (``flax.linen.scan``, ``nnx.scan``).

For each it records compile time, cold (JAX's caches cleared) and split into
JAX's tracing, its lowering and XLA's compilation, the size of the lowered
StableHLO module, the instructions of the optimized HLO, the compiled peak and temporaries (``memory_analysis()``), and
every ratio to the float peer of the same layout.

Run: ``python -m benchmarks.compile_layouts [--quick]``; writes
``results/compile_layouts.{json,md}`` (``results/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import optax

import flora_optax
from benchmarks import common

LR = 1e-3
# (name, float peer, make)
ROWS = (
    ('optax.adamw', None, lambda: optax.adamw(LR)),
    ('flora_optax.adamw(bits=8)', 'optax.adamw',
     lambda: flora_optax.adamw(LR, bits=8)),
    ('flora_optax.adamw(bits=4)', 'optax.adamw',
     lambda: flora_optax.adamw(LR, bits=4)),
    ('optax.lion', None, lambda: optax.lion(LR)),
    ('quantized(optax.lion, bits=8)', 'optax.lion',
     lambda: flora_optax.quantized(optax.lion(LR), bits=8)),
    ('optax.contrib.ademamix', None, lambda: optax.contrib.ademamix(LR)),
    ('quantized(ademamix, bits=8)', 'optax.contrib.ademamix',
     lambda: flora_optax.quantized(optax.contrib.ademamix(LR), bits=8)),
    ('adafactor(momentum=0.9)', None,
     lambda: optax.adafactor(LR, momentum=0.9)),
    ('flora(rank=None, bits=8)', 'adafactor(momentum=0.9)',
     lambda: flora_optax.flora(LR, rank=None, bits=8)),
)


def layouts(size: str) -> dict[str, Any]:
  """GPT-2's shapes with one leaf per layer, and with the layers stacked."""
  flat = common.gpt2_shapes(size)
  n = len(flat['h'])
  stacked = dict(flat)
  stacked['h'] = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((n, *s.shape), s.dtype), flat['h']['0'])
  return {'per-layer leaves': flat, 'stacked layers': stacked}


def compile_phases(tx, params, state) -> tuple[dict[str, float], Any, Any]:
  """Seconds of a cold compile of ``tx.update``, by phase: JAX's tracing
  (``trace_s``), its lowering to StableHLO (``lower_s``) and XLA's compilation
  (``xla_s``); and the lowered and compiled objects. JAX's caches are cleared
  first, so that no phase reuses a trace of an earlier row (the codec's
  jitted encode and decode are traced once per shape and quantizer)."""
  jax.clear_caches()
  update = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=1)
  t0 = time.perf_counter()
  traced = update.trace(params, state, params)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return dict(trace_s=t1 - t0, lower_s=t2 - t1, xla_s=t3 - t2), lowered, \
      compiled


def run(quick: bool = False) -> dict[str, Any]:
  size = 'tiny' if quick else 'small'
  rows = []
  for layout, params in layouts(size).items():
    for name, peer, make in ROWS:
      tx = make()
      state = jax.eval_shape(tx.init, params)
      phases, lowered, compiled = compile_phases(tx, params, state)
      mem = common.memory_figures(compiled)
      rows.append(dict(layout=layout, optimizer=name, peer=peer,
                       compile_s=sum(phases.values()), **phases,
                       stablehlo_bytes=len(lowered.as_text().encode()),
                       hlo_ops=common.hlo_ops(compiled),
                       state_bytes=common.tree_bytes(state), **mem))
  by = {(r['layout'], r['optimizer']): r for r in rows}
  for r in rows:
    if r['peer']:
      ref = by[(r['layout'], r['peer'])]
      r['compile_ratio'] = r['compile_s'] / ref['compile_s']
      r['hlo_ratio'] = r['hlo_ops'] / ref['hlo_ops']
  meta = dict(workload=f'gpt2-{size}', jax=jax.__version__,
              optax=optax.__version__, flora_optax=flora_optax.__version__,
              devices=str(jax.devices()[0]),
              xla_flags=os.environ.get('XLA_FLAGS', ''))
  return dict(meta=meta, rows=rows)


def markdown(res: dict[str, Any]) -> str:
  m = res['meta']
  lines = ['# Compile time and HLO size by parameter layout', '',
           f"`python -m benchmarks.compile_layouts` ({m['workload']}, jax "
           f"{m['jax']}, optax {m['optax']}, flora_optax {m['flora_optax']}, "
           f"{m['devices']}; XLA_FLAGS `{m['xla_flags']}`). Ratios are to the "
           'float peer compiled in the same layout.', '']
  header = ['layout', 'optimizer', 'compile s', 'compile ÷ peer',
            'trace / lower / XLA s', 'StableHLO KiB', 'HLO instructions',
            'HLO ÷ peer', 'peak MiB', 'temporaries MiB', 'state MiB']
  body = [[r['layout'], r['optimizer'], f"{r['compile_s']:.2f}",
           f"{r['compile_ratio']:.2f}" if r['peer'] else '-',
           f"{r['trace_s']:.2f} / {r['lower_s']:.2f} / {r['xla_s']:.2f}",
           f"{r['stablehlo_bytes'] / 1024:.0f}",
           r['hlo_ops'], f"{r['hlo_ratio']:.2f}" if r['peer'] else '-',
           f"{common.mib(r['peak_bytes']):.0f}",
           f"{common.mib(r['temp_bytes']):.0f}",
           f"{common.mib(r['state_bytes']):.1f}"] for r in res['rows']]
  return '\n'.join(lines) + '\n' + common.markdown_table(header, body)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.compile_layouts', description=__doc__)
  parser.add_argument('--quick', action='store_true',
                      help='GPT-2 tiny shapes: a smoke test')
  parser.add_argument('--out', default=None, help='results folder')
  args = parser.parse_args(argv)
  common.avoid_xla_cpu_hang()
  res = run(args.quick)
  out = args.out or (os.path.join(common.RESULTS_DIR, 'quick')
                     if args.quick else common.RESULTS_DIR)
  common.write_results('compile_layouts', res, markdown(res), out)
  print(markdown(res))
  return res


if __name__ == '__main__':
  main()
