"""The study's targets, its markdown report and its plot."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.quality import per_byte
from benchmarks.quality.per_byte import other_base
from benchmarks.quality.watchdog import row_key
from benchmarks.quality.settings import (ACCUMULATE, ADAFACTOR,
                                         BENEFIT_TARGETS, MAX_HANGS,
                                         MOMENTUM, NOISE_MULT, RATIOS,
                                         TARGET_GAP_CLOSED,
                                         WITHIN_NOISE_TARGETS)
from benchmarks.quality.variants import variants


def _find(rows, task, optimizer, ratio=None):
  return next((r for r in rows if r['task'] == task and
               r['optimizer'] == optimizer and r['ratio'] == ratio), None)


def noise(a: dict[str, Any], b: dict[str, Any]) -> float:
  """The seed std of the difference of two rows' losses (unpaired)."""
  return math.hypot(a['std'], b['std'])


def targets(rows: list[dict[str, Any]], default: str | None,
            ratio: int = 4) -> list[dict[str, Any]]:
  """The issue's targets for the default Flora at ``d/r = ratio``, per task.

  1. Flora is not worse than Adafactor without momentum beyond the noise
     (``L_flora - L_nomom <= NOISE_MULT * noise``);
  2. where momentum clearly helps (``L_nomom - L_mom > NOISE_MULT * noise``),
     Flora closes at least 70% of the gap:
     ``(L_nomom - L_flora) / (L_nomom - L_mom) >= 0.7``.
  """
  out = []
  for task in dict.fromkeys(r['task'] for r in rows):
    mom = _find(rows, task, 'adafactor')
    nomom = _find(rows, task, 'adafactor_nomomentum')
    fl = _find(rows, task, default, ratio) if default else None
    if not (mom and nomom and fl):
      continue
    gap = nomom['mean'] - mom['mean']
    gap_noise = noise(mom, nomom)
    worse = fl['mean'] - nomom['mean']
    worse_noise = noise(fl, nomom)
    t = dict(task=task, ratio=ratio, optimizer=default,
             L_mom=mom['mean'], L_nomom=nomom['mean'], L_flora=fl['mean'],
             momentum_gap=gap, momentum_gap_noise=gap_noise,
             momentum_helps=gap > NOISE_MULT * gap_noise,
             flora_minus_nomom=worse, flora_minus_nomom_noise=worse_noise,
             not_worse=worse <= NOISE_MULT * worse_noise)
    t['gap_closed'] = (nomom['mean'] - fl['mean']) / gap if gap else math.nan
    t['closes_70'] = (t['gap_closed'] >= TARGET_GAP_CLOSED
                      if t['momentum_helps'] else None)
    out.append(t)
  return out


