"""Flora against optax's optimizers: state bytes, compiled memory, time, scaling.

Everything is measured in one process, candidates interleaved round-robin and
summarised by medians, and every time is reported as a ratio to
``optax.adafactor(momentum=0.9)`` measured in the same run (the machines these
run on are shared and noisy). Peak memory comes from XLA's
``memory_analysis()`` of the compiled function (arguments + outputs +
temporaries - donated aliases); nothing is measured from the process.

Run through ``python -m benchmarks [--quick]``; ``run(quick)`` returns the
JSON-able results that :mod:`benchmarks.report` turns into tables and plots.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import flora_optax
from benchmarks import common
from benchmarks import small_lm
from benchmarks.common import BASELINE, GALORE_GAP, LR, Candidate

F32 = 4  # bytes
KEY_BYTES = 8  # raw uint32 key data of the default PRNG implementation
MIN_DIM_TO_FACTOR = 128  # optax.adafactor's default


# --- sizes ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Size:
  """How much of the benchmark to run (the defaults: the full run)."""

  ranks: tuple[int, ...] = (32, 128, 256)
  gpt2: tuple[str, ...] = ('small', 'medium')  # shapes for state bytes
  # Shapes for update memory / time of every candidate.
  timed_gpt2: str = 'small'
  big_gpt2: str | None = None  # update memory of the key candidates only
  # Train-step memory (baseline vs flora at the middle rank), and the
  # (batch, seq) of that train step.
  step_gpt2: str = 'small'
  step_tokens: tuple[int, int] = (1, 1024)
  lm: small_lm.GPTConfig = small_lm.FULL
  repeats: int = 3
  lm_repeats: int = 8
  ks: tuple[int, ...] = (4, 16)
  # (shape, ranks) and (shapes, rank) of the scaling sweeps.
  rank_sweep: tuple[tuple[int, int], tuple[int, ...]] = (
      (512, 2048), (32, 128, 256))
  size_sweep: tuple[tuple[tuple[int, int], ...], int] = (
      ((256, 1024), (512, 2048), (1024, 4096)), 128)
  sweep_repeats: int = 5


FULL = Size()

QUICK = Size(
    ranks=(16,),
    gpt2=('tiny',),
    timed_gpt2='nano',
    step_gpt2='nano',
    step_tokens=(1, 64),
    lm=small_lm.QUICK,
    repeats=2,
    lm_repeats=2,
    rank_sweep=((64, 256), (16,)),
    size_sweep=(((64, 256),), 16),
    sweep_repeats=2,
)


# --- the theoretical state bytes, written from the papers' definitions --------
#
# These are deliberately independent of the implementations: they count what
# each optimizer is documented to keep, so a mismatch flags a real difference.


def _numel(shape) -> int:
  return math.prod(shape)


def _leaves(shapes) -> list[tuple[int, ...]]:
  return [tuple(x.shape) for x in jax.tree.leaves(shapes)]


def _adafactor_v(shape) -> int:
  """Elements of Adafactor's second moment of one leaf.

  Factored (row and column statistics over the two largest axes, plus a
  ``(1,)`` placeholder) when the second-largest axis is at least
  ``MIN_DIM_TO_FACTOR``; otherwise a full ``v`` plus two ``(1,)``
  placeholders.
  """
  if len(shape) >= 2:
    order = sorted(range(len(shape)), key=lambda a: shape[a])
    a, b = order[-2], order[-1]
    if shape[a] >= MIN_DIM_TO_FACTOR:
      return _numel(shape) // shape[a] + _numel(shape) // shape[b] + 1
  return _numel(shape) + 2


def flora_sketch(shape, rank: int) -> int:
  """Elements of Flora's momentum/accumulator for one leaf (side='smaller').

  The smaller of the last two axes is compressed to ``rank`` when it is larger
  than ``rank``; leading axes are batch axes; other leaves stay dense.
  """
  if len(shape) < 2 or min(shape[-2:]) <= rank:
    return _numel(shape)
  return _numel(shape[:-2]) * rank * max(shape[-2:])


def formula_adafactor(shapes, momentum: bool) -> int:
  n = 1 + sum(_adafactor_v(s) for s in _leaves(shapes))  # count + v
  if momentum:  # optax.ema: count + a dense first moment
    n += 1 + sum(_numel(s) for s in _leaves(shapes))
  return F32 * n


def formula_adamw(shapes) -> int:
  return F32 * (1 + 2 * sum(_numel(s) for s in _leaves(shapes)))


def formula_flora(shapes, rank: int) -> int:
  return (formula_adafactor(shapes, False) + F32 + KEY_BYTES +
          F32 * sum(flora_sketch(s, rank) for s in _leaves(shapes)))


def formula_galore(shapes, rank: int) -> int:
  """GaLore with Adam: an ``max×r`` projector and Adam's two ``r×min``
  moments per matrix; full Adam moments for other leaves."""
  n = 2  # galore's count and Adam's count
  for s in _leaves(shapes):
    if len(s) == 2:
      r = min(rank, *s)
      n += max(s) * r + 2 * min(s) * r
    else:
      n += 2 * _numel(s)
  return F32 * n


def formula_multisteps(shapes, inner_bytes: int) -> int:
  # mini_step, gradient_step, a dense accumulator.
  return F32 * (2 + sum(_numel(s) for s in _leaves(shapes))) + inner_bytes


def formula_flora_multisteps(shapes, inner_bytes: int, rank: int) -> int:
  return (F32 * (2 + sum(flora_sketch(s, rank) for s in _leaves(shapes))) +
          KEY_BYTES + inner_bytes)


# --- candidates ----------------------------------------------------------------


def _formula(c: Candidate) -> Callable[[Any], int]:
  """The state-bytes formula of one of :func:`common.candidates`' rows."""
  if c.family == 'flora':
    return lambda s: formula_flora(s, c.rank)
  if c.family == 'galore':
    return lambda s: formula_galore(s, c.rank)
  if c.family == 'adamw':
    return formula_adamw
  return lambda s: formula_adafactor(s, c.name == BASELINE)


