"""Bad input gives a clear error at build, init or trace time, never garbage.

Every test whose purpose is to check an argument or a tree lives here, so that
each rule is stated once. An error must be a ``ValueError``/``TypeError`` that
names the argument (or the leaf's path) and what is accepted; the message
patterns below are part of that contract.

* Arguments several builders share (``rank``, ``projection``, ``side``,
  ``dimension_numbers``, ``key``, ``resample_every``, ``decay``/``momentum``,
  the momentum dtype): property-based (hypothesis) over every builder that
  takes them.
* One table per public entry point (``Projector``, ``compressed_momentum``,
  ``flora``, ``optax.inject_hyperparams`` around them, ``MultiSteps``,
  ``accumulate_gradients``, ``cycle_key``, ``state_shardings``), one row per
  rule: ``(callable, kwargs, error type, message regex)``.
* Random trees (hypothesis): every valid tree, zero-size axes included,
  initialises and updates with the shapes and dtypes it was given; every
  invalid leaf is named.
* Updates that do not match the params given to ``init``.
"""

import re

import _helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flora_optax
from flora_optax import DimensionNumbers

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
FEW = settings(max_examples=5, deadline=None, derandomize=True)


def _multisteps(rank, **kw):
  return flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2, rank=rank,
                                **kw)


# Every public builder that takes the projection arguments.
BUILDERS = {
    'Projector': lambda rank, **kw: flora_optax.Projector(rank, **kw),
    'compressed_momentum': flora_optax.compressed_momentum,
    'flora': lambda rank, **kw: flora_optax.flora(0.1, rank, **kw),
    'MultiSteps': _multisteps,
}


def _raises(exc, *names):
  """pytest.raises whose message must mention every name in ``names``."""
  return pytest.raises(exc, match='(?s)' + ''.join(
      f'(?=.*{re.escape(n)})' for n in names))


# --- build-time arguments shared by several builders --------------------------
#
# The @examples pin the values the former per-module tables checked.


@pytest.mark.parametrize('builder', BUILDERS)
@given(rank=st.integers(max_value=0))
@example(rank=0)
@example(rank=-3)
@FEW
def test_nonpositive_rank(builder, rank):
  with _raises(ValueError, '`rank`', 'positive'):
    BUILDERS[builder](rank)


@pytest.mark.parametrize('builder', BUILDERS)
@given(rank=st.one_of(
    st.floats(allow_nan=True), st.text(max_size=3), st.booleans(),
    st.integers(1, 9).map(jnp.asarray), st.integers(1, 9).map(np.asarray)))
@example(rank=1.5)
@example(rank=2.0)
@example(rank=True)
@FEW
def test_non_integer_rank(builder, rank):
  with _raises(TypeError, '`rank`', 'int'):
    BUILDERS[builder](rank)


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora'])
@given(value=st.one_of(st.integers(max_value=0), st.integers(min_value=2**31)))
@example(value=0)
@example(value=-1)
@FEW
def test_resample_every_out_of_range(builder, value):
  with _raises(ValueError, '`resample_every`', 'positive int', 'None'):
    BUILDERS[builder](4, resample_every=value)


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora'])
@given(value=st.one_of(st.floats(), st.text(max_size=2), st.booleans()))
@example(value=2.5)
@FEW
def test_resample_every_not_an_int(builder, value):
  with _raises(TypeError, '`resample_every`', 'positive int'):
    BUILDERS[builder](4, resample_every=value)


@given(decay=st.one_of(
    st.floats(max_value=0, exclude_max=True),
    st.floats(min_value=1), st.just(float('nan'))))
@example(decay=-0.1)
@example(decay=1.5)
@SETTINGS
def test_decay_outside_unit_interval(decay):
  with _raises(ValueError, '`decay`', '[0, 1)'):
    flora_optax.compressed_momentum(4, decay=decay)
  # flora names its own argument.
  with _raises(ValueError, '`momentum`', '[0, 1)'):
    flora_optax.flora(0.1, 4, momentum=decay)


def test_decay_accepts_the_closed_lower_end():
  flora_optax.compressed_momentum(4, decay=0.0)
  with _raises(ValueError, '`decay`'):
    flora_optax.compressed_momentum(4, decay=1.0)
  with _raises(ValueError, '`decay`', 'scalar'):
    flora_optax.compressed_momentum(4, decay=jnp.array([0.5, 0.5]))
  with _raises(TypeError, '`decay`'):
    flora_optax.compressed_momentum(4, decay='0.9')


@pytest.mark.parametrize('builder', BUILDERS)
@pytest.mark.parametrize('arg,accepted', [
    ('projection', "'gaussian', 'rademacher', 'orthogonal'"),
    ('side', "'smaller', 'larger'"),
])
@given(value=st.one_of(st.text(max_size=12), st.none(), st.integers()))
@example(value='svd')
@example(value='normal')
@example(value='left')
@example(value='both')
@FEW
def test_unknown_choice(builder, arg, accepted, value):
  if value in ('gaussian', 'rademacher', 'orthogonal', 'smaller', 'larger'):
    return
  with _raises(ValueError, f'`{arg}`', accepted):
    BUILDERS[builder](4, **{arg: value})


