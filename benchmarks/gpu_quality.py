"""``benchmarks.gpu``'s quality section: a GPU-sized byte GPT, per optimizer.

The language model where momentum matters at scale (issue 22): a 19M-
parameter byte-level GPT (6 layers, d_model 512, 8192 tokens a step) trained
2000 steps on the standard library's sources, the last tenth of the bytes
held out, every row at one shared learning rate (3e-3, warmup-cosine) and one
seed: an accelerator lease allows no grid. The rows are the study's
compressors at this size: Adafactor with and without momentum, Flora's sketch
at d/r = 4 (float32 and 8-bit), momentum in 8- and 4-bit codes, AdamW in
float32 and in 8- and 4-bit codes, and GaLore at the same rank. Each row
reports its final held-out loss, its state bytes and bytes per parameter,
its steps per second, and the loss before training.

Rows run most informative first while the section's budget allows one more
(the first row's time is the estimate), so a short lease keeps the baselines.
The whole training loop is on the device: the text is a device array, every
batch is drawn with ``jax.random`` inside a ``lax.scan`` of ``chunk`` steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import flora_optax
from benchmarks import common
from benchmarks import small_lm
from benchmarks.quality.settings import ADAFACTOR, MOMENTUM
from benchmarks.small_lm import GPTConfig
from examples.data import stdlib_bytes


@dataclasses.dataclass(frozen=True)
class QualitySize:
  """The quality section's model and run length.

  Attributes:
    model: the GPT and its batch (tokens a step = batch × seq_len).
    steps: optimizer updates per row.
    chunk: updates per compiled call (a ``lax.scan``).
    lr: the peak learning rate every row shares.
    eval_batches: held-out batches of the final loss.
  """

  model: GPTConfig
  steps: int
  chunk: int
  lr: float
  eval_batches: int

  @property
  def rank(self) -> int:
    return self.model.d_model // 4  # d/r = 4, the study's ratio


SIZES = {
    # 19M parameters, 8192 tokens a step: about 40 s a row on an H200.
    'full': QualitySize(GPTConfig(n_layer=6, d_model=512, vocab=256,
                                  seq_len=256, batch=32), 2000, 250, 3e-3, 16),
    # The same model on a CPU: a few steps only (a timing, not a result).
    'cpu-full': QualitySize(GPTConfig(n_layer=6, d_model=512, vocab=256,
                                      seq_len=256, batch=32), 20, 10, 3e-3, 2),
    'quick': QualitySize(GPTConfig(n_layer=1, d_model=64, vocab=256,
                                   seq_len=32, batch=4), 20, 10, 3e-3, 2),
}


def rows(size: QualitySize) -> list[tuple[str, Callable[[Any], Any]]]:
  """``(name, schedule -> optimizer)``, most informative first."""
  r = size.rank
  flora = lambda **kw: lambda lr: flora_optax.flora(  # noqa: E731
      lr, momentum=MOMENTUM, resample_every=max(1, size.steps // 8),
      **kw, **ADAFACTOR)
  return [
      ('adafactor', lambda lr: optax.adafactor(lr, momentum=MOMENTUM,
                                               **ADAFACTOR)),
      ('adafactor_nomomentum', lambda lr: optax.adafactor(lr, **ADAFACTOR)),
      ('momentum_8bit', flora(rank=None, bits=8)),
      (f'flora r={r}', flora(rank=r)),
      ('momentum_4bit', flora(rank=None, bits=4)),
      (f'flora r={r} bits=8', flora(rank=r, bits=8)),
      ('adamw', lambda lr: optax.adamw(lr)),
      ('adamw_8bit', lambda lr: flora_optax.adamw(lr, bits=8)),
      ('adamw_4bit', lambda lr: flora_optax.adamw(lr, bits=4)),
      (f'galore r={r}', lambda lr: optax.contrib.galore(
          lr, r, update_proj_gap=max(1, size.steps // 8))),
  ]


def _windows(text: jax.Array, key: jax.Array, batch: int, length: int
             ) -> jax.Array:
  """``batch`` random windows of ``length`` tokens of ``text``."""
  starts = jax.random.randint(key, (batch,), 0, text.shape[0] - length)
  return jax.vmap(lambda s: jax.lax.dynamic_slice(text, (s,), (length,)))(
      starts)


def train_row(size: QualitySize, make: Callable[[Any], Any],
              train_text: jax.Array, evals: jax.Array) -> dict[str, Any]:
  """Trains one row from the shared init; its loss, bytes and speed."""
  cfg = size.model
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, size.lr, max(1, size.steps // 10), size.steps,
      end_value=size.lr / 10)
  tx = make(schedule)
  params = small_lm.init_params(small_lm.param_shapes(cfg), seed=0)
  state = tx.init(params)
  state_bytes = common.tree_bytes(state)
  num_params = sum(x.size for x in jax.tree.leaves(params))

  def step(carry, key):
    params, state = carry
    batch = _windows(train_text, key, cfg.batch, cfg.seq_len + 1)
    loss, grads = jax.value_and_grad(small_lm.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def chunk(params, state, keys):
    (params, state), losses = jax.lax.scan(step, (params, state), keys)
    return params, state, losses[-1]

  evaluate = jax.jit(lambda p: jax.lax.map(
      lambda b: small_lm.loss_fn(p, b), evals).mean())
  before = float(evaluate(params))
  keys = jax.random.split(jax.random.key(1), size.steps).reshape(
      -1, size.chunk)
  t0 = time.perf_counter()
  params, state, _ = chunk(params, state, keys[0])  # compiles
  jax.block_until_ready(params)
  compile_and_first = time.perf_counter() - t0
  t1 = time.perf_counter()
  for k in keys[1:]:
    params, state, train_loss = chunk(params, state, k)
  jax.block_until_ready(params)
  timed = time.perf_counter() - t1
  return dict(final_eval_loss=float(evaluate(params)), loss_before=before,
              state_bytes=state_bytes,
              bytes_per_param=state_bytes / num_params, params=num_params,
              steps_per_s=(size.steps - size.chunk) / timed if timed else None,
              first_chunk_s=compile_and_first,
              seconds=time.perf_counter() - t0)


def section(size_name: str, budget, log,
            only: tuple[str, ...] | None = None) -> dict[str, Any]:
  """The section (see the module docstring): every row that fits (of
  ``only``, when given)."""
  size = SIZES[size_name]
  cfg = size.model
  text = stdlib_bytes().astype(np.int32)
  cut = int(0.9 * len(text))
  train_text = jnp.asarray(text[:cut])
  # Fixed held-out windows: the same for every row.
  evals = jnp.stack([
      _windows(jnp.asarray(text[cut:]), jax.random.key(100 + i), cfg.batch,
               cfg.seq_len + 1) for i in range(size.eval_batches)])
  out, not_run, estimate = [], [], 0.0
  for name, make in rows(size):
    if only is not None and name not in only:
      continue
    if not budget.allows(estimate * 1.2 + 5):
      not_run.append(name)
      continue
    row = dict(optimizer=name, **train_row(size, make, train_text, evals))
    estimate = max(estimate, row['seconds'])
    out.append(row)
    log(f"  {name}: held-out loss {row['final_eval_loss']:.4f} "
        f"(before {row['loss_before']:.4f}), state "
        f"{row['state_bytes'] / 2**20:.1f} MiB "
        f"({row['bytes_per_param']:.2f} B/param), "
        f"{row['steps_per_s'] or 0:.1f} steps/s")
  return dict(model=cfg.record(), steps=size.steps, lr=size.lr,
              rank=size.rank, seeds=[0], rows=out, not_run=not_run)


def markdown(res: dict[str, Any]) -> list[str]:
  """The section's table, or nothing when it did not run."""
  if not res:
    return []
  lines = ['## Quality: a GPU-sized byte GPT\n',
           f"{res['model']}, {res['steps']} steps, one shared lr "
           f"{res['lr']:g} (warmup-cosine), one seed, rank {res['rank']} "
           '(d/r = 4); held-out loss on the last tenth of the stdlib '
           'bytes.\n']
  table = [[r['optimizer'], f"{r['final_eval_loss']:.4f}",
            f"{r['state_bytes'] / 2**20:.1f}", f"{r['bytes_per_param']:.2f}",
            f"{r['steps_per_s']:.1f}" if r['steps_per_s'] else '-']
           for r in res['rows']]
  lines.append(common.markdown_table(
      ['optimizer', 'held-out loss', 'state MiB', 'B/param', 'steps/s'],
      table))
  if res['not_run']:
    lines.append(f"Not run (budget): {', '.join(res['not_run'])}.\n")
  return lines
