"""Writes the notebooks in this folder from the cell sources below.

Run ``python notebooks/_build_notebooks.py`` after editing; the notebooks are
committed without outputs (CI executes them with ``FLORA_SMOKE=1``).
"""

import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

# The install cell's marked variable, and its default: the wheel that
# `pip wheel --no-deps -w dist .` makes (any version), uploaded to Colab.
# flora_optax is not on PyPI (yet), and the notebooks name no repository
# (tests/test_notebooks.py checks both).
SOURCE_VARIABLE = 'FLORA_OPTAX_SOURCE'
DEFAULT_SOURCE = 'flora_optax-*-py3-none-any.whl'

INSTALL_CELL = f"""\
# ===== Where to install flora_optax from: edit this one line ==============
{SOURCE_VARIABLE} = '{DEFAULT_SOURCE}'
# ==========================================================================
# flora_optax is not on PyPI yet, so the default is a wheel that you upload
# to this Colab session. In a copy of the project, on your machine, run
#     pip wheel --no-deps -w dist .     (or: python -m build --wheel)
# and drag dist/flora_optax-<version>-py3-none-any.whl into Colab's Files
# panel (left bar, folder icon): it lands in /content, this notebook's
# folder, where the pattern above finds it. The value may also be the path
# of a wheel or of a checkout of the project, or 'flora-optax' once it is
# published on PyPI. The [notebooks] extra is what this notebook imports
# beyond jax and optax: flax and matplotlib, each with its dependencies
# (flax brings orbax-checkpoint, tensorstore and others). pip installs
# them where missing or older than flora_optax's floors (the docs' Getting
# started page) and leaves the rest, ipykernel included, as it is.
# %pip ends with "you may need to restart the kernel": no restart is
# needed, as nothing it installs has been imported yet in this session.
# Where flora_optax is already installed (e.g. in CI), this cell does nothing.
import glob
import importlib.util
import os

if importlib.util.find_spec('flora_optax') is None:
  source = {SOURCE_VARIABLE}
  if any(c in source for c in '*?['):  # a pattern: the uploaded wheel
    found = glob.glob(source)
    if not found:
      raise FileNotFoundError(
          f'no file matches {{source!r}} in {{os.getcwd()}}: upload the '
          f'flora_optax wheel (see above) or set {SOURCE_VARIABLE}')
    source = max(found, key=os.path.getmtime)  # several: the newest
  if os.path.exists(source):
    source = os.path.abspath(source)
  get_ipython().run_line_magic('pip', f'install -q "{{source}}[notebooks]"')
  importlib.invalidate_caches()
  import flora_optax  # fails here, not three cells later, if pip did not
# On Colab pick a CPU, GPU or TPU runtime: the notebook builds its mesh from
# whatever jax.devices() finds."""

COLAB_NOTE = (
    '**On Colab:** File → Upload notebook (this `.ipynb`), upload the '
    'flora_optax wheel to the session (how to make it: the next cell, or '
    'the README\'s "Colab" section), then run all cells. The install cell '
    'ends with %pip\'s note that you may need to restart the kernel: ignore '
    'it, no restart is needed.')


def header(name: str, title: str, intro: str) -> list:
  del name  # the notebooks link to no repository (none can be shown)
  return [
      v4.new_markdown_cell(f'# {title}\n\n{intro}\n\n{COLAB_NOTE}'),
      v4.new_code_cell(INSTALL_CELL),
      v4.new_code_cell(
          "import os\n"
          "import time\n\n"
          "import jax\n"
          "import jax.numpy as jnp\n"
          "import matplotlib.pyplot as plt\n"
          "import numpy as np\n"
          "import optax\n"
          "from flax import nnx\n\n"
          "import flora_optax\n\n"
          "# CI executes this notebook with FLORA_SMOKE=1: same code, small sizes.\n"
          "SMOKE = os.environ.get('FLORA_SMOKE') == '1'\n"
          "print('JAX', jax.__version__, 'running on',\n"
          "      jax.devices()[0].platform.upper(), f'({jax.device_count()} devices)')\n"
          "# One data-parallel axis over every device: 1 CPU, 1 GPU or 8 TPU cores.\n"
          "mesh = jax.make_mesh((jax.device_count(),), ('data',),\n"
          "                     axis_types=(jax.sharding.AxisType.Auto,))\n"
          "data_sharding = jax.NamedSharding(mesh, jax.P('data'))\n"
          "print(mesh)"),
  ]


