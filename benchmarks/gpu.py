"""Flora on an accelerator: update, train step and projection generation.

One prepared script (issue 14) that fits a short accelerator lease: it keeps
to an internal time budget, stops itself when the budget is spent and writes
its JSON after every section, so whatever it measured comes back.

Figures, all measured in one process against ``optax.adafactor(momentum=0.9)``
(the baseline):

* **update** on GPT-2-small shapes (float32): the jitted update with the state
  donated, median of interleaved calls (``block_until_ready``), compiled peak
  (``memory_analysis()``), state MiB, compile time (lower + compile wall
  time) and the number of instructions of the optimised HLO. Rows: adafactor
  with and without momentum, adamw, flora at every rank in both momentum
  modes, galore at the same ranks without its SVD refresh (its counter is
  set past the refresh step, as in :mod:`benchmarks.optimizers`), Lion, Muon
  and AdEMAMix each next to ``flora_optax.quantized(..., bits=8)`` of itself
  (with its ratios to its float self), ``optax.MultiSteps`` next to the
  8-bit ``flora_optax.MultiSteps``, Adafactor's momentum and AdamW in 8 and 4
  bits, and flora with an ``rbg`` key if flora accepts one (the error is
  recorded otherwise). Each quantized row gets its update and compile time
  against its float peer (issue 30).
* **train step** of a GPT-2-sized byte-level model (12 layers, d_model 768,
  vocabulary 256, ~86M parameters; 8192 tokens a step on the accelerator),
  forward, backward, update and apply with params and state donated: time
  ratio to the baseline, compiled peak, peak saving ÷ state saved, compile
  time.
* **projection** generation per PRNG implementation (threefry2x32, rbg,
  unsafe_rbg): drawing every projection flora's plan needs on GPT-2-small at
  rank 128, against the compress products (einsums) of the same matrices.
* **targets** (issue 14 item 2, issue 30's quantized rows), derived from
  the above: met or not.
* **quality** (``--sections quality``, its own run of the same budget): a
  19M-parameter byte GPT trained 2000 steps per optimizer, one shared
  learning rate, one seed; held-out loss, state bytes per parameter, steps
  per second (:mod:`benchmarks.gpu_quality`, issue 22).

Usage::

  python -m benchmarks.gpu [--out DIR]   # accelerator size, ~5 minutes
  python -m benchmarks.gpu --cpu-full    # GPT-2 update, smaller train step
  python -m benchmarks.gpu --quick       # tiny shapes: a smoke test
  python -m benchmarks.gpu --sections quality   # the GPU-sized LM, ~5 min

Writes ``gpu_<platform>.json`` and ``.md`` into ``--out`` (default
``benchmarks/results``, or ``benchmarks/results/quick`` with ``--quick``) and
prints the JSON. Only jax, optax, numpy and flora_optax are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_optax
from benchmarks import accumulation
from benchmarks import common
from benchmarks import gpu_quality
from benchmarks import small_lm
from benchmarks.common import BASELINE, LR, Candidate
from benchmarks.small_lm import GPTConfig
from flora_optax._momentum import DEFAULT_RESIDUAL

PRNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')
# When the run started: set by main() (the module may be imported long before,
# e.g. by the test suite, which imports every local module up front).
_START = time.perf_counter()


# --- sizes -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Size:
  """How much to run.

  Attributes:
    name: the size's name (recorded).
    update_layout: ``(n_layer, d_model, vocab, n_pos)`` of the GPT-2-layout
      tree whose update is measured.
    ranks: flora and galore ranks of the update rows.
    repeats: timed calls per update candidate.
    compile_repeats: compilations of each update (the fastest is kept:
      compile time is noisy on a shared machine).
    step: the model of the train step.
    step_rank: flora and galore rank of the train step rows.
    step_repeats: timed calls per train-step candidate.
    proj_rank: rank of the projection-generation figures.
    proj_repeats: timed calls per projection thunk.
    budget_s: wall seconds from the start of the process; the script stops
      starting new work once they are spent.
  """

  name: str
  update_layout: tuple[int, int, int, int]
  ranks: tuple[int, ...]
  repeats: int
  compile_repeats: int
  step: GPTConfig
  step_rank: int
  step_repeats: int
  proj_rank: int
  proj_repeats: int
  budget_s: float


_GPT2_SMALL = (12, 768, 50257, 1024)
# GPT-2-sized byte-level model: 12 x 768, vocabulary 256, 1024 positions.
_GPT2_BYTES = dict(n_layer=12, d_model=768, n_head=12, vocab=256)

SIZES = {
    # One H200, a 6-minute slot: 330 s of budget leaves room for start-up
    # and for a compile that begins just before the deadline.
    'full': Size('full', _GPT2_SMALL, (32, 128, 256), 20, 1,
                 GPTConfig(**_GPT2_BYTES, seq_len=1024, batch=8),
                 128, 20, 128, 20, 300.0),
    # The same update on a CPU; the train step keeps the model but runs 256
    # tokens (8192 would take a minute a step on two cores).
    'cpu-full': Size('cpu-full', _GPT2_SMALL, (32, 128, 256), 6, 2,
                     GPTConfig(**_GPT2_BYTES, seq_len=128, batch=2),
                     128, 5, 128, 10, 1200.0),
    # A smoke test: tiny shapes, every section; the budget never binds.
    'quick': Size('quick', (1, 128, 256, 128), (16,), 3, 1,
                  GPTConfig(n_layer=1, d_model=64, n_head=4, vocab=256,
                            seq_len=32, batch=2),
                  16, 3, 16, 3, 600.0),
}


class Budget:
  """The wall-clock budget of the run, counted from ``start`` (default: the
  start of the run, set by :func:`main`)."""

  def __init__(self, seconds: float, start: float | None = None):
    self.deadline = (_START if start is None else start) + seconds

  def share(self, fraction: float) -> 'Budget':
    """A budget of ``fraction`` of the time left (a section's share)."""
    now = time.perf_counter()
    return Budget(fraction * self.left(), start=now)

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def allows(self, estimate_s: float) -> bool:
    """Whether ``estimate_s`` more seconds of work still fit."""
    return self.left() > estimate_s


# --- candidates ----------------------------------------------------------------

# Flora's momentum modes (``residual``), its default first.
FLORA_MODES = (DEFAULT_RESIDUAL, not DEFAULT_RESIDUAL)


def candidates(ranks, *, rbg_rank: int | None = None) -> list[Candidate]:
  """Every update row, the baseline first.

  Flora rows (every rank, in every momentum mode) come before GaLore's so
  that a run cut short by its budget still has them; quantized momentum
  (issue 18) in every direction and 8-/4-bit AdamW (issue 20, next to
  ``adamw``) before them; Lion, Muon and AdEMAMix each followed by
  ``flora_optax.quantized`` of itself (issue 28, :func:`inner_candidates`)
  between Flora's rows and GaLore's; ``rbg_rank`` adds flora (default mode)
  with an ``rbg`` key last.
  """
  quantized = [Candidate(f'flora rank=None bits={b}', 'quantized', None,
                         lambda b=b: flora_optax.flora(LR, None, bits=b))
               for b in (8, 4)]
  quantized += [Candidate(f'flora_optax.adamw(bits={b})', 'quantized', None,
                          lambda b=b: flora_optax.adamw(LR, bits=b))
                for b in (8, 4)]
  out = common.candidates(ranks, residual=FLORA_MODES, extra=quantized)
  first_galore = next((i for i, c in enumerate(out) if c.family == 'galore'),
                      len(out))
  out[first_galore:first_galore] = inner_candidates()
  if rbg_rank is not None:
    out.append(common.flora_row(rbg_rank, suffix=' key=rbg',
                                family='flora-rbg',
                                key=jax.random.key(0, impl='rbg')))
  return out


# Issue 28: other optax optimizers, each against ``flora_optax.quantized`` of
# itself. The rows of ``benchmarks.quantized``'s ``inners`` section (same
# names, LR and bits; a test checks it), listed here because that module
# needs tqdm, which this script does without.
INNERS = {
    'optax.lion': lambda: optax.lion(LR),
    'optax.contrib.muon': lambda: optax.contrib.muon(LR),
    'optax.contrib.ademamix': lambda: optax.contrib.ademamix(LR),
}
INNER_BITS = 8


def quantized_name(inner: str) -> str:
  return f'quantized({inner}, bits={INNER_BITS})'


# Issue 30: 8-bit accumulation against optax's own, k micro-steps a cycle.
ACCUMULATION_K = 4
ACCUMULATION = f'optax.MultiSteps(adafactor, k={ACCUMULATION_K})'


def inner_candidates() -> list[Candidate]:
  """Each of ``INNERS`` (family ``'inner'``), then its quantized self
  (family ``'quantized'``, ``inner`` naming the float row); then
  ``optax.MultiSteps`` and ``flora_optax.MultiSteps(rank=None, bits=8)`` of
  the same Adafactor, the latter with ``inner`` naming the former. Their
  update is timed per call like every row (the state threaded through, so
  ``k - 1`` of every ``k`` calls are micro-steps: the median is a
  micro-step's time)."""
  out = []
  for name, make in INNERS.items():
    out.append(Candidate(name, 'inner', None, make))
    out.append(Candidate(
        quantized_name(name), 'quantized', None,
        lambda make=make: flora_optax.quantized(make(), bits=INNER_BITS),
        inner=name))
  out.append(Candidate(ACCUMULATION, 'inner', None,
                       lambda: optax.MultiSteps(optax.adafactor(LR),
                                                ACCUMULATION_K)))
  out.append(Candidate(
      f'flora_optax.MultiSteps(adafactor, k={ACCUMULATION_K}, rank=None, '
      'bits=8)', 'quantized', None,
      lambda: flora_optax.MultiSteps(optax.adafactor(LR), ACCUMULATION_K,
                                     rank=None, bits=8),
      inner=ACCUMULATION))
  return out


def step_candidates(rank: int) -> list[Candidate]:
  """The train-step rows, most important first (a budget cut drops the
  last): the baseline, flora, then the others."""
  first = lambda c: 0 if c.name == BASELINE else 1 if c.family == 'flora' else 2
  return sorted(common.candidates((rank,), residual=FLORA_MODES), key=first)


# --- timing --------------------------------------------------------------------


def _interleave(thunks: dict[str, Callable[[], Any]], repeats: int,
                budget: Budget) -> dict[str, list[float]]:
  """``common.interleaved_samples`` while the budget lasts: a round is
  started only if the previous one would still fit."""
  return common.interleaved_samples(
      thunks, repeats, fits=lambda round_s: budget.allows(1.5 * round_s))


def _median(xs) -> float | None:
  return float(statistics.median(xs)) if xs else None


def _finish_rows(rows, samples, key: str) -> None:
  """Adds medians, sample counts and ratios to the baseline (in place)."""
  base = _median(samples.get(BASELINE, []))
  for row in rows:
    med = _median(samples.get(row['optimizer'], []))
    row[f'{key}_s'] = med
    row[f'{key}_calls'] = len(samples.get(row['optimizer'], []))
    row[f'{key}_ratio'] = (med / base if med is not None and base else None)


def _against_baseline(rows) -> None:
  """Adds peak saving ÷ state saved and the compile-time ratio (in place).

  The saving ratio is left out (None) where less than 1% of the baseline's
  state is saved: a ratio of two near-zero numbers says nothing.
  """
  base = next((r for r in rows if r['optimizer'] == BASELINE), None)
  for row in rows:
    row['peak_saving_over_state_saved'] = None
    row['compile_s_ratio'] = None
    if base is None:
      continue
    saved = base['state_bytes'] - row['state_bytes']
    if saved > 0.01 * base['state_bytes']:
      row['peak_saving_over_state_saved'] = (
          (base['peak_bytes'] - row['peak_bytes']) / saved)
    if base['compile_s'] > 0:
      row['compile_s_ratio'] = row['compile_s'] / base['compile_s']


def _against_inner(rows) -> None:
  """Adds to each quantized row of another optimizer (its ``inner`` set) its
  ratios to that float row: state, update time, compile time, and its peak
  saving ÷ state saved (in place)."""
  by = {r['optimizer']: r for r in rows}
  for row in rows:
    ref = by.get(row.get('inner'))
    if ref is None:
      continue
    saved = ref['state_bytes'] - row['state_bytes']
    row['inner_state_ratio'] = row['state_bytes'] / ref['state_bytes']
    row['inner_peak_saving_over_state_saved'] = (
        (ref['peak_bytes'] - row['peak_bytes']) / saved if saved > 0 else
        None)
    row['inner_update_ratio'] = (
        row['update_s'] / ref['update_s']
        if row.get('update_s') and ref.get('update_s') else None)
    row['inner_compile_ratio'] = (row['compile_s'] / ref['compile_s']
                                  if ref['compile_s'] > 0 else None)


def _against_peer(rows) -> None:
  """Adds to each quantized row (8 or 4 bits) its float peer's name and its
  update and compile ratios to it (issue 30, in place): the baseline for the
  quantized momentum, ``adamw`` for ``flora_optax.adamw(bits=...)``, the
  float inner for ``quantized(inner)``."""
  by = {r['optimizer']: r for r in rows}
  for row in rows:
    name = row['optimizer']
    if 'bits=' not in name or 'r=' in name:
      continue
    peer = row.get('inner') or (
        'adamw' if name.startswith('flora_optax.adamw') else BASELINE)
    ref = by.get(peer)
    if ref is None:
      continue
    row['peer'] = peer
    row['bits'] = 4 if 'bits=4' in name else 8
    row['peer_update_ratio'] = (
        row['update_s'] / ref['update_s']
        if row.get('update_s') and ref.get('update_s') else None)
    row['peer_compile_ratio'] = (row['compile_s'] / ref['compile_s']
                                 if ref['compile_s'] > 0 else None)


# --- sections ------------------------------------------------------------------


def machine(size: Size) -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      'device_kind': dev.device_kind, 'platform': dev.platform,
      'device_count': jax.device_count(), 'backend': jax.default_backend(),
      'jax': jax.__version__, 'optax': optax.__version__,
      'numpy': np.__version__, 'python': platform.python_version(),
      'host': platform.processor() or platform.machine(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'flora_modes': list(FLORA_MODES),
      'size': dataclasses.asdict(size),
  }


def _compile(fn, *args, repeats: int = 1, **jit_kwargs):
  """``common.compile_timed`` (cold: it clears JAX's in-process caches), the
  fastest of ``repeats`` compilations."""
  best = None
  for _ in range(repeats):
    out = common.compile_timed(fn, *args, **jit_kwargs)
    if best is None or out[2] < best[2]:
      best = out
  return best


def _warm_compile(fn, *args, **jit_kwargs) -> float:
  """Compiles once so that one-time costs (backend start-up, GEMM autotuning
  of shared shapes) are not charged to the first candidate."""
  return common.compile_timed(fn, *args, **jit_kwargs)[2]


def _compiled_row(c: Candidate, state, mem, secs: float, log,
                  **extra) -> dict[str, Any]:
  """A row's state bytes and compiled figures (``extra`` after the compile
  time), logged."""
  log(f'  {c.name}: compiled in {secs:.1f} s, peak '
      f'{common.mib(mem["peak_bytes"]):.0f} MiB')
  return {'optimizer': c.name, 'family': c.family, 'rank': c.rank,
          'state_bytes': common.tree_bytes(state),
          'state_mib': common.mib(common.tree_bytes(state)),
          'compile_s': secs, **extra, **mem,
          'peak_mib': common.mib(mem['peak_bytes'])}


def update_section(size: Size, budget: Budget, log) -> dict[str, Any]:
  shapes = common.gpt2_layout(*size.update_layout)
  params = common.random_like(shapes, seed=0)
  grads = common.random_like(shapes, seed=1, scale=1e-3)
  mid = size.ranks[len(size.ranks) // 2]
  sgd = optax.sgd(LR)
  warm = _warm_compile(lambda g, s, p: sgd.update(g, s, p), grads,
                       sgd.init(params), params, donate_argnums=1)
  rows, thunks, errors, skipped = [], {}, {}, []
  longest = 0.0
  for c in candidates(size.ranks, rbg_rank=mid):
    if not budget.allows(size.compile_repeats * longest * 1.5 + 5):
      skipped.append(c.name)
      continue
    try:
      tx = c.make()
      # quantized(inner)'s state eagerly: jitted, XLA constant-folds the
      # encoding of its zeros (~13 s per 768x3072 leaf on XLA:CPU).
      state = (tx.init(params) if c.inner else jax.jit(tx.init)(params))
      if c.family == 'galore':
        state = common.galore_with_count(state, 1)
      compiled, mem, secs = _compile(
          lambda g, s, p, tx=tx: tx.update(g, s, p), grads, state, params,
          repeats=size.compile_repeats, donate_argnums=1)
    except Exception as e:  # pylint: disable=broad-except
      # Only expected for flora with an rbg key (another engineer is adding
      # support); recorded rather than fatal either way.
      errors[c.name] = f'{type(e).__name__}: {e}'[:500]
      log(f'  {c.name}: {errors[c.name][:120]}')
      continue
    longest = max(longest, secs)
    rows.append(_compiled_row(c, state, mem, secs, log,
                              hlo_ops=common.hlo_ops(compiled), inner=c.inner))
    thunks[c.name] = common.Threaded(compiled, grads, state, params)
  samples = _interleave(thunks, size.repeats, budget)
  del thunks
  _finish_rows(rows, samples, 'update')
  _against_baseline(rows)
  _against_inner(rows)
  _against_peer(rows)
  return {'workload': 'gpt2-layout %dx%d vocab %d' % (
      size.update_layout[0], size.update_layout[1], size.update_layout[2]),
          'param_bytes': common.tree_bytes(shapes),
          'warmup_compile_s': warm, 'rows': rows, 'errors': errors,
          'skipped': skipped}


def step_section(size: Size, budget: Budget, log) -> dict[str, Any]:
  cfg = size.step
  shapes = small_lm.param_shapes(cfg)
  params0 = accumulation.init_params(shapes)
  tokens = jax.random.randint(jax.random.key(2), (cfg.batch, cfg.seq_len + 1),
                              0, cfg.vocab, jnp.int32)
  # The model alone (SGD): warms the compiler and gives the floor.
  sgd = optax.sgd(LR)
  t0 = time.perf_counter()
  warm = _warm_compile(accumulation.train_step(sgd, cfg.n_head),
                       params0, sgd.init(params0), tokens,
                       donate_argnums=(0, 1))
  longest = time.perf_counter() - t0
  rows, thunks, skipped = [], {}, []
  for c in step_candidates(size.step_rank):
    if not budget.allows(1.5 * longest + 5):
      skipped.append(c.name)
      continue
    tx = c.make()
    params = jax.tree.map(jnp.copy, params0)  # each candidate donates its own
    state = jax.jit(tx.init)(params)
    if c.family == 'galore':
      state = common.galore_with_count(state, 1)
    compiled, mem, secs = _compile(
        accumulation.train_step(tx, cfg.n_head), params, state, tokens,
        donate_argnums=(0, 1))
    longest = max(longest, secs)
    rows.append(_compiled_row(c, state, mem, secs, log))
    thunks[c.name] = common.Threaded(compiled, params, state, tokens,
                                     threaded=(0, 1))
  samples = _interleave(thunks, size.step_repeats, budget)
  # One more step each (params, state donated: the thunks are done).
  losses = {n: float(th.compiled(*th.args)[2])
            for n, th in thunks.items()} if budget.allows(0) else {}
  del thunks
  _finish_rows(rows, samples, 'step')
  _against_baseline(rows)
  for row in rows:
    row['loss_after'] = losses.get(row['optimizer'])
  return {'model': cfg.record(),
          'params': sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)),
          'tokens_per_step': cfg.tokens, 'warmup_compile_s': warm,
          'rows': rows, 'skipped': skipped}


