"""Adam and AdamW with quantized moments: ``bits=None`` is optax's own, the
second moment's maps exclude zero, the quantized moments track exact Adam
within their maps' bounds, and the contract of quantized states holds (bytes,
one trace, checkpoints, sharding, NaN confined, clear errors)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _helpers
import flora_optax
from flora_optax import QuantizedArray
from flora_optax import _quantization
from flora_optax._quantization import Quantizer, make_quantizer

BITS = (8, 4)
NU_MAPS = _quantization.UNSIGNED_CODE_MAPS
SHAPES = {'w': (48, 96), 'v': (3, 16, 40), 'b': (7,)}
is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731


def _grads(seed, shapes=SHAPES):
  return _helpers.random_tree(seed, shapes)


def _run(tx, params, steps, grad=None):
  """``steps`` jitted updates with gradients ``grad(t)``; all outputs."""
  grad = grad or (lambda t: _grads(t + 1, {k: v.shape
                                           for k, v in params.items()}))
  step = jax.jit(tx.update)
  state, outs = tx.init(params), []
  for t in range(steps):
    u, state = step(grad(t), state, params)
    outs.append(u)
  return outs, state


# --- bits=None is optax ---------------------------------------------------------


@pytest.mark.parametrize('kwargs', [
    {},
    dict(b1=0.8, b2=0.95, eps=1e-6, eps_root=1e-9, weight_decay=0.1),
    dict(nesterov=True, mu_dtype=jnp.bfloat16),
    dict(mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
])
def test_bits_none_is_optax_adamw_bit_for_bit(kwargs):
  params = _grads(0)
  lr = optax.linear_schedule(1e-2, 1e-3, 5)
  ours, state = _run(flora_optax.adamw(lr, **kwargs), params, 4)
  ref, ref_state = _run(optax.adamw(lr, **kwargs), params, 4)
  chex.assert_trees_all_equal(ours, ref)
  chex.assert_trees_all_equal(state, ref_state)
  assert type(state[0]) is type(ref_state[0])  # optax's own state


@pytest.mark.parametrize('nesterov', [False, True])
def test_unquantized_leaves_follow_optax_math(nesterov):
  """With every leaf under ``min_quantized_size`` the quantized path's
  float math is optax's."""
  params = _grads(0)
  tx = flora_optax.adamw(1e-2, nesterov=nesterov, bits=8,
                         min_quantized_size=10**9)
  ours, state = _run(tx, params, 5)
  ref, ref_state = _run(optax.adamw(1e-2, nesterov=nesterov), params, 5)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(state[0].mu, ref_state[0].mu, rtol=1e-6)
  chex.assert_trees_all_close(state[0].nu, ref_state[0].nu, rtol=1e-6)


# --- the second moment's maps -----------------------------------------------------


def _nu_bound(q, u):
  """Bound on ``|decode(encode(x)) - x| / absmax`` at ``u = x / absmax`` for
  unsigned nearest rounding: half a step, or up to the smallest code."""
  return _helpers.code_bound(q, u)


def _m_bound(q, u):
  """The same for the signed first moment (any map)."""
  return _helpers.code_bound(q, u)


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('code_map', NU_MAPS)
def test_unsigned_round_trip_within_bound_and_never_zero(bits, code_map):
  q = Quantizer(bits, 32, code_map, False, 0, signed=False)
  # Six decades within each block: the small entries are what a map with a
  # zero code would lose.
  x = np.asarray(jax.random.uniform(jax.random.key(0), (6, 100))) * np.exp(
      np.linspace(-14, 0, 100))
  enc = q.encode(jnp.asarray(x))
  assert enc.codes.dtype == jnp.uint8
  dec = np.asarray(q.decode(enc, x.shape))
  amax = _helpers.blocks_absmax(x, 32)
  bound = _nu_bound(q, x / amax) * amax
  # (float32 arithmetic: up to 1e-6 of the block's absmax more)
  assert np.all(np.abs(dec - x) <= bound + 1e-6 * amax)
  assert np.max(np.abs(dec - x) / bound) > 0.3  # the bound is tight
  smallest = _quantization.code_values(code_map, bits, False)[0]
  assert np.all(dec >= smallest * amax * (1 - 1e-6))  # never zero
  # A zero block stays zero; every 4-bit code is one nibble.
  zero = q.encode(jnp.zeros((2, 64)))
  assert np.all(np.asarray(q.decode(zero, (2, 64))) == 0)
  if bits == 4:
    assert enc.codes.shape == (6, 50)