@pytest.mark.parametrize('builder', BUILDERS)
@pytest.mark.parametrize('dn', [
    DimensionNumbers((), 1),
    DimensionNumbers(0.5, 1),
    DimensionNumbers(0, (True,)),
    DimensionNumbers(0, 'x'),  # a string is a Sequence, of non-ints
    'rows',
    {'w': 3},
])
def test_malformed_dimension_numbers(builder, dn):
  with _raises(TypeError, '`dimension_numbers`'):
    BUILDERS[builder](4, dimension_numbers=dn)


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora',
                                     'MultiSteps'])
@pytest.mark.parametrize('key', [1.5, 'seed', True,
                                 np.zeros((3,), np.uint32)])
def test_bad_key(builder, key):
  with pytest.raises((TypeError, ValueError), match='`key`'):
    BUILDERS[builder](4, key=key)


# Builders of quantized states: every one that takes ``bits``.
QUANTIZED_BUILDERS = {
    'compressed_momentum': flora_optax.compressed_momentum,
    'flora': lambda rank, **kw: flora_optax.flora(0.1, rank, **kw),
    'MultiSteps': _multisteps,
    'accumulate_gradients': lambda rank, **kw: flora_optax.accumulate_gradients(
        lambda p, b: p, {'w': jnp.zeros((4, 4))}, jnp.ones((2, 3)),
        projector=flora_optax.Projector(rank), step=0, **kw),
}


@pytest.mark.parametrize('builder', QUANTIZED_BUILDERS)
@given(bits=st.one_of(st.integers(), st.booleans(), st.floats(),
                      st.text(max_size=2), st.integers(1, 9).map(np.asarray))
       .filter(lambda b: not (isinstance(b, int) and not isinstance(b, bool)
                              and b in (4, 8))))
@example(bits=True)
@example(bits=8.0)
@example(bits='8')
@example(bits=2)
@example(bits=16)
@FEW
def test_bad_bits(builder, bits):
  exc = (ValueError if isinstance(bits, int) and not isinstance(bits, bool)
         else TypeError)
  with _raises(exc, '`bits`', 'None, 8 or 4'):
    QUANTIZED_BUILDERS[builder](2, bits=bits)


@pytest.mark.parametrize('builder', QUANTIZED_BUILDERS)
@pytest.mark.parametrize('kwargs,exc,names', [
    (dict(bits=8, block_size=0), ValueError, ('`block_size`', '>= 1')),
    (dict(bits=4, block_size=1.5), TypeError, ('`block_size`', 'int')),
    (dict(bits=8, block_size=jnp.asarray(64)), TypeError,
     ('`block_size`', 'static_args')),
    (dict(bits=8, min_quantized_size=-1), ValueError,
     ('`min_quantized_size`', '>= 0')),
    (dict(bits=8, code_map='bogus'), ValueError,
     ('`code_map`', "'linear'", "'sqrt'")),
    (dict(bits=8, stochastic_rounding='yes'), TypeError,
     ('`stochastic_rounding`', 'bool')),
    (dict(block_size=64), ValueError, ('`block_size`', '`bits`')),
    (dict(code_map='linear'), ValueError, ('`code_map`', '`bits`')),
    (dict(min_quantized_size=0), ValueError, ('`min_quantized_size`',
                                              '`bits`')),
], ids=['block-zero', 'block-float', 'block-array', 'min-size-negative',
        'code-map', 'rounding', 'block-without-bits', 'map-without-bits',
        'min-size-without-bits'])
def test_bad_quantization_keywords(builder, kwargs, exc, names):
  with _raises(exc, *names):
    QUANTIZED_BUILDERS[builder](2, **kwargs)


@pytest.mark.parametrize('builder', BUILDERS)
def test_rank_none_compresses_no_leaf(builder):
  # ``rank=None``: no projection (a full-rank state, quantized with bits).
  tx = BUILDERS[builder](None)
  params = {'w': jnp.ones((64, 64)), 'b': jnp.ones((3,))}
  if builder == 'Projector':
    assert all(pl.dense for pl in jax.tree.leaves(
        tx.plan(params), is_leaf=lambda x: hasattr(x, 'dense')))
    return
  state = tx.init(params)
  mu = optax.tree.get(state, 'mu') if builder != 'MultiSteps' else (
      state.acc_grads)
  assert mu['w'].shape == (64, 64)


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora'])
def test_non_floating_momentum_dtype(builder):
  arg = 'accumulator_dtype' if builder == 'compressed_momentum' else (
      'dtype_momentum')
  for dtype in (jnp.int32, 'not-a-dtype', jnp.bool_):
    with _raises(TypeError, f'`{arg}`', 'floating'):
      BUILDERS[builder](4, **{arg: dtype})