def candidates(ranks) -> list[Candidate]:
  """The baseline first, then optax's optimizers, Flora and GaLore, each with
  its state-bytes formula."""
  return [dataclasses.replace(c, formula=_formula(c))
          for c in common.candidates(ranks)]


_INNER = {
    'adafactor': (lambda: optax.adafactor(LR),
                  lambda s: formula_adafactor(s, False)),
    'adamw': (lambda: optax.adamw(LR), formula_adamw),
}


def multisteps_candidates(ks, rank: int) -> list[Candidate]:
  out = []
  for inner, (make_inner, inner_formula) in _INNER.items():
    for k in ks:
      out.append(Candidate(
          f'optax.MultiSteps({inner}, k={k})', 'optax.MultiSteps', None,
          lambda mi=make_inner, k=k: optax.MultiSteps(mi(), k),
          lambda s, f=inner_formula: formula_multisteps(s, f(s)), k, inner))
      out.append(Candidate(
          f'flora.MultiSteps({inner}, k={k}, r={rank})', 'flora.MultiSteps',
          rank,
          lambda mi=make_inner, k=k: flora_optax.MultiSteps(
              mi(), k, rank=rank),
          lambda s, f=inner_formula: formula_flora_multisteps(s, f(s), rank),
          k, inner))
  return out


# --- 1. state bytes --------------------------------------------------------------