COMMON_MEMORY = '''\
def gpt2_shapes(n_layer=12, d=768, vocab=50257, n_pos=1024):
  """GPT-2's parameter shapes (no arrays are allocated)."""
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  block = {'attn': {'c_attn': f(d, 3 * d), 'c_proj': f(d, d),
                    'b_attn': f(3 * d), 'b_proj': f(d)},
           'mlp': {'c_fc': f(d, 4 * d), 'c_proj': f(4 * d, d),
                   'b_fc': f(4 * d), 'b_proj': f(d)},
           'ln_1': f(d), 'ln_2': f(d)}
  return {'wte': f(vocab, d), 'wpe': f(n_pos, d),
          'h': {str(i): block for i in range(n_layer)}, 'ln_f': f(d)}


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_mib(tx, shapes):
  return nbytes(jax.eval_shape(tx.init, shapes)) / 2**20


def update_peak_mib(tx, shapes):
  """Peak memory of one compiled optimizer update (memory_analysis)."""
  def apply(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  state = jax.eval_shape(tx.init, shapes)
  m = jax.jit(apply).lower(shapes, state, shapes).compile().memory_analysis()
  if m is None:
    return float('nan')
  return (m.argument_size_in_bytes + m.output_size_in_bytes +
          m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


# GPT-2 small (124M) in full runs; a 2-layer stand-in when smoke-testing.
shapes = gpt2_shapes(2, 128, 1000, 128) if SMOKE else gpt2_shapes()
print(f'{nbytes(shapes) / 2**20:.1f} MiB of float32 parameters')'''


