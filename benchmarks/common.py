"""Shared pieces of the benchmarks: model shapes, byte counts, compiled memory
and interleaved timing. Every figure is measured against a baseline in the
same process (these machines are noisy).

The model, the text and the memory measurements are the examples' own
(``examples/gpt.py``, ``examples/data.py``, ``examples/memory.py``): one copy
each, imported from the ``examples`` package and re-exported here for the
benchmarks.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Re-exported for the benchmarks (one definition each, in examples/).
from examples.gpt import gpt2_layout
from examples.memory import (compiled_memory, memory_figures, mib,  # noqa: F401
                             state_bytes, tree_bytes)
from examples.xla_cpu import avoid_xla_cpu_hang  # noqa: F401

RESULTS_DIR = os.path.join(os.path.dirname(__file__), 'results')


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


class ThreadedUpdate:
  """A compiled ``tx.update(grads, state, params)`` applied again and again
  to its own (donated) state: the steady state of a training loop, as a
  thunk for :func:`interleaved_samples`."""

  def __init__(self, compiled, grads, state, params):
    self.compiled, self.grads, self.state, self.params = (compiled, grads,
                                                          state, params)

  def __call__(self):
    out, self.state = self.compiled(self.grads, self.state, self.params)
    jax.block_until_ready((out, self.state))


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                      warmup: int = 1) -> dict[str, float]:
  """Median wall time (seconds) of each thunk, run round-robin.

  Each thunk must block on its result (e.g. ``jax.block_until_ready``).
  Interleaving spreads the machine's noise over all candidates alike.
  """
  samples = interleaved_samples(fns, repeats, warmup)
  return {name: statistics.median(ts) for name, ts in samples.items()}


def write_results(name: str, payload: Any, markdown: str) -> tuple[str, str]:
  """Writes ``results/<name>.json`` and ``results/<name>.md``."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  jpath = os.path.join(RESULTS_DIR, f'{name}.json')
  mpath = os.path.join(RESULTS_DIR, f'{name}.md')
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
    lowering and XLA compilation.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  seconds = time.perf_counter() - t0
  return compiled, memory_figures(compiled), seconds


def interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                        warmup: int = 1,
                        progress: Any = None) -> dict[str, list[float]]:
  """Like ``interleaved_times`` but returns every sample (seconds).

  ``progress``, if given, is called with no argument after each round (e.g. a
  tqdm bar's ``update``).
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    if progress is not None:
      progress()
  return times