def projection_section(size: Size, budget: Budget, log) -> dict[str, Any]:
  """Generation of every projection per PRNG implementation vs compressing."""
  shapes = common.gpt2_layout(*size.update_layout)
  plans = [pl for pl in jax.tree.leaves(
      flora_optax.Projector(size.proj_rank).plan(shapes)) if not pl.dense]

  def draw(key):
    # As flora does: one key per leaf (fold_in), one normal draw per leaf,
    # in the (*batch, r, d) layout of LeafPlan.projection.
    out = []
    for i, pl in enumerate(plans):
      batch = tuple(pl.shape[a] for a in pl.batch_axes)
      out.append(jax.random.normal(jax.random.fold_in(key, i),
                                   (*batch, pl.rank, pl.d), jnp.float32))
    return out

  def compress(gs, ps):
    out = []
    for pl, g, p in zip(plans, gs, ps):
      comp = tuple(pl.shape[a] for a in pl.compress_axes)
      out.append(pl.compress(g, p.reshape(*p.shape[:-1], *comp)))
    return out

  grads = [jax.random.normal(jax.random.key(i), pl.shape, jnp.float32)
           for i, pl in enumerate(plans)]
  thunks, compile_s, errors = {}, {}, {}
  projs = None
  for impl in PRNG_IMPLS:
    try:
      key = jax.random.key(0, impl=impl)
      compiled, _, secs = common.compile_timed(draw, key)
      if projs is None:
        projs = compiled(key)
    except Exception as e:  # pylint: disable=broad-except
      errors[impl] = f'{type(e).__name__}: {e}'[:500]
      continue
    compile_s[impl] = secs
    thunks[impl] = (lambda c=compiled, k=key: jax.block_until_ready(c(k)))
  compiled, _, secs = common.compile_timed(compress, grads, projs)
  compile_s['compress'] = secs
  thunks['compress'] = lambda: jax.block_until_ready(compiled(grads, projs))
  samples = _interleave(thunks, size.proj_repeats, budget)
  med = {k: _median(v) for k, v in samples.items()}
  rows = []
  for impl in PRNG_IMPLS:
    if impl not in med:
      continue
    rows.append({'impl': impl, 'generate_s': med[impl],
                 'compress_s': med['compress'],
                 'generate_over_compress': (
                     med[impl] / med['compress']
                     if med[impl] is not None and med['compress'] else None),
                 'calls': len(samples[impl]),
                 'compile_s': compile_s[impl]})
    log(f'  {impl}: generation / compress = '
        f'{rows[-1]["generate_over_compress"]}')
  n_proj = sum(math.prod(pl.shape[a] for a in pl.batch_axes)
               for pl in plans)
  return {'rank': size.proj_rank, 'matrices': n_proj,
          'projection_elements': sum(
              math.prod(pl.shape[a] for a in pl.batch_axes) * pl.rank * pl.d
              for pl in plans),
          'compress_flops': sum(2 * math.prod(pl.shape) * pl.rank
                                for pl in plans),
          'compress_compile_s': compile_s['compress'], 'rows': rows,
          'errors': errors}