def quickstart() -> list:
  cells = header(
      'quickstart', 'flora_optax quickstart',
      'Flora ([Hao, Cao and Mou, ICML 2024](https://arxiv.org/abs/2402.03293)) '
      'keeps an optimizer\'s momentum as a random sketch `G Pᵀ` of each '
      'matrix, of size `r·max(n, m)` instead of `n·m`, and regenerates the '
      'projection `P` from a PRNG key whenever it is needed. This notebook '
      'shows the two ways to use it (a drop-in optimizer, and a transform '
      'inside `optax.chain`), trains a Flax NNX model with it, and measures '
      'the memory it saves.')
  cells += [
      v4.new_markdown_cell(
          '## 1. A transform in `optax.chain`\n\n'
          '`compressed_momentum` is an EMA of the updates (like `optax.ema` '
          'without debiasing) whose state is compressed for every matrix; '
          'vectors keep an exact dense EMA.'),
      v4.new_code_cell(
          "params = {'w': jnp.zeros((512, 256)), 'b': jnp.zeros((256,))}\n"
          "tx = optax.chain(\n"
          "    optax.clip_by_global_norm(1.0),\n"
          "    flora_optax.compressed_momentum(rank=16, decay=0.9, resample_every=100),\n"
          "    optax.scale_by_learning_rate(1e-2),\n"
          ")\n"
          "state = tx.init(params)\n"
          "print('momentum state shapes:', jax.tree.map(jnp.shape, state[1].mu))\n"
          "grads = jax.tree.map(jnp.ones_like, params)\n"
          "updates, state = jax.jit(tx.update)(grads, state, params)\n"
          "print('update shapes:        ', jax.tree.map(jnp.shape, updates))"),
      v4.new_markdown_cell(
          '## 2. Training a Flax NNX model with `flora_optax.flora`\n\n'
          '`flora` is `optax.adafactor(momentum=...)` with the momentum '
          'compressed; every other argument has Adafactor\'s name and '
          'default. We fit a two-layer MLP to a random teacher network, with '
          'the batch sharded over the mesh, and compare it with the same '
          'Adafactor keeping the full momentum.'),
      v4.new_code_cell(
          "class MLP(nnx.Module):\n"
          "  def __init__(self, din, dhidden, dout, rngs):\n"
          "    self.l1 = nnx.Linear(din, dhidden, rngs=rngs)\n"
          "    self.l2 = nnx.Linear(dhidden, dhidden, rngs=rngs)\n"
          "    self.l3 = nnx.Linear(dhidden, dout, rngs=rngs)\n\n"
          "  def __call__(self, x):\n"
          "    return self.l3(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))\n\n\n"
          "DIN, DH, DOUT = 64, (64 if SMOKE else 512), 16\n"
          "STEPS = 12 if SMOKE else 600\n"
          "BATCH = 8 * jax.device_count()\n"
          "teacher = MLP(DIN, 256, DOUT, nnx.Rngs(123))\n\n\n"
          "def batch(i):\n"
          "  x = jax.random.normal(jax.random.key(i), (BATCH, DIN))\n"
          "  return jax.device_put((x, teacher(x)), data_sharding)\n\n\n"
          "def train(tx, seed=0):\n"
          "  model = MLP(DIN, DH, DOUT, nnx.Rngs(seed))\n"
          "  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)\n\n"
          "  @nnx.jit\n"
          "  def step(model, optimizer, x, y):\n"
          "    loss, grads = nnx.value_and_grad(\n"
          "        lambda m: jnp.mean((m(x) - y) ** 2))(model)\n"
          "    optimizer.update(model, grads)\n"
          "    return loss\n\n"
          "  losses = [float(step(model, optimizer, *batch(i))) for i in range(STEPS)]\n"
          "  return losses, optimizer\n\n\n"
          "RANK = 8 if SMOKE else 32\n"
          "schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, STEPS // 10, STEPS)\n"
          "runs = {\n"
          "    f'flora (rank {RANK})': flora_optax.flora(\n"
          "        schedule, rank=RANK, resample_every=100,\n"
          "        multiply_by_parameter_scale=False),\n"
          "    'adafactor, full momentum': optax.adafactor(\n"
          "        schedule, momentum=0.9, multiply_by_parameter_scale=False),\n"
          "}\n"
          "results = {name: train(tx) for name, tx in runs.items()}\n"
          "for name, (losses, _) in results.items():\n"
          "  print(f'{name:>26}: final loss {np.mean(losses[-10:]):.4f}')"),
      v4.new_code_cell(
          "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
          "for name, (losses, _) in results.items():\n"
          "  ax.plot(losses, label=name, alpha=0.8)\n"
          "ax.set_yscale('log'); ax.set_xlabel('step'); ax.set_ylabel('MSE')\n"
          "ax.legend(); ax.grid(alpha=0.3); plt.show()"),
      v4.new_code_cell(
          "# The optimizer states themselves: Flora's momentum is a sketch.\n"
          "for name, (_, opt) in results.items():\n"
          "  state = nnx.state(opt, nnx.OptState)\n"
          "  print(f'{name:>26}: optimizer state '\n"
          "        f'{sum(x.size for x in jax.tree.leaves(state)):,} numbers')"),
      v4.new_markdown_cell(
          '## 3. Memory at GPT-2 scale\n\n'
          'State sizes come from `jax.eval_shape` (nothing is allocated); the '
          'peak memory of one compiled update (params, grads and state in, '
          'new params and state out, plus temporaries) comes from '
          '`jax.jit(...).lower(...).compile().memory_analysis()`.'),
      v4.new_code_cell(COMMON_MEMORY),
      v4.new_code_cell(
          "candidates = {\n"
          "    'adamw': optax.adamw(1e-3),\n"
          "    'adafactor, momentum 0.9': optax.adafactor(1e-3, momentum=0.9),\n"
          "    'adafactor, no momentum': optax.adafactor(1e-3),\n"
          "}\n"
          "for r in ([8, 32] if SMOKE else [32, 128, 256]):\n"
          "  candidates[f'flora, rank {r}'] = flora_optax.flora(1e-3, rank=r)\n"
          "base = state_mib(candidates['adafactor, momentum 0.9'], shapes)\n"
          "print(f\"{'optimizer':<26}{'state MiB':>10}{'vs adafactor+m':>16}\")\n"
          "for name, tx in candidates.items():\n"
          "  s = state_mib(tx, shapes)\n"
          "  print(f'{name:<26}{s:>10.1f}{s / base:>16.3f}')"),
      v4.new_code_cell(
          "for name in ['adafactor, momentum 0.9', list(candidates)[-1]]:\n"
          "  t = time.perf_counter()\n"
          "  peak = update_peak_mib(candidates[name], shapes)\n"
          "  print(f'{name:<26} peak of one update: {peak:8.1f} MiB '\n"
          "        f'(compiled in {time.perf_counter() - t:.1f} s)')"),
  ]
  return cells


