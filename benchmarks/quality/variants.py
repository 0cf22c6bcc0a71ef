"""The study's rows: which optimizer each one trains.

Every row is the same Adafactor (:data:`settings.ADAFACTOR`) and differs only
in the first moment. The Flora rows other than the library's default are
built from public parts (:func:`flora_chain`), the default is
``flora_optax.flora`` itself. AdamW's rows, and the other optimizers
wrapped by ``flora_optax.quantized`` (issue 28: Muon, Lion, AdEMAMix, SGD
with momentum, float and in 8-/4-bit codes), are their own optimizers at the
task's learning rates (times their ``lr_factor``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax
import optax.contrib

import flora_optax
from benchmarks.quality import frontier
from benchmarks.quality.settings import ACCUMULATE, ADAFACTOR, MOMENTUM
from flora_optax._momentum import DEFAULT_RESIDUAL

# make(learning_rate, rank, key, resample_every) -> GradientTransformation.
MakeTx = Callable[[optax.Schedule, int | None, Any, int],
                  optax.GradientTransformation]
MOMENTUM_POSITIONS = ('paper', 'optax')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study.

  Attributes:
    name: the key used on the command line and in the results.
    label: what the tables say.
    make: builds the optimizer (see ``MakeTx``); ``None``: a row whose
      figures are recorded in the results but that can no longer be built
      (``flora_optax`` dropped its option), reported, not run.
    ranked: whether it depends on the rank (one row per ``d/r``).
    lora: trains the LoRA-reparametrised model.
    accumulate: micro-batches per update (same examples per update); rows
      with ``accumulate > 1`` run on the tasks with ``Task.accumulation``.
    ablation: a row that settled a default (a code map, a block size, a
      rounding, a momentum position) or a variant of a peer (GaLore with
      Adafactor): run only when named (``--variants``, ``--ablations``), so
      that the full run stays within its time.
    sweep: a ranked row that runs at every ``d/r`` of a task (the others
      run at 4, the targets' ratio, unless ``--ratios``/``--all-ratios``).
    flora: the Flora momentum's options, ``residual``, ``momentum_position``
      (and ``subspace_scale`` in residual mode); ``None``: not a Flora
      momentum row.
    lr_factor: a power of two: a row measured for the first time centres
      its grid on the task's centre times this (optimizers whose steps have
      another scale than Adafactor's: Lion's sign steps, Muon's
      orthogonalised ones, plain SGD), on the task's lattice of learning
      rates.
    named_only: a row outside the full run (and outside ``--ablations``'
      rows that settled a default): run when named with ``--variants``
      (the other optimizers of issue 28, which the full run's 90 minutes
      can not hold).
  """

  name: str
  label: str
  make: MakeTx | None
  ranked: bool
  lora: bool = False
  accumulate: int = 1
  ablation: bool = False
  sweep: bool = False
  flora: dict[str, Any] | None = None
  lr_factor: float = 1.0
  named_only: bool = False
  state_bytes: Callable[[Any], int] | None = None

  def __post_init__(self):
    octaves = math.log2(self.lr_factor)
    if octaves != round(octaves):
      raise ValueError(f'{self.name}: lr_factor must be a power of two (the '
                       f"task's lattice of learning rates), not "
                       f'{self.lr_factor}')


