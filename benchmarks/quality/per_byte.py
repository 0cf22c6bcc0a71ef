"""The bytes axis of the study: loss against optimizer-state bytes per task,
the Pareto front, and the best measured row for a budget of bytes."""

from __future__ import annotations

from typing import Any

from benchmarks import common
from benchmarks.quality.variants import variants

# Budgets as fractions of a reference row's state bytes.
BUDGETS = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
REFERENCES = (('adafactor', 'Adafactor with float32 momentum'),
              ('adamw', 'optax.adamw'))


def other_base(r: dict[str, Any], payload: dict[str, Any]) -> bool:
  """Whether row ``r`` started from another pretrained model than its
  task's recorded one (``loss_before`` differs: pretrained on a machine
  whose XLA:CPU rounds differently). Such rows compare with each other, not
  with the task's other rows."""
  before = r.get('loss_before')
  task = payload['tasks'].get(r['task'], {}).get('settings', {})
  return (before is not None and 'loss_before' in task and
          abs(before - task['loss_before']) > 1e-6)


def _rows(payload: dict[str, Any], task: str,
          same_base: bool = True) -> list[dict[str, Any]]:
  """The task's rows that trained (a finite loss), accumulation rows left out
  (their bytes are an accumulator's, their updates see K times the data);
  ``same_base``: only those on the task's recorded pretrained model
  (:func:`other_base`), the others alone otherwise."""
  return [r for r in payload['rows']
          if r['task'] == task and r.get('accumulate', 1) == 1 and
          r['mean'] == r['mean'] and r['mean'] != float('inf') and
          other_base(r, payload) != same_base]


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows no other row beats in both bytes and loss, fewest bytes
  first."""
  front, best = [], float('inf')
  for r in sorted(rows, key=lambda r: (r['state_bytes'], r['mean'])):
    if r['mean'] < best:
      front.append(r)
      best = r['mean']
  return front


def _name(r: dict[str, Any]) -> str:
  v = variants().get(r['optimizer'])
  label = v.label if v else r['optimizer']
  return f"{label}, d/r = {r['ratio']}" if r['ratio'] else label


def _per_param(r: dict[str, Any]) -> str:
  b = r.get('bytes_per_param')
  return f'{b:.2f}' if b is not None else '-'


def budget_table(payload: dict[str, Any]) -> list[list[Any]]:
  """Per task, reference and budget: the best row within the budget."""
  table = []
  for task in payload['tasks']:
    rows = _rows(payload, task)
    for ref_name, ref_label in REFERENCES:
      ref = next((r for r in rows if r['optimizer'] == ref_name), None)
      if ref is None:
        continue
      for f in BUDGETS:
        budget = f * ref['state_bytes']
        fits = [r for r in rows if r['state_bytes'] <= budget]
        best = min(fits, key=lambda r: r['mean']) if fits else None
        table.append([
            task, f'1/{round(1 / f)} of {ref_label} ({budget / 1024:.0f} KiB)',
            _name(best) if best else '–',
            f"{best['mean']:.4f} ± {best['std']:.4f}" if best else '–',
            f"{best['state_bytes'] / 1024:.1f}" if best else '–',
            _per_param(best) if best else '–', f"{ref['mean']:.4f}"])
  return table


def markdown_section(payload: dict[str, Any]) -> list[str]:
  """The report's section: the Pareto front of each task, the budgets."""
  lines = ['## Quality per byte\n',
           'Each row\'s final loss (best learning rate, mean ± std) against '
           'its optimizer state for the task\'s model, and those bytes per '
           'parameter of the model (LoRA\'s too: per parameter of the model '
           'it fine-tunes). The Pareto front: the rows that no other row '
           'beats with fewer or equal bytes. Rows marked † started from '
           'another pretrained model than the task\'s (see its table) and '
           'are left out of the fronts and budgets.\n']
  for task in payload['tasks']:
    front = pareto(_rows(payload, task))
    if front:
      lines.append(f'**{task}**\n')
      lines.append(common.markdown_table(
          ['state KiB', 'B/param', 'final loss', 'row'],
          [[f"{r['state_bytes'] / 1024:.1f}", _per_param(r),
            f"{r['mean']:.4f} ± {r['std']:.4f}", _name(r)] for r in front]))
  table = budget_table(payload)
  if table:
    lines.append('**Best measured row within a budget of state bytes**\n')
    lines.append(common.markdown_table(
        ['task', 'budget', 'best row', 'final loss', 'state KiB', 'B/param',
         'reference loss'], table))
  return lines


def plot(payload: dict[str, Any], path: str) -> None:
  """Final loss against state bytes (log scale) per task, front drawn."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = [t for t in payload['tasks']
           if _rows(payload, t) or _rows(payload, t, same_base=False)]
  if not tasks:
    return
  cols = min(2, len(tasks))
  nrows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.5 * nrows),
                           squeeze=False)
  for ax in axes.flat[len(tasks):]:
    ax.axis('off')
  for ax, task in zip(axes.flat, tasks):
    rows = _rows(payload, task)
    others = _rows(payload, task, same_base=False)
    families = {'adamw': 'tab:purple', 'flora': 'tab:blue',
                'galore': 'tab:brown',
                'momentum': 'tab:green', 'adafactor': 'k', 'lora': 'tab:orange',
                # Other optimizers, float and quantized (issue 28).
                'muon': 'tab:cyan', 'lion': 'tab:olive', 'ademamix': 'tab:pink',
                'sgd': 'tab:red'}
    for r in rows:
      color = next((c for k, c in families.items()
                    if r['optimizer'].startswith(k)), 'tab:gray')
      ax.errorbar(r['state_bytes'] / 1024, r['mean'], yerr=r['std'], fmt='o',
                  ms=4, color=color, alpha=0.7)
    for r in others:  # hollow: another pretrained base, off the front
      color = next((c for k, c in families.items()
                    if r['optimizer'].startswith(k)), 'tab:gray')
      ax.errorbar(r['state_bytes'] / 1024, r['mean'], yerr=r['std'], fmt='o',
                  ms=4, color=color, mfc='none', alpha=0.7)
    if others:
      ax.plot([], [], 'o', ms=4, color='gray', mfc='none',
              label='† other pretrained base')
    used = {k for r in rows + others for k in families
            if r['optimizer'].startswith(k)}
    for k, c in families.items():  # one legend entry per family
      if k in used:
        ax.plot([], [], 'o', ms=4, color=c, label=f'{k}*')
    front = pareto(rows)
    ax.plot([r['state_bytes'] / 1024 for r in front],
            [r['mean'] for r in front], 'r-', lw=1, label='Pareto front')
    for r in front:
      ax.annotate(r['optimizer'] + (f"/{r['ratio']}" if r['ratio'] else ''),
                  (r['state_bytes'] / 1024, r['mean']), fontsize=6,
                  xytext=(3, 3), textcoords='offset points')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('optimizer state (KiB, log)')
    ax.set_ylabel('final loss (best lr)')
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
