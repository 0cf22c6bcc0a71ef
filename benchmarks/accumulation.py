"""flora_optax.MultiSteps against optax.MultiSteps, in one run.

Both wrap the same inner optimizer (adafactor, adamw) and accumulate
``--every-k`` micro-steps. Two models:

* a GPT-2-small-shaped parameter tree (compile-only for the full train step;
  the update alone is also run and timed);
* a small GPT (GPT-2 layout, trained on random tokens) whose full micro-step
  (forward, backward, update, apply) is run and timed.

Figures (all in one process, ours / optax's as ratios):

* accumulator bytes and total state bytes;
* peak memory of the compiled step (``memory_analysis()``: arguments +
  outputs + temporaries - aliased, with the params and state donated as in a
  real train loop), for the program that runs at every call and for variants
  specialised to a micro-step and to the boundary step;
* median wall time of the micro-step and of the boundary step, update alone
  and full step, interleaved repeats.

Run ``python -m benchmarks.accumulation`` (a few minutes on a CPU) or with
``--quick`` (tiny shapes, a smoke test). Results go to
``benchmarks/results/accumulation{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import flora_optax
from benchmarks import common
from benchmarks import small_lm
from benchmarks.small_lm import GPTConfig
from examples import gpt


# --- the GPT of examples/gpt.py, in GPT-2's parameter layout ---------------


# d_model 512 > rank 128, so every matrix is compressed (4x at best: r/d).
SMALL = GPTConfig(n_layer=2, d_model=512, n_head=8, vocab=4096, seq_len=128,
                  batch=8)
QUICK = GPTConfig(n_layer=1, d_model=64, n_head=4, vocab=256, seq_len=32,
                  batch=4)
GPT2_SMALL_BATCH = (8, 1024)  # (batch, sequence) for the compile-only step.


def init_params(shapes: Any, seed: int = 0) -> Any:
  """N(0, 0.02) weights and biases, LayerNorm scales at one."""
  return small_lm.init_params(shapes, seed, random_biases=True)


def gpt_loss(params: Any, tokens: jax.Array, n_head: int) -> jax.Array:
  """Next-token cross-entropy of a pre-LayerNorm GPT (tied embeddings), its
  blocks unrolled."""
  return gpt.gpt2_loss(params, tokens, n_head, scan_layers=False)


# --- the candidates --------------------------------------------------------


def inner_optimizers() -> dict[str, optax.GradientTransformation]:
  return {'adafactor': optax.adafactor(1e-3), 'adamw': optax.adamw(1e-3)}


def wrappers(inner, every_k: int, rank: int) -> dict[str, Any]:
  return {
      'optax': optax.MultiSteps(inner, every_k),
      'flora': flora_optax.MultiSteps(inner, every_k, rank=rank, key=0),
  }


def _at(state, mini_step):
  """The state with ``mini_step`` set (a fresh buffer: states are donated)."""
  return state._replace(mini_step=jnp.asarray(mini_step, jnp.int32))


def update_step(tx, mini_step=None):
  """The update alone; ``mini_step`` fixes the micro-step at compile time."""

  def f(grads, state, params):
    if mini_step is not None:
      state = _at(state, mini_step)
    return tx.update(grads, state, params)

  return f


def train_step(tx, n_head, mini_step=None):
  """Forward, backward, update and apply, as in a real train loop."""

  def f(params, state, tokens):
    if mini_step is not None:
      state = _at(state, mini_step)
    loss, grads = jax.value_and_grad(gpt_loss)(params, tokens, n_head)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return f


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def memory_figures(txs, params_shapes, every_k, full=None) -> dict[str, Any]:
  """Compiled peak memory of each candidate (nothing is allocated)."""
  out = {}
  for name, tx in txs.items():
    state = jax.eval_shape(tx.init, params_shapes)
    fig = {}
    for label, mini in [('any', None), ('micro', 0), ('boundary', every_k - 1)]:
      fig[f'update_{label}'] = common.compiled_memory(
          update_step(tx, mini), params_shapes, state, params_shapes,
          donate_argnums=(1,))
    if full is not None:
      n_head, tokens = full
      fig['train_any'] = common.compiled_memory(
          train_step(tx, n_head), params_shapes, state, tokens,
          donate_argnums=(0, 1))
    out[name] = fig
  return out


def state_figures(txs, params_shapes) -> dict[str, Any]:
  out = {}
  for name, tx in txs.items():
    state = jax.eval_shape(tx.init, params_shapes)
    out[name] = {'state_bytes': common.tree_bytes(state),
                 'acc_bytes': common.tree_bytes(state.acc_grads)}
  return out


def time_updates(txs, params, every_k, repeats) -> dict[str, float]:
  """Median seconds of the update alone, micro-step and boundary step."""
  grads = common.random_like(_shapes(params), seed=1)
  thunks = {}
  for name, tx in txs.items():
    compiled = jax.jit(update_step(tx), donate_argnums=(1,))
    for label, mini in [('micro', 0), ('boundary', every_k - 1)]:
      box = {'state': jax.jit(tx.init)(params)}

      def thunk(box=box, compiled=compiled, mini=mini):
        updates, box['state'] = compiled(grads, _at(box['state'], mini),
                                         params)
        jax.block_until_ready((updates, box['state']))

      thunks[f'{name}/{label}'] = thunk
  return common.interleaved_times(thunks, repeats=repeats)


def time_train(txs, params, cfg: GPTConfig, every_k, repeats):
  """Median seconds of the full micro-step and boundary step."""
  tokens = jax.random.randint(jax.random.key(2), (cfg.batch, cfg.seq_len + 1),
                              0, cfg.vocab)
  thunks = {}
  for name, tx in txs.items():
    compiled = jax.jit(train_step(tx, cfg.n_head), donate_argnums=(0, 1))
    for label, mini in [('micro', 0), ('boundary', every_k - 1)]:
      box = {'params': jax.tree.map(jnp.copy, params),
             'state': jax.jit(tx.init)(params)}

      def thunk(box=box, compiled=compiled, mini=mini):
        box['params'], box['state'], loss = compiled(
            box['params'], _at(box['state'], mini), tokens)
        jax.block_until_ready((box['params'], loss))

      thunks[f'{name}/{label}'] = thunk
  return common.interleaved_times(thunks, repeats=repeats)


# --- the run ---------------------------------------------------------------


def run(quick: bool, repeats: int, every_k: int, compile_gpt2_train: bool):
  rank = 16 if quick else 128
  gpt2 = common.gpt2_shapes('tiny' if quick else 'small')
  gpt2_n_head = 4 if quick else 12
  cfg = QUICK if quick else SMALL
  batch, seq = (2, 64) if quick else GPT2_SMALL_BATCH
  results: dict[str, Any] = {
      'config': {
          'quick': quick, 'rank': rank, 'every_k': every_k,
          'repeats': repeats, 'small_model': cfg.record(),
          'gpt2': 'tiny' if quick else 'small',
          'gpt2_train_batch': [batch, seq],
          'jax': jax.__version__, 'optax': optax.__version__,
          'backend': jax.default_backend(), 'cpu': platform.processor(),
      },
      'models': {},
  }
  models = {
      'gpt2': (gpt2, (gpt2_n_head, jax.ShapeDtypeStruct(
          (batch, seq + 1), jnp.int32)) if compile_gpt2_train else None),
      'small_gpt': (small_lm.param_shapes(cfg), (
          cfg.n_head,
          jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len + 1), jnp.int32))),
  }
  for model, (shapes, full) in models.items():
    params = init_params(shapes)
    res = results['models'][model] = {}
    for inner_name, inner in inner_optimizers().items():
      t0 = time.perf_counter()
      txs = wrappers(inner, every_k, rank)
      entry = {'state': state_figures(txs, shapes),
               'memory': memory_figures(txs, shapes, every_k, full),
               'time_update': time_updates(txs, params, every_k, repeats)}
      if model == 'small_gpt':
        entry['time_train'] = time_train(txs, params, cfg, every_k, repeats)
      res[inner_name] = entry
      print(f'{model}/{inner_name}: {time.perf_counter() - t0:.0f}s',
            flush=True)
  return results


def _ratio(a, b):
  return a / b if b else float('nan')


def summarize(results) -> tuple[dict[str, Any], str]:
  """Ratios, target checks and the markdown report."""
  rows, checks = _ratios(results)
  markdown = _markdown(results['config'], rows, checks)
  return {'rows': rows, 'checks': checks}, markdown


def _header(cfg) -> list[str]:
  return [
      '# Gradient accumulation: flora_optax.MultiSteps vs optax.MultiSteps\n',
      f"rank {cfg['rank']}, every_k {cfg['every_k']}, {cfg['repeats']} "
      f"interleaved repeats (medians), backend {cfg['backend']}, jax "
      f"{cfg['jax']}, optax {cfg['optax']}. Small GPT: {cfg['small_model']}. "
      f"GPT-2 tree: {cfg['gpt2']} (full train step compiled only, batch "
      f"{cfg['gpt2_train_batch']}).\n",
      'Peak = arguments + outputs + temporaries - aliased bytes of the '
      'compiled step, params/state donated. `any`: the program that runs at '
      'every call (both paths compiled in); `micro`/`boundary`: the same '
      'step specialised to one path (for optax.MultiSteps, the specialised '
      'micro-step drops the inner update that its real program runs at every '
      'call).\n',
  ]


def _ratios(results) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """One row of ratios (flora / optax) per model and inner optimizer, and
  the target checks."""
  checks = {}
  rows = []
  for model, per_inner in results['models'].items():
    for inner, e in per_inner.items():
      st, mem = e['state'], e['memory']
      acc_ratio = _ratio(st['optax']['acc_bytes'], st['flora']['acc_bytes'])
      saved = st['optax']['state_bytes'] - st['flora']['state_bytes']
      row = {'model': model, 'inner': inner,
             'acc_MiB_optax': common.mib(st['optax']['acc_bytes']),
             'acc_MiB_flora': common.mib(st['flora']['acc_bytes']),
             'acc_smaller_x': acc_ratio,
             'state_MiB_optax': common.mib(st['optax']['state_bytes']),
             'state_MiB_flora': common.mib(st['flora']['state_bytes']),
             'state_saved_MiB': common.mib(saved)}
      for prog in mem['optax']:
        po = mem['optax'][prog]['peak_bytes']
        pf = mem['flora'][prog]['peak_bytes']
        row[f'peak_MiB_{prog}_optax'] = common.mib(po)
        row[f'peak_MiB_{prog}_flora'] = common.mib(pf)
        row[f'peak_saved_over_state_saved_{prog}'] = _ratio(po - pf, saved)
      tu = e['time_update']
      for label in ('micro', 'boundary'):
        row[f'time_update_{label}_ratio'] = _ratio(tu[f'flora/{label}'],
                                                   tu[f'optax/{label}'])
        row[f'time_update_{label}_s_optax'] = tu[f'optax/{label}']
      if 'time_train' in e:
        tt = e['time_train']
        for label in ('micro', 'boundary'):
          row[f'time_train_{label}_ratio'] = _ratio(tt[f'flora/{label}'],
                                                    tt[f'optax/{label}'])
          row[f'time_train_{label}_s_optax'] = tt[f'optax/{label}']
      rows.append(row)
      key = f'{model}/{inner}'
      checks[key] = {
          'acc_at_least_4x_smaller': acc_ratio >= 4.0,
          'peak_saving_at_least_80pct_of_state_saving': {
              prog: row[f'peak_saved_over_state_saved_{prog}'] >= 0.8
              for prog in mem['optax']},
      }
      if 'time_train_micro_ratio' in row:
        checks[key]['train_micro_time_at_most_1.10x'] = (
            row['time_train_micro_ratio'] <= 1.10)
  return rows, checks


def _markdown(cfg, rows, checks) -> str:
  lines = _header(cfg)
  lines.append('\n## State\n')
  lines.append(common.markdown_table(
      ['model', 'inner', 'acc MiB optax', 'acc MiB flora', 'acc smaller ×',
       'state MiB optax', 'state MiB flora'],
      [[r['model'], r['inner'], r['acc_MiB_optax'], r['acc_MiB_flora'],
        r['acc_smaller_x'], r['state_MiB_optax'], r['state_MiB_flora']]
       for r in rows]))
  lines.append('\n## Peak memory of the compiled step (MiB)\n')
  progs = [p for p in ('update_any', 'update_micro', 'update_boundary',
                       'train_any')]
  mem_rows = []
  for r in rows:
    for prog in progs:
      if f'peak_MiB_{prog}_optax' in r:
        mem_rows.append([r['model'], r['inner'], prog,
                         r[f'peak_MiB_{prog}_optax'],
                         r[f'peak_MiB_{prog}_flora'],
                         r[f'peak_saved_over_state_saved_{prog}']])
  lines.append(common.markdown_table(
      ['model', 'inner', 'step', 'optax', 'flora',
       'peak saved / state saved'], mem_rows))
  lines.append('\n## Time (flora / optax, medians)\n')
  time_rows = []
  for r in rows:
    for kind in ('update', 'train'):
      for label in ('micro', 'boundary'):
        k = f'time_{kind}_{label}_ratio'
        if k in r:
          time_rows.append([r['model'], r['inner'], f'{kind} {label}',
                            r[f'time_{kind}_{label}_s_optax'], r[k]])
  lines.append(common.markdown_table(
      ['model', 'inner', 'step', 'optax s', 'flora / optax'], time_rows))
  lines.append('\n## Targets\n')
  for key, c in checks.items():
    lines.append(f'- {key}: {c}')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes: a smoke test of the script')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--every-k', type=int, default=4)
  parser.add_argument('--no-gpt2-train', action='store_true',
                      help='skip compiling the GPT-2 full train step')
  args = parser.parse_args(argv)
  repeats = args.repeats or (2 if args.quick else 5)
  results = run(args.quick, repeats, args.every_k, not args.no_gpt2_train)
  summary, markdown = summarize(results)
  results['summary'] = summary
  name = 'accumulation_quick' if args.quick else 'accumulation'
  paths = common.write_results(name, results, markdown)
  print(markdown)
  print('wrote', *paths)


if __name__ == '__main__':
  main()