def test_a_map_without_zero_keeps_adam_steps_bounded():
  """One large entry sets its block's scale; Adam's step of the tiny entries
  next to it stays bounded (decoded as zero, ``m / (0 + eps)`` would be
  ~1e5 times larger)."""
  g = jnp.full((1, 256), 1e-5).at[0, 0].set(1e3)
  tx = flora_optax.scale_by_adam(bits=4, min_quantized_size=0)
  state = tx.init({'w': g})
  for _ in range(3):
    u, state = jax.jit(tx.update)({'w': g}, state)
  assert bool(jnp.all(jnp.isfinite(u['w'])))
  assert float(jnp.abs(u['w']).max()) <= 1.0 + 1e-5  # |m̂ / sqrt(v̂)| <= 1
  # The same second moment in signed linear codes (a zero code) decodes
  # the tiny entries of the large entry's block to 0: their next step would
  # be m / eps.
  signed = make_quantizer(4, 64)
  v = np.asarray(signed.decode(signed.encode(g * g), g.shape))
  assert np.all(v[0, 1:64] == 0)


# --- tracking exact Adam ---------------------------------------------------------


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('nu_map', NU_MAPS)
def test_quantized_moments_track_exact_adam_within_their_bounds(bits, nu_map):
  b1, b2, eps, block, steps = 0.9, 0.99, 1e-8, 32, 45
  tx = flora_optax.scale_by_adam(b1, b2, eps, bits=bits, nu_code_map=nu_map,
                                 block_size=block, min_quantized_size=0)
  mq = make_quantizer(bits, block, min_size=0)
  nq = make_quantizer(bits, block, nu_map, min_size=0, signed=False)
  shape = (16, 64)
  scale = np.exp(np.linspace(-3, 3, shape[1]))  # scales differ along blocks
  state = tx.init({'w': jnp.zeros(shape)})
  step = jax.jit(tx.update)
  m_ref = v_ref = np.zeros(shape)
  m_err = v_err = np.zeros(shape)  # accumulated bounds of the drift
  for t in range(1, steps + 1):
    g = np.asarray(jax.random.normal(jax.random.key(t), shape)) * scale
    m_prev = np.asarray(mq.decode(state.mu['w'], shape), np.float64)
    v_prev = np.asarray(nq.decode(state.nu['w'], shape), np.float64)
    u, state = step({'w': jnp.asarray(g, jnp.float32)}, state)
    # The update is exact Adam from the decoded state and this gradient.
    m_new = (1 - b1) * g + b1 * m_prev
    v_new = (1 - b2) * g * g + b2 * v_prev
    want = (m_new / (1 - b1**t)) / (np.sqrt(v_new / (1 - b2**t)) + eps)
    np.testing.assert_allclose(u['w'], want, rtol=2e-4, atol=1e-6)
    # The stored moments are those moments within their maps' bounds.
    for q, new, stored, bound in ((mq, m_new, state.mu, _m_bound),
                                  (nq, v_new, state.nu, _nu_bound)):
      amax = _helpers.blocks_absmax(new, block)
      dec = np.asarray(q.decode(stored['w'], shape))
      # (float32 arithmetic: up to 1e-6 of the block's absmax more)
      assert np.all(np.abs(dec - new) <=
                    (bound(q, np.abs(new) / amax) + 1e-6) * amax)
    # The drift from exact Adam is bounded by the decayed sum of the bounds.
    m_ref = (1 - b1) * g + b1 * m_ref
    v_ref = (1 - b2) * g * g + b2 * v_ref
    m_amax = _helpers.blocks_absmax(m_new, block)
    v_amax = _helpers.blocks_absmax(v_new, block)
    m_err = b1 * m_err + (_m_bound(mq, m_new / m_amax) + 1e-6) * m_amax
    v_err = b2 * v_err + (_nu_bound(nq, v_new / v_amax) + 1e-6) * v_amax
    m_dec = np.asarray(mq.decode(state.mu['w'], shape))
    v_dec = np.asarray(nq.decode(state.nu['w'], shape))
    assert np.all(np.abs(m_dec - m_ref) <= m_err)
    assert np.all(np.abs(v_dec - v_ref) <= v_err)
  # 8 bits stay close to exact Adam's update after the whole run (measured
  # 4-5% with the sqrt map, 7% with the linear one, on gradients whose
  # scale varies 20x within a block; 4 bits: 50-65%, bounded above).
  exact = (m_ref / (1 - b1**steps)) / (np.sqrt(v_ref / (1 - b2**steps)) + eps)
  rel = np.abs(np.asarray(u['w']) - exact).mean() / np.abs(exact).mean()
  assert rel < (0.1 if bits == 8 else 1.0), rel


