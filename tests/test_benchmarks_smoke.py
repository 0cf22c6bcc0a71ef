"""Smoke test of the benchmarks: the ``--quick`` size, no timing assertions.

Checks that the entry point writes its files, that every optimizer's state
bytes equal the independent formula of ``benchmarks.optimizers`` (within 1%,
the issue's target; in fact exactly), and that the small LM's pieces behave.
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import __main__ as bench_main
from benchmarks import common
from benchmarks import optimizers
from benchmarks import small_lm


def _f(*s):
  return jax.ShapeDtypeStruct(s, jnp.float32)


# Exercises every branch of the formulas: factored and unfactored second
# moments, compressed / dense / batched Flora sketches, GaLore's 2-D-only
# projection and its rank clipping.
EDGE_SHAPES = {
    'vec': _f(300),
    'scalar': _f(),
    'wide': _f(200, 640),  # factored; compressed at every rank below 200
    'thin': _f(12, 640),  # unfactored (12 < 128); flora dense when r >= 12
    'stack': _f(3, 160, 256),  # batch axis: one sketch per slice
    'tall': _f(700, 130),
}


@pytest.mark.parametrize('shapes', ['gpt2-tiny', 'edge'])
@pytest.mark.parametrize('ranks', [(8, 16), (150,)])
def test_state_bytes_equal_the_formula(shapes, ranks):
  tree = common.gpt2_shapes('tiny') if shapes == 'gpt2-tiny' else EDGE_SHAPES
  cands = (optimizers.candidates(ranks) +
           optimizers.multisteps_candidates((4,), ranks[0]))
  for c in cands:
    measured = common.state_bytes(c.make(), tree)
    formula = c.formula(tree)
    assert abs(measured - formula) <= 0.01 * formula, (c.name, measured,
                                                       formula)


def test_flora_formula_counts_sketches():
  # A hand count for one matrix: the smaller axis (200) compressed to r.
  assert optimizers.flora_sketch((200, 640), 16) == 16 * 640
  assert optimizers.flora_sketch((3, 160, 256), 16) == 3 * 16 * 256
  assert optimizers.flora_sketch((12, 640), 16) == 12 * 640  # dense
  assert optimizers.flora_sketch((300,), 16) == 300


def test_quick_run_writes_results(tmp_path):
  out = str(tmp_path)
  paths = bench_main.main(
      ['--quick', '--only', 'state,update,scaling', '--out', out])
  for name in ('optimizers.json', 'optimizers.md', 'README_section.md',
               'state_bytes.png', 'scaling_rank.png', 'scaling_size.png'):
    path = os.path.join(out, name)
    assert path in paths and os.path.getsize(path) > 0, name
  with open(os.path.join(out, 'optimizers.json')) as f:
    res = json.load(f)
  names = {c.name for c in optimizers.candidates(optimizers.QUICK.ranks)}
  assert names <= {r['optimizer'] for r in res['state']}
  for row in res['state']:
    assert row['formula_rel_err'] <= 0.01, row
  base = [r for r in res['update'] if r['optimizer'] == optimizers.BASELINE]
  assert base and base[0]['update_ratio'] == 1.0
  for row in res['update']:
    assert row['peak_bytes'] > 0 and row['temp_bytes'] >= 0
    assert row['update_s'] > 0 and math.isfinite(row['update_ratio'])
  for row in res['scaling']['rank'] + res['scaling']['size']:
    assert row['temp_bytes'] >= 0 and row['ratio'] > 0
  with open(os.path.join(out, 'README_section.md')) as f:
    text = f.read()
  assert '| target |' in text and 'scaling_rank.png' in text


def test_small_lm_data_and_loss():
  cfg = small_lm.QUICK
  a, b = small_lm.Batches(cfg, seed=3), small_lm.Batches(cfg, seed=3)
  xa, xb = a(), b()
  assert xa.shape == (cfg.batch, cfg.seq_len + 1) and xa.dtype == jnp.int32
  np.testing.assert_array_equal(xa, xb)  # seeded: the same batches
  assert 0 <= int(xa.min()) and int(xa.max()) < cfg.vocab
  assert len(small_lm.stdlib_bytes(1 << 16)) == 1 << 16
  params = small_lm.init_params(small_lm.param_shapes(cfg))
  loss = float(jax.jit(small_lm.loss_fn)(params, xa))
  # Small initial weights: close to a uniform prediction over 256 bytes.
  assert abs(loss - math.log(cfg.vocab)) < 0.1


@pytest.mark.slow
def test_gpu_quick_run_writes_every_section(tmp_path):
  # Deferred import: benchmarks.gpu records its start time when imported.
  from benchmarks import gpu  # pylint: disable=g-import-not-at-top
  res = gpu.main(['--quick', '--quiet', '--out', str(tmp_path)])
  platform = jax.devices()[0].platform
  for ext in ('json', 'md'):
    assert os.path.getsize(tmp_path / f'gpu_{platform}.{ext}') > 0
  with open(tmp_path / f'gpu_{platform}.json') as f:
    assert json.load(f)['machine']['device_kind'] == res['machine'][
        'device_kind']
  assert not res['not_run'] and not res.get('section_errors'), res
  for section in ('projection', 'update', 'train_step'):
    assert res[section]['rows'] and not res[section].get('skipped'), section
  m = res['machine']
  assert m['platform'] == platform and m['jax'] == jax.__version__

  upd = {r['optimizer']: r for r in res['update']['rows']}
  base = upd[gpu.BASELINE]
  assert base['update_ratio'] == 1.0
  modes = gpu.FLORA_MODES
  for r in gpu.SIZES['quick'].ranks:
    for mode in modes:
      row = upd[common.flora_name(r, mode)]
      # Flora's state is a sketch: smaller than a dense first moment.
      assert row['state_bytes'] < base['state_bytes'], row
      assert upd['adafactor']['state_bytes'] < row['state_bytes']
    assert f'galore r={r}' in upd
  for row in res['update']['rows']:
    assert row['peak_bytes'] > 0 and row['compile_s'] > 0, row
    assert row['update_s'] > 0 and math.isfinite(row['update_ratio']), row
    assert row['update_calls'] == gpu.SIZES['quick'].repeats
  # flora with an rbg key: a row if it works, the error string if not.
  rbg = [n for n in upd if n.endswith('key=rbg')]
  assert len(rbg) + len(res['update']['errors']) == 1

  step = {r['optimizer']: r for r in res['train_step']['rows']}
  assert step[gpu.BASELINE]['step_ratio'] == 1.0
  for row in step.values():
    assert row['step_s'] > 0 and row['peak_bytes'] > 0, row
    assert math.isfinite(row['loss_after']), row
  assert step[common.flora_name(gpu.SIZES['quick'].step_rank, modes[0])][
      'state_bytes'] < step[gpu.BASELINE]['state_bytes']

  impls = {r['impl']: r for r in res['projection']['rows']}
  assert set(impls) | set(res['projection']['errors']) == set(gpu.PRNG_IMPLS)
  for row in impls.values():
    assert row['generate_s'] > 0 and row['generate_over_compress'] > 0, row
  # Lion, Muon, AdEMAMix and quantized(..., bits=8) of each (issue 28),
  # with ratios to their float selves and a peak target.
  for name in gpu.INNERS:
    q = upd[gpu.quantized_name(name)]
    assert q['inner'] == name and q['inner_state_ratio'] < 0.5, q
    assert q['inner_update_ratio'] > 0 and q['inner_compile_ratio'] > 0, q
  # Issue 30: every quantized row (momentum, AdamW, quantized(inner), 8-bit
  # accumulation) against its float peer, judged in three targets.
  peers = {n: r['peer'] for n, r in upd.items() if r.get('peer')}
  assert peers['flora rank=None bits=8'] == gpu.BASELINE
  assert peers['flora_optax.adamw(bits=4)'] == 'adamw'
  assert gpu.ACCUMULATION in peers.values(), peers
  assert len(peers) == 4 + len(gpu.INNERS) + 1
  for n in peers:
    assert upd[n]['peer_update_ratio'] > 0, upd[n]
  assert {t['met'] for t in res['targets']} <= {True, False}
  assert len(res['targets']) == 10


@pytest.mark.slow
def test_gpu_quality_section_quick():
  from benchmarks import gpu, gpu_quality  # pylint: disable=g-import-not-at-top
  res = gpu_quality.section('quick', gpu.Budget(600, start=time.perf_counter()),
                            lambda *_: None,
                            only=('adafactor', 'flora r=16 bits=8'))
  by = {r['optimizer']: r for r in res['rows']}
  assert set(by) == {'adafactor', 'flora r=16 bits=8'} and not res['not_run']
  for r in by.values():
    # Trained: below the loss of the shared init, on held-out bytes.
    assert math.isfinite(r['final_eval_loss']), r
    assert r['final_eval_loss'] < r['loss_before'], r
  assert by['adafactor']['loss_before'] == by['flora r=16 bits=8'][
      'loss_before']
  # float32 momentum: 4 bytes per parameter plus Adafactor's factored rows.
  assert 4 < by['adafactor']['bytes_per_param'] < 4.5
  assert by['flora r=16 bits=8']['bytes_per_param'] < 1
  text = '\n'.join(gpu_quality.markdown(res))
  assert 'Quality: a GPU-sized byte GPT' in text and 'B/param' in text


@pytest.mark.slow
def test_quality_quick_run(tmp_path):
  # Imported here: the study loads the examples' corpus and model.
  from benchmarks import quality  # pylint: disable=g-import-not-at-top
  out = str(tmp_path)
  paths = quality.main(['--quick', '--out', out, '--cache',
                        os.path.join(out, 'cache')])
  for name in ('quality.json', 'quality.md', 'quality.png'):
    path = os.path.join(out, name)
    assert path in paths and os.path.getsize(path) > 0, name
  with open(os.path.join(out, 'quality.json')) as f:
    res = json.load(f)
  rows = res['rows']
  default = res['meta']['default_variant']
  names = {(r['task'], r['optimizer']) for r in rows}
  for task in quality.QUICK['tasks']:
    for name in ('adafactor', 'adafactor_nomomentum', default, 'lora'):
      assert (task, name) in names, (task, name)
  assert ('lm', 'multisteps_flora') in names
  assert not any(r['optimizer'].startswith('multisteps') for r in rows
                 if r['task'] != 'lm')
  for r in rows:
    losses = np.asarray(r['losses'])
    assert losses.shape == (len(r['lrs']), len(r['seeds'])), r['optimizer']
    assert len(r['lrs']) >= 3 and np.all(np.isfinite(losses)), r
    # The reported learning rate is the one with the lowest mean loss, and
    # mean / std are that learning rate's statistics over seeds.
    means = losses.mean(axis=1)
    i = r['lrs'].index(r['best_lr'])
    assert means[i] == means.min(), r
    assert math.isclose(r['mean'], means[i], rel_tol=1e-9)
    assert math.isclose(r['std'], losses[i].std(ddof=1), rel_tol=1e-9)
    assert math.isfinite(r['std']) and r['std'] >= 0
    assert r['state_bytes'] > 0 and r['seconds'] > 0
    assert (r['rank'] is None) == (r['ratio'] is None)
    # The bytes axis: per parameter of the task's full model.
    assert math.isclose(r['bytes_per_param'], r['state_bytes'] /
                        res['tasks'][r['task']]['params'])
  # GaLore at the same rank; the fine-tuning task records the loss of the
  # pretrained model, which fine-tuning improves on.
  assert {r['task'] for r in rows if r['optimizer'] == 'galore'} == set(
      quality.QUICK['tasks'])
  ft = res['tasks']['finetune']['settings']['loss_before']
  assert min(r['mean'] for r in rows if r['task'] == 'finetune') < ft
  # Compressed states are smaller than the uncompressed momentum's.
  by = {(r['task'], r['optimizer']): r for r in rows}
  for task in quality.QUICK['tasks']:
    assert (by[(task, default)]['state_bytes'] <
            by[(task, 'adafactor')]['state_bytes'])
  assert {t['task'] for t in res['targets']} == set(quality.QUICK['tasks'])
  with open(os.path.join(out, 'quality.md')) as f:
    text = f.read()
  assert '(default)' in text and '## Targets' in text
  assert '## Quality per byte' in text
  assert os.path.getsize(os.path.join(out, 'quality_per_byte.png')) > 0


def test_quality_per_byte_front_and_budgets():
  from benchmarks.quality import per_byte  # pylint: disable=g-import-not-at-top
  row = lambda name, kib, mean, ratio=None, k=1: dict(  # noqa: E731
      task='t', optimizer=name, state_bytes=kib * 1024, mean=mean, std=0.0,
      ratio=ratio, accumulate=k)
  rows = [row('adafactor', 100, 1.0), row('adafactor_nomomentum', 1, 2.0),
          row('momentum_8bit', 26, 1.0), row('momentum_4bit', 14, 1.2),
          row('flora_8bit', 10, 1.9, 4), row('default', 27, 1.9, 4),
          row('multisteps_8bit', 5, 0.5, k=4)]
  payload = dict(tasks={'t': {}}, rows=rows)
  front = per_byte.pareto(per_byte._rows(payload, 't'))  # pylint: disable=protected-access
  # Fewest bytes first; a row is on it only if it beats every cheaper row
  # (the accumulation row, with other bytes and data, is left out).
  assert [r['optimizer'] for r in front] == [
      'adafactor_nomomentum', 'flora_8bit', 'momentum_4bit', 'momentum_8bit']
  table = {r[1].split(' (')[0]: r[2] for r in per_byte.budget_table(payload)}
  assert table['1/2 of Adafactor with float32 momentum'].startswith(
      'momentum in 8-bit')
  assert table['1/4 of Adafactor with float32 momentum'].startswith(
      'momentum in 4-bit')
  assert table['1/8 of Adafactor with float32 momentum'].startswith(
      'Flora sketch in 8-bit')
  assert table['1/16 of Adafactor with float32 momentum'] == (
      'Adafactor, no momentum')


def test_quality_best_lr_skips_diverged_runs():
  from benchmarks import quality  # pylint: disable=g-import-not-at-top
  lrs = [0.1, 0.2, 0.4]
  losses = [[1.0, 1.2], [0.9, float('nan')], [0.95, 0.97]]
  assert quality.best_lr(lrs, losses) == 2  # the NaN run does not win
  assert quality.best_lr(lrs, [[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]]) == 2


@pytest.mark.slow
def test_quantized_quick_run():
  from benchmarks import quantized  # pylint: disable=g-import-not-at-top
  res = quantized.run(quick=True, log=lambda *_: None)
  text = quantized.markdown(res)
  assert '## Targets' in text and 'rank=None bits=8' in text
  # The measured state bytes equal the codes' formula, for every row.
  assert all(r['formula_rel_err'] == 0 for r in res['state']), res['state']
  st = {r['optimizer']: r['state_bytes'] for r in res['state']}
  base = st[quantized.BASELINE]
  assert st['flora rank=None bits=4'] < st['flora rank=None bits=8'] < base
  # Momentum's, AdamW's (issue 20) and the other optimizers' (issue 28)
  # state-bytes targets of a large leaf.
  leaf = [t for t in res['targets'] if '768×3072' in t['target']]
  assert len(leaf) == 4 + len(quantized.INNERS) and all(t['met'] for t in leaf)
  adam = {r['optimizer']: r['state_bytes'] for r in res['adam']['state']}
  assert (adam['flora_optax.adamw(bits=4)'] < adam['flora_optax.adamw(bits=8)']
          < adam['optax.adamw'])
  # Lion, Muon, AdEMAMix against quantized(..., bits=8) of themselves: the
  # bytes of the codes' formula, a peak target each, a table row each.
  inner = {r['optimizer']: r for r in res['inners']['state']}
  assert all(r['formula_rel_err'] == 0 for r in inner.values()), inner
  for name in quantized.INNERS:
    q = quantized.quantized_name(name)
    assert inner[q]['state_bytes'] < 0.3 * inner[name]['state_bytes']
    assert any(t['target'].startswith(q + ': update peak saving')
               for t in res['targets'])
    assert f'| {q} |' in text
  # --quick compiles the baseline once for every section of update rows.
  assert {r['optimizer'] for r in res['inners']['update']} == set(inner)
  from benchmarks import gpu  # pylint: disable=g-import-not-at-top
  assert list(gpu.INNERS) == list(quantized.INNERS)
  assert {r['family'] for r in res['multisteps']} >= {
      'optax.MultiSteps', 'flora.MultiSteps bits=8'}
  # Issue 30's time targets: each quantized row against its float peer, the
  # accumulators per call, the sketch with the time of its extra flops.
  names = [t['target'] for t in res['targets']]
  for q in [quantized.quantized_name(n) for n in quantized.INNERS] + [
      'flora_optax.adamw(bits=8)', 'flora rank=None bits=4']:
    assert any(n.startswith(f'{q}: update ≤') for n in names), q
    assert any(n.startswith(f'{q}: ') and 'compile' in n for n in names), q
  assert sum('per call ≤ 1.15×' in n for n in names) == 2
  sketch = next(t for t in res['targets'] if 'update ≤ 2.0×' in t['target'])
  assert 'GFLOP more than' in sketch['figures'], sketch


@pytest.mark.slow
def test_compile_layouts_quick_run():
  from benchmarks import compile_layouts  # pylint: disable=g-import-not-at-top
  res = compile_layouts.run(quick=True)
  rows = {(r['layout'], r['optimizer']): r for r in res['rows']}
  assert len(rows) == 2 * len(compile_layouts.ROWS)
  for (layout, name), r in rows.items():
    assert r['compile_s'] > 0 and r['hlo_ops'] > 0 and r['peak_bytes'] > 0
    if r['peer']:
      peer = rows[(layout, r['peer'])]
      # Quantized states are smaller; each leaf's codec is more code.
      assert r['state_bytes'] < 0.3 * peer['state_bytes'], r
      assert r['hlo_ratio'] > 1 and r['compile_ratio'] > 0, r
  # Stacking the layers leaves one leaf per block matrix: less code.
  for name, _, _ in compile_layouts.ROWS:
    assert (rows[('stacked layers', name)]['hlo_ops'] <
            rows[('per-layer leaves', name)]['hlo_ops'])
  assert '| stacked layers |' in compile_layouts.markdown(res)


@pytest.mark.slow
def test_process_spread_quick_run(tmp_path):
  from benchmarks import process_spread  # pylint: disable=g-import-not-at-top
  res = process_spread.main(['--quick', '--out', str(tmp_path)])
  assert res['meta']['processes'] == 1
  assert [r['optimizer'] for r in res['rows']] == [
      p[0] for p in process_spread.PAIRS]
  for r in res['rows']:
    assert r['low'] <= r['median'] <= r['high'] and r['low'] > 0, r
    assert r['met'] == (r['median'] <= r['target'])
  text = (tmp_path / 'process_spread.md').read_text()
  assert '| quantized(optax.lion, bits=8) | optax.lion |' in text