def quantized_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The quantized states' targets, per task.

  ``BENEFIT_TARGETS``: where momentum clearly helps, the row keeps at least
  the given fraction of its benefit, ``(L_nomom - L) / (L_nomom - L_mom)``;
  where it does not, the row is within the noise of momentum (``|L - L_mom|
  <= NOISE_MULT * noise``). ``WITHIN_NOISE_TARGETS``: the row is within the
  noise of its float32 reference.
  """
  out = []
  for task in dict.fromkeys(r['task'] for r in rows):
    mom = _find(rows, task, 'adafactor')
    nomom = _find(rows, task, 'adafactor_nomomentum')
    if mom and nomom:
      gap = nomom['mean'] - mom['mean']
      helps = gap > NOISE_MULT * noise(mom, nomom)
      for name, fraction in BENEFIT_TARGETS:
        r = _find(rows, task, name)
        if r is None:
          continue
        kept = (nomom['mean'] - r['mean']) / gap if gap else math.nan
        diff = r['mean'] - mom['mean']
        out.append(dict(
            task=task, optimizer=name, reference='adafactor',
            kind='benefit' if helps else 'within noise', target=fraction,
            value=kept if helps else diff, noise=noise(r, mom),
            met=(kept >= fraction if helps else
                 abs(diff) <= NOISE_MULT * noise(r, mom))))
    for name, ref_name in WITHIN_NOISE_TARGETS:
      r, ref = _find(rows, task, name), _find(rows, task, ref_name)
      if r is None or ref is None:
        continue
      diff = r['mean'] - ref['mean']
      out.append(dict(task=task, optimizer=name, reference=ref_name,
                      kind='within noise', target=None, value=diff,
                      noise=noise(r, ref),
                      met=abs(diff) <= NOISE_MULT * noise(r, ref)))
  return out


def _fmt(r: dict[str, Any] | None) -> str:
  return '-' if r is None else f"{r['mean']:.4f} ± {r['std']:.4f}"


def markdown(payload: dict[str, Any]) -> str:
  """The report: how tasks were chosen, per-task tables, targets."""
  lines = (_intro(payload) + _task_tables(payload) + _summary(payload) +
           per_byte.markdown_section(payload) + _targets_section(payload) +
           _quantized_targets_section(payload) + _footer(payload))
  return '\n'.join(lines)


def _mark(name: str, payload: dict[str, Any]) -> str:
  return (' **(default)**' if name == payload['meta'].get('default_variant')
          else '')


def _intro(payload: dict[str, Any]) -> list[str]:
  """What every row is, and the tasks."""
  meta = payload['meta']
  lines = [
      '# Quality study (issue 11)\n',
      'Each optimizer at its best learning rate (lowest mean final loss over '
      f"{len(meta['seeds'])} seeds), mean ± std (ddof=1) over seeds; a seed "
      'fixes the init, the data order and the projection key. Every row is '
      'the same Adafactor '
      f"({', '.join(f'{k}={v}' for k, v in ADAFACTOR.items())}, decay_rate "
      '0.8, warmup-cosine schedule: 10% warmup, down to 0.1x) and differs '
      f'only in the first moment (β = {MOMENTUM}). Flora: gaussian '
      "projections, transfer='unbiased', `resample_every` = "
      f"steps / {meta['resample_fraction']} on every task. The compressed "
      "axis of every matrix has d = the task's width, rank = d / ratio. "
      f'LoRA: `W = W0 + A B` on every matrix, `W0` frozen at the full '
      "model's init, `A` random, `B = 0`; other parameters trained. "
      f'MultiSteps rows: K = {ACCUMULATE} micro-batches of batch / '
      f'{ACCUMULATE} per update, inner Adafactor without momentum (the '
      'paper\'s setup); their rank is the accumulator\'s.\n',
      f"Library defaults ({meta.get('defaults')}): the row marked **(default)**"
      f" is `{meta.get('default_variant')}`.\n",
      '## Tasks\n',
  ]
  for name, t in payload['tasks'].items():
    lines.append(f"- **{name}**: {t['description']} LR grid centre "
                 f"{t['lr']:g}; resample_every {t['resample_every']}.")
  centres = meta.get('lr_centres')
  if centres and centres != "each task's":
    lines.append(f'\nEach row\'s grid: centred on its best learning rate in '
                 f'`{centres}` (a row measured for the first time: on its '
                 'task\'s centre), extended at an edge that holds the best.')
  lines.append('\n' + meta['task_choice'] + '\n')
  return lines


def _task_tables(payload: dict[str, Any]) -> list[str]:
  """One table per task: every row at its best learning rate, per seed."""
  vs, lines = variants(), []
  for task in payload['tasks']:
    lines.append(f'## {task}\n')
    table = []
    for r in payload['rows']:
      if r['task'] != task:
        continue
      v = vs.get(r['optimizer'])
      mark = _mark(r['optimizer'], payload)
      per_seed = ', '.join(f'{x:.4f}' for x in r['losses'][r['lrs'].index(
          r['best_lr'])])
      grid = ', '.join(f'{x:g}' for x in r['lrs'])
      if r['lr_grid_extended']:
        grid += ' (extended)'
      if other_base(r, payload):
        mark += f" † (base: {r['loss_before']:.4f} before fine-tuning)"
      table.append([(v.label if v else r['optimizer']) + mark,
                    r['ratio'] or '-', r['rank'] or '-',
                    f"{r['best_lr']:g}", _fmt(r), per_seed, grid,
                    f"{r['state_bytes'] / 1024:.1f}", _per_param(r, payload),
                    f"{r['seconds']:.0f}"])
    lines.append(common.markdown_table(
        ['optimizer', 'd/r', 'rank', 'best lr', 'final loss', 'per seed',
         'lr grid', 'state KiB', 'B/param', 's'], table))
  return lines


def _per_param(r: dict[str, Any], payload: dict[str, Any]) -> str:
  """State bytes per parameter of the task's (full) model."""
  n = payload['tasks'].get(r['task'], {}).get('params')
  return f"{r['state_bytes'] / n:.2f}" if n else '-'


