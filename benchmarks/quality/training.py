"""Training: every (learning rate, seed) of one configuration in one program,
and one row of the study (its learning-rate grid, extended at an edge)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.quality.watchdog import arm_watchdog, row_key
from benchmarks.quality.settings import END_LR, MAX_EXTENSIONS
from benchmarks.quality.tasks import Task
from benchmarks.quality.variants import Variant
from examples.gpt import stack_trees


def _warmup_cosine(steps: int) -> optax.Schedule:
  """The schedule of every row, with peak 1 (scaled by each model's lr)."""
  return optax.warmup_cosine_decay_schedule(
      0.0, 1.0, max(1, steps // 10), steps, end_value=END_LR)


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
  # flora chains (clip_by_block_rms before the momentum); see
  # docs/explain/guarantees.md.
  fn = jax.jit(one_model)
  final = np.asarray([
      fn(*jax.tree.map(lambda x, i=i: x[i],
                       (params, frozen, opt_state, peak, stream)))
      for i in range(len(models))
  ], np.float64).reshape(len(lrs), len(seeds))
  return dict(losses=final.tolist(),
              state_bytes=(v.state_bytes or common.tree_bytes)(
                  states[seeds[0]]),
              seconds=time.perf_counter() - t0, notes=notes)


def count_params(task: Task) -> int:
  """The parameters of the task's full model (LoRA's rows too are measured
  per parameter of the model they fine-tune)."""
  params, _ = task.model(None).init(0)
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


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
  key = row_key(task.name, v.name, ratio)
  arm_watchdog(watchdog, out, key)
  res = train(task, v, rank, lrs, seeds, resample_every)
  losses, seconds, extended = res['losses'], res['seconds'], []
  while extend and len(extended) < MAX_EXTENSIONS:
    i = best_lr(lrs, losses)
    if 0 < i < len(lrs) - 1 or len(lrs) < 2:
      break
    # Beyond the edge, one grid step on (the grid is geometric).
    step = lrs[1] / lrs[0]
    new = lrs[0] / step if i == 0 else lrs[-1] * step
    arm_watchdog(watchdog, out, key)
    more = train(task, v, rank, [new], seeds, resample_every)
    seconds += more['seconds']
    extended.append(new)
    lrs, losses = ((([new] + lrs), more['losses'] + losses) if i == 0 else
                   (lrs + [new], losses + more['losses']))
  arm_watchdog(None)
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

