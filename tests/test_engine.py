"""The per-leaf engine: its loop and order, projections drawn in bounded
chunks.

(That MultiSteps and accumulate_gradients agree bit for bit through it is
test_accumulation.test_scan_recipe_equals_multisteps.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flora_optax
from flora_optax import _keys, _projection  # pylint: disable=g-bad-import-order


def _items(like, proj):
  flat, _ = _projection.flatten_plans(proj.plan(like))
  return flat, [(path, plan, jnp.float32) for path, plan in flat]


@pytest.mark.parametrize('chunk_leaves', [1, 2, 3, 100])
def test_chunked_draws_are_the_per_leaf_projections(monkeypatch, chunk_leaves):
  # Same-shaped projections are drawn in chunks of bounded bytes (so that not
  # every P of a model is alive at once); any chunking gives each leaf the
  # projection of its own key.
  like = {f'w{i}': jnp.zeros((8, 24)) for i in range(7)}
  like['v'] = jnp.zeros((24,))
  proj = flora_optax.Projector(4)
  flat, items = _items(like, proj)
  p_bytes = 4 * 24 * 4
  monkeypatch.setattr(_projection, 'DRAW_CHUNK_BYTES', chunk_leaves * p_bytes)
  key = jax.random.key(3)
  got = jax.jit(lambda k: _projection.draw_projections(items, k))(key)
  for (path, plan), g in zip(flat, got):
    if plan.dense:
      assert g is None
    else:
      np.testing.assert_array_equal(
          g, plan.projection(_keys.leaf_key(key, path), 'gaussian'),
          err_msg=str(path))


def test_chunks_are_bounded_and_cover_every_compressed_leaf(monkeypatch):
  like = {f'w{i}': jnp.zeros((8, 24)) for i in range(7)}
  like.update(u=jnp.zeros((16, 40)), v=jnp.zeros((24,)))
  _, items = _items(like, flora_optax.Projector(4))
  monkeypatch.setattr(_projection, 'DRAW_CHUNK_BYTES', 3 * 4 * 8 * 4)
  chunks = _projection._chunks(items)  # pylint: disable=protected-access
  assert sorted(i for c in chunks for i in c) == [
      i for i, (_, plan, _) in enumerate(items) if not plan.dense]
  for c in chunks:
    shapes = {items[i][1].p_shape for i in c}
    assert len(shapes) == 1
    (shape,) = shapes
    assert len(c) == 1 or len(c) * 4 * np.prod(shape) <= 3 * 4 * 8 * 4
  assert sorted(len(c) for c in chunks) == [1, 1, 3, 3]


def test_momentum_is_the_same_under_any_chunking(monkeypatch):
  # The update depends on the projections only, not on how they were drawn.
  params = {f'w{i}': jnp.full((8, 24), 0.1 * i) for i in range(5)}
  grads = jax.tree.map(lambda x: jnp.sin(x + 1.0), params)
  tx = flora_optax.compressed_momentum(4, resample_every=2)

  def run():
    state = tx.init(params)
    step = jax.jit(tx.update)
    outs = []
    for _ in range(3):
      out, state = step(grads, state)
      outs.append(out)
    return outs, state

  want = run()
  monkeypatch.setattr(_projection, 'DRAW_CHUNK_BYTES', 1)
  jax.clear_caches()
  got = run()
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_map_leaves_orders_loads_after_the_last_quantized_store(monkeypatch):
  # The loop every transformation runs on: per leaf, loads come after the
  # last quantized state stored (a float store in between does not reset
  # the order), and the results come back per output.
  from flora_optax import _engine, _quantization  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(_quantization, 'after',
                      lambda prev, q: calls.append((prev, q)) or q)
  monkeypatch.setattr(_quantization, 'chains_leaves', lambda: True)
  q = _quantization.make_quantizer(8, min_size=0)
  stored = [q.encode(jnp.full((4, 8), 1.0)), jnp.zeros((3,)),
            q.encode(jnp.full((4, 8), 2.0))]

  def step(order, k, s):
    x = order.load(s, jnp.float32)
    new = order.store(q.encode(x + 1) if k != 1 else x + 1)
    return x.sum(), new

  sums, news = _engine.map_leaves(step, stored, outputs=2)
  np.testing.assert_allclose(sums, [32.0, 0.0, 64.0])
  assert [_quantization.is_quantized(n) for n in news] == [True, False, True]
  # One chained load: leaf 2's, after leaf 0's new codes (leaf 1 is float).
  assert len(calls) == 1 and calls[0][0] is news[0]
  assert calls[0][1] is stored[2]
  assert _engine.map_leaves(step, [], outputs=2) == ([], [])
