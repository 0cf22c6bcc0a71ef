"""Markdown tables, PNG plots and the README section, from the results JSON.

``write(results)`` writes into ``benchmarks/results/``:

* ``optimizers.json`` / ``optimizers.md``: every figure;
* ``scaling_rank.png``, ``scaling_size.png``, ``state_bytes.png``;
* ``README_section.md``: the targets, the main tables and the plots, for the
  project README.

``python -m benchmarks.report`` regenerates the markdown and plots from an
existing ``optimizers.json`` without re-running anything.
"""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks import common
from benchmarks.common import mib as _mib


def _find(rows, **kw):
  for r in rows:
    if all(r.get(k) == v for k, v in kw.items()):
      return r
  return None


def _x(v) -> str:
  return '–' if v is None else f'{v:.2f}×'


# --- targets -------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each with its figures and whether it is met."""
  return _state_targets(res) + _memory_targets(res) + _time_targets(res)


def _names(meta) -> tuple[str, int, str]:
  """The baseline's name, the middle rank and Flora's name at that rank."""
  return meta['baseline'], meta['mid_rank'], f'flora r={meta["mid_rank"]}'


def _state_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
  meta = res['meta']
  base, mid, flora_mid = _names(meta)
  out = []
  if 'state' in res:
    worst = max(res['state'], key=lambda r: r['formula_rel_err'])
    out.append({
        'target': 'state bytes equal the formula within 1%',
        'figures': f'largest deviation {100 * worst["formula_rel_err"]:.3f}% '
                   f'({worst["optimizer"]}, {worst["workload"]}); '
                   f'{len(res["state"])} optimizer × workload pairs',
        'met': worst['formula_rel_err'] <= 0.01})
    wl = 'gpt2-small' if _find(res['state'], workload='gpt2-small') else (
        res['state'][0]['workload'])
    fl = _find(res['state'], workload=wl, optimizer=flora_mid)
    out.append({
        'target': f'{wl}: flora r={mid} state ≤ 20% of {base} and ≤ 10% of '
                  'adamw',
        'figures': f'{100 * fl["vs_baseline"]:.1f}% of {base} '
                   f'({_mib(fl["state_bytes"]):.1f} vs '
                   f'{_mib(fl["state_bytes"] / fl["vs_baseline"]):.1f} MiB), '
                   f'{100 * fl["vs_adamw"]:.1f}% of adamw',
        'met': fl['vs_baseline'] <= 0.20 and fl['vs_adamw'] <= 0.10})
    worse = []
    for r in meta['ranks']:
      f = _find(res['state'], workload=wl, optimizer=f'flora r={r}')
      g = _find(res['state'], workload=wl, optimizer=f'galore r={r}')
      worse.append((r, f['state_bytes'], g['state_bytes']))
    out.append({
        'target': f'{wl}: flora state < galore state at the same rank',
        'figures': ', '.join(f'r={r}: {_mib(f):.1f} vs {_mib(g):.1f} MiB'
                             for r, f, g in worse),
        'met': all(f < g for _, f, g in worse)})
  return out


def _memory_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
  base, _, flora_mid = _names(res['meta'])
  out = []
  for key, label in (('step', 'train step'), ('lm', 'small-LM train step')):
    rows = res.get(key)
    if rows is None:
      continue
    rows = rows['rows'] if key == 'lm' else rows
    b, f = _find(rows, optimizer=base), _find(rows, optimizer=flora_mid)
    if b is None or f is None:
      continue
    saved_state = b['state_bytes'] - f['state_bytes']
    saved_peak = b['peak_bytes'] - f['peak_bytes']
    frac = saved_peak / saved_state if saved_state else float('nan')
    out.append({
        'target': f'{b["workload"]} {label}: peak memory lower than {base}\'s '
                  'by ≥ 80% of the state saved',
        'figures': f'peak {_mib(f["peak_bytes"]):.1f} vs '
                   f'{_mib(b["peak_bytes"]):.1f} MiB: saves '
                   f'{_mib(saved_peak):.1f} MiB = {100 * frac:.0f}% of the '
                   f'{_mib(saved_state):.1f} MiB of state saved',
        'met': frac >= 0.8})
  return out


