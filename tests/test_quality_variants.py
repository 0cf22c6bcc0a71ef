"""The quality study builds its Flora rows from public parts.

``benchmarks.quality.variants.flora_chain`` (``optax.chain`` of
``scale_by_factored_rms``, ``flora_optax.compressed_momentum``, block-RMS
clipping, the learning rate, the parameter scale and the sign flip) must be
``flora_optax.flora`` bit for bit wherever flora can express it: paper-mode
momentum in the paper's position, residual momentum in optax's. Otherwise the
study's non-default rows would not measure what they claim to.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import flora_optax
from benchmarks.quality import settings
from benchmarks.quality import variants

# Paper mode with an unbiased transfer at d/r = 10 warns (as it should).
pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')


def _params():
  # A compressed matrix, a batched one, a matrix too thin to compress at
  # rank 4 and a vector (dense momentum).
  k = jax.random.split(jax.random.key(0), 4)
  return {'w': jax.random.normal(k[0], (48, 40)),
          'stack': jax.random.normal(k[1], (2, 40, 36)),
          'thin': jax.random.normal(k[2], (3, 40)),
          'b': jax.random.normal(k[3], (40,))}


def _run(tx, params, steps=5, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for i in range(steps):
    grads = jax.tree.map(
        lambda p, i=i: jnp.sin(p * (i + 1)) + 0.1 * p, params)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    out.append(updates)
  return out, state


@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.parametrize('options', ['study', 'defaults'])
def test_flora_chain_equals_flora_bit_for_bit(residual, options):
  kwargs = dict(settings.ADAFACTOR) if options == 'study' else {}
  # resample_every=2: the momentum crosses two resampling boundaries.
  common = dict(momentum=0.9, key=5, resample_every=2, **kwargs)
  position = 'optax' if residual else 'paper'
  chain = variants.flora_chain(3e-2, 4, residual=residual,
                               momentum_position=position, **common)
  flora = flora_optax.flora(3e-2, 4, residual=residual, **common)
  params = _params()
  (got, got_state), (want, want_state) = _run(chain, params), _run(
      flora, params)
  for g, w in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def test_study_rows_use_flora_or_the_chain():
  defaults = variants.library_defaults()
  vs = variants.variants()
  default = [n for n, v in vs.items() if variants.is_default(v, defaults)]
  assert default == ['flora_residual_projection_optax']
  # The unbiased subspace scale is no longer buildable: recorded, not run.
  assert not {n for n in vs if 'unbiased' in n} & set(variants.runnable())
  other = vs['flora_residual_projection_paper'].make(1e-2, 4, 0, 10)
  # Factored second moment, momentum, clipping, learning rate, sign flip
  # (the study's Adafactor has no parameter scale).
  assert len(other.init(_params())) == 5


def test_other_optimizer_rows_build_float_and_quantized():
  """Issue 28's rows: the float ones are the inner optimizer itself, the
  quantized ones hold their large state leaves as QuantizedArray."""
  vs = variants.variants()
  inner = {'muon': lambda lr: optax.contrib.muon(lr), 'lion': optax.lion,
           'ademamix': optax.contrib.ademamix,
           'sgd_momentum': lambda lr: optax.sgd(lr, momentum=0.9)}
  bits = {'muon': (8, 4), 'lion': (8, 4), 'ademamix': (8,),
          'sgd_momentum': (8,)}
  # (and issue 29's frontier row, Flora's sketch in 4-bit codes)
  names = {n for n, v in vs.items() if v.named_only and not v.ablation}
  assert names == ({f'{n}_{b}bit' for n in bits for b in bits[n]} |
                   set(bits) | {'flora_4bit'})
  is_q = lambda x: isinstance(x, flora_optax.QuantizedArray)  # noqa: E731
  # The map ablations: named only, quantized with the map they name (the
  # linear rows: the default before issue 29).
  maps = {'muon_8bit_sqrt': ('sqrt', 8), 'lion_8bit_sqrt': ('sqrt', 8)}
  maps.update({f'{n}_{b}bit_linear': ('linear', b)
               for n in bits for b in bits[n]})
  for name, (code_map, b) in maps.items():
    assert vs[name].named_only and vs[name].ablation
    state = vs[name].make(1e-2, None, 0, 10).init(
        {'w': jnp.zeros((64, 64))})
    q = [x for x in jax.tree.leaves(state, is_leaf=is_q) if is_q(x)]
    assert q and all(x.format.code_map == code_map and x.format.bits == b
                     for x in q), name
  # 4096 entries: quantized (min_quantized_size); the vector stays float.
  params = {'w': jnp.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64),
            'b': jnp.linspace(0.0, 1.0, 64)}
  is_q = lambda x: isinstance(x, flora_optax.QuantizedArray)  # noqa: E731
  for name, make_inner in inner.items():
    v = vs[name]
    assert not v.ranked and not v.ablation
    assert math.log2(v.lr_factor) == round(math.log2(v.lr_factor))
    # Float: the inner optimizer's own updates and state, bit for bit.
    (got, got_state), (want, want_state) = (
        _run(v.make(1e-2, None, 0, 10), params, steps=1),
        _run(make_inner(1e-2), params, steps=1))
    for g, w in zip(got, want):
      jax.tree.map(np.testing.assert_array_equal, g, w)
    jax.tree.map(np.testing.assert_array_equal, got_state, want_state)
    assert not any(map(is_q, jax.tree.leaves(got_state, is_leaf=is_q)))
    for b in bits[name]:
      q = vs[f'{name}_{b}bit']
      assert q.lr_factor == v.lr_factor and q.named_only
      # Eager: quantized runs one small leaf at a time, faster than a
      # compile here.
      updates, state = _run(q.make(1e-2, None, 0, 10), params, steps=1,
                            jit=False)
      codes = [x for x in jax.tree.leaves(state, is_leaf=is_q) if is_q(x)]
      assert codes and all(x.format.bits == b for x in codes), name
      assert all(np.isfinite(x).all() for u in updates
                 for x in jax.tree.leaves(u))


def test_other_optimizer_rows_run_only_when_named():
  from benchmarks.quality import cli  # pylint: disable=g-import-not-at-top
  vs = variants.variants()
  full = cli.parse_args([]).variants
  assert not any(vs[n].named_only for n in full)
  named = cli.parse_args(['--variants', 'lion,lion_8bit']).variants
  assert named == ['lion', 'lion_8bit']
  with pytest.raises(ValueError, match='power of two'):
    variants.Variant('x', 'x', None, ranked=False, lr_factor=3.0)