def _summary(payload: dict[str, Any]) -> list[str]:
  """Every optimizer per task (columns), and the best Flora variant."""
  vs, rows = variants(), payload['rows']
  lines = ['## Summary: each optimizer at its best learning rate\n']
  tasks = list(payload['tasks'])
  ratios = sorted({r['ratio'] for r in rows if r['ratio']})
  table = []
  for name, v in vs.items():
    for ratio in (ratios if v.ranked else [None]):
      cells = [_fmt(_find(rows, t, name, ratio)) for t in tasks]
      if any(c != '-' for c in cells):
        table.append([v.label + _mark(name, payload), ratio or '-'] + cells)
  lines.append(common.markdown_table(['optimizer', 'd/r'] + tasks, table))
  lines.append('## Best Flora variant per task and d/r\n')
  table = []
  for t in tasks:
    for ratio in ratios:
      cand = [r for r in rows if r['task'] == t and r['ratio'] == ratio and
              vs.get(r['optimizer']) and vs[r['optimizer']].flora]
      if cand:
        b = min(cand, key=lambda r: r['mean'])
        table.append([t, ratio, b['optimizer'], _fmt(b)])
  lines.append(common.markdown_table(['task', 'd/r', 'best Flora variant',
                                      'final loss'], table))
  return lines


def _targets_section(payload: dict[str, Any]) -> list[str]:
  """The targets table of the default Flora."""
  default = payload['meta'].get('default_variant')
  lines = [f"## Targets for the default Flora (`{default}`), d/r = 4\n"]
  lines.append(
      f'noise = sqrt(std_a² + std_b²) of the two rows compared; "clearly" = '
      f'by more than {NOISE_MULT:g} noise. Gap closed = (L_nomom - L_flora) / '
      '(L_nomom - L_mom).\n')
  table = []
  for t in payload['targets']:
    ok1 = 'yes' if t['not_worse'] else '**no**'
    ok2 = ('n/a (no clear momentum gap)' if t['closes_70'] is None else
           'yes' if t['closes_70'] else '**no**')
    z_gap = t['momentum_gap'] / max(t['momentum_gap_noise'], 1e-30)
    z_worse = t['flora_minus_nomom'] / max(t['flora_minus_nomom_noise'], 1e-30)
    table.append([
        t['task'], f"{t['L_mom']:.4g}", f"{t['L_nomom']:.4g}",
        f"{t['L_flora']:.4g}", f"{t['momentum_gap']:.3g} ({z_gap:.1f} noise)",
        f"{t['flora_minus_nomom']:+.3g} ({z_worse:+.1f} noise)", ok1,
        f"{t['gap_closed']:.0%}", ok2])
  lines.append(common.markdown_table(
      ['task', 'L_mom', 'L_nomom', 'L_flora', 'momentum gap',
       'flora - nomom', 'not worse than nomom', 'gap closed',
       '>= 70% closed'], table))
  return lines