def lora() -> list:
  cells = header(
      'lora_is_a_gradient_compressor', 'LoRA is secretly a gradient compressor',
      'The observation behind Flora: train LoRA `W = W₀ + B A` with `A` '
      'frozen and plain SGD, and the full weight moves by `-η G Aᵀ A`, where '
      '`G` is the gradient of the full weight. That is a random projection of '
      '`G` (compress: `G Aᵀ`, decompress: `· A`). So LoRA with a frozen `A` '
      'is exactly `compressed_momentum(decay=0, resample_every=None, '
      'residual=False)` (the paper\'s mode) with projection `P = A`. And since the updates live in the row space of '
      'one `A`, their sum never exceeds rank `r`; Flora resamples `P`, so '
      'the sum of its updates can have full rank.')
  cells += [
      v4.new_markdown_cell(
          '## 1. The equivalence, numerically\n\n'
          'A least-squares problem `min_W ½‖XW − Y‖²/N`. The LoRA run trains '
          'only `B` (with `A` taken from the optimizer\'s own key, via '
          '`Projector.projections` and `cycle_key`); the Flora run trains the '
          'full `W` through `compressed_momentum(decay=0, '
          'resample_every=None, residual=False)`. Both use `optax.sgd`.'),
      v4.new_code_cell(
          "N, DIN, DOUT, R = 256, 64, 48, 4\n"
          "LR, T, KEY = 0.02, 60, 7  # E[AᵀA] = I, but AᵀA has eigenvalues ~d/r\n"
          "kx, kw, k0 = jax.random.split(jax.random.key(0), 3)\n"
          "X = jax.random.normal(kx, (N, DIN))\n"
          "W_true = jax.random.normal(kw, (DIN, DOUT)) / np.sqrt(DIN)\n"
          "Y = X @ W_true\n"
          "W0 = 0.1 * jax.random.normal(k0, (DIN, DOUT)) / np.sqrt(DIN)\n\n\n"
          "def loss_w(w):\n"
          "  return 0.5 * jnp.mean(jnp.sum((X @ w - Y) ** 2, axis=-1))\n\n\n"
          "# Flora: the full weight, compressed 'momentum' with decay 0, no resampling.\n"
          "flora_tx = optax.chain(\n"
          "    flora_optax.compressed_momentum(R, decay=0.0, resample_every=None, key=KEY,\n"
          "                                    residual=False),\n"
          "    optax.sgd(LR))\n"
          "# The frozen A: the projection that optimizer draws in cycle 0.\n"
          "A = flora_optax.Projector(R).projections(\n"
          "    {'w': W0}, flora_optax.cycle_key(KEY, 0))['w']\n"
          "print('A:', A.shape, '(r x d_out)')\n\n"
          "# LoRA: only B trains; W = W0 + B @ A.\n"
          "lora_tx = optax.sgd(LR)\n"
          "lora_loss = lambda p: loss_w(W0 + p['b'] @ A)\n\n"
          "pf = {'w': W0}; sf = flora_tx.init(pf)\n"
          "pl = {'b': jnp.zeros((DIN, R))}; sl = lora_tx.init(pl)\n"
          "gaps = []\n"
          "for t in range(T):\n"
          "  u, sf = flora_tx.update(jax.grad(lambda p: loss_w(p['w']))(pf), sf, pf)\n"
          "  pf = optax.apply_updates(pf, u)\n"
          "  u, sl = lora_tx.update(jax.grad(lora_loss)(pl), sl, pl)\n"
          "  pl = optax.apply_updates(pl, u)\n"
          "  gaps.append(float(jnp.max(jnp.abs(pf['w'] - (W0 + pl['b'] @ A)))))\n"
          "print(f'max |W_flora - W_lora| over {T} steps: {max(gaps):.2e}  '\n"
          "      f'(|W| ~ {float(jnp.max(jnp.abs(pf[\"w\"]))):.2f})')\n"
          "print(f'loss after {T} steps: flora {float(loss_w(pf[\"w\"])):.4f}, '\n"
          "      f'lora {float(lora_loss(pl)):.4f}')\n"
          "assert max(gaps) < 1e-4"),
      v4.new_markdown_cell(
          '## 2. The rank of the summed update\n\n'
          'Same problem; the target `W_true` has full rank 48. We track the '
          'numerical rank of `W_t − W₀` and the loss for: LoRA (both `A` and '
          '`B` trained), Flora without resampling (LoRA with frozen `A`), and '
          'Flora resampling every κ steps, all in the paper\'s mode '
          '(`residual=False`). All use SGD; Flora also with momentum 0.9. '
          'The last row is the default residual mode, never resampled.'),
      v4.new_code_cell(
          "T2 = 40 if SMOKE else 400\n\n\n"
          "def numerical_rank(m):\n"
          "  s = np.linalg.svd(np.asarray(m), compute_uv=False)\n"
          "  return int(np.sum(s > 1e-3 * s[0])) if s[0] > 0 else 0\n\n\n"
          "def run_flora(decay, kappa, residual=False):\n"
          "  tx = optax.chain(\n"
          "      flora_optax.compressed_momentum(R, decay=decay, resample_every=kappa,\n"
          "                                      key=KEY, transfer='projected',\n"
          "                                      residual=residual),\n"
          "      optax.sgd(LR))\n"
          "  p = {'w': W0}; s = tx.init(p)\n"
          "  step = jax.jit(lambda p, s: tx.update(jax.grad(lambda q: loss_w(q['w']))(p), s, p))\n"
          "  ranks, losses = [], []\n"
          "  for t in range(T2):\n"
          "    u, s = step(p, s); p = optax.apply_updates(p, u)\n"
          "    ranks.append(numerical_rank(p['w'] - W0)); losses.append(float(loss_w(p['w'])))\n"
          "  return ranks, losses\n\n\n"
          "def run_lora():\n"
          "  tx = optax.sgd(LR)\n"
          "  a0 = jax.random.normal(jax.random.key(1), (R, DOUT)) / np.sqrt(R)\n"
          "  p = {'b': jnp.zeros((DIN, R)), 'a': a0}; s = tx.init(p)\n"
          "  f = lambda q: loss_w(W0 + q['b'] @ q['a'])\n"
          "  step = jax.jit(lambda p, s: tx.update(jax.grad(f)(p), s, p))\n"
          "  ranks, losses = [], []\n"
          "  for t in range(T2):\n"
          "    u, s = step(p, s); p = optax.apply_updates(p, u)\n"
          "    ranks.append(numerical_rank(p['b'] @ p['a'])); losses.append(float(f(p)))\n"
          "  return ranks, losses\n\n\n"
          "curves = {\n"
          "    f'LoRA r={R} (A and B trained)': run_lora(),\n"
          "    f'Flora r={R}, never resampled': run_flora(0.0, None),\n"
          "    f'Flora r={R}, kappa=10': run_flora(0.0, 10),\n"
          "    f'Flora r={R}, kappa=10, momentum 0.9': run_flora(0.9, 10),\n"
          "    f'Flora r={R} residual (default), never resampled': run_flora(0.9, None, True),\n"
          "}\n"
          "for name, (ranks, losses) in curves.items():\n"
          "  print(f'{name:<38} final rank {ranks[-1]:>2}, final loss {losses[-1]:.4f}')"),
      v4.new_code_cell(
          "fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))\n"
          "for name, (ranks, losses) in curves.items():\n"
          "  a1.plot(ranks, label=name); a2.plot(losses, label=name)\n"
          "a1.axhline(R, color='gray', ls=':', label=f'r = {R}')\n"
          "a1.set_xlabel('step'); a1.set_ylabel('numerical rank of W_t - W_0')\n"
          "a2.set_xlabel('step'); a2.set_ylabel('loss'); a2.set_yscale('log')\n"
          "a1.legend(fontsize=8); a1.grid(alpha=0.3); a2.grid(alpha=0.3)\n"
          "plt.tight_layout(); plt.show()"),
      v4.new_markdown_cell(
          'LoRA and Flora without resampling stay at rank `r = 4`, and their '
          'loss stalls at the best rank-4 correction; resampling lets the '
          'summed update reach full rank and the loss keep falling. '
          '(`transfer=\'projected\'` carries the momentum sketch to the new '
          'projection without the norm growth of the unbiased transfer at '
          'this small κ; see `compressed_momentum`.) The default residual '
          'mode passes the part of each gradient outside the sketch\'s '
          'subspace straight through, so its updates have full rank even '
          'without resampling.'),
  ]
  return cells


