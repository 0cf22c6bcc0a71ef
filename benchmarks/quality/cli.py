"""``python -m benchmarks.quality``: the command line, and the results files
(merged into an earlier JSON, written after every row)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import optax

import flora_optax
from benchmarks import common
from benchmarks.quality import per_byte
from benchmarks.quality.report import (markdown, plot, quantized_targets,
                                       targets)
from benchmarks.quality.settings import (ACCUMULATE, ADAFACTOR, LR_FACTORS,
                                         MAX_HANGS, MOMENTUM, NAME,
                                         NOISE_MULT, RATIOS,
                                         RESAMPLE_FRACTION)
from benchmarks.quality.tasks import CACHED, TASK_CHOICE, TASKS, Task
from benchmarks.quality.training import count_params, run_row
from benchmarks.quality.variants import (Variant, is_default,
                                         library_defaults, runnable,
                                         variants)
from benchmarks.quality.watchdog import arm_watchdog, read_hung, row_key


def _csv(text: str | None, cast=str) -> list[Any] | None:
  return None if text is None else [cast(x) for x in text.split(',') if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  # The study's docstring (the package's) says what it is.
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.quality',
      description=sys.modules[__package__].__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='tiny sizes: a smoke run (no meaningful figures)')
  p.add_argument('--tasks', help=f'comma-separated, from {",".join(TASKS)}')
  p.add_argument('--variants', help='comma-separated, from '
                 f'{",".join(runnable())} or default (the library\'s); '
                 'default: every row but the ablations and the other '
                 'optimizers (muon*, lion*, ademamix*, sgd_momentum*: run '
                 'when named)')
  p.add_argument('--ablations', action='store_true',
                 help='the ablation rows too (those that settled a default: '
                 'code maps, block sizes, rounding, momentum positions), and '
                 'the rows otherwise run only when named (other optimizers '
                 'with quantized states): every row')
  p.add_argument('--ratios', help='comma-separated d/r (default: Flora\'s '
                 'default, its paper mode and LoRA at each task\'s, 2,4,8 '
                 'on the small tasks and 4 on the language models; every '
                 'other ranked row at 4)')
  p.add_argument('--all-ratios', action='store_true',
                 help=f'every ranked row at every d/r of {RATIOS}')
  p.add_argument('--cache', default=None, metavar='DIR',
                 help='where the fine-tuning task\'s pretrained model is '
                 'cached (default runs/quality_cache)')
  p.add_argument('--seeds', help='comma-separated seeds (default 0,1,2)')
  p.add_argument('--centres', default=None, metavar='JSON',
                 help='centre each row\'s learning-rate grid on its best lr '
                 'in this results JSON (default: the committed '
                 f'{os.path.join(common.RESULTS_DIR, NAME)}.json; with '
                 '--quick, or "none": every row around its task\'s centre); '
                 'a row whose best is then at an edge is extended as usual')
  p.add_argument('--lrs', help='comma-separated factors of each task\'s grid '
                 f'centre (default {",".join(map(str, LR_FACTORS))})')
  p.add_argument('--no-extend', action='store_true',
                 help='do not extend the grid when the best lr is at an edge')
  p.add_argument('--fresh', action='store_true',
                 help='do not merge into an earlier results JSON')
  p.add_argument('--resume', action='store_true',
                 help='skip the rows that the results JSON already has')
  p.add_argument('--watchdog', type=float, default=None, metavar='SECONDS',
                 help='exit with status 3 when one training program (one '
                 'row, or one grid extension) takes longer, a fifth of it on '
                 'the small tasks (some '
                 'XLA:CPU programs wedge at random on jaxlib 0.10.2); rerun '
                 'with --resume to go on')
  p.add_argument('--max-hangs', type=int, default=MAX_HANGS,
                 help='with --resume, skip a row that hung this many times')
  p.add_argument('--report-only', action='store_true',
                 help='train nothing: rewrite the markdown and plot (and '
                 'the targets) from the results JSON')
  p.add_argument('--out', help='results folder (default benchmarks/results, '
                 'or benchmarks/results/quick with --quick)')
  args = p.parse_args(argv)
  # --quick: a small subset that runs in well under a minute.
  quick = QUICK if args.quick else {}
  args.tasks = _csv(args.tasks) or quick.get('tasks', list(TASKS))
  # Rows named on the command line run on every task (the accumulation rows
  # too); the full run keeps those to the tasks that have them.
  args.named = args.variants is not None
  args.variants = _csv(args.variants) or quick.get('variants', [
      n for n, v in runnable().items()
      if args.ablations or not (v.ablation or v.named_only)])
  args.seeds = _csv(args.seeds, int) or quick.get('seeds', [0, 1, 2])
  args.lrs = _csv(args.lrs, float) or list(LR_FACTORS)
  args.ratios = _csv(args.ratios, int) or quick.get('ratios')
  args.no_extend = args.no_extend or args.quick
  if args.centres is None and not args.quick:
    args.centres = os.path.join(common.RESULTS_DIR, f'{NAME}.json')
  if args.centres == 'none':
    args.centres = None
  if args.centres and not os.path.exists(args.centres):
    p.error(f'--centres: no results JSON at {args.centres!r}')
  # 'default': whichever variant plain flora_optax.flora is.
  vs, args.defaults = variants(), library_defaults()
  args.default = next(
      (n for n, v in vs.items() if is_default(v, args.defaults)), None)
  args.variants = list(dict.fromkeys(
      args.default if x == 'default' else x for x in args.variants))
  # Recorded-only rows (no longer buildable) are reported, not run.
  for flag, values, known in (('tasks', args.tasks, TASKS),
                              ('variants', args.variants, runnable())):
    bad = [x for x in values if x not in known]
    if bad:
      p.error(f'--{flag}: can not run {bad}; choose from {list(known)}')
  if len(args.seeds) < 2:
    p.error('--seeds: at least two (the std needs them)')
  return args


# --quick: the baselines, the library's default Flora ('default'), LoRA,
# compressed accumulation (language models from scratch only) and GaLore, at
# d/r = 4, two seeds, no grid extension.
QUICK = dict(tasks=['lm', 'finetune', 'regression'], seeds=[0, 1], ratios=[4],
             variants=['adafactor', 'adafactor_nomomentum', 'default', 'lora',
                       'multisteps_flora', 'galore'])


def _write(out: str, old: dict[str, Any], new_rows: list[dict[str, Any]],
           task_meta: dict[str, Any], args: argparse.Namespace,
           seconds: float, plot_too: bool = False) -> list[str]:
  """Merges ``new_rows`` into ``old`` and writes the JSON, markdown, plot."""
  vs = variants()
  keys = {(r['task'], r['optimizer'], r['ratio']) for r in new_rows}
  rows = [r for r in old['rows']
          if (r['task'], r['optimizer'], r['ratio']) not in keys] + new_rows
  tasks = {**old['tasks'], **task_meta}
  order = {n: i for i, n in enumerate(vs)}
  rows.sort(key=lambda r: (list(TASKS).index(r['task']),
                           order.get(r['optimizer'], len(order)),
                           r['ratio'] or 0))
  tasks = {t: tasks[t] for t in TASKS if t in tasks}
  for name, meta in tasks.items():  # results recorded before the bytes axis
    if 'params' not in meta:
      meta['params'] = count_params(TASKS[name](args.quick))
  for r in rows:
    r['bytes_per_param'] = r['state_bytes'] / tasks[r['task']]['params']
  meta = dict(
      jax=jax.__version__, optax=optax.__version__,
      flora_optax=flora_optax.__version__,
      platform=(f'{jax.devices()[0].platform} / '
                f'{platform.processor() or platform.machine()}, '
                f'{os.cpu_count()} CPUs'),
      quick=args.quick, seeds=sorted({s for r in rows for s in r['seeds']}),
      adafactor=ADAFACTOR, momentum=MOMENTUM, accumulate=ACCUMULATE,
      resample_fraction=RESAMPLE_FRACTION, noise_mult=NOISE_MULT,
      defaults=args.defaults, default_variant=args.default,
      task_choice=TASK_CHOICE, hung=read_hung(out),
      lr_centres=(old['meta'].get('lr_centres') if not new_rows else
                  os.path.relpath(args.centres) if args.centres else
                  'each task\'s'),
      jaxlib=importlib.metadata.version('jaxlib'),
      seconds=old['meta'].get('seconds', 0.0) + seconds)
  payload = dict(meta=meta, tasks=tasks, rows=rows,
                 targets=targets(rows, args.default),
                 quantized_targets=quantized_targets(rows))
  # write_results joins its name onto results/; an absolute name is kept as
  # it is (os.path.join), which sends the files to `out`.
  paths = list(common.write_results(
      os.path.join(os.path.abspath(out), NAME), payload, markdown(payload)))
  if plot_too:
    png = os.path.join(out, f'{NAME}.png')
    plot(payload, png)
    per_byte_png = os.path.join(out, f'{NAME}_per_byte.png')
    per_byte.plot(payload, per_byte_png)
    paths += [png, per_byte_png]
  return paths


def _ratios(task: Task, v: Variant, args: argparse.Namespace
            ) -> list[int | None]:
  """The d/r at which ``v`` runs on ``task``."""
  if not v.ranked:
    return [None]
  if args.ratios:
    return args.ratios
  if args.all_ratios:
    return list(RATIOS)
  if not v.sweep:
    return [4]  # the targets' ratio; the sweeps bound the full run's time
  return list(task.ratios)


def _work(task: Task, args: argparse.Namespace
          ) -> list[tuple[Variant, int | None]]:
  """The rows to train on ``task``, d/r = 4 (the targets' ratio) first, so
  that a run cut short has it."""
  vs = variants()
  work = [(vs[name], ratio) for name in args.variants
          if task.accumulation or vs[name].accumulate == 1 or args.named
          for ratio in _ratios(task, vs[name], args)]
  work.sort(key=lambda w: w[1] not in (None, 4))
  return work


def lr_centres(path: str | None) -> dict[tuple[Any, ...], float]:
  """``{(task, optimizer, ratio): best lr}`` of the results JSON at ``path``.

  The full run centres each row's grid there, so that it rarely needs the
  extensions (each a compile and three more trainings); the grids of one
  task stay on one geometric lattice, so a rerun repeats the same programs.
  """
  if not path:
    return {}
  with open(path) as f:
    rows = json.load(f)['rows']
  return {(r['task'], r['optimizer'], r['ratio']): r['best_lr'] for r in rows}


def _skip(task: Task, v: Variant, ratio: int | None,
          args: argparse.Namespace, out: str, done: set[Any]) -> bool:
  """Whether ``--resume`` skips a row: measured, or hung too often."""
  if not args.resume:
    return False
  if (task.name, v.name, ratio) in done:
    return True
  if read_hung(out).get(row_key(task.name, v.name, ratio),
                        0) >= args.max_hangs:
    print(f'  {v.name:<36} d/r={ratio or "-":<2} skipped: hung '
          f'{args.max_hangs} times (XLA:CPU)')
    return True
  return False


def main(argv: Sequence[str] | None = None) -> list[str]:
  args = parse_args(argv)
  out = args.out or (os.path.join(common.RESULTS_DIR, 'quick') if args.quick
                     else common.RESULTS_DIR)
  os.makedirs(out, exist_ok=True)
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform.upper()}; '
        f'flora_optax defaults: {args.defaults} -> {args.default}')
  jpath = os.path.join(out, f'{NAME}.json')
  old = {'rows': [], 'tasks': {}, 'meta': {'seconds': 0.0}}
  if not args.fresh and os.path.exists(jpath):
    with open(jpath) as f:
      old = json.load(f)
  done = {(r['task'], r['optimizer'], r['ratio']) for r in old['rows']}
  centres = lr_centres(args.centres)
  new_rows, task_meta = [], {}
  t0 = time.perf_counter()
  for task_name in ([] if args.report_only else args.tasks):
    task = TASKS[task_name](args.quick, **(
        {'cache_dir': args.cache} if task_name in CACHED else {}))
    kappa = max(1, task.steps // RESAMPLE_FRACTION)
    print(f'{task.name}: {task.description}')
    task_meta[task.name] = dict(description=task.description, lr=task.lr,
                                resample_every=kappa, d=task.d,
                                settings=task.settings,
                                params=count_params(task))
    # The small tasks' programs take seconds: wait less for them.
    watchdog = args.watchdog and (args.watchdog if task.language else
                                  args.watchdog / 5)
    for v, ratio in _work(task, args):
      if _skip(task, v, ratio, args, out, done):
        continue
      centre = centres.get((task.name, v.name, ratio),
                           task.lr * v.lr_factor)
      lrs = [centre * f for f in args.lrs]
      new_rows.append(run_row(task, v, ratio, lrs, args.seeds, kappa,
                              extend=not args.no_extend, log=print,
                              watchdog=watchdog, out=out))
      if 'loss_before' in task.settings:
        # The pretrained model's loss this row started from: a base
        # pretrained on another machine's CPU differs (XLA:CPU rounding),
        # and rows are comparable only on the same base.
        new_rows[-1]['loss_before'] = task.settings['loss_before']
      # Written after every row: a run that dies keeps what it measured.
      _write(out, old, new_rows, task_meta, args, time.perf_counter() - t0)
  arm_watchdog(None)
  seconds = time.perf_counter() - t0
  paths = _write(out, old, new_rows, task_meta, args, seconds, plot_too=True)
  print(f'\n{seconds:.0f} s; ' + ', '.join(paths))
  with open(paths[0]) as f:
    payload = json.load(f)
  for t in payload['targets']:
    print(f"target ({t['task']}, d/r=4, {t['optimizer']}): not worse than "
          f"no momentum: {t['not_worse']}; gap closed {t['gap_closed']:.0%} "
          f"(momentum gap clear: {t['momentum_helps']})")
  return paths
