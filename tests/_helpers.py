"""Parameter trees, ranks, models and losses shared by several test modules.

Import it as ``import _helpers``. ``tests/`` has no ``__init__.py``, so pytest
(in its default ``prepend`` import mode) puts ``tests/`` itself on
``sys.path`` before it imports ``conftest.py`` and the test modules: the
import works under plain ``pytest``, ``python -m pytest`` and pytest-xdist
workers, and always finds this checkout's file (``from tests import
_helpers`` would depend on the repository root being on ``sys.path``, and
could find another checkout's ``tests``). ``--doctest-modules`` imports this
file under the same name, so there is one module object.

Every function reproduces, value for value, the local definitions it replaced
(the same keys, the same order of draws).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import flora_optax

# --- ranks --------------------------------------------------------------------


def full_rank(path, leaf):
  """Forces ``r == d`` (side='smaller' compresses the smaller matrix axis)."""
  del path
  return min(leaf.shape[-2:])


def keep_dense(path, leaf):
  """A ``rank`` callable that keeps every leaf dense (compression off): it
  returns ``None`` for every leaf."""
  del path, leaf


# --- parameter and gradient trees ---------------------------------------------


def _key(seed):
  return seed if isinstance(seed, jax.Array) else jax.random.key(seed)


def random_tree(seed, shapes, dtype=jnp.float32):
  """``{name: N(0, 1)}`` drawn with ``jax.random``, one key per entry.

  Args:
    seed: an int seed or a typed key.
    shapes: ``{name: shape}``; keys are split in the dict's order.
    dtype: the dtype of every leaf.
  """
  keys = jax.random.split(_key(seed), len(shapes))
  return {name: jax.random.normal(k, s, dtype)
          for k, (name, s) in zip(keys, shapes.items())}


def random_like(seed, tree):
  """A float32 ``N(0, 1)`` tree shaped like ``tree``, one key per leaf in
  ``jax.tree.leaves`` order."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(_key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def numpy_tree(seed, shapes, dtype=jnp.float32, scale=1.0):
  """``{name: scale * N(0, 1)}`` drawn with NumPy's ``default_rng(seed)`` in
  the dict's order."""
  rng = np.random.default_rng(seed)
  return {n: jnp.asarray(scale * rng.standard_normal(s), dtype)
          for n, s in shapes.items()}


def shape_structs(tree):
  """The ``jax.ShapeDtypeStruct`` of every leaf (values are not kept)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# --- optimizer states ---------------------------------------------------------


def is_momentum_state(x):
  return isinstance(x, flora_optax.CompressedMomentumState)


def momentum_state(opt_state):
  """The one ``CompressedMomentumState`` inside ``opt_state``, found by type
  (its position in flora's chain is not part of the API)."""
  (mom,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_momentum_state)
            if is_momentum_state(x)]
  return mom


# --- running an optimizer ----------------------------------------------------


def run(tx, grads_seq, params=None, step=None, *, init=None,
        every_state=False):
  """Applies ``tx`` to each gradient tree of ``grads_seq`` in turn.

  Args:
    tx: the gradient transformation.
    grads_seq: the gradients, one tree per step.
    params: passed to every update; ``None``: the state is initialised from
      the first gradients (and ``None`` passed).
    step: the update to call (default ``jax.jit(tx.update)``), e.g. one
      compiled once and reused, or with shardings.
    init: the initialisation to call (default ``tx.init``).
    every_state: return every step's state instead of the last one.

  Returns:
    ``(updates of every step, final state)``, or ``(updates, states)``.
  """
  step = step or jax.jit(tx.update)
  state = (init or tx.init)(grads_seq[0] if params is None else params)
  outs, states = [], []
  for g in grads_seq:
    u, state = step(g, state, params)
    outs.append(u)
    if every_state:
      states.append(state)
  return outs, (states if every_state else state)


# --- small models -------------------------------------------------------------


@functools.cache
def linen_mlp_class():
  """A Flax Linen MLP ``12 -> Dense(16) -> relu -> Dense(4)`` (the class).

  Kernels ``Dense_0`` (12, 16) and ``Dense_1`` (16, 4). Flax is imported only
  by the tests that use it.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      # Built in call order: Dense_0 is the first layer.
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(4)(x)

  return MLP


def regression_batch(step, in_features=12, out_features=4, batch_size=8):
  """``(x, y)``, both ``N(0, 1)``, a fresh pair for every ``step``."""
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(7), step))
  return (jax.random.normal(k1, (batch_size, in_features)),
          jax.random.normal(k2, (batch_size, out_features)))


def linen_mse(params, apply_fn, batch):
  """The mean squared error of a Linen model on ``batch = (x, y)``."""
  x, y = batch
  return jnp.mean((apply_fn({'params': params}, x) - y)**2)


def nnx_model():
  """``(nnx, model)``: an NNX module with a ``(12, 6)`` ``embed`` Param and
  an ``nnx.List`` of two ``nnx.Linear(6, 10)`` layers (int keys in its
  state)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self):
      self.embed = nnx.Param(jax.random.normal(jax.random.key(0), (12, 6)))
      self.layers = nnx.List([
          nnx.Linear(6, 10, rngs=nnx.Rngs(i)) for i in range(2)])

  return nnx, Model()


# --- quantized states ------------------------------------------------------------


def blocks_absmax(x, block):
  """Each entry's block absmax (blocks of ``block`` along the last axis), as
  an array shaped like ``x``."""
  x = np.asarray(x)
  m = x.shape[-1]
  nb = -(-m // block)
  pad = np.pad(np.abs(x), [(0, 0)] * (x.ndim - 1) + [(0, nb * block - m)])
  amax = pad.reshape(*x.shape[:-1], nb, block).max(-1)
  return np.repeat(amax, block, axis=-1)[..., :m]


def code_bound(q, u, signed=None):
  """Per-entry bound on ``|decode(encode(x)) - x| / absmax`` for nearest
  rounding with quantizer ``q``, at ``u = |x| / absmax``: half the step of
  the map there (the arithmetic maps round on their code axis; the tabled
  ones by value, to one of the two values around ``u``), or, for unsigned
  codes below the smallest value, the distance up to it."""
  from flora_optax._quantization import code_values  # pylint: disable=g-import-not-at-top
  u = np.abs(np.asarray(u, np.float64))
  signed = q.signed if signed is None else signed
  cmap = q.unsigned_map if (not signed and q.signed is None) else q.code_map
  L, n = 2**(q.bits - 1) - 1, 2**q.bits
  if cmap == 'linear':
    return np.full_like(u, 0.5 / L) if signed else np.where(
        u < 1 / n, 1 / n - u, 0.5 / n)
  if cmap == 'sqrt':
    if signed:  # |ŷ² - y²| / L² with |ŷ - y| <= 1/2
      return (L * np.sqrt(u) + 0.25) / L**2
    s = np.sqrt(u)
    ds = np.where(s < 1 / n, 1 / n - s, 0.5 / n)
    return ds * (2 * s + ds)
  values = np.asarray(code_values(cmap, q.bits, bool(signed)), np.float64)
  if signed:
    values = values[len(values) // 2:]  # 0 and the magnitudes
  j = np.clip(np.searchsorted(values, u, side='right') - 1, 0,
              len(values) - 2)
  half_gap = (values[j + 1] - values[j]) / 2
  return np.where(u < values[0], values[0] - u, half_gap)