# --- quantized states' contract ---------------------------------------------------


@pytest.mark.parametrize('bits,limit', [(8, 0.26), (4, 0.145)])
def test_state_bytes_packed_and_against_optax(bits, limit):
  params = {'w': jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
  state = jax.eval_shape(flora_optax.adamw(1e-3, bits=bits).init, params)[0]
  q = make_quantizer(bits)
  for moment in (state.mu['w'], state.nu['w']):
    assert moment.codes.shape == ((768, 3072) if bits == 8 else (768, 1536))
    assert sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(moment)) == q.nbytes(
        (768, 3072))
  ref = jax.eval_shape(optax.adamw(1e-3).init, params)
  nbytes = lambda s: sum(x.size * x.dtype.itemsize  # noqa: E731
                         for x in jax.tree.leaves(s))
  assert nbytes(state) / nbytes(ref) <= limit


@pytest.mark.parametrize('bits', BITS)
def test_one_trace_stable_types_and_small_leaves_float(bits):
  traces = []
  tx = flora_optax.adamw(1e-2, bits=bits, min_quantized_size=100)

  def update(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  params = _grads(0)
  state = tx.init(params)
  assert is_q(state[0].mu['w']) and is_q(state[0].nu['v'])
  assert state[0].mu['b'].dtype == state[0].nu['b'].dtype == jnp.float32
  step = jax.jit(update)
  for t in range(3):
    _, new = step(_grads(t + 1), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    state = new
  assert len(traces) == 1


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_params_get_updates_in_their_dtype(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _grads(0))
  tx = flora_optax.adamw(1e-2, bits=8, min_quantized_size=0)
  u, state = tx.update(params, tx.init(params), params)
  assert all(x.dtype == dtype for x in jax.tree.leaves(u))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert state[0].mu['w'].scales.dtype == jnp.float32


def test_zero_gradients_give_zero_updates_and_a_zero_state():
  params = _grads(0)
  tx = flora_optax.scale_by_adam(bits=4, min_quantized_size=0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, state = tx.update(zeros, tx.init(params))
  u, state = tx.update(zeros, state)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  for x in jax.tree.leaves((state.mu, state.nu)):
    assert int(jnp.abs(x.astype(jnp.float32)).max()) == 0


def test_a_nan_gradient_poisons_only_its_block_of_each_moment():
  params = {'w': jnp.ones((4, 64)), 'x': jnp.ones((4, 64))}
  tx = flora_optax.scale_by_adam(bits=8, block_size=16, min_quantized_size=0)
  g = {'w': jnp.ones((4, 64)).at[1, 20].set(jnp.nan), 'x': jnp.ones((4, 64))}
  _, state = tx.update(g, tx.init(params))
  for moment in (state.mu, state.nu):
    scales = np.asarray(moment['w'].scales)
    assert not np.isfinite(scales[1, 1]) and np.isfinite(np.delete(
        scales.ravel(), 1 * 4 + 1)).all()
    assert np.isfinite(np.asarray(moment['x'].scales)).all()


def test_apply_if_finite_leaves_the_state_bit_identical():
  tx = optax.apply_if_finite(flora_optax.adamw(1e-2, bits=4,
                                               min_quantized_size=0), 3)
  params = _grads(0)
  state = tx.init(params)
  _, state = tx.update(_grads(1), state, params)
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), _grads(2))
  u, skipped = tx.update(bad, state, params)
  chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))