def _quantized_targets_section(payload: dict[str, Any]) -> list[str]:
  """The quantized states' targets (:func:`quantized_targets`)."""
  table = []
  for t in quantized_targets(payload['rows']):
    if t['kind'] == 'benefit':
      what = f"keeps ≥ {t['target']:.0%} of momentum's benefit"
      value = f"{t['value']:.0%}"
    else:
      what = f"within noise of `{t['reference']}`"
      value = (f"{t['value']:+.3g} ({t['value'] / max(t['noise'], 1e-30):+.1f}"
               ' noise)')
    table.append([t['task'], f"`{t['optimizer']}`", what, value,
                  'yes' if t['met'] else '**no**'])
  if not table:
    return []
  return ['## Targets for the quantized states\n',
          'Benefit kept = (L_nomom - L) / (L_nomom - L_mom), where momentum\'s '
          'gap is clear; where it is not, the row should be within the noise '
          f'of momentum (|ΔL| ≤ {NOISE_MULT:g} noise).\n',
          common.markdown_table(['task', 'row', 'target', 'measured', 'met'],
                                table)]


def _footer(payload: dict[str, Any]) -> list[str]:
  """Rows that hung, and the compute spent."""
  rows, meta, lines = payload['rows'], payload['meta'], []
  measured = {row_key(r['task'], r['optimizer'], r['ratio']) for r in rows}
  hung = [k for k, n in meta.get('hung', {}).items()
          if n >= MAX_HANGS and k not in measured]
  if hung:
    lines.append('Not measured: the XLA:CPU program of these rows hung '
                 f'{MAX_HANGS} times (jaxlib {meta.get("jaxlib", "?")}; all '
                 'threads idle, the result never ready): ' +
                 ', '.join(f'`{k}`' for k in hung) + '.\n')
  lines.append(f"Total compute: {meta['seconds']:.0f} s of training "
               f"(compile included) on {meta['platform']}.\n")
  return lines


def plot(payload: dict[str, Any], path: str) -> None:
  """Final loss vs d/r per task: Flora variants and LoRA against baselines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, tasks = payload['rows'], list(payload['tasks'])
  vs = variants()
  if not tasks:
    return
  cols = min(2, len(tasks))
  nrows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4 * nrows + 1.5),
                           squeeze=False)
  for ax in axes.flat[len(tasks):]:
    ax.axis('off')
  for ax, task in zip(axes.flat, tasks):
    flat = {'adafactor': 'k', 'adafactor_nomomentum': 'tab:red',
            'multisteps_optax': 'tab:gray'}
    for name, color in flat.items():
      r = _find(rows, task, name)
      if r:
        ax.axhline(r['mean'], color=color, ls='--', lw=1, label=vs[name].label)
        ax.axhspan(r['mean'] - r['std'], r['mean'] + r['std'], color=color,
                   alpha=0.1)
    for name, v in vs.items():
      pts = sorted((r['ratio'], r['mean'], r['std']) for r in rows
                   if r['task'] == task and r['optimizer'] == name and
                   r['ratio'])
      if not pts:
        continue
      x, m, s = map(np.asarray, zip(*pts))
      label = v.label + (' (default)' if name ==
                         payload['meta'].get('default_variant') else '')
      ax.errorbar(x, m, yerr=s, marker='o', ms=4, capsize=3, label=label,
                  ls=':' if name.startswith(('lora', 'multisteps')) else '-')
    # Paper mode is far above the others on some tasks: a log scale keeps
    # the residual variants apart.
    ax.set_yscale('log')
    ax.set_xscale('log', base=2)
    ax.set_xticks(RATIOS, [str(r) for r in RATIOS])
    ax.set_xlabel('d / r')
    ax.set_ylabel('final loss (best lr, mean ± std)')
    ax.set_title(task)
    ax.grid(alpha=0.3)
  handles, labels = [], []
  for ax in axes.flat:
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=8)
  fig.tight_layout(rect=(0, 1.5 / (4 * nrows + 1.5), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)

