"""Shared pieces of the benchmarks: the candidates, model shapes, byte counts,
compiled memory and interleaved timing. Every figure is measured against a
baseline in the same process (these machines are noisy).

The model, the text and the memory measurements are the examples' own
(``examples/gpt.py``, ``examples/data.py``, ``examples/memory.py``): one copy
each, imported from the ``examples`` package and re-exported here for the
benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import flora_optax
# Re-exported for the benchmarks (one definition each, in examples/).
from examples.gpt import gpt2_layout
from examples.memory import (compiled_memory, memory_figures, mib,  # noqa: F401
                             state_bytes, tree_bytes)
from examples.xla_cpu import avoid_xla_cpu_hang  # noqa: F401

RESULTS_DIR = os.path.join(os.path.dirname(__file__), 'results')
LR = 1e-3
# What every time and peak is compared with, in the same run.
BASELINE = 'adafactor(m=0.9)'
GALORE_GAP = 200  # optax.contrib.galore's default update_proj_gap


# --- candidates --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One optimizer row of a benchmark.

  Attributes:
    name: the row's name in the results.
    family: ``'adafactor'``, ``'adamw'``, ``'flora'``, ``'galore'``, ... (what
      a benchmark special-cases, e.g. GaLore's refresh counter).
    rank: the compression rank (``None``: not a ranked optimizer).
    make: builds the optimizer.
    formula: the state bytes its papers' definitions give, from the parameter
      shapes (:mod:`benchmarks.optimizers`; ``None`` where not counted).
    k: micro-steps per update (gradient accumulation rows).
    inner: the inner optimizer's name (gradient accumulation rows).
  """

  name: str
  family: str
  rank: int | None
  make: Callable[[], optax.GradientTransformation]
  formula: Callable[[Any], int] | None = None
  k: int | None = None
  inner: str | None = None


def flora_name(rank: int, residual: bool | None = None,
               suffix: str = '') -> str:
  """``'flora r=<rank>'``, with the momentum mode when ``residual`` is set."""
  mode = '' if residual is None else f' residual={residual}'
  return f'flora r={rank}{mode}{suffix}'


def flora_row(rank: int, residual: bool | None = None, suffix: str = '',
              family: str = 'flora', **kwargs: Any) -> Candidate:
  """``flora_optax.flora(LR, rank, **kwargs)``; ``residual=None``: its
  default momentum mode, not named."""
  if residual is not None:
    kwargs['residual'] = residual
  return Candidate(flora_name(rank, residual, suffix), family, rank,
                   lambda: flora_optax.flora(LR, rank, **kwargs))


def candidates(ranks: Sequence[int], *,
               residual: Sequence[bool | None] = (None,),
               extra: Sequence[Candidate] = ()) -> list[Candidate]:
  """The baseline first, Adafactor without momentum, AdamW, ``extra``, then
  Flora at every rank in every mode of ``residual``, then GaLore at every
  rank (before GaLore: a run cut short by a time budget still has Flora)."""
  out = [
      Candidate(BASELINE, 'adafactor', None,
                lambda: optax.adafactor(LR, momentum=0.9)),
      Candidate('adafactor', 'adafactor', None, lambda: optax.adafactor(LR)),
      Candidate('adamw', 'adamw', None, lambda: optax.adamw(LR)),
      *extra,
  ]
  out += [flora_row(r, m) for r in ranks for m in residual]
  out += [Candidate(f'galore r={r}', 'galore', r,
                    lambda r=r: optax.contrib.galore(
                        LR, r, update_proj_gap=GALORE_GAP))
          for r in ranks]
  return out


def gpt2_shapes(size: str = 'small') -> dict[str, Any]:
  """The parameter shapes of GPT-2 (HF layout: Conv1D kernels are in×out).

  Args:
    size: 'small' (124M), 'medium' (355M), 'tiny' (a 2-layer, 128-wide
      stand-in with the same structure for smoke tests) or 'nano' (one
      layer, vocabulary 256: the cheapest to compile).

  Returns:
    A nested dict of ``jax.ShapeDtypeStruct`` (float32).
  """
  cfg = {
      'small': (12, 768, 50257, 1024),
      'medium': (24, 1024, 50257, 1024),
      'tiny': (2, 128, 1000, 128),
      'nano': (1, 128, 256, 128),
  }[size]
  return gpt2_layout(*cfg)


def random_like(shapes: Any, seed: int = 0, scale: float = 0.02) -> Any:
  """Random arrays with the given shapes (values do not matter for memory)."""
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, s.shape, s.dtype)
      for k, s in zip(keys, leaves)
  ])