# --- targets (issue 14 item 2) --------------------------------------------------


def _target(text: str, rows, key: str, ok: Callable[[float], bool], *,
            unit: str = '×', spec: str = '.2f', judged=None,
            name: str = 'optimizer') -> dict[str, Any]:
  """A target: ``rows``' figures under ``key``, met when ``ok`` holds for
  every one of ``judged`` (default: ``rows``); ``None`` when one is not
  measured (budget or failure)."""
  fmt = lambda x: 'n/a' if x is None else format(x, spec)
  judged = rows if judged is None else judged
  vals = [r.get(key) for r in judged]
  met = (None if not judged or any(v is None for v in vals) else
         all(ok(v) for v in vals))
  figures = ', '.join(f'{r[name]}: {fmt(r.get(key))}{unit}' for r in rows)
  return {'target': text, 'figures': figures, 'met': met}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
  """Issue 14's targets, from the sections that ran."""
  out = []
  upd = res.get('update', {}).get('rows', [])
  step = res.get('train_step', {}).get('rows', [])
  flora_upd = [r for r in upd if r['family'] == 'flora']
  flora_step = [r for r in step if r['family'] == 'flora']
  if upd:
    out += [
        _target('update peak saving ≥ 0.9× state saved (vs adafactor(m=0.9))',
                flora_upd, 'peak_saving_over_state_saved',
                lambda v: v >= 0.9, unit=''),
        _target('flora update ≤ 1.05× adafactor(m=0.9), every rank ≤ 256',
                [r for r in flora_upd if r['rank'] <= 256], 'update_ratio',
                lambda v: v <= 1.05),
        _target('flora update compile time ≤ 1.5× adafactor(m=0.9)\'s',
                flora_upd, 'compile_s_ratio', lambda v: v <= 1.5),
        _target('quantized(inner, bits=8): update peak saving ≥ 0.9× the '
                'state saved (vs its float inner; issue 28)',
                [r for r in upd if r.get('inner')],
                'inner_peak_saving_over_state_saved', lambda v: v >= 0.9,
                unit=''),
        *(_target(f'{bits}-bit updates ≤ {limit}× their float peer (momentum: '
                  f'adafactor(m=0.9); adamw; quantized(inner): its inner; '
                  'issue 30)', [r for r in upd if r.get('bits') == bits],
                  'peer_update_ratio', lambda v, limit=limit: v <= limit)
          for bits, limit in ((8, 1.05), (4, 1.2))),
        _target('quantized update compile time ≤ 1.5× its float peer\'s '
                '(issue 30)', [r for r in upd if r.get('peer')],
                'peer_compile_ratio', lambda v: v <= 1.5)]
  if step:
    out += [
        _target('flora train step ≤ 1.03× adafactor(m=0.9)', flora_step,
                'step_ratio', lambda v: v <= 1.03, spec='.3f'),
        _target('flora train-step compile time ≤ 1.5× adafactor(m=0.9)\'s',
                flora_step, 'compile_s_ratio', lambda v: v <= 1.5)]
  proj = res.get('projection', {}).get('rows', [])
  if proj:
    out.append(_target(
        'projection generation ≤ 25% of the compress products '
        '(judged on threefry2x32, flora\'s default)', proj,
        'generate_over_compress', lambda v: v <= 0.25, unit='',
        judged=[r for r in proj if r['impl'] == 'threefry2x32'], name='impl'))
  return out