def flora_chain(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | None,
    *,
    residual: bool,
    momentum_position: str,
    momentum: float = 0.9,
    key: Any = 0,
    resample_every: int | None = 1000,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    eps: float = 1e-30,
    factored: bool = True,
) -> optax.GradientTransformation:
  """``flora_optax.flora`` built from public parts, its momentum anywhere.

  The chain of ``optax.adafactor`` with the momentum replaced by
  ``flora_optax.compressed_momentum``, placed right after
  ``scale_by_factored_rms`` (``momentum_position='paper'``, the paper's
  order) or after clipping, the learning rate and the parameter scale
  (``'optax'``, ``optax.adafactor``'s order). ``flora_optax.flora`` puts
  paper-mode momentum (``residual=False``) in the paper's position and
  residual momentum in optax's; there this chain equals it bit for bit
  (``tests/test_quality_variants.py``). Arguments as in ``flora``.
  """
  if momentum_position not in MOMENTUM_POSITIONS:
    raise ValueError(f'momentum_position must be one of {MOMENTUM_POSITIONS},'
                     f' not {momentum_position!r}')
  # The arguments in flora's order: optax's third is its step_offset.
  tx = [optax.scale_by_factored_rms(factored, decay_rate, decay_offset,
                                    min_dim_size_to_factor, eps)]
  momentum_tx = flora_optax.compressed_momentum(
      rank, decay=momentum, resample_every=resample_every, key=key,
      residual=residual)
  if momentum_position == 'paper':
    tx.append(momentum_tx)
  if clipping_threshold is not None:
    tx.append(optax.clip_by_block_rms(clipping_threshold))
  tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(optax.scale_by_param_block_rms())
  if momentum_position == 'optax':
    tx.append(momentum_tx)
  tx.append(optax.scale(-1))
  return optax.chain(*tx)


def library_defaults() -> dict[str, Any]:
  """The Flora momentum options that plain ``flora_optax.flora`` uses."""
  residual = DEFAULT_RESIDUAL
  # flora puts the paper's algorithm in the paper's position and residual
  # momentum in optax's; its residual momentum's subspace part is the
  # orthogonal projection (the study's 'projection' scale, the only one
  # flora_optax has now).
  return dict(residual=residual,
              momentum_position='optax' if residual else 'paper',
              subspace_scale='projection')


def _adafactor(momentum: float | None) -> MakeTx:
  def make(lr, rank, key, resample_every):
    del rank, key, resample_every
    return optax.adafactor(lr, momentum=momentum, **ADAFACTOR)
  return make


def _flora(options: dict[str, Any]) -> MakeTx:
  """The Flora momentum row of ``options``: ``flora_optax.flora`` when they
  are the library's defaults, :func:`flora_chain` otherwise."""
  residual, position = options['residual'], options['momentum_position']
  default = library_defaults()

  def make(lr, rank, key, resample_every):
    if (residual, position) == (default['residual'],
                                default['momentum_position']):
      return flora_optax.flora(lr, rank, momentum=MOMENTUM, key=key,
                               resample_every=resample_every,
                               residual=residual, **ADAFACTOR)
    return flora_chain(lr, rank, residual=residual,
                       momentum_position=position, momentum=MOMENTUM, key=key,
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
    # The maps of issue 29 (the 4-bit default became 'normal' quantiles,
    # the 8-bit one 'sqrt'); the linear rows are the defaults before it.
    'momentum_8bit_linear': (8, dict(code_map='linear')),
    'momentum_4bit_linear': (4, dict(code_map='linear')),
    'momentum_4bit_normal': (4, dict(code_map='normal')),
    'momentum_4bit_dynamic': (4, dict(code_map='dynamic')),
    'momentum_4bit_log': (4, dict(code_map='log')),
    'momentum_4bit_block128': (4, dict(code_map='linear', block_size=128)),
    'momentum_4bit_sqrt_block128': (4, dict(code_map='sqrt', block_size=128)),
    'momentum_4bit_sqrt_block256': (4, dict(code_map='sqrt', block_size=256)),
    'momentum_4bit_sqrt_block128_stochastic': (4, dict(
        code_map='sqrt', block_size=128, stochastic_rounding=True)),
}


def _adamw(**options: Any) -> MakeTx:
  """AdamW at the task's learning rates (no Adafactor): ``optax.adamw`` with
  ``options`` of it (``mu_dtype``), or ``flora_optax.adamw`` with ``bits``
  and its quantization keywords (issue 20)."""
  def make(lr, rank, key, resample_every):
    del rank, resample_every
    if 'bits' not in options:
      return optax.adamw(lr, **options)
    return flora_optax.adamw(lr, key=key, **options)
  return make


