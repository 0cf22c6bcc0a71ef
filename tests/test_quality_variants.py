"""The quality study builds its Flora rows from public parts.

``benchmarks.quality.variants.flora_chain`` (``optax.chain`` of
``scale_by_factored_rms``, ``flora_optax.compressed_momentum``, block-RMS
clipping, the learning rate, the parameter scale and the sign flip) must be
``flora_optax.flora`` bit for bit wherever flora can express it: paper-mode
momentum in the paper's position, residual momentum in optax's. Otherwise the
study's non-default rows would not measure what they claim to.
"""

import jax
import jax.numpy as jnp
import numpy as np
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


def _run(tx, params, steps=5):
  state = tx.init(params)
  update = jax.jit(tx.update)
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