# --- output --------------------------------------------------------------------


def _fmt(x, spec: str = '.3g') -> str:
  return 'n/a' if x is None else format(x, spec)


def _rows_table(rows, key: str, ratio_spec: str, hlo: bool = False) -> str:
  """The update (``key='update'``) or train-step (``'step'``) table."""
  head = ['optimizer', 'state MiB', f'{key} ms', '÷ baseline', 'peak MiB',
          'peak saving ÷ state saved', 'compile s', 'compile ÷ baseline']
  table = []
  for r in rows:
    secs = r[f'{key}_s']
    table.append(
        [r['optimizer'], _fmt(r['state_mib'], '.1f'),
         _fmt(secs and 1e3 * secs), _fmt(r[f'{key}_ratio'], ratio_spec),
         _fmt(r['peak_mib'], '.0f'),
         _fmt(r['peak_saving_over_state_saved'], '.2f'),
         _fmt(r['compile_s'], '.2f'), _fmt(r.get('compile_s_ratio'), '.2f')]
        + ([r['hlo_ops']] if hlo else []) + [r[f'{key}_calls']])
  return common.markdown_table(head + (['HLO ops'] if hlo else []) +
                               ['calls'], table)


def _notes(section: dict[str, Any]) -> list[str]:
  """A section's failures and the rows its budget skipped, then a blank."""
  lines = [f'- {name} failed: `{err[:200]}`'
           for name, err in section.get('errors', {}).items()]
  if section.get('skipped'):
    lines.append(f'- skipped (budget): {", ".join(section["skipped"])}')
  return lines + ['']