def accumulation() -> list:
  cells = header(
      'accumulation', 'Gradient accumulation with a compressed accumulator',
      '`flora_optax.MultiSteps` is a drop-in for `optax.MultiSteps`: same '
      'constructor, methods and state fields, plus a `rank`. Its accumulator '
      'keeps `Σ g_i Pᵀ` for every matrix (a fresh `P` per optimizer update) '
      'instead of `Σ g_i`; at the end of the cycle the inner optimizer gets '
      'the decompressed mean gradient, an unbiased estimate of it.')
  cells += [
      v4.new_markdown_cell('## 1. The one-line swap, with Flax NNX'),
      v4.new_code_cell(
          "class MLP(nnx.Module):\n"
          "  def __init__(self, din, dhidden, dout, rngs):\n"
          "    self.l1 = nnx.Linear(din, dhidden, rngs=rngs)\n"
          "    self.l2 = nnx.Linear(dhidden, dout, rngs=rngs)\n\n"
          "  def __call__(self, x):\n"
          "    return self.l2(jax.nn.gelu(self.l1(x)))\n\n\n"
          "DIN, DH, DOUT = 64, (64 if SMOKE else 512), 16\n"
          "K = 4  # micro-batches per update\n"
          "UPDATES = 4 if SMOKE else 300\n"
          "MICRO = 4 * jax.device_count()\n"
          "RANK = 8 if SMOKE else 32\n"
          "teacher = MLP(DIN, 256, DOUT, nnx.Rngs(123))\n\n\n"
          "def micro_batch(i):\n"
          "  x = jax.random.normal(jax.random.key(i), (MICRO, DIN))\n"
          "  return jax.device_put((x, teacher(x)), data_sharding)\n\n\n"
          "def train(tx, micro_steps):\n"
          "  model = MLP(DIN, DH, DOUT, nnx.Rngs(0))\n"
          "  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)\n\n"
          "  @nnx.jit\n"
          "  def step(model, optimizer, x, y):\n"
          "    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)\n"
          "    optimizer.update(model, grads)\n"
          "    return loss\n\n"
          "  return [float(step(model, optimizer, *micro_batch(i)))\n"
          "          for i in range(micro_steps)]\n\n\n"
          "inner = lambda: optax.adafactor(3e-3, multiply_by_parameter_scale=False)\n"
          "runs = {\n"
          "    'optax.MultiSteps': optax.MultiSteps(inner(), every_k_schedule=K),\n"
          "    f'flora_optax.MultiSteps (rank {RANK})': flora_optax.MultiSteps(\n"
          "        inner(), every_k_schedule=K, rank=RANK),\n"
          "    'no accumulation (K x more updates)': inner(),\n"
          "}\n"
          "losses = {name: train(tx, UPDATES * K) for name, tx in runs.items()}\n"
          "for name, l in losses.items():\n"
          "  print(f'{name:>36}: final loss {np.mean(l[-4 * K:]):.4f}')"),
      v4.new_code_cell(
          "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
          "for name, l in losses.items():\n"
          "  ax.plot(np.convolve(l, np.ones(K) / K, 'valid'), label=name, alpha=0.8)\n"
          "ax.set_yscale('log'); ax.set_xlabel('micro-step (same examples seen)')\n"
          "ax.set_ylabel('MSE'); ax.legend(); ax.grid(alpha=0.3); plt.show()"),
      v4.new_markdown_cell(
          '`has_updated` tells which micro-steps applied an update, as with '
          '`optax.MultiSteps`. With all-ones gradients, SGD(0.1) would move '
          'every weight by exactly 0.1; the decompressed mean gradient is an '
          'unbiased but noisy estimate of it (rank 4 of 16 here), so the '
          'largest entry is bigger.'),
      v4.new_code_cell(
          "tx = flora_optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3, rank=4)\n"
          "params = {'w': jnp.ones((32, 16))}\n"
          "state = tx.init(params)\n"
          "for i in range(6):\n"
          "  updates, state = tx.update({'w': jnp.ones((32, 16))}, state, params)\n"
          "  print(i, bool(tx.has_updated(state)), float(jnp.abs(updates['w']).max()))"),
      v4.new_markdown_cell(
          '## 2. Memory\n\n'
          'The accumulator is what changes: `optax.MultiSteps` keeps one '
          'full-size gradient, Flora a sketch of rank `r`.'),
      v4.new_code_cell(COMMON_MEMORY),
      v4.new_code_cell(
          "inner_tx = optax.adafactor(1e-3)\n"
          "candidates = {'optax.MultiSteps': optax.MultiSteps(inner_tx, 8)}\n"
          "for r in ([8, 32] if SMOKE else [32, 128, 256]):\n"
          "  candidates[f'flora_optax.MultiSteps r={r}'] = flora_optax.MultiSteps(\n"
          "      inner_tx, 8, rank=r)\n"
          "base = state_mib(candidates['optax.MultiSteps'], shapes)\n"
          "print(f\"{'accumulator':<30}{'state MiB':>10}{'vs optax':>10}\")\n"
          "for name, tx in candidates.items():\n"
          "  s = state_mib(tx, shapes)\n"
          "  print(f'{name:<30}{s:>10.1f}{s / base:>10.3f}')"),
      v4.new_code_cell(
          "for name in ['optax.MultiSteps', list(candidates)[-1]]:\n"
          "  tx = candidates[name].gradient_transformation()\n"
          "  print(f'{name:<30} peak of one micro-step: {update_peak_mib(tx, shapes):8.1f} MiB')"),
  ]
  return cells


def main():
  for name, build in [('quickstart', quickstart),
                      ('lora_is_a_gradient_compressor', lora),
                      ('accumulation', accumulation)]:
    nb = v4.new_notebook(cells=build())
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilds do not churn
      cell.id = f'{name[:40]}-{i:02d}'
    nb.metadata = {
        'kernelspec': {'display_name': 'Python 3', 'language': 'python',
                       'name': 'python3'},
        'language_info': {'name': 'python'},
        'colab': {'provenance': [], 'name': f'{name}.ipynb'},
        'accelerator': 'GPU',
    }
    nbformat.validate(nb)
    path = os.path.join(HERE, f'{name}.ipynb')
    nbformat.write(nb, path)
    print('wrote', path)


if __name__ == '__main__':
  main()