def test_nesterov_must_be_bool():
  with _raises(TypeError, '`nesterov`', 'bool'):
    flora_optax.compressed_momentum(4, nesterov=1)


@given(k=st.integers(max_value=0))
@example(k=0)
@FEW
def test_every_k_nonpositive(k):
  with _raises(ValueError, '`every_k_schedule`', 'positive'):
    flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k, rank=4)


@given(k=st.one_of(st.floats(), st.text(max_size=2), st.booleans(),
                   st.none()))
@example(k=2.5)
@example(k=True)
@FEW
def test_every_k_not_an_int(k):
  with _raises(TypeError, '`every_k_schedule`', 'positive int'):
    flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k, rank=4)


# --- one table per public entry point -----------------------------------------
#
# Each row: (callable, kwargs, error type, message regex). Rules the
# hypothesis tests above already cover for every builder are not repeated.


def _plan(like, **kw):
  return flora_optax.Projector(**kw).plan(like)


def _momentum_init(params, **kw):
  return flora_optax.compressed_momentum(**kw).init(params)


def _flora(**kw):
  return flora_optax.flora(**{'learning_rate': 1e-3, 'rank': 8, **kw})


def _build_multisteps(**kw):
  args = dict(opt=optax.sgd(0.1), every_k_schedule=2, rank=4)
  args.update(kw)
  return flora_optax.MultiSteps(args.pop('opt'), args.pop('every_k_schedule'),
                                **args)


def _multisteps_init(params, **kw):
  return _build_multisteps(**kw).init(params)


_INT64 = {'w': np.ones((4, 4), np.int64)}


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    pytest.param(flora_optax.Projector, dict(rank=jnp.asarray(4)), TypeError,
                 'static_args', id='rank-array'),
    pytest.param(_plan, dict(rank=lambda p, x: 2.5,
                             like={'a': jnp.zeros((8, 50))}),
                 TypeError, r'rank.*callable returned 2.5',
                 id='rank-callable-returns-a-float'),
    pytest.param(_plan, dict(rank=2, like=_INT64), TypeError, 'dtype int64',
                 id='int64-leaf'),
    pytest.param(_plan, dict(rank=2, like=(jnp.ones((4, 6)),),
                             dimension_numbers=[DimensionNumbers(0, 1)]),
                 ValueError, r'`dimension_numbers`.*structure.*same paths but '
                 r'different containers', id='dimension-numbers-container'),
])
def test_projector_rejects(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    pytest.param(flora_optax.compressed_momentum,
                 dict(rank=4, transfer='magic'), ValueError, 'transfer',
                 id='transfer'),
    pytest.param(flora_optax.compressed_momentum,
                 dict(rank=4, residual='yes'), TypeError, 'residual',
                 id='residual-not-a-bool'),
    pytest.param(flora_optax.compressed_momentum,
                 dict(rank=4, resample_every=jnp.array([1, 2])), ValueError,
                 r'`resample_every` must be a scalar, got shape \(2,\)',
                 id='resample-every-not-a-scalar'),
    pytest.param(flora_optax.compressed_momentum,
                 dict(rank=4, resample_every=jnp.asarray(2.5)), TypeError,
                 '`resample_every` must be a positive int',
                 id='resample-every-fractional-array'),
    pytest.param(flora_optax.compressed_momentum,
                 dict(rank=4, accumulator_dtype=jnp.zeros((), jnp.bfloat16)),
                 TypeError, r"(?s)`accumulator_dtype` must be a dtype, got an "
                 r"array.*'bfloat16'.*static_args",
                 id='accumulator-dtype-array'),
    pytest.param(_momentum_init, dict(rank=2, params=_INT64), TypeError,
                 r"Leaf \['w'\] has dtype int64", id='int64-leaf'),
])
def test_compressed_momentum_rejects(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    pytest.param(_flora, dict(transfer='x'), ValueError,
                 r"`transfer` must be one of \['unbiased', 'projected', "
                 r"'reset'\]", id='transfer'),
    *[pytest.param(_flora, dict(min_dim_size_to_factor=bad), TypeError,
                   'min_dim_size_to_factor', id=f'min-dim-size-to-factor-{i}')
      for i, bad in enumerate((4.5, 'big', jnp.ones(2, jnp.int32)))],
    pytest.param(_flora, dict(min_dim_size_to_factor=True), TypeError,
                 '`min_dim_size_to_factor` must be an int or None',
                 id='min-dim-size-to-factor-bool'),
])
def test_flora_rejects(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


@pytest.mark.parametrize('momentum', [0.9, None])
@pytest.mark.parametrize('params, path, kind', [
    ({'w': 1.0}, "['w']", 'no dtype (a Python float, not an array)'),
    ({'w': [[1.0, 2.0], [3.0, 4.0]]}, r"['w'][0][0]", 'a Python float'),
    ({'w': jnp.ones((4, 4)), 'n': 3}, "['n']", 'a Python int'),
    ({'w': np.ones((4, 4), np.int64)}, "['w']", 'dtype int64'),
    ({'w': np.ones((4, 4), np.complex64)}, "['w']", 'dtype complex64'),
])
def test_flora_names_a_bad_leaf(params, path, kind, momentum):
  # With and without momentum: Adafactor's parts would fail inside optax.
  tx = flora_optax.flora(1e-2, 2, momentum=momentum)
  with pytest.raises(TypeError) as info:
    tx.init(params)
  assert f'Leaf {path} has' in str(info.value)
  assert kind in str(info.value)


# optax.inject_hyperparams turns every argument not in static_args into an
# array (a callable into a schedule): arguments that set state shapes or
# dtypes must then say how to pass them.
_INJECT_KW = dict(rank=3, resample_every=2, min_dim_size_to_factor=4)
_INJECT_PARAMS = {'w': jnp.ones((12, 8)), 'b': jnp.ones((8,))}


def _injected_init(fn, static_args, *args, jit=False, **kw):
  tx = optax.inject_hyperparams(fn, static_args=static_args)(*args, **kw)
  return (jax.jit(tx.init) if jit else tx.init)(_INJECT_PARAMS)


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    *[pytest.param(_injected_init, dict(
        fn=flora_optax.flora, static_args=static, args=(1e-2,), kw=_INJECT_KW),
                   TypeError, r'static_args=\(.rank.',
                   id=f'flora-rank-not-static-{i}')
      for i, static in enumerate([(), ('min_dim_size_to_factor',)])],
    pytest.param(_injected_init, dict(
        fn=flora_optax.flora, static_args=('rank',), args=(1e-2,),
        kw=_INJECT_KW, jit=True), TypeError,
                 'min_dim_size_to_factor.*static_args',
                 id='flora-min-dim-size-to-factor-traced'),
    pytest.param(_injected_init, dict(
        fn=flora_optax.flora,
        static_args=('rank', 'min_dim_size_to_factor'), args=(1e-2,),
        kw=dict(dtype_momentum=jnp.bfloat16, **_INJECT_KW)), TypeError,
                 'dtype_momentum', id='flora-dtype-momentum-callable'),
    pytest.param(_injected_init, dict(
        fn=flora_optax.compressed_momentum, static_args='rank', args=(3,),
        kw=dict(accumulator_dtype=jnp.bfloat16)), TypeError,
                 'accumulator_dtype',
                 id='momentum-accumulator-dtype-callable'),
])
def test_inject_hyperparams_rejects(fn, kwargs, exc, match):
  kwargs = dict(kwargs)
  args, kw = kwargs.pop('args'), kwargs.pop('kw')
  with pytest.raises(exc, match=match):
    fn(kwargs.pop('fn'), kwargs.pop('static_args'), *args, **kwargs, **kw)