def test_inject_hyperparams_with_bits_static():
  opt = optax.inject_hyperparams(flora_optax.adamw, static_args=('bits',))(
      learning_rate=1e-2, b1=0.8, bits=8, weight_decay=0.0)
  params = _grads(0)
  u, _ = jax.jit(opt.update)(params, opt.init(params), params)
  plain = flora_optax.adamw(1e-2, b1=0.8, bits=8, weight_decay=0.0)
  pu, _ = plain.update(params, plain.init(params), params)
  # Injected hyperparameters are float32 arrays (1 - b2 is 5e-5 off in
  # float32), not Python floats: as with optax.adamw itself.
  chex.assert_trees_all_close(u, pu, rtol=1e-4)


@pytest.mark.parametrize('bits', BITS)
def test_checkpoint_round_trips_continue_bit_identically(bits, tmp_path):
  serialization = pytest.importorskip('flax.serialization')
  ocp = pytest.importorskip('orbax.checkpoint')
  tx = flora_optax.adamw(1e-2, bits=bits, min_quantized_size=0,
                         stochastic_rounding=True, key=3)
  params = _grads(0)
  _, state = _run(tx, params, 3)
  restored = serialization.from_bytes(tx.init(params),
                                      serialization.to_bytes(state))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', state)
    ckptr.wait_until_finished()
    from_orbax = ckptr.restore(tmp_path / 'ckpt',
                               jax.eval_shape(tx.init, params))
  step = jax.jit(tx.update)
  want, _ = step(_grads(9), state, params)
  for other in (restored, from_orbax):
    chex.assert_trees_all_equal(other, state)
    got, _ = step(_grads(9), other, params)
    chex.assert_trees_all_equal(got, want)


def test_stochastic_rounding_depends_on_the_key_and_is_deterministic():
  params = _grads(0)
  make = lambda key: flora_optax.scale_by_adam(  # noqa: E731
      bits=4, min_quantized_size=0, stochastic_rounding=True, key=key)
  _, a = _run(make(1), params, 2)
  _, b = _run(make(1), params, 2)
  _, c = _run(make(2), params, 2)
  chex.assert_trees_all_equal(a, b)
  assert np.any(np.asarray(a.nu['w'].codes) != np.asarray(c.nu['w'].codes))


def test_sharded_equals_unsharded_without_gathering():
  """Blocks of 8 along the last axis: every shard holds whole blocks."""
  shapes = {'w': (32, 64), 'v': (64, 32), 'b': (32,)}
  specs = {'w': P('data', 'model'), 'v': P('model', 'data'), 'b': P('model')}
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = flora_optax.adamw(1e-2, bits=4, block_size=8, min_quantized_size=0)
  params = _helpers.random_tree(0, shapes)
  grads = [_helpers.random_tree(s, shapes) for s in (1, 2)]
  ref = _run(tx, params, 2, lambda t: grads[t])
  state_sh = flora_optax.state_shardings(tx, params, sh)
  init = jax.jit(tx.init, in_shardings=(sh,), out_shardings=state_sh)
  step = jax.jit(tx.update, in_shardings=(sh, state_sh, sh),
                 out_shardings=(sh, state_sh))
  p = jax.device_put(params, sh)
  state = init(p)
  for t, g in enumerate(grads):
    args = (jax.device_put(g, sh), state, p)
    if t == 0:
      hlo = step.lower(*args).compile().as_text()
      assert 'all-gather' not in hlo and 'all-to-all' not in hlo
    u, state = step(*args)
  chex.assert_trees_all_close(u, ref[0][-1], rtol=1e-5, atol=1e-7)
  codes = [np.asarray(x.codes) for x in jax.tree.leaves(
      (state[0], ref[1][0]), is_leaf=is_q) if is_q(x)]
  half = len(codes) // 2
  for a, b in zip(codes[:half], codes[half:]):
    nibbles = [np.stack([c & 15, c >> 4]).astype(int) for c in (a, b)]
    assert np.abs(nibbles[0] - nibbles[1]).max() <= 1
  assert state[0].mu['w'].codes.sharding.spec == P('data', 'model')


