r"""Train a small GPT-style language model with Flora, on text that ships with Python.

The model is a byte-level GPT (Flax NNX, ``model.py``) trained on the Python
reference manual (``pydoc_data``) and standard-library sources (``data.py``):
nothing is downloaded.
By default it trains ``flora_optax.flora`` and, for comparison, the same
Adafactor with uncompressed momentum (``optax.adafactor(momentum=0.9)``), then
prints the eval loss of both and a memory table (optimizer-state bytes and
the peak memory of the compiled training step), and saves a loss-curve PNG.

Run from the repository root::

    python -m examples.train_lm                       # ~2-3 minutes on 2 CPU cores
    python -m examples.train_lm --out examples/results/train_lm  # the reference
    python -m examples.train_lm --optimizers flora --steps 2000 --d-model 256
    python -m examples.train_lm --accumulate 4 --accumulation-rank 8

``--accumulate K`` takes K micro-batches per optimizer update, with
``flora_optax.MultiSteps`` (a compressed accumulator) for the Flora optimizers
and ``optax.MultiSteps`` for the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flora_optax
from examples import data as data_lib
from examples import xla_cpu
from examples.memory import mib, peak_bytes, tree_bytes
from examples.model import ModelConfig, init_model, make_loss_fn

OPTIMIZERS = ('flora', 'adafactor', 'adafactor_nomomentum', 'flora_paper',
              'flora_frozen', 'lora', 'flora8', 'flora4', 'flora_sketch8',
              'adamw', 'adamw8', 'adamw4', 'muon', 'muon8', 'lion8')
# Learning rates of the optimizers whose step has another scale, as multiples
# of the demo's (Adam-like) --learning-rate: Muon's orthogonalized step takes
# ~0.02 (its Adam part, for the embeddings, vectors and norms, the demo's
# rate); Lion's sign step ~1/3-1/10 of Adam's (at the defaults, 300 steps,
# lion8's eval loss: 2.764 at 1/10, 2.645 at 1/5, 2.638 at 1/3, 2.644 at
# 1/2).
MUON_LR_SCALE = 0.02 / 3e-3
LION_LR_SCALE = 1 / 3
# Run outputs go to an untracked directory (/runs/ is in .gitignore); the
# reference results in examples/results/train_lm are regenerated only on
# purpose, with --out examples/results/train_lm.
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'runs',
    'train_lm')

# ----------------------------------------------------------------------------
# Optimizers.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptConfig:
  name: str = 'flora'
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  steps: int = 500  # optimizer updates (each of `accumulate` micro-batches)
  rank: int = 16  # Flora momentum rank, and LoRA rank
  resample_every: int | None = 100
  accumulate: int = 1
  accumulation_rank: int | None = 8  # None: an accumulator in every direction
  accumulation_bits: int | None = None  # flora's accumulator in 8/4-bit codes
  accumulator: str | None = None  # 'flora', 'optax'; None: by optimizer name
  momentum: float | None = 0.9
  min_dim_size_to_factor: int = 128  # Adafactor's; lower it for tiny models
  transfer: str = 'unbiased'  # Flora's momentum transfer at a resample
  seed: int = 0


def make_schedule(oc: OptConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      0.0, oc.learning_rate, min(oc.warmup_steps, oc.steps // 2),
      max(oc.steps, 1), end_value=0.1 * oc.learning_rate)


def make_optimizer(oc: OptConfig) -> optax.GradientTransformation:
  """The optimizer ``oc.name``, wrapped for accumulation when asked.

  All but the AdamW, Muon and Lion rows are Adafactor (factored second
  moment, block-RMS clipping) with the same learning-rate schedule; they
  differ only in the first moment:

  - ``flora``: Flora-compressed momentum of rank ``oc.rank`` (the default,
    residual mode);
  - ``flora_paper``: the paper's algorithm (``residual=False``);
  - ``flora_frozen``: the paper's algorithm never resampled (LoRA with a
    frozen ``A``);
  - ``adafactor``: uncompressed momentum (``optax.adafactor(momentum=...)``);
  - ``adafactor_nomomentum``: no momentum;
  - ``lora``: uncompressed momentum, used on a model with LoRA adapters;
  - ``flora8`` / ``flora4``: the momentum in 8- or 4-bit codes in every
    direction (``flora(rank=None, bits=8)``);
  - ``flora_sketch8``: Flora's residual momentum of rank ``oc.rank`` with its
    sketch in 8-bit codes (``flora(rank, bits=8)``).

  ``adamw``: ``optax.adamw`` on the same schedule; ``adamw8`` / ``adamw4``:
  ``flora_optax.adamw(bits=8 / 4)``, both moments in 8- or 4-bit codes.

  ``muon``: ``optax.contrib.muon`` (Newton-Schulz-orthogonalized momentum)
  on the 2-D kernels at ``MUON_LR_SCALE`` times the learning rate, Adam at
  the learning rate on the embeddings, positions, biases and norms;
  ``muon8``: the same in ``flora_optax.quantized(..., bits=8)``, its
  momentum and Adam moments in 8-bit codes. ``lion8``:
  ``flora_optax.quantized(optax.lion(...), bits=8)`` at ``LION_LR_SCALE``
  times the learning rate. All on the same schedule shape.

  ``oc.momentum=None`` removes the momentum of every one of them (AdamW's
  ``b1 = 0``, Muon's ``beta = adam_b1 = 0``, Lion's ``b1 = b2 = 0``);
  otherwise Muon and Lion keep optax's defaults (0.95; 0.9 and 0.99).

  Parameter-scale multiplication is off so that zero-initialised weights
  (biases, LoRA's ``B``) learn at the same rate under every optimizer.
  """
  if oc.name not in OPTIMIZERS:
    raise ValueError(f'`name` must be one of {OPTIMIZERS}, got {oc.name!r}.')
  lr = make_schedule(oc)
  common = dict(multiply_by_parameter_scale=False,
                min_dim_size_to_factor=oc.min_dim_size_to_factor)
  if oc.name in ('muon', 'muon8'):
    no_momentum = {} if oc.momentum is not None else dict(beta=0.0,
                                                          adam_b1=0.0)
    tx = optax.contrib.muon(
        make_schedule(dataclasses.replace(
            oc, learning_rate=MUON_LR_SCALE * oc.learning_rate)),
        adam_learning_rate=lr, muon_weight_dimension_numbers=_muon_kernels,
        **no_momentum)
    tx = flora_optax.quantized(tx, bits=8 if oc.name == 'muon8' else None)
  elif oc.name == 'lion8':
    no_momentum = {} if oc.momentum is not None else dict(b1=0.0, b2=0.0)
    tx = flora_optax.quantized(optax.lion(make_schedule(dataclasses.replace(
        oc, learning_rate=LION_LR_SCALE * oc.learning_rate)), **no_momentum),
                               bits=8)
  elif oc.name.startswith('adamw'):
    bits = {'adamw': None, 'adamw8': 8, 'adamw4': 4}[oc.name]
    tx = flora_optax.adamw(lr, b1=oc.momentum or 0.0, bits=bits, key=oc.seed)
  elif oc.name in ('flora8', 'flora4'):
    tx = flora_optax.flora(lr, None, momentum=oc.momentum,
                           bits=int(oc.name[-1]), key=oc.seed, **common)
  elif oc.name == 'flora_sketch8':
    tx = flora_optax.flora(lr, oc.rank, momentum=oc.momentum, key=oc.seed,
                           resample_every=oc.resample_every,
                           transfer=oc.transfer, bits=8, **common)
  elif oc.name in ('flora', 'flora_paper', 'flora_frozen'):
    tx = flora_optax.flora(
        lr, oc.rank, momentum=oc.momentum, key=oc.seed,
        resample_every=None if oc.name == 'flora_frozen' else
        oc.resample_every, transfer=oc.transfer,
        residual=oc.name == 'flora', **common)
  elif oc.name == 'adafactor_nomomentum':
    tx = optax.adafactor(lr, **common)
  else:
    tx = optax.adafactor(lr, momentum=oc.momentum, **common)
  if oc.accumulate > 1:
    tx = accumulate(tx, oc)
  return tx


def _muon_kernels(params):
  """Muon's dimension numbers: the 2-D ``kernel`` leaves (the Dense
  layers); ``None`` (Adam) for the rest, the embeddings among them."""
  def spec(path, x):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', None))
    return (optax.contrib.MuonDimensionNumbers()
            if name == 'kernel' and x.ndim == 2 else None)
  return jax.tree_util.tree_map_with_path(spec, params)


def accumulate(tx: optax.GradientTransformation,
               oc: OptConfig) -> optax.GradientTransformation:
  """``flora_optax.MultiSteps`` for Flora, ``optax.MultiSteps`` otherwise.

  ``oc.accumulator`` (``'flora'`` or ``'optax'``) overrides the choice.
  """
  kind = oc.accumulator or ('flora' if oc.name.startswith('flora') else
                            'optax')
  if kind not in ('flora', 'optax'):
    raise ValueError("`accumulator` must be 'flora', 'optax' or None, got "
                     f'{oc.accumulator!r}.')
  if kind == 'flora':
    return flora_optax.MultiSteps(
        tx, oc.accumulate, rank=oc.accumulation_rank, key=oc.seed + 1,
        bits=oc.accumulation_bits).gradient_transformation()
  return optax.MultiSteps(tx, oc.accumulate).gradient_transformation()


def _mib_cell(n: float) -> str:
  """A table cell: MiB, or '-' for a figure not measured (negative)."""
  return f'{mib(n):.3f}' if n >= 0 else '-'


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  name: str
  steps: list[int]
  train_loss: list[float]
  eval_steps: list[int]
  eval_loss: list[float]
  final_eval_loss: float
  state_bytes: int
  param_bytes: int
  peak_step_bytes: int
  peak_update_bytes: int
  seconds: float
  warnings: list[str]


def train(mc: ModelConfig, oc: OptConfig, corpus: data_lib.Corpus, *,
          batch_size: int = 16, eval_every: int = 100, eval_batches: int = 8,
          progress: bool = True, measure_peak: bool = True) -> RunResult:
  """Trains one model with one optimizer; returns curves and memory figures.

  Args:
    mc: the model configuration (``oc.name == 'lora'`` adds LoRA adapters).
    oc: the optimizer configuration.
    corpus: the data.
    batch_size: sequences per micro-batch.
    eval_every: optimizer updates between evaluations.
    eval_batches: batches in each evaluation (always the same ones).
    progress: show a tqdm progress bar.
    measure_peak: also compile the optimizer update alone, for its peak
      memory (``memory_analysis``).
  """
  import warnings  # pylint: disable=g-import-not-at-top
  if oc.name == 'lora':
    mc = dataclasses.replace(mc, lora_rank=oc.rank)
  graphdef, params, template = init_model(mc, oc.seed)
  loss_fn = make_loss_fn(graphdef, template)
  tx = make_optimizer(oc)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    opt_state = tx.init(params)
  caught = [f'{w.category.__name__}: {w.message}' for w in caught]

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batches = corpus.batches('train', batch_size, mc.seq_len, seed=oc.seed)
  evals = [jnp.asarray(b) for b in corpus.eval_batches(
      batch_size, mc.seq_len, eval_batches)]
  eval_jit = jax.jit(loss_fn)
  # Compile once, and read the memory figures from that same executable.
  tokens_shape = jax.ShapeDtypeStruct((batch_size, mc.seq_len + 1), jnp.uint8)
  step_compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, tokens_shape).compile()
  peak = peak_bytes(step_compiled)
  update_peak = -1
  if measure_peak:
    # The optimizer update alone (grads in, new params out): the part of the
    # step that the optimizer's state and temporaries decide.
    def apply(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    update_peak = peak_bytes(
        jax.jit(apply).lower(params, opt_state, params).compile())
  state_bytes = tree_bytes(opt_state)
  param_bytes = tree_bytes(params)

  def evaluate(p):
    return float(np.mean([eval_jit(p, b) for b in evals]))

  micro_steps = oc.steps * oc.accumulate
  steps, losses, eval_steps, eval_losses = [], [], [], []
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=micro_steps, desc=f'{oc.name:>9}', unit='step',
               dynamic_ncols=True)
  t0 = time.perf_counter()
  for i in range(1, micro_steps + 1):
    params, opt_state, loss = step_compiled(params, opt_state,
                                       jnp.asarray(next(batches)))
    update = i // oc.accumulate
    if i % max(1, micro_steps // 200) == 0 or i == micro_steps:
      steps.append(i)
      losses.append(float(loss))
      if bar is not None:
        bar.set_postfix(loss=f'{losses[-1]:.3f}', refresh=False)
    if i % oc.accumulate == 0 and (update % eval_every == 0 or
                                   update == oc.steps):
      eval_steps.append(i)
      eval_losses.append(evaluate(params))
      if bar is not None:
        bar.set_postfix(loss=f'{float(loss):.3f}',
                        eval=f'{eval_losses[-1]:.3f}', refresh=False)
    if bar is not None:
      bar.update(1)
  seconds = time.perf_counter() - t0
  if bar is not None:
    bar.close()
  return RunResult(oc.name, steps, losses, eval_steps, eval_losses,
                   eval_losses[-1], state_bytes, param_bytes, peak, update_peak,
                   seconds,
                   caught)


def memory_table(results: Sequence[RunResult]) -> str:
  """A Markdown table of state bytes and compiled peak memory per optimizer."""
  base = {r.name: r for r in results}.get('adafactor')
  def ratio(a, b):
    return f'{a / b:.3f}' if base and a > 0 and b > 0 else '-'

  lines = [
      '| optimizer | eval loss | state (MiB) | state / adafactor | '
      'peak of optimizer update (MiB) | ratio | '
      'peak of training step (MiB) | ratio |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    lines.append(
        f'| {r.name} | {r.final_eval_loss:.4f} | {_mib_cell(r.state_bytes)} | '
        f'{ratio(r.state_bytes, base.state_bytes if base else 0)} | '
        f'{_mib_cell(r.peak_update_bytes)} | '
        f'{ratio(r.peak_update_bytes, base.peak_update_bytes if base else 0)}'
        f' | {_mib_cell(r.peak_step_bytes)} | '
        f'{ratio(r.peak_step_bytes, base.peak_step_bytes if base else 0)} |')
  return '\n'.join(lines)


def plot(results: Sequence[RunResult], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for r in results:
    line, = ax.plot(r.steps, _smooth(r.train_loss), alpha=0.6,
                    label=f'{r.name} train')
    ax.plot(r.eval_steps, r.eval_loss, 'o-', color=line.get_color(),
            label=f'{r.name} eval')
  ax.set_xlabel('micro-step')
  ax.set_ylabel('cross-entropy (nats / byte)')
  ax.set_title(title)
  lo = min(min(r.eval_loss) for r in results)
  ax.set_ylim(lo - 0.2, lo + 2.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _smooth(xs: Sequence[float], beta: float = 0.8) -> list[float]:
  out, m = [], None
  for x in xs:
    m = x if m is None else beta * m + (1 - beta) * x
    out.append(m)
  return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--optimizers', default='flora,adafactor',
                 help=f'comma-separated, from {",".join(OPTIMIZERS)}')
  p.add_argument('--steps', type=int, default=300, help='optimizer updates')
  p.add_argument('--batch-size', type=int, default=16,
                 help='sequences per micro-batch')
  p.add_argument('--accumulate', type=int, default=1,
                 help='micro-batches per update (MultiSteps)')
  p.add_argument('--accumulation-rank', type=int, default=8,
                 help='rank of the compressed accumulator (Flora only)')
  p.add_argument('--rank', type=int, default=16,
                 help='Flora momentum rank (and LoRA rank)')
  p.add_argument('--resample-every', type=int, default=100,
                 help='Flora κ: steps between fresh projections; 0 = never')
  p.add_argument('--learning-rate', type=float, default=3e-3)
  p.add_argument('--warmup-steps', type=int, default=30)
  p.add_argument('--d-model', type=int, default=128)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--data', default='all', choices=data_lib.SOURCES)
  p.add_argument('--eval-every', type=int, default=50)
  p.add_argument('--eval-batches', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=DEFAULT_OUT,
                 help='directory for the PNG and results.json (pass '
                 'examples/results/train_lm to regenerate the reference '
                 'results)')
  p.add_argument('--no-progress', action='store_true')
  p.add_argument('--no-update-peak', action='store_true',
                 help="skip compiling the optimizer update alone for its "
                 "peak memory (the training step's peak is still reported)")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.optimizers.split(',') if n.strip()]
  bad = [n for n in names if n not in OPTIMIZERS]
  if bad or not names:
    p.error(f'--optimizers: unknown {bad}; choose from {OPTIMIZERS}')
  args.optimizers = names
  for flag in ('steps', 'batch_size', 'accumulate', 'accumulation_rank',
               'rank', 'd_model', 'layers', 'heads', 'seq_len', 'eval_every',
               'eval_batches'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag.replace("_", "-")} must be >= 1')
  if args.d_model % args.heads:
    p.error('--d-model must be divisible by --heads')
  return args


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
  args = parse_args(argv)
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform.upper()} '
        f'({jax.device_count()} device(s)); flora_optax '
        f'{flora_optax.__version__}')
  corpus = data_lib.load_corpus(args.data)
  print(f'data: {args.data!r}: {len(corpus.train):,} train bytes '
        f'({len(corpus.train_docs)} documents), {len(corpus.eval):,} eval '
        f'bytes ({len(corpus.eval_docs)} held-out documents)')
  mc = ModelConfig(seq_len=args.seq_len, d_model=args.d_model,
                   num_layers=args.layers, num_heads=args.heads)
  n_params = tree_bytes(init_model(mc, 0)[1]) // 4
  print(f'model: {args.layers} layers, d_model {args.d_model}, '
        f'{args.heads} heads, context {args.seq_len}: {n_params:,} params; '
        f'{args.steps} updates x {args.accumulate} micro-batch(es) of '
        f'{args.batch_size}')
  results = []
  for name in args.optimizers:
    oc = OptConfig(name=name, learning_rate=args.learning_rate,
                   warmup_steps=args.warmup_steps, steps=args.steps,
                   rank=args.rank,
                   resample_every=args.resample_every or None,
                   accumulate=args.accumulate,
                   accumulation_rank=args.accumulation_rank, seed=args.seed)
    r = train(mc, oc, corpus, batch_size=args.batch_size,
              eval_every=args.eval_every, eval_batches=args.eval_batches,
              progress=not args.no_progress,
              measure_peak=not args.no_update_peak)
    for w in r.warnings:
      print(f'  note: {w}')
    print(f'{name}: eval loss {r.final_eval_loss:.4f} nats/byte '
          f'({r.final_eval_loss / np.log(2):.3f} bits/byte) in '
          f'{r.seconds:.1f} s')
    results.append(r)
  print()
  print(memory_table(results))
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, 'loss_curve.png')
  plot(results, png, f'byte-level GPT, {n_params:,} params, '
       f'rank {args.rank}' + (f', accumulate {args.accumulate}'
                             if args.accumulate > 1 else ''))
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    # Where it was written is no result, and would record a machine's path.
    saved_args = {k: v for k, v in vars(args).items() if k != 'out'}
    json.dump({'args': saved_args, 'results': [dataclasses.asdict(r)
                                               for r in results]}, f,
              indent=1)
  print(f'\nloss curve: {png}')
  return results


if __name__ == '__main__':
  xla_cpu.avoid_xla_cpu_hang()  # jaxlib 0.10 on CPU only; see the README
  main()