def _skip_returns_a_vector(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.zeros(3), ()


def _multisteps_update(updates, params=None, init_params=None, **kw):
  tx = _build_multisteps(**kw)
  state = tx.init(init_params)
  return tx.update(updates, state, params)


_MS_PARAMS = {'w': jnp.zeros((16, 32)), 'b': jnp.zeros((32,))}
_MS_WIDER = {'w': jnp.zeros((16, 33)), 'b': jnp.zeros((32,))}


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    pytest.param(_build_multisteps, dict(opt='sgd'), TypeError, '`opt`',
                 id='opt'),
    pytest.param(_build_multisteps, dict(use_grad_mean='yes'), TypeError,
                 '`use_grad_mean`', id='use-grad-mean'),
    pytest.param(_build_multisteps, dict(should_skip_update_fn=3), TypeError,
                 '`should_skip_update_fn`', id='should-skip-update-fn'),
    pytest.param(_build_multisteps, dict(accumulator_dtype=jnp.int32),
                 TypeError, '`accumulator_dtype`', id='accumulator-dtype'),
    pytest.param(_multisteps_init, dict(rank=2, params=_INT64), TypeError,
                 r"Leaf \['w'\] has dtype int64", id='int64-leaf'),
    # At trace time.
    pytest.param(_multisteps_update, dict(
        rank=2, should_skip_update_fn=_skip_returns_a_vector,
        updates={'w': jnp.zeros((4, 4))}, params={'w': jnp.zeros((4, 4))},
        init_params={'w': jnp.zeros((4, 4))}), ValueError, 'boolean scalar',
                 id='skip-fn-returns-no-bool-scalar'),
    pytest.param(_multisteps_update, dict(
        updates={'w': _MS_PARAMS['w']}, init_params=_MS_PARAMS), ValueError,
                 r"leaves missing: \['b'\]", id='update-lacks-a-leaf'),
    pytest.param(_multisteps_update, dict(
        updates={'w': _MS_PARAMS['w'], 'b': jnp.zeros((31,))},
        init_params=_MS_PARAMS), ValueError, r"\['b'\].*\(31,\)",
                 id='update-leaf-shape'),
    # A change of the compressed axis alone is caught through params.
    pytest.param(_multisteps_update, dict(
        updates=_MS_WIDER, params=_MS_WIDER, init_params=_MS_PARAMS),
                 ValueError, r"\['w'\]", id='update-compressed-axis-shape'),
])
def test_multisteps_rejects(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


def _accumulate(grad_fn=lambda p, b: p, micro_batches=None, **kw):
  args = dict(projector=flora_optax.Projector(2), step=0)
  args.update(kw)
  if micro_batches is None:
    micro_batches = jnp.ones((2, 3))
  return flora_optax.accumulate_gradients(grad_fn, {'w': jnp.zeros((4, 4))},
                                          micro_batches, **args)


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    pytest.param(_accumulate, dict(projector=2), TypeError, '`projector`',
                 id='projector'),
    pytest.param(_accumulate, dict(micro_batches={
        'x': jnp.ones((2, 3)), 'y': jnp.ones((3, 3))}), ValueError,
                 '`micro_batches`', id='micro-batches-sizes-differ'),
    pytest.param(_accumulate, dict(micro_batches=jnp.ones(())), ValueError,
                 '`micro_batches`', id='micro-batches-scalar'),
    pytest.param(_accumulate, dict(micro_batches={}), ValueError,
                 '`micro_batches` must be a non-empty pytree',
                 id='micro-batches-no-leaves'),
    pytest.param(_accumulate, dict(micro_batches=jnp.ones((0, 3))),
                 ValueError, r'`micro_batches`.*size >= 1.*\{0\}',
                 id='micro-batches-empty-axis'),
    pytest.param(_accumulate, dict(grad_fn=None), TypeError, '`grad_fn`',
                 id='grad-fn'),
    pytest.param(_accumulate, dict(use_grad_mean=1), TypeError,
                 '`use_grad_mean` must be a bool', id='use-grad-mean'),
    pytest.param(_accumulate, dict(accumulator_dtype=jnp.int32), TypeError,
                 '`accumulator_dtype` must be a floating dtype',
                 id='accumulator-dtype'),
    pytest.param(_accumulate, dict(key='k'), TypeError,
                 '`key` must be an int seed, a typed key', id='key'),
])
def test_accumulate_gradients_rejects(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


# Keys: see also test_bad_key (every builder) above.
@pytest.mark.parametrize('fn, kwargs, exc, match', [
    # Raw key data of another implementation: a typed key is the way.
    pytest.param(_build_multisteps, dict(key=jax.random.key_data(
        jax.random.key(0, impl='rbg'))), ValueError, 'wrap_key_data',
                 id='multisteps-raw-rbg-key-data'),
    pytest.param(_build_multisteps, dict(key=jax.random.split(
        jax.random.key(0))), ValueError, 'single typed key',
                 id='multisteps-key-array'),
    pytest.param(flora_optax.cycle_key, dict(key=0, cycle=0, purpose='mom'),
                 ValueError, r"`purpose` must be one of \['momentum', "
                 r"'accumulation', 'momentum_rounding', "
                 r"'accumulation_rounding', 'adam_mu_rounding', "
                 r"'adam_nu_rounding'\], got 'mom'",
                 id='cycle-key-purpose'),
    pytest.param(flora_optax.cycle_key, dict(
        key=np.zeros(2, np.uint32), cycle=0, impl='rbg'), ValueError,
                 r"(?s)key data of shape \(2,\) does not fit the PRNG "
                 r"implementation 'rbg'.*typed key",
                 id='cycle-key-data-of-another-impl'),
])
def test_keys_rejected(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


_SHARD_SHAPES = _helpers.shape_structs(
    {'w': jnp.zeros((32, 64)), 'b': jnp.zeros((32,))})


def _state_shardings(param_shardings=None, params=_SHARD_SHAPES, tx=None,
                     **kw):
  """``state_shardings`` with ``param_shardings`` built on a (4, 2) mesh."""
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(AxisType.Auto,) * 2)
  other = jax.make_mesh((8, 1), ('data', 'model'),
                        axis_types=(AxisType.Auto,) * 2)
  tx = flora_optax.compressed_momentum(2) if tx is None else tx
  if callable(param_shardings):
    param_shardings = param_shardings(mesh, other)
  if kw.pop('with_mesh', False):
    kw['mesh'] = mesh
  return flora_optax.state_shardings(tx, params, param_shardings, **kw)


@pytest.mark.parametrize('fn, kwargs, exc, match', [
    pytest.param(_state_shardings, dict(
        param_shardings=lambda m, o: {'w': NamedSharding(m, P())}),
                 ValueError, 'param_shardings', id='structure'),
    pytest.param(_state_shardings, dict(param_shardings=P()), ValueError,
                 'mesh=', id='partition-spec-without-mesh'),
    pytest.param(_state_shardings, dict(
        param_shardings=lambda m, o: {'w': NamedSharding(m, P()), 'b': None}),
                 ValueError, r'leaf of None \(replicated\) needs `mesh=`',
                 id='none-leaf-without-mesh'),
    pytest.param(_state_shardings, dict(
        param_shardings=lambda m, o: jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), TypeError, 'NamedSharding',
                 id='not-a-named-sharding'),
    pytest.param(_state_shardings, dict(), ValueError, 'own sharding',
                 id='leaves-without-sharding'),
    pytest.param(_state_shardings, dict(tx=3, param_shardings=P(),
                                        with_mesh=True), TypeError, '`tx`',
                 id='tx'),
    pytest.param(_state_shardings, dict(param_shardings=lambda m, o: {
        'w': NamedSharding(m, P()), 'b': NamedSharding(o, P())}),
                 ValueError, 'one mesh', id='two-meshes'),
    pytest.param(_state_shardings, dict(params={}), ValueError,
                 '`params` has no leaves', id='no-leaves'),
    pytest.param(_state_shardings, dict(
        param_shardings=lambda m, o: NamedSharding(m.abstract_mesh, P())),
                 TypeError, r'`param_shardings` must be on a concrete '
                 r'jax.sharding.Mesh, got AbstractMesh', id='abstract-mesh'),
])
def test_state_shardings_rejects(fn, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    fn(**kwargs)


# --- random trees -------------------------------------------------------------

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_BAD_DTYPES = (jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64)

shapes = st.lists(st.integers(0, 6), max_size=3).map(tuple)
leaf_specs = st.builds(jax.ShapeDtypeStruct, shapes, st.sampled_from(_FLOATS))
names = st.text('abcxyz', min_size=1, max_size=3)
trees = st.recursive(
    leaf_specs,
    lambda kids: st.one_of(
        st.dictionaries(names, kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=2).map(tuple)),
    max_leaves=5)


def _materialize(specs, seed=0):
  leaves, treedef = jax.tree.flatten(specs)
  rng = np.random.default_rng(seed)
  arrays = []
  for s in leaves:
    if jnp.issubdtype(s.dtype, jnp.floating):
      x = rng.standard_normal(s.shape)
    elif jnp.issubdtype(s.dtype, jnp.complexfloating):
      x = rng.standard_normal(s.shape) + 1j
    else:
      x = rng.integers(0, 2, s.shape)
    arrays.append(jnp.asarray(x, s.dtype))
  return treedef.unflatten(arrays)


def _paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in
          jax.tree_util.tree_leaves_with_path(tree)]


def _with_leaf(tree, index, new):
  leaves, treedef = jax.tree.flatten(tree)
  leaves[index] = new
  return treedef.unflatten(leaves)


_ZERO_SIZE_SPECS = {  # the tree that crashed every update (issue 21)
    'batch': jax.ShapeDtypeStruct((0, 8, 8), jnp.float32),
    'rows': jax.ShapeDtypeStruct((8, 0), jnp.bfloat16),
    'w': jax.ShapeDtypeStruct((6, 5), jnp.float32)}


@pytest.mark.filterwarnings('ignore::flora_optax.TransferStabilityWarning')
@given(specs=trees, rank=st.integers(1, 4),
       projection=st.sampled_from(['gaussian', 'orthogonal']),
       side=st.sampled_from(['smaller', 'larger']))
@example(specs=_ZERO_SIZE_SPECS, rank=1, projection='gaussian',
         side='smaller')
@example(specs=_ZERO_SIZE_SPECS, rank=2, projection='orthogonal',
         side='larger')
@SETTINGS
def test_valid_trees_keep_shapes_and_dtypes(specs, rank, projection, side):
  # Zero-size axes included: such leaves stay dense or have empty sketches.
  params = _materialize(specs)
  tx = flora_optax.compressed_momentum(rank, projection=projection, side=side,
                                       resample_every=1)
  state = tx.init(params)
  want = flora_optax.Projector(rank, projection=projection,
                               side=side).sketch_shapes(params, jnp.float32)
  chex_like = jax.tree.map(lambda x: (x.shape, x.dtype), state.mu)
  assert chex_like == jax.tree.map(lambda s: (s.shape, s.dtype), want)
  for _ in range(2):  # the second step transfers between projections
    updates, state = tx.update(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert (u.shape, u.dtype) == (p.shape, p.dtype)
    assert bool(jnp.all(jnp.isfinite(u)))


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora',
                                     'MultiSteps', 'Projector'])
