"""A small GPT trained for real on CPU, on bytes of Python's own sources.

The model is a pre-LayerNorm GPT in pure JAX whose parameters have GPT-2's
layout (``wte``, ``wpe``, ``h/<i>/attn/c_attn/kernel``, ... with in×out
kernels), so the same ``loss_fn`` serves two purposes:

* the small LM (byte-level, vocabulary 256) whose train steps are timed;
* GPT-2 small/medium shapes (``benchmarks.common.gpt2_shapes``), whose full
  train step is only compiled, for its memory figures.

The text is the concatenated ``.py`` files of the standard library, which
ships with every Python: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Shape of the model and of a batch."""

  n_layer: int = 2
  d_model: int = 384
  vocab: int = 256
  seq_len: int = 128
  batch: int = 16

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.seq_len


# 2048 tokens per step; d_model = 384 > 256, so ranks up to 256 compress.
FULL = LMConfig()
QUICK = LMConfig(n_layer=1, d_model=64, seq_len=32, batch=4)


def param_shapes(cfg: LMConfig) -> dict[str, Any]:
  """GPT-2-layout parameter shapes of ``cfg`` (float32)."""
  return common.gpt2_layout(cfg.n_layer, cfg.d_model, cfg.vocab, cfg.seq_len)


def init_params(shapes: Any, seed: int = 0) -> Any:
  """GPT-2's initialisation: N(0, 0.02) kernels, LayerNorm scale 1, bias 0."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, (path, s) in zip(keys, leaves):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      out.append(jnp.ones(s.shape, s.dtype))
    elif name.endswith("['bias']"):
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      out.append(0.02 * jax.random.normal(k, s.shape, s.dtype))
  return jax.tree.unflatten(treedef, out)


def _layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']


def _n_head(params) -> int:
  # 64-wide heads as in GPT-2; at least one head.
  return max(1, params['wte'].shape[1] // 64)


def _block(x, blk, mask, h):
  b, t, d = x.shape
  y = _layer_norm(x, blk['ln_1'])
  qkv = y @ blk['attn']['c_attn']['kernel'] + blk['attn']['c_attn']['bias']
  q, k, v = jnp.split(qkv.reshape(b, t, 3 * h, d // h), 3, axis=2)
  att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // h)
  att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
  y = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, t, d)
  x = x + y @ blk['attn']['c_proj']['kernel'] + blk['attn']['c_proj']['bias']
  y = _layer_norm(x, blk['ln_2'])
  y = jax.nn.gelu(y @ blk['mlp']['c_fc']['kernel'] + blk['mlp']['c_fc']['bias'])
  return x + y @ blk['mlp']['c_proj']['kernel'] + blk['mlp']['c_proj']['bias']


def forward(params: Any, tokens: jax.Array, scan_layers: bool = True
            ) -> jax.Array:
  """Logits ``(batch, seq, vocab)``; the output head is tied to ``wte``.

  The blocks run in a ``lax.scan`` over their stacked parameters: the
  parameters keep GPT-2's one-leaf-per-layer layout (what the optimizers see),
  but the compiled step holds one block, not ``n_layer`` (compiling the
  unrolled GPT-2 small step takes minutes on a shared 2-core machine). The
  stacked copy adds about one parameter-sized buffer (and its gradient) to
  the temporaries of every optimizer alike. ``scan_layers=False`` unrolls
  the blocks instead (no copy; slow to compile).
  """
  t = tokens.shape[1]
  h = _n_head(params)
  x = params['wte'][tokens] + params['wpe'][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  blocks = [params['h'][str(i)] for i in range(len(params['h']))]
  if scan_layers:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    x, _ = jax.lax.scan(lambda x, blk: (_block(x, blk, mask, h), None), x,
                        stacked)
  else:
    for blk in blocks:
      x = _block(x, blk, mask, h)
  x = _layer_norm(x, params['ln_f'])
  return x @ params['wte'].T


def loss_fn(params: Any, batch: jax.Array, scan_layers: bool = True
            ) -> jax.Array:
  """Mean next-token cross-entropy of ``batch`` (``(b, seq + 1)`` tokens)."""
  logits = forward(params, batch[:, :-1], scan_layers)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()


def make_train_step(tx: optax.GradientTransformation,
                    scan_layers: bool = True):
  """``(params, opt_state, batch) -> (params, opt_state, loss)``."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, scan_layers)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def stdlib_bytes(max_bytes: int = 4 << 20) -> np.ndarray:
  """The first ``max_bytes`` bytes of the standard library's sources.

  Files are read in sorted order, so the text is the same on every run of one
  Python version.
  """
  root = os.path.dirname(os.__file__)
  chunks, total = [], 0
  for path in sorted(glob.glob(os.path.join(root, '*.py'))):
    with open(path, 'rb') as f:
      data = f.read()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  return np.frombuffer(b''.join(chunks)[:max_bytes], np.uint8)


class Batches:
  """Random windows of ``seq_len + 1`` bytes, from a seeded NumPy generator."""

  def __init__(self, cfg: LMConfig, seed: int = 0, max_bytes: int = 4 << 20):
    self.text = stdlib_bytes(max_bytes).astype(np.int32)
    self.cfg = cfg
    self.rng = np.random.default_rng(seed)

  def __call__(self) -> jax.Array:
    n = self.cfg.seq_len + 1
    starts = self.rng.integers(0, len(self.text) - n, self.cfg.batch)
    return jnp.asarray(np.stack([self.text[s:s + n] for s in starts]))


def batch_shape(cfg: LMConfig) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len + 1), jnp.int32)
