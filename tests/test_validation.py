"""Bad input gives a clear error at build, init or trace time, never garbage.

Property-based (hypothesis) over tree structures, shapes, dtypes and ranks:
every invalid argument raises ``ValueError``/``TypeError`` naming the argument
(or the leaf's path) and what is accepted; every valid tree, zero-size axes
included, initialises and updates with the shapes and dtypes it was given.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- build-time arguments -----------------------------------------------------


@pytest.mark.parametrize('builder', BUILDERS)
@given(rank=st.integers(max_value=0))
@FEW
def test_nonpositive_rank(builder, rank):
  with _raises(ValueError, '`rank`', 'positive'):
    BUILDERS[builder](rank)


@pytest.mark.parametrize('builder', BUILDERS)
@given(rank=st.one_of(
    st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans(),
    st.integers(1, 9).map(jnp.asarray), st.integers(1, 9).map(np.asarray)))
@FEW
def test_non_integer_rank(builder, rank):
  with _raises(TypeError, '`rank`', 'int'):
    BUILDERS[builder](rank)


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora'])
@given(value=st.one_of(st.integers(max_value=0), st.integers(min_value=2**31)))
@FEW
def test_resample_every_out_of_range(builder, value):
  with _raises(ValueError, '`resample_every`', 'positive int', 'None'):
    BUILDERS[builder](4, resample_every=value)


@pytest.mark.parametrize('builder', ['compressed_momentum', 'flora'])
@given(value=st.one_of(st.floats(), st.text(max_size=2), st.booleans()))
@FEW
def test_resample_every_not_an_int(builder, value):
  with _raises(TypeError, '`resample_every`', 'positive int'):
    BUILDERS[builder](4, resample_every=value)


@given(decay=st.one_of(
    st.floats(max_value=0, exclude_max=True),
    st.floats(min_value=1), st.just(float('nan'))))
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
@FEW
def test_every_k_nonpositive(k):
  with _raises(ValueError, '`every_k_schedule`', 'positive'):
    flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k, rank=4)


@given(k=st.one_of(st.floats(), st.text(max_size=2), st.booleans(),
                   st.none()))
@FEW
def test_every_k_not_an_int(k):
  with _raises(TypeError, '`every_k_schedule`', 'positive int'):
    flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k, rank=4)


# --- random trees ---------------------------------------------------------------

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


@pytest.mark.filterwarnings('ignore::flora_optax.TransferStabilityWarning')
@given(specs=trees, rank=st.integers(1, 4),
       projection=st.sampled_from(['gaussian', 'orthogonal']),
       side=st.sampled_from(['smaller', 'larger']))
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
                 "leaf ['layer']['kernel']", f'{ndim} axes'):
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


# --- updates that do not match init ------------------------------------------


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
