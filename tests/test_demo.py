"""Smoke tests of the README's demo (examples.train_lm) at a tiny size."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_optax
from examples import data
from examples import paper_miniature
from examples import train_lm

TINY = ['--d-model', '32', '--layers', '1', '--heads', '2', '--seq-len', '16',
        '--batch-size', '4', '--eval-batches', '2', '--rank', '4',
        '--data', 'topics', '--learning-rate', '3e-2', '--warmup-steps', '1',
        '--no-progress']


def test_corpus_split_is_deterministic_and_disjoint():
  a = data.load_corpus('topics')
  b = data.load_corpus('topics')
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.eval, b.eval)
  assert a.eval_docs and a.train_docs
  assert not set(a.eval_docs) & set(a.train_docs)
  # Held-out text really is absent from the training stream.
  probe = data.decode(a.eval[1000:1200])
  assert probe not in data.decode(a.train)
  x1 = next(a.batches('train', 3, 8, seed=5))
  x2 = next(b.batches('train', 3, 8, seed=5))
  x3 = next(b.batches('train', 3, 8, seed=6))
  np.testing.assert_array_equal(x1, x2)
  assert not np.array_equal(x1, x3)
  assert x1.shape == (3, 9) and x1.dtype == np.uint8
  with pytest.raises(ValueError, match='source'):
    data.load_corpus('wikipedia')


def test_lora_model_starts_equal_to_its_base_and_trains_only_adapters():
  cfg = train_lm.ModelConfig(seq_len=8, d_model=16, num_layers=1, num_heads=2)
  _, base, _ = train_lm.init_model(cfg, seed=3)
  graphdef, lora, template = train_lm.init_model(
      train_lm.dataclasses.replace(cfg, lora_rank=2), seed=3)
  block = lora['blocks'][0]
  assert 'kernel' not in block['qkv']  # frozen: not among the trained params
  assert block['qkv']['lora_a'].shape == (16, 2)
  assert block['qkv']['lora_b'].shape == (2, 48)
  tokens = jnp.arange(18, dtype=jnp.uint8).reshape(2, 9)
  # Larger embeddings than at init, so the loss is sensitive to the blocks.
  for p in (base, lora):
    p['embed']['embedding'] = 50 * p['embed']['embedding']
  lora_fn = jax.jit(train_lm.make_loss_fn(graphdef, template))
  loss_lora = lora_fn(lora, tokens)
  g2, _, t2 = train_lm.init_model(cfg, seed=3)
  loss_base = jax.jit(train_lm.make_loss_fn(g2, t2))(base, tokens)
  # Same seed, B = 0: the LoRA model computes the base model's function.
  np.testing.assert_allclose(loss_lora, loss_base, rtol=1e-5)
  # ...until B moves: then the adapters change the function.
  lora['blocks'][0]['fc']['lora_b'] = lora['blocks'][0]['fc']['lora_b'] + 0.5
  assert abs(float(loss_lora) - math.log(256)) > 0.5  # not uniform logits
  assert abs(float(lora_fn(lora, tokens))
             - float(loss_base)) > 1e-2


def test_demo_trains_and_reports_memory(tmp_path, capsys):
  results = train_lm.main(TINY + ['--steps', '6', '--eval-every', '3',
                                  '--out', str(tmp_path)])
  out = capsys.readouterr().out
  by_name = {r.name: r for r in results}
  assert set(by_name) == {'flora', 'adafactor'}
  for r in results:
    assert r.eval_loss[-1] < math.log(256) - 0.3, r.eval_loss  # it learns
    assert all(np.isfinite(r.train_loss))
    assert r.peak_step_bytes > r.peak_update_bytes > 0
  # The compressed momentum is what makes Flora's state smaller.
  assert by_name['flora'].state_bytes < 0.6 * by_name['adafactor'].state_bytes
  assert '| flora |' in out and '| adafactor |' in out
  assert os.path.getsize(tmp_path / 'loss_curve.png') > 1000
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['results'][0]['final_eval_loss'] == pytest.approx(
      by_name['flora'].final_eval_loss)


def test_demo_accumulation_uses_compressed_multisteps(tmp_path):
  (r,) = train_lm.main(TINY + ['--steps', '3', '--eval-every', '3',
                               '--accumulate', '2', '--accumulation-rank', '2',
                               '--optimizers', 'flora', '--no-update-peak',
                               '--out', str(tmp_path)])
  assert r.steps[-1] == 6  # 3 updates x 2 micro-batches
  assert np.isfinite(r.eval_loss[-1])
  assert r.eval_loss[-1] < math.log(256)
  # The state is MultiSteps' (compressed accumulator) around flora, and is
  # smaller than optax.MultiSteps around adafactor with full momentum.
  _, params, _ = train_lm.init_model(
      train_lm.ModelConfig(seq_len=16, d_model=32, num_layers=1, num_heads=2),
      0)
  def state(name):
    tx = train_lm.make_optimizer(train_lm.OptConfig(
        name=name, rank=4, accumulate=2, accumulation_rank=2))
    return jax.eval_shape(tx.init, params)
  flora_state, ada_state = state('flora'), state('adafactor')
  assert isinstance(flora_state, flora_optax.MultiStepsState)
  assert flora_state.acc_grads['blocks'][0]['fc']['kernel'].shape == (2, 128)
  assert train_lm.tree_bytes(flora_state) == r.state_bytes
  assert r.state_bytes < 0.5 * train_lm.tree_bytes(ada_state)


def test_demo_quantized_rows_store_codes():
  # The paper miniature's quantized rows: momentum in 8-/4-bit codes in
  # every direction, Flora's sketch in 8-bit codes, an 8-bit accumulator.
  # d_model 64, rank 16: the fc sketches (16 x 256) are large enough to be
  # quantized (min_quantized_size 4096).
  _, params, _ = train_lm.init_model(
      train_lm.ModelConfig(seq_len=16, d_model=64, num_layers=1, num_heads=2),
      0)
  def kernel(name, **kw):
    tx = train_lm.make_optimizer(train_lm.OptConfig(
        name=name, rank=16, min_dim_size_to_factor=32, **kw))
    state = jax.eval_shape(tx.init, params)
    leaves = [x for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, flora_optax.QuantizedArray))
              if isinstance(x, flora_optax.QuantizedArray)]
    return leaves, train_lm.tree_bytes(state)
  (q8, b8), (q4, b4), (sk, bsk) = (kernel('flora8'), kernel('flora4'),
                                   kernel('flora_sketch8'))
  _, b32 = kernel('adafactor')
  assert q8 and q4 and sk
  assert {x.codes.dtype for x in q8 + sk} == {jnp.dtype(jnp.int8)}
  # 4-bit codes packed two to a byte; the sketch has rank 16 rows.
  assert q4[0].codes.shape[-1] * 2 == q8[0].codes.shape[-1]
  assert {min(x.codes.shape) for x in sk} == {16}
  assert bsk < b4 < b8 < b32
  acc, _ = kernel('adafactor_nomomentum', accumulate=2, accumulator='flora',
                  accumulation_rank=None, accumulation_bits=8)
  assert acc


def test_demo_muon_and_lion_rows_train_with_quantized_states():
  # The rows of other optax optimizers: muon (optax.contrib.muon), and Muon
  # and Lion in flora_optax.quantized(..., bits=8). d_model 32: the fc
  # kernels (32 x 128) and the byte embedding (256 x 32) reach
  # min_quantized_size (4096).
  cfg = train_lm.ModelConfig(seq_len=16, d_model=32, num_layers=1,
                             num_heads=2)
  graphdef, params0, template = train_lm.init_model(cfg, 0)
  loss_fn = train_lm.make_loss_fn(graphdef, template)
  tokens = jnp.asarray(next(data.load_corpus('topics').batches(
      'train', 4, 16, seed=0)))
  is_q = lambda x: isinstance(x, flora_optax.QuantizedArray)  # noqa: E731
  make = lambda name: train_lm.make_optimizer(train_lm.OptConfig(  # noqa: E731
      name=name, learning_rate=3e-3, warmup_steps=1, steps=4))
  states = {}
  for name in ('muon8', 'lion8'):
    tx = make(name)

    @jax.jit
    def step(params, state, tx=tx):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    params, state = params0, jax.jit(tx.init)(params0)
    losses = []
    for _ in range(3):
      params, state, loss = step(params, state)
      losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], (name,
                                                                 losses)
    states[name] = state
  # Muon's momentum of the kernels and Adam's moments of the rest (the
  # embedding among them) in codes; decoded: plain Muon's state layout.
  parts = states['muon8'].inner_states
  assert is_q(parts['muon'].inner_state[0].mu['blocks'][0]['fc']['kernel'])
  assert is_q(parts['adam'].inner_state[0].nu['embed']['embedding'])
  muon = jax.eval_shape(make('muon').init, params0)
  assert not any(is_q(x) for x in jax.tree.leaves(muon, is_leaf=is_q))
  assert (jax.tree.structure(flora_optax.to_float_state(states['muon8'])) ==
          jax.tree.structure(muon))
  assert is_q(states['lion8'][0].mu['blocks'][0]['fc_out']['kernel'])
  # The README's demo is unchanged: flora against adafactor by default.
  assert train_lm.parse_args([]).optimizers == ['flora', 'adafactor']


def test_demo_rejects_bad_flags():
  with pytest.raises(SystemExit):
    train_lm.parse_args(['--optimizers', 'sgd'])
  with pytest.raises(SystemExit):
    train_lm.parse_args(['--d-model', '30', '--heads', '4'])
  with pytest.raises(ValueError, match='name'):
    train_lm.make_optimizer(train_lm.OptConfig(name='adam'))


def test_paper_miniature_compares_like_with_like():
  mini = paper_miniature
  s = mini.Setting()
  exps = mini.experiments(s)
  assert set(exps) >= {'accumulation', 'momentum', 'kappa'}
  for name, runs in exps.items():
    seen = {r.micro_batch * r.micro_steps for r in runs}
    assert len(seen) == 1, (name, seen)  # every run sees the same examples
  acc = exps['accumulation']
  # Accumulated runs: `accumulate` micro-batches per update, batch_size
  # examples per update; the baseline without accumulation updates K times
  # more often. The inner optimizer is the same for all.
  for r in acc:
    assert r.opt.momentum is None and r.opt.name in ('adafactor_nomomentum',
                                                     'lora')
    per_update = r.micro_batch * r.opt.accumulate
    assert per_update == (s.batch_size if r.opt.accumulate > 1 else
                          s.batch_size // s.accumulate)
    assert r.opt.steps * r.opt.accumulate == r.micro_steps
  assert {r.opt.accumulator for r in acc if r.opt.accumulate > 1} == {
      'flora', 'optax'}
  ranks = {r.opt.rank for rs in exps.values() for r in rs
           if r.opt.name in ('flora', 'flora_paper', 'flora_frozen', 'lora')}
  assert ranks == {s.rank}  # Flora and LoRA compared at equal rank
  kappas = [r.opt.resample_every for r in exps['kappa']
            if r.opt.name == 'flora']
  assert kappas == list(s.kappas)
  # Both momentum modes are compared, the paper's never resampled too.
  assert {r.opt.name for r in exps['momentum']} >= {
      'flora', 'flora_paper', 'flora_frozen'}