def state_bytes(cands, sizes) -> list[dict[str, Any]]:
  rows = []
  for size in sizes:
    shapes = common.gpt2_shapes(size)
    base = adamw = None
    for c in cands:
      measured = common.state_bytes(c.make(), shapes)
      formula = c.formula(shapes)
      if c.name == BASELINE:
        base = measured
      if c.name == 'adamw':
        adamw = measured
      rows.append({
          'workload': f'gpt2-{size}', 'optimizer': c.name, 'family': c.family,
          'rank': c.rank, 'k': c.k, 'state_bytes': measured,
          'formula_bytes': formula,
          'formula_rel_err': abs(measured - formula) / max(formula, 1),
          'vs_baseline': measured / base if base else None,
          'vs_adamw': measured / adamw if adamw else None,
          'param_bytes': common.tree_bytes(shapes),
      })
  return rows


# --- 2-3. compiled update: memory, compile time, time -------------------------


def _update_fn(tx):
  return lambda g, s, p: tx.update(g, s, p)


def update_figures(cands, size: str, *, timed: bool, repeats: int,
                   desc: str) -> list[dict[str, Any]]:
  """Compiled memory and compile time of ``tx.update`` for every candidate,
  then (``timed``) the interleaved update times with the state threaded
  through donated calls (the steady state of a training loop)."""
  shapes = common.gpt2_shapes(size)
  if timed:
    params = common.random_like(shapes, seed=0)
    grads = common.random_like(shapes, seed=1, scale=1e-3)
  else:  # memory only: compile from shapes, allocate nothing
    params = grads = shapes
  rows, thunks = [], {}
  for c in tqdm(cands, desc=f'{desc}: compile', leave=False):
    tx = c.make()
    if timed:
      state = jax.jit(tx.init)(params)
    else:
      state = jax.eval_shape(tx.init, params)
    if timed and c.family == 'galore':  # count 0 would refresh (an SVD)
      state = common.galore_with_count(state, 1)
    compiled, mem, secs = common.compile_timed(
        lambda g, s, p, tx=tx: tx.update(g, s, p), grads, state, params,
        donate_argnums=1)
    rows.append({'workload': f'gpt2-{size}', 'optimizer': c.name,
                 'family': c.family, 'rank': c.rank, 'k': c.k,
                 'compile_s': secs, 'flops': common.flops(compiled), **mem})
    if timed:
      thunks[c.name] = common.Threaded(compiled, grads, state, params)
  if not timed:
    return rows
  bar = tqdm(total=repeats, desc=f'{desc}: time', leave=False)
  samples = common.interleaved_samples(thunks, repeats=repeats, warmup=1,
                                       progress=bar.update)
  bar.close()
  med = {n: float(np.median(v)) for n, v in samples.items()}
  # GaLore's projector refresh (an SVD of every matrix) is not timed on GPT-2
  # shapes: XLA's CPU SVD takes ~15 s for one 768×3072 matrix on a shared
  # 2-core machine, minutes for the whole model. Its steady-state time (no
  # refresh) is reported: a lower bound of its amortised time. The refresh
  # is timed on single matrices in the scaling sweep.
  refresh = {}
  for row in rows:
    n = row['optimizer']
    row['update_s'] = med[n]
    row['update_ratio'] = med[n] / med[BASELINE]
    if n in refresh:
      row['refresh_s'] = refresh[n]
      row['amortised_update_s'] = (
          (GALORE_GAP - 1) * med[n] + refresh[n]) / GALORE_GAP
      row['amortised_ratio'] = row['amortised_update_s'] / med[BASELINE]
    else:
      row['amortised_update_s'] = med[n]
      row['amortised_ratio'] = row['update_ratio']
  del thunks
  return rows


