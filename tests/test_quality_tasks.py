"""The quality study's fine-tuning task, its GaLore rows, its row selection
and its targets for the quantized states (issue 22).

The fine-tuning task must start every row from the same pretrained weights
(LoRA's frozen base included) and pretrain only once per setting; GaLore's
rows must descend; the full run leaves the ablations out unless asked; the
quantized states' targets must say "met" exactly when the numbers do.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.quality import cli
from benchmarks.quality import report
from benchmarks.quality import tasks
from benchmarks.quality import variants


# finetune_task(quick=True)'s model and pretraining.
_CFG = tasks.model_lib.ModelConfig(seq_len=16, d_model=32, num_layers=1,
                                   num_heads=2)


def _pretrained(cache, steps=8):
  return tasks.pretrained(_CFG, tasks.data_lib.load_corpus('stdlib'), steps,
                          4, 0.005, cache)


@pytest.fixture(scope='module')
def finetune(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  return tasks.finetune_task(True, cache_dir=cache), cache


def test_finetune_pretrains_once_and_caches_by_settings(finetune, monkeypatch):
  task, cache = finetune
  files = sorted(f for f in os.listdir(cache) if f.endswith('.npz'))
  assert len(files) == 1 and os.path.exists(
      os.path.join(cache, files[0][:-4] + '.json'))
  # Built again: loaded, not trained (training would call init_model on the
  # pretraining path; here it must not run).
  calls = []
  real = tasks.model_lib.init_model
  monkeypatch.setattr(tasks.model_lib, 'init_model',
                      lambda *a: calls.append(a) or real(*a))
  again = _pretrained(cache)
  assert not calls
  # Another setting is another file.
  other = _pretrained(cache, steps=9)
  assert len([f for f in os.listdir(cache) if f.endswith('.npz')]) == 2
  assert any(not np.array_equal(again[k], other[k]) for k in again)


def test_finetune_rows_start_from_the_pretrained_weights(finetune):
  task, cache = finetune
  base = _pretrained(cache)
  full, rest = task.model(None).init(3)
  assert not jax.tree.leaves(rest)
  flat = tasks._flat(full)  # pylint: disable=protected-access
  assert set(flat) == set(base)
  for k, v in flat.items():
    np.testing.assert_array_equal(v, base[k])
  # LoRA: the frozen kernels and every trained non-adapter leaf are the
  # pretrained ones; B = 0, so the LoRA model computes the pretrained model.
  lora_params, lora_rest = task.model(4).init(3)
  frozen = tasks._flat(tasks.nnx.to_pure_dict(lora_rest))  # pylint: disable=protected-access
  assert frozen and all(k.endswith('kernel') for k in frozen)
  for k, v in {**frozen, **tasks._flat(lora_params)}.items():  # pylint: disable=protected-access
    if 'lora' not in k:
      np.testing.assert_array_equal(v, base[k])
    elif k.endswith('lora_b'):
      assert not np.any(v)
  tokens = jnp.asarray(task.data(0, 1, 4)[0])
  np.testing.assert_allclose(task.model(4).loss(lora_params, lora_rest, tokens),
                             task.model(None).loss(full, rest, tokens),
                             rtol=1e-6)
  # Seeds differ only in LoRA's A.
  a3 = tasks._flat(lora_params)  # pylint: disable=protected-access
  a5 = tasks._flat(task.model(4).init(5)[0])  # pylint: disable=protected-access
  assert all(np.array_equal(a3[k], a5[k]) == ('lora_a' not in k) for k in a3)
  # Fine-tuning starts below a fresh model's loss (the pretraining helped).
  fresh, fresh_rest = tasks.model_lib.init_model(_CFG, 3)[1:]
  assert task.settings['loss_before'] < float(
      task.model(None).evaluate(fresh, fresh_rest[1]))


@pytest.mark.parametrize('name', ['galore', 'galore_adafactor'])
def test_galore_rows_descend_at_their_rank(name):
  v = variants.variants()[name]
  # optax's GaLore is in the full run; the Adafactor variant is an ablation.
  assert v.ranked and v.ablation == (name == 'galore_adafactor')
  w_star = jax.random.normal(jax.random.key(0), (32, 24))
  params = {'w': jnp.zeros((32, 24)), 'b': jnp.zeros((24,))}
  loss = lambda p: jnp.sum((p['w'] - w_star)**2) + jnp.sum((p['b'] - 1)**2)  # noqa: E731
  tx = v.make(0.05, 4, 0, 10)
  state = tx.init(params)
  start = loss(params)
  for _ in range(30):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert loss(params) < 0.9 * start
  # Its state is in the rank-4 subspace: smaller than Adam's two moments.
  adam = 2 * (32 * 24 + 24) * 4
  assert sum(x.nbytes for x in jax.tree.leaves(state)) < adam


def test_full_run_leaves_the_ablations_out_unless_asked():
  vs = variants.variants()
  full = cli.parse_args([]).variants
  assert full and not any(vs[n].ablation for n in full)
  for name in ('adafactor', 'adafactor_nomomentum', 'momentum_8bit',
               'momentum_4bit', 'adamw', 'adamw_8bit', 'adamw_4bit', 'lora',
               'flora_paper', 'galore'):
    assert name in full, name
  every = cli.parse_args(['--ablations']).variants
  assert set(every) == set(variants.runnable())
  assert 'adamw_4bit_stochastic' in cli.parse_args(
      ['--variants', 'adamw_4bit_stochastic']).variants
  # Only Flora's default, its paper mode and LoRA sweep d/r (the language
  # models: 4 only); the accumulation rows run on lm.
  args = cli.parse_args([])
  lm = tasks.lm_task(True)
  work = [(v.name, r) for v, r in cli._work(lm, args)]  # pylint: disable=protected-access
  assert ('multisteps_flora', 4) in work
  assert {r for v, r in work if v in ('galore', 'lora')} == {4}
  # The sweeps run on the small tasks (the language models: d/r = 4).
  small = [(v.name, r) for v, r in cli._work(tasks.regression_task(True), args)]  # pylint: disable=protected-access
  assert [r for v, r in small if v == 'galore'] == [4]
  for name in ('lora', 'flora_paper', args.default):
    assert sorted(r for v, r in small if v == name) == [2, 4, 8], name
  every = cli.parse_args(['--all-ratios'])
  assert sorted(r for v, r in cli._work(tasks.regression_task(True), every)  # pylint: disable=protected-access
                if v.name == 'galore') == [2, 4, 8]
  deep = cli._work(tasks.lm_deep_task(True), args)  # pylint: disable=protected-access
  assert {r for v, r in deep if v.ranked} == {4}
  assert not any(v.accumulate > 1 for v, _ in deep)
  small = tasks.regression_task(True)
  assert not any(v.accumulate > 1 for v, _ in cli._work(small, args))  # pylint: disable=protected-access
  # Named on the command line, the accumulation rows run there too.
  named = cli.parse_args(['--variants', 'multisteps_optax,adafactor'])
  assert [(v.name, r) for v, r in cli._work(tasks.lm_deep_task(True), named)  # pylint: disable=protected-access
          ] == [('multisteps_optax', None), ('adafactor', None)]


def test_grids_are_centred_on_the_recorded_best(tmp_path):
  # The full run reads the committed results; --quick and 'none' do not.
  assert cli.parse_args([]).centres.endswith(os.path.join('results',
                                                          'quality.json'))
  assert cli.parse_args(['--quick']).centres is None
  assert cli.parse_args(['--centres', 'none']).centres is None
  with pytest.raises(SystemExit):
    cli.parse_args(['--centres', str(tmp_path / 'missing.json')])
  # Every recorded centre lies on its task's lattice (task lr * 2^k), so
  # the full run repeats the programs (and losses) that chose it.
  committed = cli.parse_args([]).centres
  with open(committed) as f:
    task_lr = {t: meta['lr'] for t, meta in json.load(f)['tasks'].items()}
  for (task, _, _), lr in cli.lr_centres(committed).items():
    k = math.log2(lr / task_lr[task])
    assert abs(k - round(k)) < 1e-9, (task, lr)
  # A row recorded at 4x its task's centre runs its grid around that; an
  # unrecorded one around the task's centre.
  centre = tasks.regression_task(True).lr
  recorded = tmp_path / 'old.json'
  recorded.write_text(json.dumps({'rows': [dict(
      task='regression', optimizer='adafactor', ratio=None,
      best_lr=4 * centre)]}))
  out = tmp_path / 'out'
  cli.main(['--quick', '--tasks', 'regression', '--variants',
            'adafactor,adafactor_nomomentum', '--centres', str(recorded),
            '--out', str(out), '--fresh'])
  result = json.loads((out / 'quality.json').read_text())
  grids = {r['optimizer']: r['lrs'] for r in result['rows']}
  np.testing.assert_allclose(grids['adafactor'],
                             [2 * centre, 4 * centre, 8 * centre])
  np.testing.assert_allclose(grids['adafactor_nomomentum'],
                             [centre / 2, centre, 2 * centre])
  assert result['meta']['lr_centres'] == os.path.relpath(recorded)


def _row(task, name, mean, std=0.01):
  return dict(task=task, optimizer=name, ratio=None, mean=mean, std=std)


def test_quantized_targets_follow_the_numbers():
  rows = [_row('t', 'adafactor', 1.0), _row('t', 'adafactor_nomomentum', 2.0),
          _row('t', 'momentum_8bit', 1.05), _row('t', 'momentum_4bit', 1.3),
          _row('t', 'adamw', 1.0), _row('t', 'adamw_8bit', 1.1),
          # No clear momentum gap: "within noise of momentum" instead.
          _row('u', 'adafactor', 1.0), _row('u', 'adafactor_nomomentum', 1.0),
          _row('u', 'momentum_8bit', 1.02), _row('u', 'momentum_4bit', 1.2)]
  got = {(t['task'], t['optimizer']): t for t in report.quantized_targets(rows)}
  assert got[('t', 'momentum_8bit')]['kind'] == 'benefit'
  assert math.isclose(got[('t', 'momentum_8bit')]['value'], 0.95)
  assert got[('t', 'momentum_8bit')]['met']
  assert math.isclose(got[('t', 'momentum_4bit')]['value'], 0.7)
  assert not got[('t', 'momentum_4bit')]['met']  # 70% < 75%
  assert not got[('t', 'adamw_8bit')]['met']  # 0.1 > 2 * 0.014
  assert got[('u', 'momentum_8bit')]['kind'] == 'within noise'
  assert got[('u', 'momentum_8bit')]['met']  # 0.02 <= 2 * 0.014
  assert not got[('u', 'momentum_4bit')]['met']
  assert ('t', 'multisteps_8bit') not in got  # no rows, no target
  text = '\n'.join(report._quantized_targets_section(  # pylint: disable=protected-access
      {'rows': rows}))
  assert "keeps ≥ 90% of momentum's benefit" in text and '**no**' in text