def test_nnx_optimizer_and_linen_train_state():
  nnx = pytest.importorskip('flax.nnx')
  train_state = pytest.importorskip('flax.training.train_state')
  model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, flora_optax.adamw(1e-2, bits=8), wrt=nnx.Param)
  x = jnp.ones((4, 64))
  grads = nnx.grad(lambda m: jnp.mean(m(x)**2))(model)
  before = np.asarray(model.kernel.get_value())
  opt.update(model, grads)
  assert not np.allclose(before, np.asarray(model.kernel.get_value()))
  params = {'w': jnp.ones((64, 128))}
  ts = train_state.TrainState.create(apply_fn=None, params=params,
                                     tx=flora_optax.adamw(1e-2, bits=4))
  ts = ts.apply_gradients(grads=params)
  assert is_q(ts.opt_state[0].mu['w'])


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(bits=True), TypeError, '`bits`'),
    (dict(bits=2), ValueError, '`bits`'),
    (dict(bits='8'), TypeError, '`bits`'),
    (dict(bits=8.0), TypeError, '`bits`'),
    (dict(bits=8, nu_code_map='normal'), ValueError, 'nu_code_map'),
    (dict(bits=8, block_size=0), ValueError, 'block_size'),
    (dict(block_size=64), ValueError, 'block_size'),
    (dict(stochastic_rounding=True), ValueError, 'stochastic_rounding'),
    (dict(b1=1.0), ValueError, '`b1`'),
    (dict(b2=-0.1), ValueError, '`b2`'),
    (dict(eps=-1e-8), ValueError, '`eps`'),
    (dict(eps_root='0'), TypeError, '`eps_root`'),
    (dict(mu_dtype=jnp.int8), TypeError, 'mu_dtype'),
    (dict(bits=8, nesterov=1), TypeError, 'nesterov'),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    flora_optax.adamw(1e-3, **kwargs)


@pytest.mark.parametrize('make', [
    lambda: flora_optax.adamw(1e-2, bits=8, min_quantized_size=0),
    lambda: flora_optax.flora(1e-2, None, bits=4, min_quantized_size=0),
    lambda: flora_optax.MultiSteps(optax.adam(1e-2), 2, rank=None, bits=8,
                                   min_quantized_size=0),
], ids=['adamw8', 'flora4', 'multisteps8'])
def test_leaves_chained_one_at_a_time_give_the_same_bits(make, monkeypatch):
  """With one device the leaves are decoded one after another (a scalar
  dependency on the previous leaf's scales); the values are exactly those of
  the unchained program that runs here on 8 devices."""
  from flora_optax import _quantization  # pylint: disable=g-import-not-at-top
  params = _grads(0)
  ref = _run(make(), params, 3)
  assert not _quantization.chains_leaves()  # 8 devices (conftest)
  monkeypatch.setattr(_quantization, 'chains_leaves', lambda: True)
  tx = make()
  text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
  assert text.count('is_finite') >= 2  # the chain is in the program
  chex.assert_trees_all_equal(_run(tx, params, 3), ref)


def test_x64_keeps_float32_leaves_float32():
  with jax.enable_x64(True):
    tx = flora_optax.scale_by_adam(bits=4, min_quantized_size=0)
    params = {'w': jnp.ones((8, 32), jnp.float32),
              'd': jnp.ones((8, 32), jnp.float64)}
    u, state = jax.jit(tx.update)(params, tx.init(params))
    assert u['w'].dtype == jnp.float32 and u['d'].dtype == jnp.float64
    assert state.mu['d'].scales.dtype == jnp.float32
    # A constant gradient's first Adam step is 1 (m̂ / sqrt(v̂)), to the
    # codes' precision.
    np.testing.assert_allclose(u['d'], 1.0, rtol=0.02)