def galore_with_count(state, count: int):
  """A galore chain state whose counter is ``count``.

  Its projector refresh (an SVD) is due when the counter is a multiple of
  ``update_proj_gap`` (0 included): 1 skips it (the steady state between
  refreshes is what is timed), 0 forces it.
  """
  return (state[0]._replace(count=jnp.asarray(count, jnp.int32)),
          *state[1:])


class Threaded:
  """``compiled(*args)`` called again and again on its own outputs, as a thunk
  for :func:`interleaved_samples`: the steady state of a training loop.

  The outputs at the positions ``threaded`` replace the (donated) arguments
  at the same positions: ``Threaded(update, grads, state, params)`` threads
  the state of an update ``(grads, state, params) -> (updates, state)``;
  ``Threaded(step, params, state, batch, threaded=(0, 1))`` the parameters
  and state of a train step ``-> (params, state, loss)``.
  """

  def __init__(self, compiled, *args, threaded: Sequence[int] = (1,)):
    self.compiled, self.args, self.threaded = (compiled, list(args),
                                               tuple(threaded))

  @property
  def state(self) -> Any:
    """The optimizer state (the second argument)."""
    return self.args[1]

  @state.setter
  def state(self, value: Any) -> None:
    self.args[1] = value

  def __call__(self) -> Any:
    out = self.compiled(*self.args)
    for i in self.threaded:
      self.args[i] = out[i]
    jax.block_until_ready(out)
    return out


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                      warmup: int = 1) -> dict[str, float]:
  """Median wall time (seconds) of each thunk, run round-robin.

  Each thunk must block on its result (e.g. ``jax.block_until_ready``).
  Interleaving spreads the machine's noise over all candidates alike.
  """
  samples = interleaved_samples(fns, repeats, warmup)
  return {name: statistics.median(ts) for name, ts in samples.items()}


def write_results(name: str, payload: Any, markdown: str,
                  out: str | None = None) -> tuple[str, str]:
  """Writes ``<name>.json`` and ``<name>.md`` into ``out`` (default
  ``results/``)."""
  out = out or RESULTS_DIR
  os.makedirs(out, exist_ok=True)
  jpath = os.path.join(out, f'{name}.json')
  mpath = os.path.join(out, f'{name}.md')
  with open(jpath, 'w') as f:
    json.dump(payload, f, indent=2, default=float)
  with open(mpath, 'w') as f:
    f.write(markdown)
  return jpath, mpath


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  fmt = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def compile_timed(fn: Callable, *args, **jit_kwargs):
  """Compiles ``jax.jit(fn)`` for ``args``.

  Returns:
    ``(compiled, memory figures, compile seconds)``; the seconds cover
    tracing, lowering and XLA compilation, cold: JAX's caches are cleared
    first, so that no row reuses traces of an earlier one (flora_optax's
    codec is traced once per shape and quantizer and then cached).
  """
  jax.clear_caches()
  t0 = time.perf_counter()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  seconds = time.perf_counter() - t0
  return compiled, memory_figures(compiled), seconds


def hlo_ops(compiled) -> int | None:
  """Instructions of the optimised HLO (a proxy for compile work)."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return None
  return sum(1 for line in text.splitlines() if ' = ' in line)


def flops(compiled) -> float:
  """XLA's count of the floating-point operations of a compiled function
  (``cost_analysis()``; NaN where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def matmul_gflops(n: int = 768, m: int = 3072, r: int = 128,
                  repeats: int = 20) -> float:
  """GFLOP/s of an ``(n, m) @ (m, r)`` product on the default device (the
  median of ``repeats`` calls): the rate at which a sketch's products run."""
  a = jnp.ones((n, m), jnp.float32)
  b = jnp.ones((m, r), jnp.float32)
  f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t0)
  return 2 * n * m * r / statistics.median(times) / 1e9


def interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                        warmup: int = 1, progress: Any = None,
                        fits: Callable[[float], bool] | None = None
                        ) -> dict[str, list[float]]:
  """Like ``interleaved_times`` but returns every sample (seconds).

  Args:
    fns: the thunks, each blocking on its result.
    repeats: rounds of timed calls, one call of every thunk a round.
    warmup: untimed calls of each thunk first.
    progress: if given, called with no argument after each round (e.g. a
      tqdm bar's ``update``).
    fits: a time budget: called before each round with the seconds the
      previous round (at first the warm-up) took; the rounds stop when it
      returns False.
  """
  t_round = time.perf_counter()
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  round_s = time.perf_counter() - t_round
  times = {name: [] for name in fns}
  for _ in range(repeats):
    if fits is not None and not fits(round_s):
      break
    t_round = time.perf_counter()
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    round_s = time.perf_counter() - t_round
    if progress is not None:
      progress()
  return times
