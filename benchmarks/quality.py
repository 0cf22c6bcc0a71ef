r"""Quality study (issue 11): does Flora's compressed momentum train as well?

Every optimizer here is the same Adafactor (factored second moment, block-RMS
clipping at 1.0, no parameter scale, the same warmup-cosine schedule), and the
rows differ only in the first moment:

- ``adafactor``: uncompressed momentum 0.9 (``optax.adafactor``);
- ``adafactor_nomomentum``: none;
- ``flora_paper``: Flora's momentum as in the paper (``residual=False``,
  right after ``scale_by_factored_rms``);
- ``flora_residual_<scale>_<position>``: residual momentum (DESIGN.md section
  2) with the subspace part scaled as ``Π_c M`` (``projection``) or
  ``decompress_c(M)`` (``unbiased``), the momentum in the paper's position or
  in ``optax.adafactor``'s (after clipping and the learning rate);
- ``lora``: uncompressed momentum on a LoRA-reparametrised model of the same
  rank (``W = W0 + A B``, ``W0`` frozen at the full model's init, ``B = 0``);

and, on the language model, accumulation over ``K = 4`` micro-batches (the
same examples per update) with ``flora_optax.MultiSteps`` or
``optax.MultiSteps`` around Adafactor without momentum.

Each configuration trains every (seed, learning rate) pair at once: one jitted
program, ``vmap`` over models and ``lax.scan`` over steps. A seed fixes the
model init, the data order and the projection key. Each optimizer is reported
at its best learning rate by mean final (held-out) loss; when the best is at
an edge of the grid, the grid is extended on that side. Results go to
``benchmarks/results/quality.{json,md,png}``, merged into an earlier JSON so
that parts can be rerun::

    python -m benchmarks.quality                  # the full study
    python -m benchmarks.quality --quick          # a smoke run (results/quick/)
    python -m benchmarks.quality --tasks lm --variants flora_paper --ratios 4
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import inspect
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common

common.avoid_xla_cpu_hang()

import flora_optax
from examples import data as data_lib
from examples import model as model_lib
from examples.gpt import stack_trees
from flora_optax import _alias
from flora_optax import _momentum
# pylint: enable=g-import-not-at-top,wrong-import-position

NAME = 'quality'
RATIOS = (2, 4, 8)  # d / r
MOMENTUM = 0.9
ACCUMULATE = 4
LR_FACTORS = (0.5, 1.0, 2.0)  # the grid around each task's centre
MAX_EXTENSIONS = 3  # grid points added at most on an edge
NOISE_MULT = 2.0  # "clearly better": a gap larger than this many noise stds
TARGET_GAP_CLOSED = 0.7
END_LR = 0.1  # the schedule's final learning rate, a fraction of the peak
# Every row's Adafactor. Factoring from 32 makes these small matrices'
# second moments factored, as they are at scale; without the parameter scale,
# zero-initialised weights (biases, LoRA's B) learn at the same rate under
# every optimizer.
ADAFACTOR = dict(multiply_by_parameter_scale=False, min_dim_size_to_factor=32,
                 clipping_threshold=1.0)

Params = Any


# ----------------------------------------------------------------------------
# Tasks.
# ----------------------------------------------------------------------------


class Model(NamedTuple):
  """A model: how to initialise it, its training loss and its final loss.

  Attributes:
    init: ``seed -> (params, frozen)``: the trained parameters and the frozen
      ones (LoRA's base weights; may be empty).
    loss: ``(params, frozen, stream[t]) -> scalar`` training loss.
    evaluate: ``(params, frozen) -> scalar`` final held-out loss.
  """

  init: Callable[[int], tuple[Params, Params]]
  loss: Callable[[Params, Params, Any], jax.Array]
  evaluate: Callable[[Params, Params], jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """A training problem whose every matrix has ``d`` on its smaller axis.

  Attributes:
    name: the key used on the command line and in the results.
    description: what it is, and why it was chosen.
    d: the compressed (smaller) axis of every matrix; rank = ``d // ratio``.
    steps: optimizer updates.
    batch: examples per update.
    lr: the centre of the learning-rate grid (near the baselines' best).
    model: ``lora_rank -> Model``, the full model (``None``) or its LoRA
      reparametrisation.
    data: ``(seed, num_steps, batch) -> stream``, an array with a leading
      step axis, one micro-batch per step.
    settings: sizes, for the record.
  """

  name: str
  description: str
  d: int
  steps: int
  batch: int
  lr: float
  model: Callable[[int | None], Model]
  data: Callable[[int, int, int], Any]
  settings: dict[str, Any]


def _warmup_cosine(steps: int) -> optax.Schedule:
  """The schedule of every row, with peak 1 (scaled by each model's lr)."""
  return optax.warmup_cosine_decay_schedule(
      0.0, 1.0, max(1, steps // 10), steps, end_value=END_LR)


def lm_task(quick: bool, *, steps: int = 300, batch: int = 16,
            seq_len: int = 32, layers: int = 1, lr: float = 0.0025) -> Task:
  """A byte-level GPT (``examples/model.py``) on text shipped with Python."""
  if quick:
    mc = model_lib.ModelConfig(seq_len=16, d_model=32, num_layers=1,
                               num_heads=2)
    steps, batch, eval_batches = 12, 4, 2
  else:
    mc = model_lib.ModelConfig(seq_len=seq_len, d_model=128,
                               num_layers=layers, num_heads=4)
    eval_batches = 16
  corpus = data_lib.load_corpus('all')
  evals = jnp.asarray(np.stack(corpus.eval_batches(16, mc.seq_len,
                                                   eval_batches)))
  def model(lora_rank):
    cfg = dataclasses.replace(mc, lora_rank=lora_rank)
    # The graph and variable layout, to rebuild the model from its dicts;
    # `rest` holds the frozen variables (LoRA's base kernels).
    graphdef, _, (param_state, _) = model_lib.init_model(cfg, 0)
    loss = model_lib.make_loss_fn_with_rest(graphdef, param_state)

    def init(seed):
      _, params, (_, rest) = model_lib.init_model(cfg, seed)
      return params, rest

    def evaluate(params, rest):
      return jax.lax.map(lambda t: loss(params, rest, t), evals).mean()

    return Model(init, loss, evaluate)

  def data(seed, num_steps, batch):
    it = corpus.batches('train', batch, mc.seq_len, seed=1000 + seed)
    return np.stack([next(it) for _ in range(num_steps)])

  return Task(
      name='lm',
      description=(
          f'byte-level GPT of examples/train_lm.py ({mc.num_layers} layer, '
          f'd_model {mc.d_model}, context {mc.seq_len}) on the Python docs '
          f'and stdlib sources; {steps} updates of {batch} sequences; final '
          f'loss: held-out cross-entropy (nats/byte) on '
          f'{eval_batches * 16} sequences.'),
      d=mc.d_model, steps=steps, batch=batch, lr=lr, model=model,
      data=data,
      settings=dict(dataclasses.asdict(mc), steps=steps, batch=batch))


def _layer(params, frozen, name, x):
  """``x @ W + b``, with ``W = W0 + A B`` when the layer has LoRA factors."""
  p = params[name]
  if 'w' in p:
    w = p['w']
  else:
    w = frozen[name]['w'] + p['lora_a'] @ p['lora_b']
  return x @ w + p['b'] if 'b' in p else x @ w


def _init_layers(seed: int, shapes: dict[str, tuple[int, int]],
                 lora_rank: int | None, bias: bool) -> tuple[Params, Params]:
  """``model.Linear``'s init: ``N(0, 1/din)`` kernels, LoRA ``A, 0``."""
  params, frozen = {}, {}
  for i, (name, (din, dout)) in enumerate(sorted(shapes.items())):
    key = jax.random.fold_in(jax.random.key(seed), i)
    w = jax.random.normal(key, (din, dout)) / np.sqrt(din)
    p = {'b': jnp.zeros((dout,))} if bias else {}
    # Only matrices whose both sides exceed the rank get adapters (as Flora
    # keeps the others dense).
    if lora_rank is None or min(din, dout) <= lora_rank:
      p['w'] = w
    else:
      frozen[name] = {'w': w}
      p['lora_a'] = jax.random.normal(jax.random.fold_in(key, 1),
                                      (din, lora_rank)) / np.sqrt(din)
      p['lora_b'] = jnp.zeros((lora_rank, dout))
    params[name] = p
  return params, frozen


def _example_keys(seed: int, num_steps: int, batch: int) -> jax.Array:
  """One raw key per example: ``(num_steps, batch, 2)`` uint32."""
  key = jax.random.key(10_000 + seed)
  return jax.random.key_data(jax.random.split(key, (num_steps, batch)))


def _rotated_spectrum(key, n: int, decay: float) -> tuple[jax.Array, ...]:
  """``(U, s)``: a random rotation and singular values ``i**-decay / 2``."""
  u, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  s = jnp.arange(1, n + 1, dtype=jnp.float32) ** (-decay / 2)
  return u, s


def regression_task(quick: bool, *, steps: int = 300, batch: int = 16,
                    decay: float = 1.5, noise: float = 0.01,
                    lr: float = 0.04) -> Task:
  """Noisy least squares ``y = x W* + σ ε`` with an ill-conditioned ``x``."""
  d_in, d_out = (64, 32) if quick else (256, 128)
  if quick:
    steps, batch = 12, 8
  k_u, k_w = jax.random.split(jax.random.key(7))
  # Covariance U diag(s²) Uᵀ with a power-law spectrum, rotated so that
  # Adafactor's diagonal preconditioner can not undo the conditioning.
  u, s = _rotated_spectrum(k_u, d_in, decay)
  w_star = jax.random.normal(k_w, (d_in, d_out)) / np.sqrt(d_in) * 4
  shapes = {'w': (d_in, d_out)}

  def sample(key):
    k1, k2 = jax.random.split(jax.random.wrap_key_data(key))
    x = (jax.random.normal(k1, (d_in,)) * s) @ u.T
    return x, x @ w_star + noise * jax.random.normal(k2, (d_out,))

  def loss(params, frozen, keys):
    x, y = jax.vmap(sample)(keys)
    return 0.5 * jnp.mean(jnp.sum((_layer(params, frozen, 'w', x) - y)**2, -1))

  def evaluate(params, frozen):
    # The population excess risk, in closed form: no test-set noise.
    delta = _layer(params, frozen, 'w', jnp.eye(d_in)) - w_star
    rot = u.T @ delta * s[:, None]
    return 0.5 * jnp.sum(rot**2)

  def model(lora_rank):
    return Model(lambda seed: _init_layers(seed, shapes, lora_rank, False),
                 loss, evaluate)

  return Task(
      name='regression',
      description=(
          f'noisy least squares y = x W* + ε, W {d_in}x{d_out}, x Gaussian '
          f'with a rotated power-law covariance (eigenvalues i^-{decay:g}, '
          f'condition number {d_in ** decay:.0f}), label noise std {noise:g}, '
          f'{steps} updates of {batch} examples; final loss: the population '
          'excess risk 0.5·E‖x(W - W*)‖² in closed form. Rotated '
          'ill-conditioning is what a diagonal preconditioner can not fix and '
          'momentum can: it allows a larger stable step.'),
      d=min(d_in, d_out), steps=steps, batch=batch, lr=lr,
      model=model, data=_example_keys,
      settings=dict(d_in=d_in, d_out=d_out, steps=steps, batch=batch,
                    spectrum_decay=decay, noise=noise))


def mlp_task(quick: bool, *, steps: int = 600, batch: int = 16,
             decay: float = 2.0, noise: float = 0.01,
             lr: float = 0.005) -> Task:
  """Teacher-student regression with a two-hidden-layer MLP."""
  width = 32 if quick else 128
  if quick:
    steps, batch = 12, 8
  num_test = 256 if quick else 4096
  k_u, k_test = jax.random.split(jax.random.key(11))
  u, s = _rotated_spectrum(k_u, width, decay)
  # Unit variance per input on average, so that the GELUs are not linear.
  s = s * jnp.sqrt(width / jnp.sum(s**2))
  shapes = {'l1': (width, width), 'l2': (width, width),
            'out': (width, width)}
  # The teacher has the student's architecture (the task is realisable) and
  # a different init.
  teacher, _ = _init_layers(12345, shapes, None, bias=True)
  for i, layer in enumerate(teacher.values()):  # nonzero biases
    layer['b'] = 0.1 * jax.random.normal(jax.random.key(i), layer['b'].shape)

  def features(z):
    return (z * s) @ u.T

  def mlp(params, frozen, x):
    h = jax.nn.gelu(_layer(params, frozen, 'l1', x))
    h = jax.nn.gelu(_layer(params, frozen, 'l2', h))
    return _layer(params, frozen, 'out', h)

  x_test = features(jax.random.normal(k_test, (num_test, width)))
  y_test = mlp(teacher, {}, x_test)

  def sample(key):
    k1, k2 = jax.random.split(jax.random.wrap_key_data(key))
    x = features(jax.random.normal(k1, (width,)))
    return x, mlp(teacher, {}, x) + noise * jax.random.normal(k2, (width,))

  def loss(params, frozen, keys):
    x, y = jax.vmap(sample)(keys)
    return 0.5 * jnp.mean((mlp(params, frozen, x) - y)**2)

  def evaluate(params, frozen):
    return 0.5 * jnp.mean((mlp(params, frozen, x_test) - y_test)**2)

  def model(lora_rank):
    return Model(lambda seed: _init_layers(seed, shapes, lora_rank, True),
                 loss, evaluate)

  return Task(
      name='mlp',
      description=(
          f'teacher-student regression: a GELU MLP {width}-{width}-{width}-'
          f'{width} learns a random teacher of the same architecture from '
          f'inputs with a rotated power-law covariance (eigenvalues '
          f'i^-{decay:g}), label noise std {noise:g}; {steps} updates of '
          f'{batch} examples; final loss: the mean of 0.5·(f(x) - '
          f'teacher(x))² on {num_test} held-out inputs.'),
      d=width, steps=steps, batch=batch, lr=lr, model=model,
      data=_example_keys,
      settings=dict(width=width, steps=steps, batch=batch,
                    spectrum_decay=decay, noise=noise))


def autoencoder_task(quick: bool, *, steps: int = 400, batch: int = 16,
                     decay: float = 2.0, lr: float = 0.01) -> Task:
  """A linear autoencoder ``x ↦ x E D`` (PCA as a two-layer problem)."""
  n, k = (64, 32) if quick else (256, 128)
  if quick:
    steps, batch = 12, 8
  u, s = _rotated_spectrum(jax.random.key(13), n, decay)
  s = s * jnp.sqrt(n / jnp.sum(s**2))  # unit variance per input on average
  shapes = {'enc': (n, k), 'dec': (k, n)}

  def reconstruct(params, frozen, x):
    return _layer(params, frozen, 'dec', _layer(params, frozen, 'enc', x))

  def loss(params, frozen, keys):
    z = jax.vmap(lambda k: jax.random.normal(jax.random.wrap_key_data(k),
                                             (n,)))(keys)
    x = (z * s) @ u.T
    return 0.5 * jnp.mean((reconstruct(params, frozen, x) - x)**2)

  def evaluate(params, frozen):
    # The population loss in closed form: 0.5·E‖x (E D - I)‖² / n.
    err = reconstruct(params, frozen, jnp.eye(n)) - jnp.eye(n)
    return 0.5 * jnp.sum((s[:, None] * (u.T @ err))**2) / n

  def model(lora_rank):
    return Model(lambda seed: _init_layers(seed, shapes, lora_rank, False),
                 loss, evaluate)

  best = 0.5 * float(jnp.sum(s[k:]**2)) / n
  return Task(
      name='autoencoder',
      description=(
          f'linear autoencoder x ↦ x E D, E {n}x{k}, D {k}x{n} (PCA as a '
          'non-convex two-layer problem), x Gaussian with a rotated '
          f'power-law covariance (eigenvalues i^-{decay:g}); {steps} updates '
          f'of {batch} examples; final loss: the population reconstruction '
          f'error 0.5·E‖x E D - x‖²/{n} in closed form (PCA reaches '
          f'{best:.4f}).'),
      d=k, steps=steps, batch=batch, lr=lr, model=model, data=_example_keys,
      settings=dict(n=n, k=k, steps=steps, batch=batch, spectrum_decay=decay,
                    pca_loss=best))


TASKS = {'lm': lm_task, 'regression': regression_task, 'mlp': mlp_task,
         'autoencoder': autoencoder_task}


# ----------------------------------------------------------------------------
# Optimizers.
# ----------------------------------------------------------------------------

# make(learning_rate, rank, key, resample_every) -> GradientTransformation.
MakeTx = Callable[[optax.Schedule, int | None, Any, int],
                  optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study.

  Attributes:
    name: the key used on the command line and in the results.
    label: what the tables say.
    make: builds the optimizer (see ``MakeTx``).
    ranked: whether it depends on the rank (one row per ``d/r``).
    lora: trains the LoRA-reparametrised model.
    accumulate: micro-batches per update (same examples per update).
    lm_only: run on the language model only.
    flora: the ``make_flora`` options (``None``: not a Flora momentum row).
  """

  name: str
  label: str
  make: MakeTx
  ranked: bool
  lora: bool = False
  accumulate: int = 1
  lm_only: bool = False
  flora: dict[str, Any] | None = None


def has_variants() -> bool:
  """Whether this flora_optax has the residual-momentum study factories."""
  return hasattr(_alias, 'make_flora')


def library_defaults() -> dict[str, Any] | None:
  """The ``make_flora`` options that plain ``flora_optax.flora`` uses."""
  if not has_variants():
    return None
  residual = inspect.signature(
      flora_optax.flora).parameters['residual'].default
  # The position of the paper's algorithm is the paper's; residual momentum
  # sits where the library's measured default puts it.
  position = 'paper'
  if residual:
    position = getattr(_alias, 'DEFAULT_MOMENTUM_POSITION', None) or getattr(
        _alias, 'DEFAULT_RESIDUAL_POSITION')
  return dict(residual=residual, momentum_position=position,
              subspace_scale=_momentum.DEFAULT_SUBSPACE_SCALE)


def _adafactor(momentum: float | None) -> MakeTx:
  def make(lr, rank, key, resample_every):
    del rank, key, resample_every
    return optax.adafactor(lr, momentum=momentum, **ADAFACTOR)
  return make


def _flora(options: dict[str, Any]) -> MakeTx:
  def make(lr, rank, key, resample_every):
    if has_variants():
      return _alias.make_flora(lr, rank, momentum=MOMENTUM, key=key,
                               resample_every=resample_every, **options,
                               **ADAFACTOR)
    # Before the study factories existed: the paper's algorithm only.
    assert not options.get('residual'), options
    return flora_optax.flora(lr, rank, momentum=MOMENTUM, key=key,
                             resample_every=resample_every, **ADAFACTOR)
  return make


def _multisteps(compressed: bool) -> MakeTx:
  def make(lr, rank, key, resample_every):
    del resample_every
    inner = optax.adafactor(lr, **ADAFACTOR)  # no momentum, as in the paper
    if compressed:
      return flora_optax.MultiSteps(inner, ACCUMULATE, rank=rank,
                                    key=key).gradient_transformation()
    return optax.MultiSteps(inner, ACCUMULATE).gradient_transformation()
  return make


def _quantized(bits: int, ranked: bool, **options: Any) -> MakeTx:
  """Adafactor whose momentum is kept in ``bits``-bit codes: in every
  direction (``ranked=False``) or as Flora's default sketch; ``options``:
  the quantization keywords (block size, code map, rounding)."""
  def make(lr, rank, key, resample_every):
    return flora_optax.flora(lr, rank if ranked else None, momentum=MOMENTUM,
                             key=key, resample_every=resample_every,
                             bits=bits, **options, **ADAFACTOR)
  return make


# How the defaults of the quantized momentum were chosen: each row changes
# one keyword of the library's default (code map, block size, rounding).
QUANT_ABLATIONS = {
    'momentum_8bit_sqrt': (8, dict(code_map='sqrt')),
    'momentum_4bit_sqrt': (4, dict(code_map='sqrt')),
    'momentum_4bit_block128': (4, dict(block_size=128)),
    'momentum_4bit_sqrt_block128': (4, dict(code_map='sqrt', block_size=128)),
    'momentum_4bit_sqrt_block256': (4, dict(code_map='sqrt', block_size=256)),
    'momentum_4bit_sqrt_block128_stochastic': (4, dict(
        code_map='sqrt', block_size=128, stochastic_rounding=True)),
}


def _adafactor_bf16() -> MakeTx:
  def make(lr, rank, key, resample_every):
    del rank, key, resample_every
    return optax.adafactor(lr, momentum=MOMENTUM, dtype_momentum=jnp.bfloat16,
                           **ADAFACTOR)
  return make


def _multisteps_quantized(bits: int, **options: Any) -> MakeTx:
  def make(lr, rank, key, resample_every):
    del rank, resample_every
    inner = optax.adafactor(lr, **ADAFACTOR)
    return flora_optax.MultiSteps(inner, ACCUMULATE, rank=None, key=key,
                                  bits=bits, **options
                                  ).gradient_transformation()
  return make


def variants() -> dict[str, Variant]:
  """Every row of the study, in table order."""
  rows = [
      Variant('adafactor', f'Adafactor, momentum {MOMENTUM}',
              _adafactor(MOMENTUM), ranked=False),
      Variant('adafactor_nomomentum', 'Adafactor, no momentum',
              _adafactor(None), ranked=False),
      Variant('flora_paper', 'Flora, paper (residual=False)',
              _flora(dict(residual=False, momentum_position='paper')),
              ranked=True,
              flora=dict(residual=False, momentum_position='paper')),
  ]
  for scale in ('projection', 'unbiased'):
    for position in ('paper', 'optax'):
      opts = dict(residual=True, subspace_scale=scale,
                  momentum_position=position)
      rows.append(Variant(
          f'flora_residual_{scale}_{position}',
          f'Flora, residual, {scale} scale, {position} position',
          _flora(opts), ranked=True, flora=opts))
  rows += [
      Variant('lora', f'LoRA + Adafactor, momentum {MOMENTUM}',
              _adafactor(MOMENTUM), ranked=True, lora=True),
      Variant('multisteps_optax', f'optax.MultiSteps (K={ACCUMULATE})',
              _multisteps(False), ranked=False, accumulate=ACCUMULATE,
              lm_only=True),
      Variant('multisteps_flora', f'flora_optax.MultiSteps (K={ACCUMULATE})',
              _multisteps(True), ranked=True, accumulate=ACCUMULATE,
              lm_only=True),
      # Quantized states (issue 18): the same bytes spent on precision.
      Variant('adafactor_bf16', f'Adafactor, bf16 momentum {MOMENTUM}',
              _adafactor_bf16(), ranked=False),
      Variant('momentum_8bit', 'momentum in 8-bit codes (rank=None, bits=8)',
              _quantized(8, False), ranked=False),
      Variant('momentum_4bit', 'momentum in 4-bit codes (rank=None, bits=4)',
              _quantized(4, False), ranked=False),
      Variant('flora_8bit', 'Flora sketch in 8-bit codes (bits=8)',
              _quantized(8, True), ranked=True),
      Variant('multisteps_8bit',
              f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, bits=8)',
              _multisteps_quantized(8), ranked=False, accumulate=ACCUMULATE,
              lm_only=True),
      Variant('multisteps_4bit',
              f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, bits=4)',
              _multisteps_quantized(4), ranked=False, accumulate=ACCUMULATE,
              lm_only=True),
  ]
  for bits in (8, 4):
    rows.append(Variant(
        f'multisteps_{bits}bit_nearest',
        f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, bits={bits}, '
        'nearest rounding)',
        _multisteps_quantized(bits, stochastic_rounding=False), ranked=False,
        accumulate=ACCUMULATE, lm_only=True))
  for name, (bits, options) in QUANT_ABLATIONS.items():
    what = ', '.join(f'{k}={v!r}' for k, v in options.items())
    rows.append(Variant(name, f'momentum in {bits}-bit codes ({what})',
                        _quantized(bits, False, **options), ranked=False))
  return {v.name: v for v in rows}


def is_default(v: Variant, defaults: dict[str, Any] | None) -> bool:
  """Whether ``v`` is what plain ``flora_optax.flora`` does."""
  if v.flora is None:
    return False
  if defaults is None:  # before the variants: flora was the paper's
    return v.name == 'flora_paper'
  if not defaults['residual']:
    return (not v.flora['residual'] and
            v.flora['momentum_position'] == defaults['momentum_position'])
  return v.flora == defaults


# ----------------------------------------------------------------------------
# Training: every (learning rate, seed) of one configuration in one program.
# ----------------------------------------------------------------------------


def train(task: Task, v: Variant, rank: int | None, lrs: Sequence[float],
          seeds: Sequence[int], resample_every: int) -> dict[str, Any]:
  """Trains ``v`` at every learning rate and seed; returns the final losses.

  Returns:
    ``losses`` (``[lr][seed]`` final held-out losses), ``state_bytes`` (one
    model's optimizer state) and ``seconds`` (compile and run).
  """
  t0 = time.perf_counter()
  schedule = _warmup_cosine(task.steps)
  models = [(lr, s) for lr in lrs for s in seeds]
  model = task.model(rank if v.lora else None)
  inits = {s: model.init(s) for s in seeds}
  micro_batch = task.batch // v.accumulate
  streams = {s: task.data(s, task.steps * v.accumulate, micro_batch)
             for s in seeds}
  # States carry their keys as data (flora's and MultiSteps' `state.key`),
  # so the update below, built with key 0, uses each model's own key.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    states = {s: v.make(schedule, rank, s, resample_every).init(inits[s][0])
              for s in seeds}
  notes = sorted({f'{w.category.__name__}: {w.message}' for w in caught})
  params = stack_trees([inits[s][0] for _, s in models])
  frozen = stack_trees([inits[s][1] for _, s in models])
  opt_state = stack_trees([states[s] for _, s in models])
  stream = stack_trees([streams[s] for _, s in models])
  peak = jnp.asarray([lr for lr, _ in models], jnp.float32)

  def one_model(params, frozen, opt_state, peak, stream):
    # Built inside the trace so that the peak learning rate may differ per
    # model; the state's layout does not depend on it.
    tx = v.make(lambda t: peak * schedule(t), rank, 0, resample_every)

    def step(carry, batch):
      params, opt_state = carry
      grads = jax.grad(model.loss)(params, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), stream)
    return model.evaluate(params, frozen)

  # One compiled program, run once per (learning rate, seed). Not vmapped:
  # XLA's CPU backend (jaxlib 0.10.2) hangs running some vmapped residual
  # flora chains (clip_by_block_rms before the momentum); see README.
  fn = jax.jit(one_model)
  final = np.asarray([
      fn(*jax.tree.map(lambda x, i=i: x[i],
                       (params, frozen, opt_state, peak, stream)))
      for i in range(len(models))
  ], np.float64).reshape(len(lrs), len(seeds))
  return dict(losses=final.tolist(),
              state_bytes=common.tree_bytes(states[seeds[0]]),
              seconds=time.perf_counter() - t0, notes=notes)


def _mean(losses: Sequence[float]) -> float:
  x = np.asarray(losses, np.float64)
  return float(x.mean()) if np.all(np.isfinite(x)) else math.inf


def best_lr(lrs: Sequence[float], losses: Sequence[Sequence[float]]) -> int:
  """Index of the learning rate with the lowest mean loss (diverged: inf)."""
  return int(np.argmin([_mean(x) for x in losses]))


def run_row(task: Task, v: Variant, ratio: int | None, lrs: Sequence[float],
            seeds: Sequence[int], resample_every: int, extend: bool,
            log: Callable[[str], None], watchdog: float | None = None,
            out: str = '') -> dict[str, Any]:
  """One row: the grid, extended at an edge that holds the best, and stats.

  ``watchdog``: seconds one training program may take before the process
  exits (see ``--watchdog``).
  """
  rank = task.d // ratio if ratio else None
  lrs = sorted(lrs)
  key = _row_key(task.name, v.name, ratio)
  _arm_watchdog(watchdog, out, key)
  res = train(task, v, rank, lrs, seeds, resample_every)
  losses, seconds, extended = res['losses'], res['seconds'], []
  while extend and len(extended) < MAX_EXTENSIONS:
    i = best_lr(lrs, losses)
    if 0 < i < len(lrs) - 1 or len(lrs) < 2:
      break
    # Beyond the edge, one grid step on (the grid is geometric).
    step = lrs[1] / lrs[0]
    new = lrs[0] / step if i == 0 else lrs[-1] * step
    _arm_watchdog(watchdog, out, key)
    more = train(task, v, rank, [new], seeds, resample_every)
    seconds += more['seconds']
    extended.append(new)
    lrs, losses = ((([new] + lrs), more['losses'] + losses) if i == 0 else
                   (lrs + [new], losses + more['losses']))
  _arm_watchdog(None)
  i = best_lr(lrs, losses)
  best = np.asarray(losses[i])
  row = dict(
      task=task.name, optimizer=v.name, label=v.label, ratio=ratio, rank=rank,
      lrs=lrs, losses=losses, lr_grid_extended=extended, best_lr=lrs[i],
      mean=_mean(best),
      std=float(best.std(ddof=1)) if len(best) > 1 else 0.0,
      state_bytes=res['state_bytes'], seconds=seconds, notes=res['notes'],
      accumulate=v.accumulate, seeds=list(seeds))
  edge = ' (best at the grid edge)' if i in (0, len(lrs) - 1) else ''
  log(f'  {v.name:<36} d/r={ratio or "-":<2} lr {lrs[i]:<9.3g}{edge} '
      f'{row["mean"]:.4f} ± {row["std"]:.4f}  state '
      f'{row["state_bytes"] / 1024:7.1f} KiB  {seconds:5.0f} s'
      + (f'  grid extended by {extended}' if extended else ''))
  return row


# ----------------------------------------------------------------------------
# Targets, tables, plot.
# ----------------------------------------------------------------------------


def _find(rows, task, optimizer, ratio=None):
  return next((r for r in rows if r['task'] == task and
               r['optimizer'] == optimizer and r['ratio'] == ratio), None)


def noise(a: dict[str, Any], b: dict[str, Any]) -> float:
  """The seed std of the difference of two rows' losses (unpaired)."""
  return math.hypot(a['std'], b['std'])


def targets(rows: list[dict[str, Any]], default: str | None,
            ratio: int = 4) -> list[dict[str, Any]]:
  """The issue's targets for the default Flora at ``d/r = ratio``, per task.

  1. Flora is not worse than Adafactor without momentum beyond the noise
     (``L_flora - L_nomom <= NOISE_MULT * noise``);
  2. where momentum clearly helps (``L_nomom - L_mom > NOISE_MULT * noise``),
     Flora closes at least 70% of the gap:
     ``(L_nomom - L_flora) / (L_nomom - L_mom) >= 0.7``.
  """
  out = []
  for task in dict.fromkeys(r['task'] for r in rows):
    mom = _find(rows, task, 'adafactor')
    nomom = _find(rows, task, 'adafactor_nomomentum')
    fl = _find(rows, task, default, ratio) if default else None
    if not (mom and nomom and fl):
      continue
    gap = nomom['mean'] - mom['mean']
    gap_noise = noise(mom, nomom)
    worse = fl['mean'] - nomom['mean']
    worse_noise = noise(fl, nomom)
    t = dict(task=task, ratio=ratio, optimizer=default,
             L_mom=mom['mean'], L_nomom=nomom['mean'], L_flora=fl['mean'],
             momentum_gap=gap, momentum_gap_noise=gap_noise,
             momentum_helps=gap > NOISE_MULT * gap_noise,
             flora_minus_nomom=worse, flora_minus_nomom_noise=worse_noise,
             not_worse=worse <= NOISE_MULT * worse_noise)
    t['gap_closed'] = (nomom['mean'] - fl['mean']) / gap if gap else math.nan
    t['closes_70'] = (t['gap_closed'] >= TARGET_GAP_CLOSED
                      if t['momentum_helps'] else None)
    out.append(t)
  return out


def _fmt(r: dict[str, Any] | None) -> str:
  return '-' if r is None else f"{r['mean']:.4f} ± {r['std']:.4f}"


def markdown(payload: dict[str, Any]) -> str:
  """The report: how tasks were chosen, per-task tables, targets."""
  rows, meta = payload['rows'], payload['meta']
  vs = variants()
  default = meta.get('default_variant')
  lines = [
      '# Quality study (issue 11)\n',
      'Each optimizer at its best learning rate (lowest mean final loss over '
      f"{len(meta['seeds'])} seeds), mean ± std (ddof=1) over seeds; a seed "
      'fixes the init, the data order and the projection key. Every row is '
      'the same Adafactor '
      f"({', '.join(f'{k}={v}' for k, v in ADAFACTOR.items())}, decay_rate "
      '0.8, warmup-cosine schedule: 10% warmup, down to 0.1x) and differs '
      f'only in the first moment (β = {MOMENTUM}). Flora: gaussian '
      "projections, transfer='unbiased', `resample_every` = "
      f"steps / {meta['resample_fraction']} on every task. The compressed "
      "axis of every matrix has d = the task's width, rank = d / ratio. "
      f'LoRA: `W = W0 + A B` on every matrix, `W0` frozen at the full '
      "model's init, `A` random, `B = 0`; other parameters trained. "
      f'MultiSteps rows: K = {ACCUMULATE} micro-batches of batch / '
      f'{ACCUMULATE} per update, inner Adafactor without momentum (the '
      'paper\'s setup); their rank is the accumulator\'s.\n',
      f"Library defaults ({meta.get('defaults')}): the row marked **(default)**"
      f' is `{default}`.\n',
      '## Tasks\n',
  ]
  for name, t in payload['tasks'].items():
    lines.append(f"- **{name}**: {t['description']} LR grid centre "
                 f"{t['lr']:g}; resample_every {t['resample_every']}.")
  lines.append('\n' + meta['task_choice'] + '\n')
  for task in payload['tasks']:
    lines.append(f'## {task}\n')
    table = []
    for r in rows:
      if r['task'] != task:
        continue
      v = vs.get(r['optimizer'])
      mark = ' **(default)**' if r['optimizer'] == default else ''
      per_seed = ', '.join(f'{x:.4f}' for x in r['losses'][r['lrs'].index(
          r['best_lr'])])
      grid = ', '.join(f'{x:g}' for x in r['lrs'])
      if r['lr_grid_extended']:
        grid += ' (extended)'
      table.append([(v.label if v else r['optimizer']) + mark,
                    r['ratio'] or '-', r['rank'] or '-',
                    f"{r['best_lr']:g}", _fmt(r), per_seed, grid,
                    f"{r['state_bytes'] / 1024:.1f}", f"{r['seconds']:.0f}"])
    lines.append(common.markdown_table(
        ['optimizer', 'd/r', 'rank', 'best lr', 'final loss', 'per seed',
         'lr grid', 'state KiB', 's'], table))
  lines.append('## Summary: each optimizer at its best learning rate\n')
  tasks = list(payload['tasks'])
  ratios = sorted({r['ratio'] for r in rows if r['ratio']})
  table = []
  for name, v in vs.items():
    for ratio in (ratios if v.ranked else [None]):
      cells = [_fmt(_find(rows, t, name, ratio)) for t in tasks]
      if any(c != '-' for c in cells):
        mark = ' **(default)**' if name == default else ''
        table.append([v.label + mark, ratio or '-'] + cells)
  lines.append(common.markdown_table(['optimizer', 'd/r'] + tasks, table))
  lines.append('## Best Flora variant per task and d/r\n')
  table = []
  for t in tasks:
    for ratio in ratios:
      cand = [r for r in rows if r['task'] == t and r['ratio'] == ratio and
              vs.get(r['optimizer']) and vs[r['optimizer']].flora]
      if cand:
        b = min(cand, key=lambda r: r['mean'])
        table.append([t, ratio, b['optimizer'], _fmt(b)])
  lines.append(common.markdown_table(['task', 'd/r', 'best Flora variant',
                                      'final loss'], table))
  lines.append(f"## Targets for the default Flora (`{default}`), d/r = 4\n")
  lines.append(
      f'noise = sqrt(std_a² + std_b²) of the two rows compared; "clearly" = '
      f'by more than {NOISE_MULT:g} noise. Gap closed = (L_nomom - L_flora) / '
      '(L_nomom - L_mom).\n')
  table = []
  for t in payload['targets']:
    ok1 = 'yes' if t['not_worse'] else '**no**'
    ok2 = ('n/a (no clear momentum gap)' if t['closes_70'] is None else
           'yes' if t['closes_70'] else '**no**')
    z_gap = t['momentum_gap'] / max(t['momentum_gap_noise'], 1e-30)
    z_worse = t['flora_minus_nomom'] / max(t['flora_minus_nomom_noise'], 1e-30)
    table.append([
        t['task'], f"{t['L_mom']:.4g}", f"{t['L_nomom']:.4g}",
        f"{t['L_flora']:.4g}", f"{t['momentum_gap']:.3g} ({z_gap:.1f} noise)",
        f"{t['flora_minus_nomom']:+.3g} ({z_worse:+.1f} noise)", ok1,
        f"{t['gap_closed']:.0%}", ok2])
  lines.append(common.markdown_table(
      ['task', 'L_mom', 'L_nomom', 'L_flora', 'momentum gap',
       'flora - nomom', 'not worse than nomom', 'gap closed',
       '>= 70% closed'], table))
  measured = {_row_key(r['task'], r['optimizer'], r['ratio']) for r in rows}
  hung = [k for k, n in meta.get('hung', {}).items()
          if n >= MAX_HANGS and k not in measured]
  if hung:
    lines.append('Not measured: the XLA:CPU program of these rows hung '
                 f'{MAX_HANGS} times (jaxlib {meta.get("jaxlib", "?")}; all '
                 'threads idle, the result never ready): ' +
                 ', '.join(f'`{k}`' for k in hung) + '.\n')
  lines.append(f"Total compute: {meta['seconds']:.0f} s of training "
               f"(compile included) on {meta['platform']}.\n")
  return '\n'.join(lines)


def plot(payload: dict[str, Any], path: str) -> None:
  """Final loss vs d/r per task: Flora variants and LoRA against baselines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, tasks = payload['rows'], list(payload['tasks'])
  vs = variants()
  if not tasks:
    return
  cols = min(2, len(tasks))
  nrows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4 * nrows + 1.5),
                           squeeze=False)
  for ax in axes.flat[len(tasks):]:
    ax.axis('off')
  for ax, task in zip(axes.flat, tasks):
    flat = {'adafactor': 'k', 'adafactor_nomomentum': 'tab:red',
            'multisteps_optax': 'tab:gray'}
    for name, color in flat.items():
      r = _find(rows, task, name)
      if r:
        ax.axhline(r['mean'], color=color, ls='--', lw=1, label=vs[name].label)
        ax.axhspan(r['mean'] - r['std'], r['mean'] + r['std'], color=color,
                   alpha=0.1)
    for name, v in vs.items():
      pts = sorted((r['ratio'], r['mean'], r['std']) for r in rows
                   if r['task'] == task and r['optimizer'] == name and
                   r['ratio'])
      if not pts:
        continue
      x, m, s = map(np.asarray, zip(*pts))
      label = v.label + (' (default)' if name ==
                         payload['meta'].get('default_variant') else '')
      ax.errorbar(x, m, yerr=s, marker='o', ms=4, capsize=3, label=label,
                  ls=':' if name.startswith(('lora', 'multisteps')) else '-')
    # Paper mode is far above the others on some tasks: a log scale keeps
    # the residual variants apart.
    ax.set_yscale('log')
    ax.set_xscale('log', base=2)
    ax.set_xticks(RATIOS, [str(r) for r in RATIOS])
    ax.set_xlabel('d / r')
    ax.set_ylabel('final loss (best lr, mean ± std)')
    ax.set_title(task)
    ax.grid(alpha=0.3)
  handles, labels = [], []
  for ax in axes.flat:
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=8)
  fig.tight_layout(rect=(0, 1.5 / (4 * nrows + 1.5), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

TASK_CHOICE = (
    'How the tasks were chosen. The (full-run) sizes make the smaller axis '
    'of every matrix d = 128, so d/r = 2, 4, 8 is rank 64, 32, 16. Each '
    'non-language task was tuned (input conditioning, label noise, steps) '
    'until Adafactor with momentum 0.9 beat Adafactor without momentum, '
    'both at their best learning rates, by more than 2 seed stds. With '
    'noisy labels (least squares with label noise std 1; a teacher-student '
    'classifier trained on labels sampled from the teacher) or mild '
    'conditioning the two were within noise: momentum paid only where the '
    'learning rate is limited by curvature (a rotated power-law input '
    'covariance, little label noise). The language model is the exception: '
    'in every setting tried (300 updates of 16 x 32 bytes, held-out loss; '
    '150 updates of 64 x 32; cosine decay to 0; memorising 256 fixed '
    'windows) Adafactor without momentum was as good or better, at learning '
    'rates from 0.0025 to 0.02. It stays in the study (the issue asks for a '
    'language model, and it measures Flora and LoRA against the baselines), '
    'its targets row says whether the momentum gap is clear, and the '
    'autoencoder is a third task with a clear gap.')


def _csv(text: str | None, cast=str) -> list[Any] | None:
  return None if text is None else [cast(x) for x in text.split(',') if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks.quality',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='tiny sizes: a smoke run (no meaningful figures)')
  p.add_argument('--tasks', help=f'comma-separated, from {",".join(TASKS)}')
  p.add_argument('--variants', help='comma-separated, from '
                 f'{",".join(variants())} or default (the library\'s)')
  p.add_argument('--ratios', help='comma-separated d/r (default 2,4,8; on '
                 'the LM the non-default residual variants at 4 only, unless '
                 '--all-ratios)')
  p.add_argument('--all-ratios', action='store_true',
                 help='every Flora variant at every ratio on the LM too')
  p.add_argument('--seeds', help='comma-separated seeds (default 0,1,2)')
  p.add_argument('--lrs', help='comma-separated factors of each task\'s grid '
                 f'centre (default {",".join(map(str, LR_FACTORS))})')
  p.add_argument('--no-extend', action='store_true',
                 help='do not extend the grid when the best lr is at an edge')
  p.add_argument('--fresh', action='store_true',
                 help='do not merge into an earlier results JSON')
  p.add_argument('--resume', action='store_true',
                 help='skip the rows that the results JSON already has')
  p.add_argument('--watchdog', type=float, default=None, metavar='SECONDS',
                 help='exit with status 3 when one training program (one '
                 'row, or one grid extension) takes longer, a fifth of it on '
                 'the small tasks (some '
                 'XLA:CPU programs wedge at random on jaxlib 0.10.2); rerun '
                 'with --resume to go on')
  p.add_argument('--max-hangs', type=int, default=MAX_HANGS,
                 help='with --resume, skip a row that hung this many times')
  p.add_argument('--report-only', action='store_true',
                 help='train nothing: rewrite the markdown and plot (and '
                 'the targets) from the results JSON')
  p.add_argument('--out', help='results folder (default benchmarks/results, '
                 'or benchmarks/results/quick with --quick)')
  args = p.parse_args(argv)
  # --quick: a small subset that runs in well under a minute.
  quick = QUICK if args.quick else {}
  args.tasks = _csv(args.tasks) or quick.get('tasks', list(TASKS))
  args.variants = _csv(args.variants) or quick.get('variants',
                                                    list(variants()))
  args.seeds = _csv(args.seeds, int) or quick.get('seeds', [0, 1, 2])
  args.lrs = _csv(args.lrs, float) or list(LR_FACTORS)
  args.ratios = _csv(args.ratios, int) or quick.get('ratios')
  args.no_extend = args.no_extend or args.quick
  # 'default': whichever variant plain flora_optax.flora is.
  vs, args.defaults = variants(), library_defaults()
  args.default = next(
      (n for n, v in vs.items() if is_default(v, args.defaults)), None)
  args.variants = list(dict.fromkeys(
      args.default if x == 'default' else x for x in args.variants))
  for flag, values, known in (('tasks', args.tasks, TASKS),
                              ('variants', args.variants, vs)):
    bad = [x for x in values if x not in known]
    if bad:
      p.error(f'--{flag}: unknown {bad}; choose from {list(known)}')
  if len(args.seeds) < 2:
    p.error('--seeds: at least two (the std needs them)')
  return args


RESAMPLE_FRACTION = 8  # resample_every = steps / 8
# --quick: the baselines, the library's default Flora ('default'), LoRA and
# compressed accumulation (LM only), at d/r = 4, two seeds, no grid extension.
QUICK = dict(tasks=['lm', 'regression'], seeds=[0, 1], ratios=[4],
             variants=['adafactor', 'adafactor_nomomentum', 'default', 'lora',
                       'multisteps_flora'])


_WATCHDOG: list[Any] = []
MAX_HANGS = 2  # a row that hung this many times is skipped by --resume


def _hung_path(out: str) -> str:
  return os.path.join(out, f'{NAME}_hung.json')


def _read_hung(out: str) -> dict[str, int]:
  if not os.path.exists(_hung_path(out)):
    return {}
  with open(_hung_path(out)) as f:
    return json.load(f)


def _row_key(task: str, optimizer: str, ratio: int | None) -> str:
  return f'{task}/{optimizer}/{ratio or "-"}'


def _arm_watchdog(seconds: float | None, out: str = '',
                  row: str = '') -> None:
  """(Re)starts a timer that ends the process if a row hangs.

  The hung row is counted in ``quality_hung.json`` so that ``--resume``
  skips it after ``MAX_HANGS`` tries.
  """
  import threading  # pylint: disable=g-import-not-at-top
  while _WATCHDOG:
    _WATCHDOG.pop().cancel()
  if seconds:

    def fire():
      print(f'watchdog: {row} did not finish in {seconds:g} s; exiting '
            '(rerun with --resume)', flush=True)
      hung = _read_hung(out)
      hung[row] = hung.get(row, 0) + 1
      with open(_hung_path(out), 'w') as f:
        json.dump(hung, f)
      os._exit(3)  # pylint: disable=protected-access

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    _WATCHDOG.append(timer)


def _write(out: str, old: dict[str, Any], new_rows: list[dict[str, Any]],
           task_meta: dict[str, Any], args: argparse.Namespace,
           seconds: float, plot_too: bool = False) -> list[str]:
  """Merges ``new_rows`` into ``old`` and writes the JSON, markdown, plot."""
  vs = variants()
  keys = {(r['task'], r['optimizer'], r['ratio']) for r in new_rows}
  rows = [r for r in old['rows']
          if (r['task'], r['optimizer'], r['ratio']) not in keys] + new_rows
  tasks = {**old['tasks'], **task_meta}
  order = {n: i for i, n in enumerate(vs)}
  rows.sort(key=lambda r: (list(TASKS).index(r['task']),
                           order.get(r['optimizer'], len(order)),
                           r['ratio'] or 0))
  tasks = {t: tasks[t] for t in TASKS if t in tasks}
  meta = dict(
      jax=jax.__version__, optax=optax.__version__,
      flora_optax=flora_optax.__version__,
      platform=(f'{jax.devices()[0].platform} / '
                f'{platform.processor() or platform.machine()}, '
                f'{os.cpu_count()} CPUs'),
      quick=args.quick, seeds=sorted({s for r in rows for s in r['seeds']}),
      adafactor=ADAFACTOR, momentum=MOMENTUM, accumulate=ACCUMULATE,
      resample_fraction=RESAMPLE_FRACTION, noise_mult=NOISE_MULT,
      defaults=args.defaults, default_variant=args.default,
      task_choice=TASK_CHOICE, hung=_read_hung(out),
      jaxlib=importlib.metadata.version('jaxlib'),
      seconds=old['meta'].get('seconds', 0.0) + seconds)
  payload = dict(meta=meta, tasks=tasks, rows=rows,
                 targets=targets(rows, args.default))
  # write_results joins its name onto results/; an absolute name is kept as
  # it is (os.path.join), which sends the files to `out`.
  paths = list(common.write_results(
      os.path.join(os.path.abspath(out), NAME), payload, markdown(payload)))
  if plot_too:
    png = os.path.join(out, f'{NAME}.png')
    plot(payload, png)
    paths.append(png)
  return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
  args = parse_args(argv)
  out = args.out or (os.path.join(common.RESULTS_DIR, 'quick') if args.quick
                     else common.RESULTS_DIR)
  os.makedirs(out, exist_ok=True)
  vs, defaults, default = variants(), args.defaults, args.default
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform.upper()}; '
        f'flora_optax defaults: {defaults or "paper (no study factories)"}'
        f' -> {default}')
  if not has_variants():
    skipped = [n for n in args.variants if vs[n].flora and
               vs[n].flora['residual']]
    if skipped:
      print(f'skipping {skipped}: flora_optax._alias.make_flora is missing')
    args.variants = [n for n in args.variants if n not in skipped]
  jpath = os.path.join(out, f'{NAME}.json')
  old = {'rows': [], 'tasks': {}, 'meta': {'seconds': 0.0}}
  if not args.fresh and os.path.exists(jpath):
    with open(jpath) as f:
      old = json.load(f)
  done = {(r['task'], r['optimizer'], r['ratio']) for r in old['rows']}
  new_rows, task_meta = [], {}
  t0 = time.perf_counter()
  for task_name in ([] if args.report_only else args.tasks):
    task = TASKS[task_name](args.quick)
    kappa = max(1, task.steps // RESAMPLE_FRACTION)
    print(f'{task.name}: {task.description}')
    task_meta[task.name] = dict(description=task.description, lr=task.lr,
                                resample_every=kappa, d=task.d,
                                settings=task.settings)
    lrs = [task.lr * f for f in args.lrs]
    # The small tasks' programs take seconds: wait less for them.
    watchdog = args.watchdog and (args.watchdog if task.name == 'lm' else
                                  args.watchdog / 5)
    work = []
    for name in args.variants:
      v = vs[name]
      if v.lm_only and task.name != 'lm':
        continue
      if not v.ranked:
        ratios = [None]
      elif args.ratios:
        ratios = args.ratios
      elif (task.name == 'lm' and v.flora and v.flora['residual'] and
            name != default and not args.all_ratios):
        ratios = [4]  # the LM is the costly task
      else:
        ratios = list(RATIOS)
      work += [(v, ratio) for ratio in ratios]
    # d/r = 4 (the targets' ratio) first, so that a run cut short has it.
    work.sort(key=lambda w: w[1] not in (None, 4))
    for v, ratio in work:
      if args.resume and (task.name, v.name, ratio) in done:
        continue
      if (args.resume and _read_hung(out).get(
          _row_key(task.name, v.name, ratio), 0) >= args.max_hangs):
        print(f'  {v.name:<36} d/r={ratio or "-":<2} skipped: hung '
              f'{args.max_hangs} times (XLA:CPU)')
        continue
      new_rows.append(run_row(task, v, ratio, lrs, args.seeds, kappa,
                              extend=not args.no_extend, log=print,
                              watchdog=watchdog, out=out))
      # Written after every row: a run that dies keeps what it measured.
      _write(out, old, new_rows, task_meta, args, time.perf_counter() - t0)
  _arm_watchdog(None)
  seconds = time.perf_counter() - t0
  paths = _write(out, old, new_rows, task_meta, args, seconds, plot_too=True)
  print(f'\n{seconds:.0f} s; ' + ', '.join(paths))
  with open(paths[0]) as f:
    payload = json.load(f)
  for t in payload['targets']:
    print(f"target ({t['task']}, d/r=4, {t['optimizer']}): not worse than "
          f"no momentum: {t['not_worse']}; gap closed {t['gap_closed']:.0%} "
          f"(momentum gap clear: {t['momentum_helps']})")
  return paths


if __name__ == '__main__':
  main()
