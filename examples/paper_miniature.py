r"""The Flora paper's experiments in miniature: one command, tables and plots.

Hao, Cao and Mou, "Flora: Low-Rank Adapters Are Secretly Gradient
Compressors" (ICML 2024) claim that (1) Flora's compressed states perform
about as well as the uncompressed ones at a fraction of their memory,
(2) Flora beats LoRA at the same rank, and (3) resampling the projection
matters. This script checks those claims on a tiny byte-level GPT (see
``model.py`` and ``train_lm.py``) trained from scratch on text that ships
with Python:

1. **accumulation**: ``flora_optax.MultiSteps`` (rank ``r``) vs
   ``optax.MultiSteps`` vs no accumulation (same number of examples seen, so
   ``K`` times more, smaller updates) vs LoRA of rank ``r`` (+ every non-matrix
   parameter) with ``optax.MultiSteps``; inner optimizer: Adafactor without
   momentum, as in the paper, so that the accumulator is the only difference;
2. **momentum**: ``flora`` (residual, the default) and ``flora`` in paper
   mode (``residual=False``) vs Adafactor with full momentum vs Adafactor
   without momentum vs LoRA of rank ``r`` (with full momentum) vs paper-mode
   ``flora`` with ``resample_every=None`` (LoRA with a frozen ``A``);
3. **κ ablation**: ``flora`` with several resampling intervals, and the paper
   mode at the smallest one (unbiased and projected transfers).

Every configuration runs with 3 seeds (model init, data order and projection
key) at once, ``vmap``-ed, and reports the final eval loss as mean ± std with
the optimizer-state memory of one model. Results go to
``runs/paper/`` (``--out examples/results/paper`` for the reference results:
``tables.md``, ``results.json`` and PNGs).

Run from the repository root (about 10 minutes on 2 CPU cores)::

    python -m examples.paper_miniature
    python -m examples.paper_miniature --quick   # a 1-minute smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_optax
from examples import data as data_lib
from examples import model as model_lib
from examples import train_lm
from examples import xla_cpu
from examples.gpt import stack_trees
from examples.memory import tree_bytes
from examples.model import ModelConfig
from examples.train_lm import OptConfig

# Run outputs go to an untracked directory; the reference results in
# examples/results/paper are regenerated on purpose with
# --out examples/results/paper.
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'runs',
    'paper')


@dataclasses.dataclass(frozen=True)
class Setting:
  """Sizes shared by every run of the miniature."""
  d_model: int = 64
  layers: int = 2
  heads: int = 4
  seq_len: int = 64
  batch_size: int = 16  # examples per optimizer update
  accumulate: int = 4  # micro-batches per update in the accumulation runs
  updates: int = 200
  rank: int = 16
  kappa: int = 25  # Flora's resample_every in the momentum experiment
  kappas: tuple[int, ...] = (5, 25, 100)
  learning_rate: float = 3e-3
  warmup: int = 20
  seeds: tuple[int, ...] = (0, 1, 2)
  eval_batches: int = 8
  evals: int = 5  # evaluations per run (the last one is the reported one)

  @property
  def model(self) -> ModelConfig:
    return ModelConfig(seq_len=self.seq_len, d_model=self.d_model,
                       num_layers=self.layers, num_heads=self.heads)


@dataclasses.dataclass(frozen=True)
class Run:
  """One configuration: an optimizer, how many micro-steps, which batch."""
  label: str
  opt: OptConfig  # seed is replaced per seed
  micro_batch: int
  micro_steps: int


def run_seeds(setting: Setting, run: Run, corpus: data_lib.Corpus,
              log=print) -> dict[str, Any]:
  """Trains ``run`` for every seed at once (vmap) and evaluates it.

  Flora's states keep their key as data (``state.key``), so one update
  function serves states initialised with different keys: each seed gets its
  own projections.
  """
  mc = setting.model
  if run.opt.name == 'lora':
    mc = dataclasses.replace(mc, lora_rank=run.opt.rank)
  inits, states, rests, caught = [], [], [], []
  tx = None
  for seed in setting.seeds:
    oc = dataclasses.replace(run.opt, seed=seed)
    graphdef, params, (param_state, rest) = model_lib.init_model(mc, seed)
    tx_seed = train_lm.make_optimizer(oc)
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter('always')
      states.append(tx_seed.init(params))
    caught += [f'{x.category.__name__}: {str(x.message)[:160]}...' for x in w]
    tx = tx or tx_seed
    inits.append(params)
    rests.append(rest)
  loss_fn = model_lib.make_loss_fn_with_rest(graphdef, param_state)
  params, opt_state, rest = (stack_trees(inits), stack_trees(states),
                             stack_trees(rests))
  state_bytes = tree_bytes(states[0])
  trained_params = tree_bytes(inits[0]) // 4

  def step(params, opt_state, rest, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step_v = jax.jit(jax.vmap(step), donate_argnums=(0, 1))
  eval_v = jax.jit(jax.vmap(loss_fn, in_axes=(0, 0, None)))
  evals = [jnp.asarray(b) for b in corpus.eval_batches(
      16, setting.seq_len, setting.eval_batches)]
  streams = [corpus.batches('train', run.micro_batch, setting.seq_len,
                            seed=1000 + s) for s in setting.seeds]
  every = max(1, run.micro_steps // setting.evals)
  curve_steps, curve = [], []
  t0 = time.perf_counter()
  for i in range(1, run.micro_steps + 1):
    tokens = jnp.asarray(np.stack([next(s) for s in streams]))
    params, opt_state, _ = step_v(params, opt_state, rest, tokens)
    if i % every == 0 or i == run.micro_steps:
      losses = np.mean([np.asarray(eval_v(params, rest, b)) for b in evals],
                       axis=0)
      curve_steps.append(i)
      curve.append(losses.tolist())
  seconds = time.perf_counter() - t0
  final = np.asarray(curve[-1])
  log(f'  {run.label:<34} eval {final.mean():.4f} ± {final.std(ddof=1):.4f}'
      f'  state {state_bytes / 1024:8.1f} KiB  ({seconds:.0f} s)')
  return {
      'label': run.label,
      'optimizer': dataclasses.asdict(run.opt),
      'micro_batch': run.micro_batch,
      'micro_steps': run.micro_steps,
      'final_eval_per_seed': final.tolist(),
      'final_eval_mean': float(final.mean()),
      'final_eval_std': float(final.std(ddof=1)),
      'curve_steps': curve_steps,
      'curve': curve,
      'state_bytes': state_bytes,
      'trained_params': trained_params,
      'seconds': seconds,
      'warnings': sorted(set(caught)),
  }


def experiments(s: Setting) -> dict[str, list[Run]]:
  # Adafactor factors matrices with both sides >= min_dim_size_to_factor
  # (128 by default); 32 makes this tiny model's second moments factored, as
  # they are at scale, so the momentum / accumulator is the state that counts.
  base = OptConfig(learning_rate=s.learning_rate, warmup_steps=s.warmup,
                   steps=s.updates, rank=s.rank, resample_every=s.kappa,
                   min_dim_size_to_factor=32)
  k, r = s.accumulate, s.rank
  micro = s.batch_size // k
  acc = dataclasses.replace(base, name='adafactor_nomomentum', momentum=None,
                            accumulate=k, accumulation_rank=r)
  many = s.updates * k
  accumulation = [
      Run(f'flora_optax.MultiSteps (r={r})',
          dataclasses.replace(acc, accumulator='flora'), micro, many),
      Run('optax.MultiSteps', dataclasses.replace(acc, accumulator='optax'),
          micro, many),
      Run(f'no accumulation ({k}x updates)',
          dataclasses.replace(acc, accumulate=1, steps=many,
                              warmup_steps=s.warmup * k), micro, many),
      Run(f'LoRA (r={r}) + optax.MultiSteps',
          dataclasses.replace(acc, name='lora', accumulator='optax'),
          micro, many),
      # The other compressor: every direction kept, in 8-bit codes.
      Run('flora_optax.MultiSteps (rank=None, bits=8)',
          dataclasses.replace(acc, accumulator='flora', accumulation_rank=None,
                              accumulation_bits=8), micro, many),
  ]
  mom = dataclasses.replace(base, momentum=0.9)
  momentum = [
      Run(f'flora (r={r}, κ={s.kappa}), residual (default)',
          dataclasses.replace(mom, name='flora'), s.batch_size, s.updates),
      Run(f'flora (r={r}, κ={s.kappa}), paper mode',
          dataclasses.replace(mom, name='flora_paper'), s.batch_size,
          s.updates),
      Run('adafactor, momentum 0.9',
          dataclasses.replace(mom, name='adafactor'), s.batch_size, s.updates),
      Run('adafactor, no momentum',
          dataclasses.replace(mom, name='adafactor_nomomentum', momentum=None),
          s.batch_size, s.updates),
      Run(f'LoRA (r={r}), momentum 0.9', dataclasses.replace(mom, name='lora'),
          s.batch_size, s.updates),
      Run(f'flora (r={r}), paper mode never resampled',
          dataclasses.replace(mom, name='flora_frozen'), s.batch_size,
          s.updates),
      # Quantized states (the other compressor, and both composed), and
      # AdamW with its moments in codes, at the same learning rate.
      Run('momentum in 8-bit codes (rank=None, bits=8)',
          dataclasses.replace(mom, name='flora8'), s.batch_size, s.updates),
      Run('momentum in 4-bit codes (rank=None, bits=4)',
          dataclasses.replace(mom, name='flora4'), s.batch_size, s.updates),
      Run(f'flora (r={r}), sketch in 8-bit codes',
          dataclasses.replace(mom, name='flora_sketch8'), s.batch_size,
          s.updates),
      Run('optax.adamw', dataclasses.replace(mom, name='adamw'), s.batch_size,
          s.updates),
      Run('flora_optax.adamw(bits=8)', dataclasses.replace(mom, name='adamw8'),
          s.batch_size, s.updates),
      Run('flora_optax.adamw(bits=4)', dataclasses.replace(mom, name='adamw4'),
          s.batch_size, s.updates),
  ]
  # Resampling interval: the residual default at every κ, and the paper
  # mode's failure at a small κ (its unbiased transfer grows the momentum)
  # with the safe transfer that fixes it.
  kappa = [
      Run(f'flora κ={kk}', dataclasses.replace(mom, name='flora',
                                               resample_every=kk),
          s.batch_size, s.updates)
      for kk in s.kappas if kk
  ] + [
      Run(f'flora paper mode κ={s.kappas[0]}',
          dataclasses.replace(mom, name='flora_paper',
                              resample_every=s.kappas[0]), s.batch_size,
          s.updates),
      Run(f"flora paper mode κ={s.kappas[0]}, transfer='projected'",
          dataclasses.replace(mom, name='flora_paper',
                              resample_every=s.kappas[0],
                              transfer='projected'), s.batch_size, s.updates),
  ]
  return {'accumulation': accumulation, 'momentum': momentum, 'kappa': kappa}


def _same(a: Run, b: Run) -> bool:
  return (dataclasses.replace(a.opt, seed=0) == dataclasses.replace(b.opt,
                                                                     seed=0)
          and a.micro_batch == b.micro_batch and a.micro_steps == b.micro_steps)


def table(rows: list[dict[str, Any]], baseline: str | None) -> str:
  base = next((r for r in rows if r['label'] == baseline), None)
  out = ['| configuration | final eval loss (mean ± std, 3 seeds) | '
         'per seed | optimizer state (KiB) | state vs baseline |',
         '|---|---|---|---|---|']
  for r in rows:
    ratio = (f"{r['state_bytes'] / base['state_bytes']:.2f}x"
             if base else '-')
    seeds = ', '.join(f'{x:.3f}' for x in r['final_eval_per_seed'])
    out.append(f"| {r['label']} | {r['final_eval_mean']:.4f} ± "
               f"{r['final_eval_std']:.4f} | {seeds} | "
               f"{r['state_bytes'] / 1024:.1f} | {ratio} |")
  return '\n'.join(out)


def plot(name: str, rows: list[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2),
                                 gridspec_kw={'width_ratios': [1.2, 1]})
  for r in rows:
    c = np.asarray(r['curve'])
    x = np.asarray(r['curve_steps']) / r['micro_steps']
    m, sd = c.mean(1), c.std(1, ddof=1)
    line, = ax1.plot(x, m, 'o-', ms=3, label=r['label'])
    ax1.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.2)
  ax1.set_xlabel('fraction of training (same examples seen by all)')
  ax1.set_ylabel('eval loss (nats / byte)')
  lo = min(np.asarray(r['curve']).min() for r in rows)
  ax1.set_ylim(lo - 0.05, lo + 1.0)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=7)
  ax1.set_title(f'{name}: eval loss (mean ± std over seeds)')
  labels = [r['label'] for r in rows]
  means = [r['final_eval_mean'] for r in rows]
  stds = [r['final_eval_std'] for r in rows]
  y = np.arange(len(rows))
  ax2.barh(y, means, xerr=stds, color='tab:blue', alpha=0.7)
  for yi, r in zip(y, rows):
    ax2.text(min(means) - 0.02, yi,
             f"state {r['state_bytes'] / 1024:.0f} KiB", va='center',
             ha='right', fontsize=7, color='white')
  ax2.set_yticks(y, labels, fontsize=7)
  ax2.set_xlim(min(means) - 0.35, max(means) + 0.1)
  ax2.invert_yaxis()
  ax2.set_xlabel('final eval loss')
  ax2.grid(alpha=0.3, axis='x')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='a tiny smoke run (not a result)')
  p.add_argument('--updates', type=int, default=None)
  p.add_argument('--only', default=None,
                 help='comma-separated subset of accumulation,momentum,kappa')
  p.add_argument('--merge', action='store_true',
                 help='keep the other experiments of an earlier results.json')
  p.add_argument('--out', default=DEFAULT_OUT)
  args = p.parse_args(argv)
  s = Setting()
  if args.quick:
    s = dataclasses.replace(s, d_model=32, layers=1, heads=2, seq_len=32,
                            updates=12, warmup=2, eval_batches=2, evals=2,
                            kappas=(5,), kappa=5)
  if args.updates:
    s = dataclasses.replace(s, updates=args.updates)
  corpus = data_lib.load_corpus('all')
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform.upper()}; '
        f'{dataclasses.asdict(s)}')
  exps = experiments(s)
  if args.only:
    exps = {k: v for k, v in exps.items() if k in args.only.split(',')}
  results: dict[str, list[dict[str, Any]]] = {}
  done: list[tuple[Run, dict[str, Any]]] = []
  t0 = time.perf_counter()
  for name, runs in exps.items():
    print(f'{name}:')
    results[name] = []
    for run in runs:
      prev = next((res for r, res in done if _same(r, run)), None)
      if prev is None:
        res = run_seeds(s, run, corpus)
        done.append((run, res))
      else:  # the same configuration ran in an earlier experiment
        res = dict(prev, label=run.label)
        print(f'  {run.label:<34} (same run as {prev["label"]!r})')
      results[name].append(res)
  total = time.perf_counter() - t0
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, 'results.json')
  if args.merge and os.path.exists(json_path):
    with open(json_path) as f:
      old = json.load(f)
    total += old['meta']['seconds']
    results = {**old['results'], **results}
    results = {k: results[k] for k in experiments(s) if k in results}
  for name, rows in results.items():
    plot(name, rows, os.path.join(args.out, f'{name}.png'))
  meta = {
      'setting': dataclasses.asdict(s),
      'jax': jax.__version__, 'optax': optax.__version__,
      'flora_optax': flora_optax.__version__,
      'platform': f'{jax.devices()[0].platform} / {platform.processor() or platform.machine()}',
      'seconds': total,
  }
  with open(json_path, 'w') as f:
    json.dump({'meta': meta, 'results': results}, f, indent=1)
  baselines = {'accumulation': 'optax.MultiSteps',
               'momentum': 'adafactor, momentum 0.9',
               'kappa': None}
  with open(os.path.join(args.out, 'tables.md'), 'w') as f:
    for name, rows in results.items():
      f.write(f'### {name}\n\n{table(rows, baselines[name])}\n\n')
      notes = sorted({w for r in rows for w in r['warnings']})
      for w in notes:
        f.write(f'- warning at init: {w}\n')
      f.write('\n')
  print(f'\n{total:.0f} s; tables and plots in {args.out}')
  return results


if __name__ == '__main__':
  xla_cpu.avoid_xla_cpu_hang()  # jaxlib 0.10 on CPU only; see the README
  main()