def multisteps_figures(ms_cands, size: str, *, repeats: int,
                       desc: str) -> list[dict[str, Any]]:
  """Memory and per-call times of the MultiSteps wrappers.

  One compiled update per (wrapper, inner) at the smallest ``k`` (``k`` only
  changes a constant); each call is timed and filed as a micro-step or a final
  step (the one that runs the inner optimizer) from ``mini_step``, and the
  per-call cost over a cycle of ``k`` is ``((k-1)·micro + final) / k``.
  """
  shapes = common.gpt2_shapes(size)
  params = common.random_like(shapes, seed=0)
  grads = common.random_like(shapes, seed=1, scale=1e-3)
  k0 = min(c.k for c in ms_cands)
  base_tx = optax.adafactor(LR, momentum=0.9)
  base_state = jax.jit(base_tx.init)(params)
  base_c, _, _ = common.compile_timed(_update_fn(base_tx), grads, base_state,
                                      params, donate_argnums=1)
  thunks = {BASELINE: common.Threaded(base_c, grads, base_state, params)}
  rows = {}
  for c in tqdm([c for c in ms_cands if c.k == k0], desc=f'{desc}: compile',
                leave=False):
    tx = c.make()
    state = jax.jit(tx.init)(params)
    compiled, mem, secs = common.compile_timed(_update_fn(tx), grads, state,
                                               params, donate_argnums=1)
    key = (c.family, c.inner)
    rows[key] = {'compile_s': secs, **mem}
    thunks[key] = common.Threaded(compiled, grads, state, params)
  calls = {key: {'micro': [], 'final': []} for key in rows}
  n_calls = max(repeats * k0, 2 * k0)
  # Interleaved: one call of each wrapper per round.
  for th in thunks.values():
    th()  # warm-up (a micro-step)
  base_times = []
  for _ in tqdm(range(n_calls), desc=f'{desc}: time', leave=False):
    for key, th in thunks.items():
      kind = None
      if key != BASELINE:
        kind = 'final' if int(th.state.mini_step) == k0 - 1 else 'micro'
      t0 = time.perf_counter()
      th()
      dt = time.perf_counter() - t0
      if key == BASELINE:
        base_times.append(dt)
      else:
        calls[key][kind].append(dt)
  base = float(np.median(base_times))
  out = []
  for c in ms_cands:
    key = (c.family, c.inner)
    micro = float(np.median(calls[key]['micro']))
    final = float(np.median(calls[key]['final']))
    per_call = ((c.k - 1) * micro + final) / c.k
    out.append({'workload': f'gpt2-{size}', 'optimizer': c.name,
                'family': c.family, 'inner': c.inner, 'k': c.k,
                'rank': c.rank, **rows[key], 'micro_s': micro,
                'final_s': final, 'per_call_s': per_call,
                'per_call_ratio': per_call / base,
                'baseline_update_s': base})
  return out


# --- the full train step -------------------------------------------------------


def train_step_memory(cands, size: str, tokens: tuple[int, int],
                      desc: str) -> list[dict[str, Any]]:
  """Compiled memory of a GPT-2-shaped train step (shapes only, not run).

  The blocks are unrolled (the real GPT-2 step: no stacked copy of the
  parameters in the temporaries), which is why only the baseline and Flora
  at the middle rank are compiled: minutes each on a shared 2-core CPU.
  """
  shapes = common.gpt2_shapes(size)
  batch = jax.ShapeDtypeStruct((tokens[0], tokens[1] + 1), jnp.int32)
  rows = []
  for c in tqdm(cands, desc=desc, leave=False):
    tx = c.make()
    state = jax.eval_shape(tx.init, shapes)
    _, mem, secs = common.compile_timed(
        small_lm.make_train_step(tx, scan_layers=False), shapes, state, batch,
        donate_argnums=(0, 1))
    rows.append({'workload': f'gpt2-{size}', 'optimizer': c.name,
                 'family': c.family, 'rank': c.rank, 'compile_s': secs,
                 'state_bytes': common.tree_bytes(state), **mem})
  return rows