def _time_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
  meta = res['meta']
  base, mid, flora_mid = _names(meta)
  out = []
  if 'lm' in res:
    f = _find(res['lm']['rows'], optimizer=flora_mid)
    b = _find(res['lm']['rows'], optimizer=base)
    out.append({
        'target': f'small LM ({res["lm"]["tokens_per_step"]} tokens/step): '
                  f'flora r={mid} train step ≤ 1.10× {base}',
        'figures': f'{f["step_ratio"]:.3f}× ({1e3 * f["step_s"]:.0f} vs '
                   f'{1e3 * b["step_s"]:.0f} ms, medians of '
                   f'{len(f["losses"]) - 1} interleaved steps)',
        'met': f['step_ratio'] <= 1.10})
  if 'update' in res:
    wl = res['update'][0]['workload']
    pairs = []
    for r in meta['ranks']:
      f = _find(res['update'], workload=wl, optimizer=f'flora r={r}')
      g = _find(res['update'], workload=wl, optimizer=f'galore r={r}')
      if f and g and 'update_s' in f:
        pairs.append((r, f['update_s'], g['amortised_update_s'],
                      g['update_s']))
    timed_refresh = any('refresh_s' in r for r in res['update'])
    if pairs:
      note = ('' if timed_refresh else
              ' (galore without its SVD refresh, which was not timed on '
              'these shapes: a lower bound of its amortised time)')
      out.append({
          'target': f'{wl}: flora update time ≤ galore\'s (amortised over its '
                    f'{meta["galore_gap"]}-step projector refresh)',
          'figures': ', '.join(
              f'r={r}: {1e3 * f:.0f} vs {1e3 * g:.0f} ms'
              for r, f, g, _ in pairs) + note,
          'met': all(f <= g for _, f, g, _ in pairs)})
  if 'scaling' in res:
    rows = res['scaling']['rank'] + res['scaling']['size']
    pts = {}
    for r in rows:
      pts.setdefault((tuple(r['shape']), r['rank']), {})[r['optimizer']] = r
    pairs = [(s, r, v['flora'], v['galore']) for (s, r), v in sorted(
        pts.items())]
    out.append({
        'target': 'single matrices: flora update time ≤ galore\'s amortised '
                  f'(SVD refresh timed, every {meta["galore_gap"]} steps)',
        'figures': ', '.join(
            f'{s[0]}×{s[1]} r={r}: {1e3 * f["update_s"]:.2f} vs '
            f'{1e3 * g["amortised_update_s"]:.2f} ms (refresh '
            f'{g["refresh_s"]:.2f} s)' for s, r, f, g in pairs),
        'met': all(f['update_s'] <= g['amortised_update_s']
                   for _, _, f, g in pairs)})
  return out


# --- tables --------------------------------------------------------------------


def _state_table(res) -> str:
  rows = []
  for r in res['state']:
    rows.append([r['workload'], r['optimizer'], f'{_mib(r["state_bytes"]):.1f}',
                 f'{_mib(r["formula_bytes"]):.1f}',
                 f'{100 * r["formula_rel_err"]:.3f}%', _x(r['vs_baseline']),
                 _x(r['vs_adamw'])])
  return common.markdown_table(
      ['workload', 'optimizer', 'state MiB', 'formula MiB', 'deviation',
       f'÷ {res["meta"]["baseline"]}', '÷ adamw'], rows)


def _update_table(res) -> str:
  rows = []
  for r in res['update']:
    rows.append([
        r['workload'], r['optimizer'], f'{_mib(r["argument_bytes"]):.0f}',
        f'{_mib(r["output_bytes"]):.0f}', f'{_mib(r["temp_bytes"]):.0f}',
        f'{_mib(r["peak_bytes"]):.0f}', f'{r["compile_s"]:.1f}',
        f'{1e3 * r["update_s"]:.0f}' if 'update_s' in r else '–',
        _x(r.get('update_ratio')),
        _x(r.get('amortised_ratio')) if 'refresh_s' in r else '',
    ])
  return common.markdown_table(
      ['workload', 'optimizer', 'args MiB', 'outputs MiB', 'temps MiB',
       'peak MiB', 'compile s', 'update ms', '× baseline',
       f'amortised × (refresh every {res["meta"]["galore_gap"]})'], rows)


