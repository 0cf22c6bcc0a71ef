"""``python -m benchmarks [--quick] [--only PART,...] [--out DIR]``.

Runs the optimizer comparison (:mod:`benchmarks.optimizers`), writes its
JSON, markdown, plots and README section (:mod:`benchmarks.report`), then the
gradient-accumulation benchmark (:mod:`benchmarks.accumulation`) and the
quantized states' one (:mod:`benchmarks.quantized`). ``--quick``
is the tiny smoke-test size (seconds, no meaningful figures) and writes into
``results/quick/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

OPTIMIZER_PARTS = ('state', 'update', 'multisteps', 'step', 'lm', 'scaling')
PARTS = OPTIMIZER_PARTS + ('accumulation', 'quantized')


def main(argv=None) -> list[str]:
  parser = argparse.ArgumentParser(prog='python -m benchmarks',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes: a smoke test (no meaningful figures)')
  parser.add_argument('--only', default=None,
                      help=f'comma-separated parts among {", ".join(PARTS)}')
  parser.add_argument('--save-raw', default=None, metavar='PATH',
                      help='only save the raw results JSON to PATH (merge '
                      'several with python -m benchmarks.report PATH...)')
  parser.add_argument('--out', default=None,
                      help='results folder (default benchmarks/results, or '
                      'benchmarks/results/quick with --quick)')
  args = parser.parse_args(argv)
  parts = PARTS if args.only is None else tuple(
      p.strip() for p in args.only.split(',') if p.strip())
  bad = [p for p in parts if p not in PARTS]
  if bad:
    parser.error(f'--only: unknown part(s) {bad}; accepted: {list(PARTS)}')

  # Imported here so that --help and argument errors are instant.
  from benchmarks import common
  from benchmarks import optimizers
  from benchmarks import report

  out = args.out or (os.path.join(common.RESULTS_DIR, 'quick')
                     if args.quick else common.RESULTS_DIR)
  paths = []
  t0 = time.perf_counter()
  opt_parts = tuple(p for p in parts if p in OPTIMIZER_PARTS)
  if opt_parts:
    res = optimizers.run(args.quick, opt_parts)
    if args.save_raw:
      with open(args.save_raw, 'w') as f:
        json.dump(res, f, default=float)
      return [args.save_raw]
    paths += report.write(res, out)
    for t in res_targets(res, report):
      print(f'[{"met" if t["met"] else "MISSED"}] {t["target"]}: '
            f'{t["figures"]}')
  if 'accumulation' in parts:
    from benchmarks import accumulation
    accumulation.main(['--quick'] if args.quick else [])
  if 'quantized' in parts:
    from benchmarks import quantized
    paths += quantized.main(['--quick'] if args.quick else [])
  print(f'done in {time.perf_counter() - t0:.0f} s; wrote:', *paths, sep='\n  ')
  return paths


def res_targets(res, report):
  return report.targets(res)


if __name__ == '__main__':
  main(sys.argv[1:])
