"""Smoke test of the benchmarks: the ``--quick`` size, no timing assertions.

Checks that the entry point writes its files, that every optimizer's state
bytes equal the independent formula of ``benchmarks.optimizers`` (within 1%,
the issue's target; in fact exactly), and that the small LM's pieces behave.
"""

import json
import math
import os

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