def _adamw_ablations() -> list[tuple[str, str, dict[str, Any]]]:
  """(row suffix, label, keywords) of ``flora_optax.adamw``'s map rows."""
  rows = [
      ('8bit_m_linear', "bits=8, code_map='linear'",
       dict(bits=8, code_map='linear')),
      ('4bit_m_linear', "bits=4, code_map='linear'",
       dict(bits=4, code_map='linear')),
      ('4bit_nu_linear', "bits=4, code_map='linear', nu_code_map='linear'",
       dict(bits=4, code_map='linear', nu_code_map='linear')),
      ('4bit_stochastic', "bits=4, code_map='linear', "
       'stochastic_rounding=True',
       dict(bits=4, code_map='linear', stochastic_rounding=True)),
      ('4bit_m_sqrt', "bits=4, code_map='sqrt'",
       dict(bits=4, code_map='sqrt')),
      ('4bit_m_sqrt_nu_linear', "bits=4, code_map='sqrt', "
       "nu_code_map='linear'",
       dict(bits=4, code_map='sqrt', nu_code_map='linear')),
      ('8bit_nu_linear', "bits=8, code_map='linear', nu_code_map='linear'",
       dict(bits=8, code_map='linear', nu_code_map='linear')),
  ]
  for m in ('normal', 'dynamic', 'log'):
    rows.append((f'4bit_m_{m}', f"bits=4, code_map='{m}'",
                 dict(bits=4, code_map=m)))
    if m != 'normal':  # (signed only)
      rows.append((f'4bit_nu_{m}', f"bits=4, nu_code_map='{m}'",
                   dict(bits=4, nu_code_map=m)))
  return rows


_ADAMW_ABLATIONS = _adamw_ablations()


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