def small_lm_figures(cands, cfg: small_lm.GPTConfig, repeats: int,
                     desc: str) -> dict[str, Any]:
  """Trains the small LM with every candidate, interleaved step by step.

  Every candidate starts from the same initial parameters and sees the same
  sequence of batches. Returns compiled memory, compile time, median step
  time (and its ratio to the baseline's) and the losses.
  """
  shapes = small_lm.param_shapes(cfg)
  params0 = small_lm.init_params(shapes)
  rows, thunks, losses = [], {}, {}
  for c in tqdm(cands, desc=f'{desc}: compile', leave=False):
    tx = c.make()
    state = jax.jit(tx.init)(params0)
    params = jax.tree.map(jnp.copy, params0)
    data = small_lm.Batches(cfg, seed=0)
    compiled, mem, secs = common.compile_timed(
        small_lm.make_train_step(tx), params, state, data(),
        donate_argnums=(0, 1))
    rows.append({'workload': 'small-lm', 'optimizer': c.name,
                 'family': c.family, 'rank': c.rank, 'compile_s': secs,
                 'state_bytes': common.tree_bytes(state), **mem})
    losses[c.name] = []
    holder = {'params': params, 'state': state}

    def thunk(compiled=compiled, holder=holder, data=data, name=c.name):
      holder['params'], holder['state'], loss = compiled(
          holder['params'], holder['state'], data())
      losses[name].append(float(loss))  # blocks on the step

    thunks[c.name] = thunk
  bar = tqdm(total=repeats, desc=f'{desc}: train', leave=False)
  samples = common.interleaved_samples(thunks, repeats=repeats, warmup=1,
                                       progress=bar.update)
  bar.close()
  med = {n: float(np.median(v)) for n, v in samples.items()}
  for row in rows:
    n = row['optimizer']
    row['step_s'] = med[n]
    row['step_ratio'] = med[n] / med[BASELINE]
    row['losses'] = losses[n]
  return {'config': cfg.record(),
          'tokens_per_step': cfg.tokens,
          'n_params': sum(_numel(s) for s in _leaves(shapes)), 'rows': rows}


# --- 4. scaling ------------------------------------------------------------------


def _sweep_shape(shape, ranks, repeats) -> list[dict[str, Any]]:
  """Flora and GaLore at every rank on one matrix, against the baseline.

  All candidates of one shape are timed interleaved; GaLore's time is
  amortised over its projector refresh (one SVD every ``GALORE_GAP`` steps),
  whose cost is timed once per rank.
  """
  sds = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {'w': common.random_like(sds, seed=0)}
  grads = {'w': common.random_like(sds, seed=1, scale=1e-3)}
  cands = {(BASELINE, None): optax.adafactor(LR, momentum=0.9)}
  for r in ranks:
    cands[('flora', r)] = flora_optax.flora(LR, r)
    cands[('galore', r)] = optax.contrib.galore(LR, r,
                                                update_proj_gap=GALORE_GAP)
  mems, thunks = {}, {}
  for key, tx in cands.items():
    state = jax.jit(tx.init)(params)
    if key[0] == 'galore':
      state = common.galore_with_count(state, 1)
    compiled, mem, _ = common.compile_timed(_update_fn(tx), grads, state,
                                            params, donate_argnums=1)
    mems[key] = mem
    thunks[key] = common.Threaded(compiled, grads, state, params)
  med = common.interleaved_times(thunks, repeats=repeats, warmup=1)
  # The refresh (a thin SVD of the whole matrix, then a slice to the rank)
  # costs the same at every rank: it is timed once per shape.
  refresh_s = None
  for key, th in thunks.items():
    if key[0] == 'galore' and refresh_s is None:
      th.state = common.galore_with_count(th.state, 0)
      t0 = time.perf_counter()
      th()
      refresh_s = time.perf_counter() - t0
  refresh = {key: refresh_s for key in thunks if key[0] == 'galore'}
  base = med[(BASELINE, None)]
  out = []
  for r in ranks:
    for key in ((BASELINE, None), ('flora', r), ('galore', r)):
      t = med[key]
      if key in refresh:
        t = ((GALORE_GAP - 1) * med[key] + refresh[key]) / GALORE_GAP
      out.append({'shape': list(shape), 'rank': r, 'optimizer': key[0],
                  'update_s': med[key], 'amortised_update_s': t,
                  'ratio': t / base, 'refresh_s': refresh.get(key),
                  'temp_bytes': mems[key]['temp_bytes'],
                  'peak_bytes': mems[key]['peak_bytes']})
  return out