def markdown(res: dict[str, Any]) -> str:
  m = res['machine']
  lines = [f'# Flora on {m["device_kind"]} ({m["platform"]})', '',
           f'jax {m["jax"]}, optax {m["optax"]}, size `{m["size"]["name"]}`, '
           f'flora momentum modes {m["flora_modes"]}; '
           f'{res.get("elapsed_s", 0):.0f} s of wall time. Times are medians '
           'of interleaved calls; ratios are to adafactor(m=0.9) in the same '
           'run; peaks are XLA\'s memory_analysis() (arguments + outputs + '
           'temporaries - donated); compile time is lowering + XLA '
           f'compilation (update: the fastest of {m["size"]["compile_repeats"]}'
           ', train step: one).'
           + (f' XLA_FLAGS: `{m["xla_flags"]}`.' if m.get('xla_flags') else ''),
           '']
  if res.get('targets'):
    lines += ['## Targets (issue 14 item 2)', '',
              common.markdown_table(
                  ['target', 'figures', 'met'],
                  [[t['target'], t['figures'],
                    {True: 'yes', False: '**no**', None: 'not measured'}[
                        t['met']]] for t in res['targets']])]
  if 'update' in res:
    u = res['update']
    lines += [f'## Update ({u["workload"]}, '
              f'{common.mib(u["param_bytes"]):.0f} MiB of float32 params)', '',
              _rows_table(u['rows'], 'update', '.2f', hlo=True)] + _notes(u)
    inner = [r for r in u['rows'] if r.get('inner')]
    if inner:
      lines += ['### Quantized optimizers against their float selves '
                '(issue 28)', '', common.markdown_table(
                    ['optimizer', 'state ÷ float', 'peak saving ÷ state saved',
                     'update ÷ float', 'compile ÷ float'],
                    [[r['optimizer'], _fmt(r['inner_state_ratio'], '.3f'),
                      _fmt(r['inner_peak_saving_over_state_saved'], '.2f'),
                      _fmt(r['inner_update_ratio'], '.2f'),
                      _fmt(r['inner_compile_ratio'], '.2f')] for r in inner])]
  if 'train_step' in res:
    s = res['train_step']
    lines += [f'## Train step ({s["params"] / 1e6:.1f}M params, '
              f'{s["tokens_per_step"]} tokens per step; the model alone '
              f'compiles in {s["warmup_compile_s"]:.1f} s with SGD, first)',
              '',
              _rows_table(s['rows'], 'step', '.3f')] + _notes(s)
  if 'projection' in res:
    p = res['projection']
    lines += [f'## Projection generation (rank {p["rank"]}, {p["matrices"]} '
              f'matrices, {p["projection_elements"] / 1e6:.1f}M normals; '
              f'compress: {p["compress_flops"] / 1e9:.1f} GFLOP)', '',
              common.markdown_table(
                  ['PRNG', 'generate ms', 'compress ms', 'generate ÷ compress',
                   'calls'],
                  [[r['impl'], _fmt(r['generate_s'] and 1e3 * r['generate_s']),
                    _fmt(r['compress_s'] and 1e3 * r['compress_s']),
                    _fmt(r['generate_over_compress'], '.2f'), r['calls']]
                   for r in p['rows']])] + _notes(p)
  lines += gpu_quality.markdown(res.get('quality'))
  return '\n'.join(lines)


