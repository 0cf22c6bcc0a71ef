# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""The docs' generated tables and labels, as Markdown text (no Sphinx or
docutils needed: tests/test_docs.py checks them in the test job);
``flora_docs`` turns them into directives."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')


def _relpath(stem: str) -> str:
  """``quality`` -> ``benchmarks/results/quality.json``; a path is kept."""
  return stem if stem.endswith('.json') else f'benchmarks/results/{stem}.json'


@functools.cache
def _load(stem: str) -> dict[str, Any]:
  with open(os.path.join(ROOT, _relpath(stem))) as f:
    return json.load(f)


@functools.cache
def _git_version(stem: str) -> str | None:
  """flora_optax's version at the last commit that wrote ``<stem>.json``."""
  rel = _relpath(stem)
  try:
    commit = subprocess.run(
        ['git', 'log', '-1', '--format=%H', '--', rel], cwd=ROOT, check=True,
        capture_output=True, text=True).stdout.strip()
    if not commit:
      return None
    init = subprocess.run(
        ['git', 'show', f'{commit}:flora_optax/__init__.py'], cwd=ROOT,
        check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  found = re.search(r"__version__ = '([^']+)'", init)
  return found.group(1) if found else None


def _machine(stem: str, d: dict[str, Any]) -> str:
  """Where a results file was measured, from its own fields."""
  meta = d.get('meta', {})
  if 'platform' in meta:
    return meta['platform']
  if 'backend' in meta:
    return f"{meta['backend']} ({meta.get('devices', '?')})"
  if 'machine' in d:
    m = d['machine']
    return (f"{m.get('device_kind', m.get('platform', '?'))}, "
            f"{m.get('device_count', '?')} device(s), {m.get('host', '')}"
            ).rstrip(', ')
  if 'config' in d:
    return f"{d['config'].get('backend', '?')}"
  if 'mesh' in d:
    mesh = ' × '.join(f'{n} {a}' for a, n in d['mesh'].items())
    return f"{d.get('devices', '?')} devices, mesh {mesh}"
  return 'a machine the file does not record'


def results_label(stem: str) -> str:
  """One sentence: which version measured ``<stem>``, with what, where."""
  d = _load(stem)
  meta = d.get('meta', {})
  source = d.get('machine', d.get('config', meta))
  jax_version = meta.get('jax', source.get('jax', d.get('jax')))
  optax_version = meta.get('optax', source.get('optax'))
  version = meta.get('flora_optax')
  if version is not None:
    which = f'**flora_optax {version}**'
  elif (version := _git_version(stem)) is not None:
    which = (f'**flora_optax {version}** (the version of the commit that '
             'wrote the file)')
  else:  # no version field, no git history
    which = 'a flora_optax version the file does not record'
  libs = ''.join(f', {name} {v}' for name, v in
                 (('jax', jax_version), ('optax', optax_version)) if v)
  return (f'Measured with {which}{libs}, on '
          f'**{_machine(stem, d)}**; source: '
          f'`{_relpath(stem)}`.')


def quality_table(name: str) -> str:
  """A generated table of the quality study, as Markdown."""
  from benchmarks import common  # noqa: PLC0415 (the repository's, lazily)
  from benchmarks.quality import per_byte, readme  # noqa: PLC0415
  payload = _load('quality')
  if name == 'loss':
    return readme.loss_table(payload)
  if name == 'benefit':
    return readme.benefit_table(payload)
  if name == 'budget':
    return budget_grids(per_byte.budget_table(payload), common.markdown_table)
  raise KeyError(name)


# The study's long row names, shortened for the grids' cells.
_SHORTER = (('Flora, residual, projection scale, optax position',
             'Flora (default)'),
            ('flora_optax.quantized(', 'quantized('),
            ('optax.contrib.', ''))


def _short(name: str) -> str:
  for long, short in _SHORTER:
    name = name.replace(long, short)
  return name


def budget_grids(rows: list[list[Any]], markdown_table: Any) -> str:
  """``per_byte.budget_table``'s rows as one grid per reference state:
  a row per task, a column per budget, the best row (and its loss) in each
  cell."""
  grids: dict[str, dict[str, dict[str, str]]] = {}
  for task, budget, best, loss, *_ in rows:
    found = re.fullmatch(r'(\S+) of (.+) \(\d+ KiB\)', budget)
    if not found:
      raise ValueError(f'unexpected budget {budget!r}')
    fraction, reference = found.groups()
    cell = ('–' if best == '–' else
            f'{_short(best)} ({loss.split(" ±")[0]})')
    grids.setdefault(reference, {}).setdefault(task, {})[fraction] = cell
  out = []
  for reference, tasks in grids.items():
    fractions = list(dict.fromkeys(f for cells in tasks.values()
                                   for f in cells))
    out.append(f'**Budgets as fractions of the state of {reference}**\n')
    out.append(markdown_table(
        ['task'] + fractions,
        [[task] + [cells.get(f, '–') for f in fractions]
         for task, cells in tasks.items()]))
  return '\n'.join(out)


def demo_table() -> str:
  """The demo's reference table, from ``examples/results/train_lm``."""
  from examples import train_lm  # noqa: PLC0415 (the repository's, lazily)
  d = _load(DEMO)
  return train_lm.memory_table(
      [train_lm.RunResult(**r) for r in d['results']])


DEMO = 'examples/results/train_lm/results.json'