@given(specs=trees, data=st.data(), bad=st.sampled_from(_BAD_DTYPES))
@SETTINGS
def test_non_float_leaf_refused_at_init(builder, specs, data, bad):
  paths = _paths(specs)
  i = data.draw(st.integers(0, len(paths) - 1))
  spec = jax.tree.leaves(specs)[i]
  params = _materialize(_with_leaf(specs, i, jax.ShapeDtypeStruct(
      spec.shape, bad)))
  tx = BUILDERS[builder](2)
  init = tx.plan if builder == 'Projector' else tx.init
  with _raises(TypeError, f'Leaf {paths[i]}', jnp.dtype(bad).name,
               'floating-point'):
    init(params)


def test_python_scalar_leaf_refused_at_init():
  with _raises(TypeError, "Leaf ['lr']", 'not an array'):
    flora_optax.compressed_momentum(2).init({'lr': 0.5})


# Trees with at least one matrix whose axes are both >= 2.
matrices = st.tuples(st.integers(2, 7), st.integers(2, 7)).map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32))


def _insert(tree_and_matrix):
  tree, mat = tree_and_matrix
  return {'m': mat, 'rest': tree}


trees_with_matrix = st.tuples(trees, matrices).map(_insert)


@given(specs=trees_with_matrix,
       returned=st.one_of(st.integers(max_value=0), st.integers(8, 100)))