def _ms_table(res) -> str:
  rows = []
  for r in res['multisteps']:
    st = _find(res.get('state', []), workload=r['workload'],
               optimizer=r['optimizer'])
    rows.append([
        r['optimizer'], f'{_mib(st["state_bytes"]):.0f}' if st else '–',
        f'{_mib(r["temp_bytes"]):.0f}', f'{_mib(r["peak_bytes"]):.0f}',
        f'{1e3 * r["micro_s"]:.0f}', f'{1e3 * r["final_s"]:.0f}',
        f'{1e3 * r["per_call_s"]:.0f}', _x(r['per_call_ratio'])])
  return common.markdown_table(
      ['optimizer', 'state MiB', 'temps MiB', 'peak MiB', 'micro-step ms',
       'final step ms', 'per call ms', '× baseline update'], rows)


def _step_table(rows, with_time: bool) -> str:
  out = []
  for r in rows:
    row = [r['workload'], r['optimizer'], f'{_mib(r["state_bytes"]):.1f}',
           f'{_mib(r["temp_bytes"]):.1f}', f'{_mib(r["peak_bytes"]):.1f}',
           f'{r["compile_s"]:.1f}']
    if with_time:
      ls = r['losses']
      row += [f'{1e3 * r["step_s"]:.0f}', _x(r['step_ratio']),
              f'{ls[0]:.3f} → {ls[-1]:.3f}']
    out.append(row)
  head = ['workload', 'optimizer', 'state MiB', 'temps MiB', 'peak MiB',
          'compile s']
  if with_time:
    head += ['step ms', '× baseline', f'loss (step 1 → {len(ls)})']
  return common.markdown_table(head, out)


def _scaling_table(rows, by: str) -> str:
  out = []
  for r in rows:
    out.append(['×'.join(map(str, r['shape'])), r['rank'], r['optimizer'],
                f'{1e3 * r["update_s"]:.2f}',
                f'{1e3 * r["amortised_update_s"]:.2f}', _x(r['ratio']),
                f'{_mib(r["temp_bytes"]):.2f}'])
  return common.markdown_table(
      ['matrix', 'rank', 'optimizer', 'update ms', 'amortised ms',
       '× baseline', 'temps MiB'], out)


def _targets_table(ts) -> str:
  return common.markdown_table(
      ['target', 'figures', 'met'],
      [[t['target'], t['figures'], 'yes' if t['met'] else '**no**']
       for t in ts])


# --- plots -----------------------------------------------------------------------