def write(res: dict[str, Any], out: str) -> tuple[str, str]:
  """Writes ``gpu_<platform>.json`` and ``.md`` (through temporary files, so
  a run killed mid-write leaves the previous section's complete files)."""
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, f'gpu_{res["machine"]["platform"]}')
  res['elapsed_s'] = time.perf_counter() - _START
  res['targets'] = targets(res)
  for path, text in ((stem + '.json', json.dumps(res, indent=2,
                                                 default=float)),
                     (stem + '.md', markdown(res))):
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  return stem + '.json', stem + '.md'


def main(argv=None) -> dict[str, Any]:
  # jaxlib 0.10's XLA:CPU hung in the interleaved timing loop here (twice in
  # three --cpu-full runs); a no-op on other versions, and GPUs never run the
  # CPU scheduler it turns off.
  common.avoid_xla_cpu_hang()
  parser = argparse.ArgumentParser(prog='python -m benchmarks.gpu',
                                   description=__doc__.split('\n')[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--quick', action='store_true',
                     help='tiny shapes: a smoke test (no meaningful figures)')
  group.add_argument('--cpu-full', action='store_true',
                     help='GPT-2-small update, a 256-token train step')
  parser.add_argument('--out', default=None,
                      help='results folder (default benchmarks/results, or '
                      'benchmarks/results/quick with --quick)')
  parser.add_argument('--budget', type=float, default=None,
                      help='wall seconds from start-up (default per size)')
  parser.add_argument('--sections', default='projection,update,train_step',
                      help='comma-separated subset, run in this order, of '
                      'projection, update, train_step and quality (the '
                      'GPU-sized LM: run it on its own)')
  parser.add_argument('--quiet', action='store_true',
                      help='do not print the JSON at the end')
  args = parser.parse_args(argv)
  size = SIZES['quick' if args.quick else
               'cpu-full' if args.cpu_full else 'full']
  global _START  # pylint: disable=global-statement
  _START = time.perf_counter()
  budget = Budget(args.budget or size.budget_s)
  out = args.out or (os.path.join(common.RESULTS_DIR, 'quick')
                     if args.quick else common.RESULTS_DIR)
  log = lambda s: print(f'[{time.perf_counter() - _START:6.1f} s] {s}',
                        file=sys.stderr, flush=True)
  sections = {'projection': projection_section, 'update': update_section,
              'train_step': step_section,
              'quality': lambda size, budget, log: gpu_quality.section(
                  size.name, budget, log)}
  # Each section's share of the time left when it starts, so that a slow
  # update section can not leave the train step nothing.
  shares = {'projection': 0.12, 'update': 0.5, 'train_step': 1.0,
            'quality': 1.0}
  wanted = [s.strip() for s in args.sections.split(',') if s.strip()]
  bad = [s for s in wanted if s not in sections]
  if bad:
    parser.error(f'--sections: unknown {bad}; accepted: {list(sections)}')
  res = {'machine': machine(size), 'not_run': []}
  paths = write(res, out)
  for name in wanted:
    if not budget.allows(10):
      res['not_run'].append(name)
      log(f'{name}: not run (budget spent)')
      continue
    log(f'{name}: start ({budget.left():.0f} s left)')
    try:
      share = shares[name] if name != wanted[-1] else 1.0
      res[name] = sections[name](size, budget.share(share), log)
    except Exception as e:  # pylint: disable=broad-except
      # A failing section must not lose the others' figures.
      res.setdefault('section_errors', {})[name] = (
          f'{type(e).__name__}: {e}'[:1000])
      log(f'{name}: FAILED {res["section_errors"][name][:300]}')
    paths = write(res, out)
  for t in res['targets']:
    verdict = {True: 'met', False: 'MISSED', None: 'not measured'}[t['met']]
    log(f'[{verdict}] {t["target"]}: {t["figures"]}')
  log('wrote ' + ' '.join(paths))
  if not args.quiet:
    print(json.dumps(res, indent=2, default=float))
  return res


if __name__ == '__main__':
  main(sys.argv[1:])