def scaling(size: Size) -> dict[str, list[dict[str, Any]]]:
  """Update time and compiled temporaries against the rank (one matrix) and
  against the matrix size (one rank)."""
  shape, ranks = size.rank_sweep
  shapes, rank = size.size_sweep
  todo = {tuple(shape): set(ranks)}
  for s in shapes:
    todo.setdefault(tuple(s), set()).add(rank)
  rows = []
  for s, rs in tqdm(todo.items(), desc='scaling', leave=False):
    rows += _sweep_shape(s, sorted(rs), size.sweep_repeats)
  return {
      'rank': [r for r in rows if tuple(r['shape']) == tuple(shape)],
      'size': sorted([r for r in rows if r['rank'] == rank and
                      tuple(r['shape']) in {tuple(x) for x in shapes}],
                     key=lambda r: math.prod(r['shape'])),
  }


# --- entry point ---------------------------------------------------------------


def run(quick: bool = False, parts: tuple[str, ...] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark; returns a JSON-able dict (see benchmarks.report).

  Args:
    quick: the tiny smoke-test size.
    parts: a subset of ``('state', 'update', 'multisteps', 'step', 'lm',
      'scaling')``; all by default.
    log: where progress lines go.
  """
  size = QUICK if quick else FULL
  parts = parts or ('state', 'update', 'multisteps', 'step', 'lm', 'scaling')
  cands = candidates(size.ranks)
  mid = size.ranks[len(size.ranks) // 2]
  ms = multisteps_candidates(size.ks, mid)
  res: dict[str, Any] = {
      'meta': {
          'quick': quick, 'jax': jax.__version__, 'optax': optax.__version__,
          'flora_optax': flora_optax.__version__,
          'backend': jax.default_backend(),
          'devices': str(jax.devices()[0]), 'baseline': BASELINE,
          'ranks': list(size.ranks), 'mid_rank': mid,
          'galore_gap': GALORE_GAP,
          'size': dataclasses.asdict(size) | {'lm': None},
      }
  }
  t_start = time.perf_counter()
  if 'state' in parts:
    log('state bytes (shapes only)')
    res['state'] = state_bytes(cands + ms, size.gpt2)
  if 'update' in parts:
    log(f'compiled update on gpt2-{size.timed_gpt2}: memory, compile, time')
    res['update'] = update_figures(cands, size.timed_gpt2, timed=True,
                                   repeats=size.repeats, desc='update')
    if size.big_gpt2:
      key = [c for c in cands
             if c.name in (BASELINE, 'adamw', f'flora r={mid}')]
      log(f'compiled update on gpt2-{size.big_gpt2}: memory, compile')
      res['update'] += update_figures(key, size.big_gpt2, timed=False,
                                      repeats=0, desc='update (big)')
  if 'multisteps' in parts:
    log(f'MultiSteps on gpt2-{size.timed_gpt2}')
    res['multisteps'] = multisteps_figures(ms, size.timed_gpt2,
                                           repeats=size.repeats,
                                           desc='multisteps')
  if 'step' in parts:
    log(f'train-step memory on gpt2-{size.step_gpt2}')
    key = [c for c in cands if c.name in (BASELINE, f'flora r={mid}')]
    res['step'] = train_step_memory(key, size.step_gpt2, size.step_tokens,
                                    'train step')
  if 'lm' in parts:
    log(f'small LM ({size.lm.tokens} tokens/step): train-step '
        'memory and time')
    lm_cands = [c for c in cands
                if c.family != 'galore' or c.rank == mid]
    res['lm'] = small_lm_figures(lm_cands, size.lm, size.lm_repeats,
                                 'small LM')
  if 'scaling' in parts:
    log('scaling with rank and matrix size')
    res['scaling'] = scaling(size)
  res['meta']['wall_s'] = time.perf_counter() - t_start
  return res