@SETTINGS
def test_rank_callable_out_of_range(specs, returned):
  params = _materialize(specs)
  d = min(params['m'].shape)  # side='smaller'

  def rank(path, leaf):
    return returned if jax.tree_util.keystr(path) == "['m']" else None

  with _raises(ValueError, '`rank` callable', f'{returned}', "leaf ['m']",
               f'1 <= rank <= {d}'):
    flora_optax.compressed_momentum(rank).init(params)


@given(specs=trees_with_matrix,
       returned=st.one_of(st.floats(), st.text(max_size=2), st.booleans(),
                          st.integers(1, 2).map(jnp.asarray)))
@SETTINGS
def test_rank_callable_not_an_int(specs, returned):
  params = _materialize(specs)

  def rank(path, leaf):
    return returned if jax.tree_util.keystr(path) == "['m']" else None

  with _raises(TypeError, '`rank` callable', "leaf ['m']", 'int or None'):
    flora_optax.compressed_momentum(rank).init(params)


def test_rank_callable_accepts_r_equal_d():
  # The exact path: r == d with orthogonal projections is the identity map.
  params = {'w': jnp.arange(12.).reshape(3, 4)}
  tx = flora_optax.compressed_momentum(lambda p, x: 3, decay=0.5,
                                       projection='orthogonal')
  state = tx.init(params)
  assert state.mu['w'].shape == (3, 4)
  updates, _ = tx.update(params, state)
  np.testing.assert_allclose(updates['w'], 0.5 * params['w'], rtol=1e-5,
                             atol=1e-5)