def _shapes_from_updates(
    tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` called with the updates as its ``params``.

  GaLore's base optimizer gets no parameters (it works on the projected
  gradients); ``scale_by_factored_rms`` reads only their shapes and dtypes,
  which the projected updates have.
  """
  return optax.GradientTransformation(
      tx.init, lambda updates, state, params=None: tx.update(
          updates, state, updates))


def _galore(adafactor: bool) -> MakeTx:
  """``optax.contrib.galore`` at the row's rank, its projector refreshed
  (an SVD of the gradient) every ``resample_every`` steps."""
  def make(lr, rank, key, resample_every):
    del key
    base = None  # optax's default: scale_by_adam()
    if adafactor:
      # optax.adafactor without its learning rate and sign flip (galore
      # applies the learning rate): a gradient-only transformation.
      base = _shapes_from_updates(optax.chain(
          optax.scale_by_factored_rms(
              min_dim_size_to_factor=ADAFACTOR['min_dim_size_to_factor']),
          optax.clip_by_block_rms(ADAFACTOR['clipping_threshold']),
          optax.ema(MOMENTUM, debias=False)))
    return optax.contrib.galore(lr, rank, update_proj_gap=resample_every,
                                base_optimizer=base)
  return make


# Other optimizers (issue 28), each float and wrapped by
# flora_optax.quantized: name -> (label, inner(lr), lr_factor, bits). The
# factors (powers of two) centre a first measurement near where each is
# known to work relative to Adam: Lion's sign steps want a learning rate
# several times smaller, Muon's orthogonalised steps about 0.02 at
# Adafactor's 0.005, SGD a much larger one.
OTHER_OPTIMIZERS: dict[str, tuple[str, Callable[[optax.ScalarOrSchedule],
                                                 optax.GradientTransformation],
                                  float, tuple[int, ...]]] = {
    'muon': ('optax.contrib.muon', optax.contrib.muon, 4.0, (8, 4)),
    'lion': ('optax.lion', optax.lion, 1 / 4, (8, 4)),
    'ademamix': ('optax.contrib.ademamix', optax.contrib.ademamix, 1.0, (8,)),
    'sgd_momentum': (f'optax.sgd(momentum={MOMENTUM})',
                     lambda lr: optax.sgd(lr, momentum=MOMENTUM), 32.0,
                     (8,)),
}


def _other(inner: Callable[[optax.ScalarOrSchedule],
                           optax.GradientTransformation],
           bits: int | None, **options: Any) -> MakeTx:
  """``inner(lr)`` itself (``bits=None``) or ``flora_optax.quantized`` of
  it, its large state leaves in ``bits``-bit codes (``options``: its
  keywords)."""
  def make(lr, rank, key, resample_every):
    del rank, key, resample_every
    return flora_optax.quantized(inner(lr), bits=bits, **options)
  return make


def _other_rows() -> list[Variant]:
  """Per other optimizer: the float row, then its quantized rows."""
  rows = []
  for name, (label, inner, factor, bits) in OTHER_OPTIMIZERS.items():
    rows.append(Variant(name, label, _other(inner, None), ranked=False,
                        lr_factor=factor, named_only=True))
    for b in bits:
      rows.append(Variant(f'{name}_{b}bit',
                          f'flora_optax.quantized({label}, bits={b})',
                          _other(inner, b), ranked=False, lr_factor=factor,
                          named_only=True))
  # The default before issue 29's maps (the linear map for signed blocks).
  for name, (label, inner, factor, bits) in OTHER_OPTIMIZERS.items():
    for b in bits:
      rows.append(Variant(f'{name}_{b}bit_linear',
                          f'flora_optax.quantized({label}, bits={b}, '
                          "code_map='linear')",
                          _other(inner, b, code_map='linear'), ranked=False,
                          lr_factor=factor, ablation=True, named_only=True))
  # Ablation: the companded map for signed blocks, where 8-bit codes missed
  # (Muon and Lion on the small tasks; issue 29's maps).
  for name in ('muon', 'lion'):
    label, inner, factor, _ = OTHER_OPTIMIZERS[name]
    rows.append(Variant(f'{name}_8bit_sqrt',
                        f"flora_optax.quantized({label}, bits=8, "
                        "code_map='sqrt')",
                        _other(inner, 8, code_map='sqrt'), ranked=False,
                        lr_factor=factor, ablation=True, named_only=True))
  # Why 8-bit Muon misses on the small tasks: momentum rounded relative to
  # each entry (bfloat16) against codes relative to a block's absmax, at
  # blocks of 256 (the default) and 32.
  label, inner, factor, _ = OTHER_OPTIMIZERS['muon']
  rows += [
      Variant('muon_bf16', f'{label}(mu_dtype=bfloat16)',
              _other(lambda lr: inner(lr, mu_dtype=jnp.bfloat16), None),
              ranked=False, lr_factor=factor, ablation=True,
              named_only=True),
      Variant('muon_8bit_block32',
              f'flora_optax.quantized({label}, bits=8, block_size=32)',
              _other(inner, 8, block_size=32), ranked=False,
              lr_factor=factor, ablation=True, named_only=True),
  ]
  return rows


def _flora_rows() -> list[Variant]:
  """The Flora momentum rows: the paper's, and residual momentum with its
  subspace part scaled as ``Π_c M`` (``projection``) or ``decompress_c(M)``
  (``unbiased``: recorded only, flora_optax no longer builds it) in both
  positions."""
  paper = dict(residual=False, momentum_position='paper')
  rows = [Variant('flora_paper', 'Flora, paper (residual=False)',
                  _flora(paper), ranked=True, flora=paper, sweep=True)]
  for scale in ('projection', 'unbiased'):
    for position in ('paper', 'optax'):
      opts = dict(residual=True, subspace_scale=scale,
                  momentum_position=position)
      default = opts == library_defaults()
      rows.append(Variant(
          f'flora_residual_{scale}_{position}',
          f'Flora, residual, {scale} scale, {position} position',
          _flora(opts) if scale == 'projection' else None, ranked=True,
          flora=opts, ablation=not default, sweep=default))
  return rows


def _frontier_rows() -> list[Variant]:
  """Issue 29's study-only prototypes (``frontier.py``), run when named
  (ablations: no library option builds them):
  the momentum in 1-3-bit block codes and as signs with factored
  magnitudes (the frontier, at most a quarter byte per parameter), and
  4-bit AdamW with the second moment rank-1 normalized (Li et al.). Their
  bytes are the packed layout's (storage simulated)."""
  packed = frontier.packed_state_bytes
  rows = [Variant(name, frontier.block_label(opts),
                  frontier.make_block(opts, MOMENTUM), ranked=False,
                  ablation=True, named_only=True, state_bytes=packed)
          for name, opts in frontier.BLOCK_ROWS.items()]
  rows.append(Variant(
      'momentum_factored_sign', 'momentum as signs x rank-1 factored '
      '|m| (prototype, storage simulated)',
      frontier.make_factored(MOMENTUM), ranked=False, ablation=True,
      named_only=True, state_bytes=packed))
  rows.append(Variant(
      'momentum_factored_sign_bf16', 'momentum as signs x rank-1 factored '
      '|m|, factors in bfloat16 (prototype, storage simulated)',
      frontier.make_factored(MOMENTUM, jnp.bfloat16), ranked=False,
      ablation=True, named_only=True, state_bytes=packed))
  for nu, what in (('block', 'prototype of flora_optax.adamw(bits=4)'),
                   ('rank1', 'v rank-1 normalized, linear map without 0'),
                   ('rank1_sqrt', "v rank-1 normalized, 'sqrt' map")):
    name = 'adamw_4bit_proto' if nu == 'block' else f'adamw_4bit_nu_{nu}'
    rows.append(Variant(name, f'AdamW, 4-bit moments ({what}; prototype, '
                        'storage simulated)', frontier.make_adamw(nu),
                        ranked=False, ablation=True, named_only=True,
                        state_bytes=packed))
  return rows


def variants() -> dict[str, Variant]:
  """Every row of the study, in table order (recorded-only rows included)."""
  rows = [
      Variant('adafactor', f'Adafactor, momentum {MOMENTUM}',
              _adafactor(MOMENTUM), ranked=False),
      Variant('adafactor_nomomentum', 'Adafactor, no momentum',
              _adafactor(None), ranked=False),
      *_flora_rows(),
      Variant('lora', f'LoRA + Adafactor, momentum {MOMENTUM}',
              _adafactor(MOMENTUM), ranked=True, lora=True, sweep=True),
      Variant('multisteps_optax', f'optax.MultiSteps (K={ACCUMULATE})',
              _multisteps(False), ranked=False, accumulate=ACCUMULATE),
      Variant('multisteps_flora', f'flora_optax.MultiSteps (K={ACCUMULATE})',
              _multisteps(True), ranked=True, accumulate=ACCUMULATE),
      # Quantized states (issue 18): the same bytes spent on precision.
      Variant('adafactor_bf16', f'Adafactor, bf16 momentum {MOMENTUM}',
              _adafactor_bf16(), ranked=False),
      Variant('momentum_8bit', 'momentum in 8-bit codes (rank=None, bits=8)',
              _quantized(8, False), ranked=False),
      Variant('momentum_4bit', 'momentum in 4-bit codes (rank=None, bits=4)',
              _quantized(4, False), ranked=False),
      Variant('flora_8bit', 'Flora sketch in 8-bit codes (bits=8)',
              _quantized(8, True), ranked=True),
      # The frontier of issue 29: a quarter of the bytes of 4-bit codes.
      Variant('flora_4bit', 'Flora sketch in 4-bit codes (bits=4)',
              _quantized(4, True), ranked=True, named_only=True),
      Variant('flora_8bit_linear',
              "Flora sketch in 8-bit codes (bits=8, code_map='linear')",
              _quantized(8, True, code_map='linear'), ranked=True,
              ablation=True),
      Variant('multisteps_8bit',
              f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, bits=8)',
              _multisteps_quantized(8), ranked=False, accumulate=ACCUMULATE),
      Variant('multisteps_4bit',
              f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, bits=4)',
              _multisteps_quantized(4), ranked=False, accumulate=ACCUMULATE),
      *[Variant(f'multisteps_{b}bit_linear',
                f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, '
                f"bits={b}, code_map='linear')",
                _multisteps_quantized(b, code_map='linear'), ranked=False,
                accumulate=ACCUMULATE, ablation=True) for b in (8, 4)],
  ]
  rows += [
      # AdamW with quantized moments (issue 20), next to optax's own.
      Variant('adamw', 'optax.adamw', _adamw(), ranked=False),
      Variant('adamw_bf16', 'optax.adamw(mu_dtype=bf16)',
              _adamw(mu_dtype=jnp.bfloat16),
              ranked=False, ablation=True),
      Variant('adamw_8bit', 'flora_optax.adamw(bits=8)', _adamw(bits=8),
              ranked=False),
      Variant('adamw_4bit', 'flora_optax.adamw(bits=4)', _adamw(bits=4),
              ranked=False),
      # The maps, one keyword changed each (issue 29: the first moment's
      # default became 'normal' quantiles at 4 bits and 'sqrt' at 8; the
      # rows with code_map='linear' were measured with the default before).
      *[Variant(f'adamw_{name}', f'flora_optax.adamw({what})',
                _adamw(**kw), ranked=False, ablation=True)
        for name, what, kw in _ADAMW_ABLATIONS],
  ]
  for bits in (8, 4):
    rows.append(Variant(
        f'multisteps_{bits}bit_nearest',
        f'flora_optax.MultiSteps (K={ACCUMULATE}, rank=None, bits={bits}, '
        "code_map='linear', nearest rounding)",
        _multisteps_quantized(bits, code_map='linear',
                              stochastic_rounding=False), ranked=False,
        accumulate=ACCUMULATE, ablation=True))
  for name, (bits, options) in QUANT_ABLATIONS.items():
    what = ', '.join(f'{k}={v!r}' for k, v in options.items())
    rows.append(Variant(name, f'momentum in {bits}-bit codes ({what})',
                        _quantized(bits, False, **options), ranked=False,
                        ablation=True))
  rows += [
      # The SVD-subspace peer (GaLore), at the same rank and refresh
      # interval as Flora's resampling: with Adam in the subspace (optax's
      # default), and with the study's Adafactor momentum there.
      Variant('galore', 'optax.contrib.galore (Adam in the subspace)',
              _galore(adafactor=False), ranked=True),
      # An ablation once measured on every task: like optax's default (Adam
      # in the subspace), the one users would try, it is worse than no
      # momentum on each task.
      Variant('galore_adafactor',
              f'optax.contrib.galore (Adafactor, momentum {MOMENTUM}, in the '
              'subspace)', _galore(adafactor=True), ranked=True,
              ablation=True),
      # Other optimizers with quantized states (issue 28): when named.
      *_other_rows(),
      *_frontier_rows(),
  ]
  return {v.name: v for v in rows}


def runnable() -> dict[str, Variant]:
  """The rows this flora_optax can train."""
  return {n: v for n, v in variants().items() if v.make is not None}


def is_default(v: Variant, defaults: dict[str, Any]) -> bool:
  """Whether ``v`` is what plain ``flora_optax.flora`` does."""
  if v.flora is None:
    return False
  if not defaults['residual']:
    return (not v.flora['residual'] and
            v.flora['momentum_position'] == defaults['momentum_position'])
  return v.flora == defaults
