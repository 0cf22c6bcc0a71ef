"""The GPT's math in pure JAX, and the GPT-2-layout model of the benchmarks.

* :func:`causal_attention`: the multi-head causal self-attention of every GPT
  here, this module's and the Flax NNX one of ``model.py`` (the examples'
  byte-level model);
* :func:`gpt2_forward` / :func:`gpt2_loss`: a pre-LayerNorm GPT with a tied
  head on a parameter dict in GPT-2's layout (:func:`gpt2_layout`: ``wte``,
  ``wpe``, ``h/<i>/attn/c_attn/kernel``, ... with in×out kernels) and GPT-2's
  initialisation (:func:`gpt2_init`). The benchmarks use it: a dict of shapes
  is enough to compile its train step (GPT-2 small and medium are only
  compiled, for their memory figures).

The two models keep their own parameter layouts because published figures
depend on them: an optimizer's state follows the parameter tree (Flora draws
one projection per leaf, in leaf order), and the demo's and the quality
study's reference losses depend on the NNX model's init and Flax's LayerNorm.

Only jax, numpy and optax are needed here (no Flax: ``benchmarks.gpu``
runs with just those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def stack_trees(trees: Sequence[Any]) -> Any:
  """Stacks same-structured trees on a new leading axis (for ``vmap`` over
  models, or ``lax.scan`` over layers)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def causal_attention(qkv: jax.Array, num_heads: int,
                     mask: jax.Array | None = None,
                     heads_before_split: bool = False) -> jax.Array:
  """Multi-head causal self-attention of ``qkv`` (``(b, t, 3 d)``, the
  query, key and value projections side by side); returns ``(b, t, d)``.

  Args:
    qkv: the projections.
    num_heads: attention heads (``d`` must be a multiple).
    mask: the ``(t, t)`` lower-triangular bool mask, to build it once for all
      layers; built here when ``None``.
    heads_before_split: reshape ``qkv`` to ``(b, t, 3 h, d / h)`` and then
      split it, rather than split and then reshape each part. Same values;
      XLA may lay out the compiled step's temporaries differently, and the
      benchmarks' small LM's published memory figures were measured this way.
  """
  b, t, d3 = qkv.shape
  d, h = d3 // 3, num_heads
  if heads_before_split:
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * h, d // h), 3, axis=2)
  else:
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
  att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // h)
  if mask is None:
    mask = jnp.tril(jnp.ones((t, t), bool))
  att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, t, d)


# ----------------------------------------------------------------------------
# A GPT in pure JAX, on a dict in GPT-2's layout.
# ----------------------------------------------------------------------------


def gpt2_layout(n_layer: int, d: int, vocab: int, n_pos: int) -> dict[str, Any]:
  """GPT-2-layout parameter shapes (float32) for any size."""
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  block = {
      'ln_1': {'scale': f(d), 'bias': f(d)},
      'attn': {'c_attn': {'kernel': f(d, 3 * d), 'bias': f(3 * d)},
               'c_proj': {'kernel': f(d, d), 'bias': f(d)}},
      'ln_2': {'scale': f(d), 'bias': f(d)},
      'mlp': {'c_fc': {'kernel': f(d, 4 * d), 'bias': f(4 * d)},
              'c_proj': {'kernel': f(4 * d, d), 'bias': f(d)}},
  }
  return {
      'wte': f(vocab, d),
      'wpe': f(n_pos, d),
      'h': {str(i): block for i in range(n_layer)},
      'ln_f': {'scale': f(d), 'bias': f(d)},
  }


def gpt2_init(shapes: Any, seed: int = 0, random_biases: bool = False) -> Any:
  """GPT-2's initialisation of ``shapes``: ``N(0, 0.02)`` weights,
  LayerNorm scales 1, biases 0 (``N(0, 0.02)`` too with ``random_biases``).

  One key per leaf, split from ``seed`` in leaf order.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, (path, s) in zip(keys, leaves):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      out.append(jnp.ones(s.shape, s.dtype))
    elif name.endswith("['bias']") and not random_biases:
      out.append(jnp.zeros(s.shape, s.dtype))
    else:
      out.append(0.02 * jax.random.normal(k, s.shape, s.dtype))
  return jax.tree.unflatten(treedef, out)


def layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']


def _gpt2_block(x, blk, mask, n_head, heads_before_split):
  y = layer_norm(x, blk['ln_1'])
  qkv = y @ blk['attn']['c_attn']['kernel'] + blk['attn']['c_attn']['bias']
  y = causal_attention(qkv, n_head, mask, heads_before_split)
  x = x + y @ blk['attn']['c_proj']['kernel'] + blk['attn']['c_proj']['bias']
  y = layer_norm(x, blk['ln_2'])
  y = jax.nn.gelu(y @ blk['mlp']['c_fc']['kernel'] + blk['mlp']['c_fc']['bias'])
  return x + y @ blk['mlp']['c_proj']['kernel'] + blk['mlp']['c_proj']['bias']


def gpt2_forward(params: Any, tokens: jax.Array, n_head: int | None = None,
                 scan_layers: bool = True,
                 heads_before_split: bool = False) -> jax.Array:
  """Logits ``(batch, seq, vocab)``; the output head is tied to ``wte``.

  Args:
    params: a GPT-2-layout dict (:func:`gpt2_layout`).
    tokens: ``(batch, seq)`` integer tokens.
    n_head: attention heads; ``None``: 64-wide heads as in GPT-2, at least
      one.
    scan_layers: run the blocks in a ``lax.scan`` over their stacked
      parameters. The parameters keep GPT-2's one-leaf-per-layer layout (what
      the optimizers see), but the compiled step holds one block, not
      ``n_layer`` (compiling the unrolled GPT-2 small step takes minutes on a
      shared 2-core machine). The stacked copy adds about one parameter-sized
      buffer (and its gradient) to the temporaries of every optimizer alike.
      ``False`` unrolls the blocks instead (no copy; slow to compile).
    heads_before_split: see :func:`causal_attention`.
  """
  t = tokens.shape[1]
  if n_head is None:
    n_head = max(1, params['wte'].shape[1] // 64)
  x = params['wte'][tokens] + params['wpe'][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  blocks = [params['h'][str(i)] for i in range(len(params['h']))]
  if scan_layers:
    x, _ = jax.lax.scan(
        lambda x, blk: (_gpt2_block(x, blk, mask, n_head,
                                    heads_before_split), None), x,
        stack_trees(blocks))
  else:
    for blk in blocks:
      x = _gpt2_block(x, blk, mask, n_head, heads_before_split)
  x = layer_norm(x, params['ln_f'])
  return x @ params['wte'].T


def gpt2_loss(params: Any, batch: jax.Array, n_head: int | None = None,
              scan_layers: bool = True,
              heads_before_split: bool = False) -> jax.Array:
  """Mean next-token cross-entropy of ``batch`` (``(b, seq + 1)`` tokens)."""
  logits = gpt2_forward(params, batch[:, :-1], n_head, scan_layers,
                        heads_before_split)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()