@given(ndim=st.integers(2, 4), data=st.data())
@SETTINGS
def test_dimension_numbers_axis_out_of_range(ndim, data):
  shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim,
                                   max_size=ndim)))
  bad_axis = data.draw(st.one_of(st.integers(ndim, ndim + 3),
                                 st.integers(-ndim - 3, -ndim - 1)))
  dn = DimensionNumbers(0, bad_axis)
  params = {'layer': {'kernel': jnp.ones(shape)}}
  for tx in (flora_optax.compressed_momentum(1, dimension_numbers=dn),
             flora_optax.Projector(1, dimension_numbers=dn)):
    init = tx.plan if isinstance(tx, flora_optax.Projector) else tx.init
    with _raises(ValueError, '`dimension_numbers`', f'axis {bad_axis}',
                 'out of range', "leaf ['layer']['kernel']", f'{ndim} axes'):
      init(params)


@given(ndim=st.integers(2, 4), data=st.data())
@SETTINGS
def test_dimension_numbers_axis_named_twice(ndim, data):
  a = data.draw(st.integers(0, ndim - 1))
  b = data.draw(st.integers(0, ndim - 1).filter(lambda x: x != a))
  neg = data.draw(st.booleans())  # the same axis spelt negatively
  dn = DimensionNumbers((a, b), a - ndim if neg else a)
  params = {'k': jnp.ones((3,) * ndim)}
  with _raises(ValueError, '`dimension_numbers`', 'axis twice', "['k']"):
    flora_optax.compressed_momentum(1, dimension_numbers=dn).init(params)


@pytest.mark.parametrize('shape', [(), (5,)])
def test_explicit_dimension_numbers_for_a_vector(shape):
  # A per-leaf DimensionNumbers can not fit a scalar or vector leaf: refused,
  # not silently ignored. (A global one applies to leaves with >= 2 axes only.)
  params = {'b': jnp.ones(shape), 'w': jnp.ones((4, 6))}
  dn = {'b': DimensionNumbers(0, 1), 'w': None}
  with _raises(ValueError, '`dimension_numbers`', "['b']"):
    flora_optax.compressed_momentum(2, dimension_numbers=dn).init(params)
  with _raises(ValueError, '`dimension_numbers`', "['b']"):
    flora_optax.compressed_momentum(
        2, dimension_numbers=lambda p, x: DimensionNumbers(0, 1)).init(params)
  # The global form skips vectors.
  flora_optax.compressed_momentum(
      2, dimension_numbers=DimensionNumbers(0, 1)).init(params)


