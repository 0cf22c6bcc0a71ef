"""The loss and benefit tables of the docs' "Choosing a compressor" page.

Made from the results JSON: ``docs/_ext/flora_tables.py`` calls them when the
site is built (the ``{flora-quality-table}`` directive of
``docs/choosing.md``), so the decision is read from the measured rows and
changes with them. ``python -m benchmarks.quality.readme`` prints them. (The
module keeps its name from when the README held these tables.)
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from benchmarks import common
from benchmarks.quality.per_byte import other_base
from benchmarks.quality.report import _find, noise
from benchmarks.quality.settings import NAME, NOISE_MULT

# The columns: the tasks where momentum is clear first.
TASK_ORDER = ('lm_deep', 'finetune', 'regression', 'mlp', 'autoencoder', 'lm')
# (row label, optimizer, d/r); 'default' is the library's Flora.
ROWS = (
    ('Adafactor, float32 momentum', 'adafactor', None),
    ('Adafactor, bf16 momentum', 'adafactor_bf16', None),
    ('**momentum in 8-bit codes** (`flora(rank=None, bits=8)`)',
     'momentum_8bit', None),
    ('momentum in 4-bit codes (`bits=4`)', 'momentum_4bit', None),
    ('**Flora** (default, d/r = 4)', 'default', 4),
    ('Flora, sketch in 8-bit codes (`rank=r, bits=8`)', 'flora_8bit', 4),
    ('Flora, paper mode (d/r = 4)', 'flora_paper', 4),
    ('LoRA (d/r = 4) + momentum', 'lora', 4),
    ('GaLore (Adafactor in the subspace, d/r = 4)', 'galore_adafactor', 4),
    ('GaLore (`optax.contrib.galore`, Adam, d/r = 4)', 'galore', 4),
    ('Adafactor, no momentum', 'adafactor_nomomentum', None),
    ('`optax.adamw`', 'adamw', None),
    ('`adamw(bits=8)`', 'adamw_8bit', None),
    ('`adamw(bits=4)`', 'adamw_4bit', None),
    # Other optimizers, float and in codes (issue 28; run when named).
    ('`optax.contrib.muon`', 'muon', None),
    ('`quantized(muon, bits=8)`', 'muon_8bit', None),
    ('`quantized(muon, bits=4)`', 'muon_4bit', None),
    ('`optax.lion`', 'lion', None),
    ('`quantized(lion, bits=8)`', 'lion_8bit', None),
    ('`quantized(lion, bits=4)`', 'lion_4bit', None),
    ('`optax.contrib.ademamix`', 'ademamix', None),
    ('`quantized(ademamix, bits=8)`', 'ademamix_8bit', None),
    ('`optax.sgd(momentum=0.9)`', 'sgd_momentum', None),
    ('`quantized(sgd, bits=8)`', 'sgd_momentum_8bit', None),
)
# Rows without a "benefit of momentum kept" (the references, and the other
# optimizers', whose first moment is not Adafactor's).
NO_BENEFIT = ('adafactor', 'adafactor_nomomentum', 'adamw', 'adamw_8bit',
              'adamw_4bit', 'muon', 'muon_8bit', 'muon_4bit', 'lion',
              'lion_8bit', 'lion_4bit', 'ademamix', 'ademamix_8bit',
              'sgd_momentum', 'sgd_momentum_8bit')


def _decimals(reference: float) -> int:
  """Three significant digits of a task's float32-momentum loss, at least
  three decimals (the language models' losses are about 2)."""
  return 3 + max(0, -math.floor(math.log10(reference)) - 1)


def _rows(payload: dict[str, Any]):
  default = payload['meta']['default_variant']
  tasks = [t for t in TASK_ORDER if t in payload['tasks']]
  for label, name, ratio in ROWS:
    name = default if name == 'default' else name
    found = [_find(payload['rows'], t, name, ratio) for t in tasks]
    if any(found):
      yield label, name, dict(zip(tasks, found))


def loss_table(payload: dict[str, Any]) -> str:
  """Loss (mean ± std) per task and bytes per parameter, one row each."""
  tasks = [t for t in TASK_ORDER if t in payload['tasks']]
  digits = {t: _decimals(_find(payload['rows'], t, 'adafactor')['mean'])
            for t in tasks}
  table = []
  for label, _, found in _rows(payload):
    per = sorted(r['bytes_per_param'] for r in found.values() if r)
    span = (f'{per[0]:.2f}' if f'{per[0]:.2f}' == f'{per[-1]:.2f}' else
            f'{per[0]:.2f}–{per[-1]:.2f}')
    # †: started from another pretrained model than the task's other rows.
    cells = ['-' if r is None else
             f"{r['mean']:.{digits[t]}f} ± {r['std']:.{digits[t]}f}" +
             (' †' if other_base(r, payload) else '')
             for t, r in found.items()]
    table.append([label, span] + cells)
  return common.markdown_table(['row', 'B/param'] + tasks, table)


def benefit_table(payload: dict[str, Any]) -> str:
  """``(L_nomom - L) / (L_nomom - L_mom)`` per task, where the gap is clear."""
  rows, tasks = payload['rows'], [t for t in TASK_ORDER
                                  if t in payload['tasks']]
  gaps = {}
  for t in tasks:
    mom, nomom = _find(rows, t, 'adafactor'), _find(rows, t,
                                                   'adafactor_nomomentum')
    gap = nomom['mean'] - mom['mean']
    gaps[t] = (nomom['mean'], gap, gap > NOISE_MULT * noise(mom, nomom))
  table = []
  for label, name, found in _rows(payload):
    if name in NO_BENEFIT:
      continue
    cells = []
    for t, r in found.items():
      l_nomom, gap, clear = gaps[t]
      cells.append('-' if r is None else '(no gap)' if not clear else
                   f"{(l_nomom - r['mean']) / gap:.0%}")
    table.append([label] + cells)
  return common.markdown_table(['benefit of momentum kept'] + tasks, table)


def tables(payload: dict[str, Any]) -> str:
  """Both tables, as ``docs/choosing.md`` shows them."""
  return loss_table(payload) + '\n' + benefit_table(payload)


def main() -> None:
  path = (sys.argv[1] if len(sys.argv) > 1 else
          os.path.join(common.RESULTS_DIR, f'{NAME}.json'))
  with open(path) as f:
    print(tables(json.load(f)), end='')


if __name__ == '__main__':
  main()