def _plots(res, out_dir) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  paths = []
  sc = res.get('scaling')
  if sc:
    for by, xlab in (('rank', 'rank r'), ('size', 'matrix (n × 4n), rank 128'
                                           if not res['meta']['quick'] else
                                           'matrix')):
      rows = sc[by]
      if not rows:
        continue
      fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
      for name, style in (('adafactor(m=0.9)', 'k--'), ('flora', 'o-'),
                          ('galore', 's-')):
        pts = [r for r in rows if r['optimizer'] == name]
        xs = ([r['rank'] for r in pts] if by == 'rank' else
              [r['shape'][0] * r['shape'][1] for r in pts])
        label = name if name != 'galore' else 'galore (amortised)'
        axes[0].plot(xs, [r['ratio'] for r in pts], style, label=label)
        axes[1].plot(xs, [_mib(r['temp_bytes']) for r in pts], style,
                     label=name)
      shape = rows[0]['shape']
      title = (f'{shape[0]}×{shape[1]} matrix' if by == 'rank' else
               f'rank {rows[0]["rank"]}')
      axes[0].set_ylabel('update time ÷ adafactor(m=0.9)')
      axes[1].set_ylabel('compiled temporaries (MiB)')
      for ax in axes:
        ax.set_xscale('log', base=2)
        ax.set_xlabel(xlab if by == 'rank' else 'matrix elements')
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
      if by == 'size':
        axes[1].set_yscale('log', base=2)
      fig.tight_layout()
      path = os.path.join(out_dir, f'scaling_{by}.png')
      fig.savefig(path, dpi=100)
      plt.close(fig)
      paths.append(path)
  if 'state' in res:
    wls = sorted({r['workload'] for r in res['state']})
    names = [r['optimizer'] for r in res['state']
             if r['workload'] == wls[0] and r['k'] is None]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(wls)
    for i, wl in enumerate(wls):
      vals = [_mib(_find(res['state'], workload=wl, optimizer=n)['state_bytes'])
              for n in names]
      ax.bar([j + i * width for j in range(len(names))], vals, width,
             label=wl)
    ax.set_xticks([j + width * (len(wls) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha='right')
    ax.set_ylabel('optimizer state (MiB)')
    ax.set_yscale('log')
    ax.grid(alpha=0.3, axis='y')
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, 'state_bytes.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


# --- documents -------------------------------------------------------------------


def _how_measured(meta) -> str:
  """What the figures of both documents are (one sentence, no capital)."""
  return ('times are medians of interleaved repeats, reported as ratios to '
          f'`{meta["baseline"]}` measured in the same run; memory is XLA\'s '
          '`memory_analysis()` of the compiled function')


def _full_markdown(res, ts) -> str:
  meta = res['meta']
  how = _how_measured(meta)
  parts = [
      '# Optimizer benchmarks\n',
      f'Generated by `python -m benchmarks{" --quick" if meta["quick"] else ""}` '
      f'(jax {meta["jax"]}, optax {meta["optax"]}, flora_optax '
      f'{meta["flora_optax"]}, backend {meta["backend"]}; wall time '
      f'{meta.get("wall_s", 0):.0f} s). {how[0].upper()}{how[1:]} (peak = '
      'arguments + outputs + temporaries − donated aliases; states and '
      'parameters are donated).\n',
      '## Targets\n', _targets_table(ts),
  ]
  if 'state' in res:
    parts += ['\n## Optimizer state\n', _state_table(res)]
  if 'update' in res:
    parts += ['\n## Compiled update\n', _update_table(res)]
  if 'multisteps' in res:
    parts += ['\n## Gradient accumulation (MultiSteps)\n',
              'One compiled update per wrapper; `k` only changes how often the '
              'final step (the inner optimizer) runs: per call = '
              '((k−1)·micro + final)/k.\n', _ms_table(res)]
  if 'step' in res:
    parts += ['\n## Full train step (GPT-2 shapes, compiled only)\n',
              _step_table(res['step'], False)]
  if 'lm' in res:
    lm = res['lm']
    parts += [f'\n## Small LM trained on CPU ({lm["n_params"] / 1e6:.2f}M '
              f'parameters, {lm["tokens_per_step"]} byte tokens per step, '
              'standard-library sources)\n', _step_table(lm['rows'], True)]
  if 'scaling' in res:
    parts += ['\n## Scaling with rank\n', _scaling_table(res['scaling']['rank'],
                                                        'rank'),
              '\n![rank](scaling_rank.png)\n',
              '\n## Scaling with matrix size\n',
              _scaling_table(res['scaling']['size'], 'size'),
              '\n![size](scaling_size.png)\n']
  return '\n'.join(parts)


def _readme_section(res, ts) -> str:
  meta = res['meta']
  lines = [
      '## Benchmarks\n',
      f'`python -m benchmarks` (`--quick` for a smoke run; these figures took '
      f'{meta.get("wall_s", 0) / 60:.0f} minutes of wall time on a 2-core CPU '
      f'shared with other jobs, mostly XLA compilation) measures every '
      f'optimizer side by side in one process: {_how_measured(meta)}. All '
      'figures: '
      '[benchmarks/results/optimizers.md](benchmarks/results/optimizers.md).\n',
      _targets_table(ts),
  ]
  if 'state' in res:
    wl = 'gpt2-small'
    rows = [r for r in res['state'] if r['workload'] == wl and r['k'] is None]
    if rows:
      upd = {r['optimizer']: r for r in res.get('update', [])
             if r['workload'] == wl}
      refreshed = any('refresh_s' in u for u in upd.values())
      table = []
      for r in rows:
        u = upd.get(r['optimizer'], {})
        table.append([
            r['optimizer'], f'{_mib(r["state_bytes"]):.1f}',
            _x(r['vs_baseline']),
            f'{_mib(u["peak_bytes"]):.0f}' if u else '–',
            _x(u.get('update_ratio'))] + (
                [_x(u.get('amortised_ratio')) if 'refresh_s' in u else '']
                if refreshed else []))
      head = ['optimizer', 'state MiB', 'state ÷ baseline', 'update peak MiB',
              'update time ÷ baseline']
      if refreshed:
        head.append(f'amortised (GaLore refresh every {meta["galore_gap"]})')
      lines += [f'\nGPT-2 small shapes (124M parameters, '
                f'{_mib(rows[0]["param_bytes"]):.0f} MiB):\n',
                common.markdown_table(head, table)]
      if not refreshed:
        lines.append(
            '\nGaLore\'s times above leave out its projector refresh (a thin '
            'SVD of every matrix every '
            f'{meta["galore_gap"]} steps), which XLA\'s CPU SVD makes too '
            'slow to time on GPT-2 shapes here; the scaling sweep times it on '
            'single matrices and amortises it.\n')
  if 'lm' in res:
    lm = res['lm']
    table = [[r['optimizer'], f'{_mib(r["state_bytes"]):.2f}',
              f'{_mib(r["peak_bytes"]):.1f}', _x(r['step_ratio']),
              f'{r["losses"][-1]:.3f}'] for r in lm['rows']]
    lines += [f'\nSmall byte-level GPT trained on CPU '
              f'({lm["n_params"] / 1e6:.1f}M parameters, '
              f'{lm["tokens_per_step"]} tokens per step):\n',
              common.markdown_table(
                  ['optimizer', 'state MiB', 'train-step peak MiB',
                   'step time ÷ baseline',
                   f'loss after {len(lm["rows"][0]["losses"])} steps'],
                  table)]
  if 'scaling' in res:
    lines += ['\nUpdate time (GaLore amortised over its refresh) and '
              'compiled temporaries of one matrix, against the rank:\n',
              '![scaling with rank](benchmarks/results/scaling_rank.png)\n']
  return '\n'.join(lines)


def write(res: dict[str, Any], out_dir: str = common.RESULTS_DIR) -> list[str]:
  """Writes the JSON, markdown, plots and README section; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  ts = targets(res)
  res = dict(res, targets=ts)
  jpath = os.path.join(out_dir, 'optimizers.json')
  with open(jpath, 'w') as f:
    json.dump(res, f, indent=1, default=float)
  mpath = os.path.join(out_dir, 'optimizers.md')
  with open(mpath, 'w') as f:
    f.write(_full_markdown(res, ts))
  rpath = os.path.join(out_dir, 'README_section.md')
  with open(rpath, 'w') as f:
    f.write(_readme_section(res, ts))
  return [jpath, mpath, rpath] + _plots(res, out_dir)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
  """Merges results of runs of separate parts (``--only ... --save-raw``).

  The wall time is the sum of the parts' (they may have run concurrently).
  """
  res = {'meta': dict(parts[0]['meta'])}
  res['meta']['wall_s'] = sum(p['meta'].get('wall_s', 0) for p in parts)
  for p in parts:
    for k, v in p.items():
      if k not in ('meta', 'targets'):
        res[k] = v
  return res


if __name__ == '__main__':
  import sys
  paths = sys.argv[1:] or [os.path.join(common.RESULTS_DIR,
                                        'optimizers.json')]
  loaded = []
  for path in paths:
    with open(path) as f:
      loaded.append(json.load(f))
  for p in write(merge(loaded)):
    print(p)