def test_dimension_numbers_tree_must_match_params():
  dn = {'w': DimensionNumbers(0, 1)}
  with _raises(ValueError, '`dimension_numbers`', 'structure'):
    flora_optax.compressed_momentum(2, dimension_numbers=dn).init(
        {'w': jnp.ones((4, 6)), 'b': jnp.ones((6,))})


# --- updates that do not match init -------------------------------------------


def _update_fns(tx):
  return {'eager': tx.update, 'jit': jax.jit(tx.update)}


@given(specs=trees_with_matrix, data=st.data())
@SETTINGS
def test_update_structure_differs_from_init(specs, data):
  params = _materialize(specs)
  tx = flora_optax.compressed_momentum(2)
  state = tx.init(params)
  # Drop one leaf (dict key) or add one.
  drop = data.draw(st.booleans())
  if drop:
    wrong = dict(params)
    del wrong['m']
    name = "['m']"
  else:
    wrong = {**params, 'extra': jnp.ones((2, 3))}
    name = "['extra']"
  for mode, update in _update_fns(tx).items():
    with _raises(ValueError, 'structure of the params given to init', name):
      update(wrong, state)


def test_update_container_type_differs_from_init():
  tx = flora_optax.compressed_momentum(2)
  state = tx.init([jnp.ones((4, 6)), jnp.ones(3)])
  with _raises(ValueError, 'structure of the params given to init',
               'different containers'):
    tx.update((jnp.ones((4, 6)), jnp.ones(3)), state)


@given(specs=trees_with_matrix, data=st.data())
@SETTINGS
def test_update_shape_differs_from_init(specs, data):
  params = _materialize(specs)
  tx = flora_optax.compressed_momentum(1, side='smaller')
  state = tx.init(params)
  paths = _paths(params)
  i = data.draw(st.integers(0, len(paths) - 1))
  leaf = jax.tree.leaves(params)[i]
  if leaf.ndim == 0:
    new_shape = (2,)
  else:
    # Grow the leading axis: for a matrix that is never the only change
    # confined to the compressed axis when n < m, and otherwise params
    # (passed below) reveal it.
    new_shape = (leaf.shape[0] + 1,) + leaf.shape[1:]
  wrong = _with_leaf(params, i, jnp.ones(new_shape, leaf.dtype))
  for update in _update_fns(tx).values():
    with _raises(ValueError, f'Leaf {paths[i]}', f'{new_shape}'):
      update(wrong, state, params)


def test_compressed_axis_change_needs_params_to_be_seen():
  # Only the compressed axis changes: the sketch shape is unchanged, so the
  # state alone can not tell; the params given to update do.
  params = {'w': jnp.ones((16, 8))}
  tx = flora_optax.compressed_momentum(4)
  state = tx.init(params)
  wrong = {'w': jnp.ones((16, 9))}
  with _raises(ValueError, "Leaf ['w']", '(16, 9)', '(16, 8)'):
    tx.update(wrong, state, params)


def test_flora_chain_names_the_leaf_on_mismatch():
  params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
  tx = flora_optax.flora(0.1, 2, min_dim_size_to_factor=2)
  state = tx.init(params)
  wrong = {'w': jnp.ones((9, 6)), 'b': jnp.ones(6)}
  with pytest.raises(ValueError, match=r"\['w'\]"):
    jax.jit(tx.update)(wrong, state, params)


def test_dimension_numbers_structure_error_does_not_rely_on_jax_wording(
    monkeypatch):
  params = {'w': jnp.ones((4, 6)), 'b': jnp.ones((6,))}
  cases = [
      ({'w': DimensionNumbers(0, 1)}, r"lacks: \['b'\]"),
      ({'w': DimensionNumbers(0, 1), 'b': None, 'x': None},
       r"for no params leaf: \['x'\]"),
  ]
  # Whatever JAX's own messages say, the error is ours and names the leaves.
  real = jax.tree_util.tree_map_with_path

  def reworded(*args, **kwargs):
    try:
      return real(*args, **kwargs)
    except ValueError as e:
      raise ValueError('some other wording') from e

  monkeypatch.setattr(jax.tree_util, 'tree_map_with_path', reworded)
  for dn, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      flora_optax.Projector(2, dimension_numbers=dn).plan(params)
    assert '`dimension_numbers`' in str(info.value)
    assert 'structure' in str(info.value)
  # A dimension_numbers leaf may stand for an NNX Variable (a subtree).
  nnx, model = _helpers.nnx_model()
  state = nnx.state(model, nnx.Param)
  dn = jax.tree.map(lambda _: None, state,
                    is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert jax.tree.leaves(flora_optax.Projector(
      2, dimension_numbers=dn).plan(state), is_leaf=lambda x: isinstance(
          x, flora_optax.LeafPlan))
