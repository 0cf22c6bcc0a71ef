"""The examples' byte-level GPT in Flax NNX, with optional LoRA adapters.

Used by ``train_lm.py``, ``paper_miniature.py`` and ``benchmarks.quality``:
token and position embeddings, pre-LayerNorm blocks (Flax's LayerNorm), a
head tied to the embedding, ``N(0, 1/d_in)`` kernels; every :class:`Linear`
takes LoRA adapters when ``ModelConfig.lora_rank`` is set. Its attention is
``gpt.causal_attention``, the one the benchmarks' GPT-2-layout model uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import data as data_lib
from examples.gpt import causal_attention


class Frozen(nnx.Variable):
  """A weight that is not trained (LoRA's base kernels)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = data_lib.VOCAB_SIZE
  seq_len: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  lora_rank: int | None = None  # LoRA adapters on every Linear when set


class Linear(nnx.Module):
  """``x @ W + b``; with ``lora_rank``, ``x @ (W + A B) + b`` with W frozen."""

  def __init__(self, din: int, dout: int, lora_rank: int | None,
               rngs: nnx.Rngs):
    key = rngs.params()
    w = jax.random.normal(key, (din, dout)) / np.sqrt(din)
    self.bias = nnx.Param(jnp.zeros((dout,)))
    if lora_rank is None:
      self.kernel = nnx.Param(w)
      self.lora_a = self.lora_b = None
    else:
      # LoRA: the random init is kept frozen; only the rank-r product trains.
      self.kernel = Frozen(w)
      # From the kernel's key, so a LoRA model's base weights are exactly
      # those of the model without adapters (same seed).
      self.lora_a = nnx.Param(jax.random.normal(
          jax.random.fold_in(key, 1), (din, lora_rank)) / np.sqrt(din))
      self.lora_b = nnx.Param(jnp.zeros((lora_rank, dout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...]
    if self.lora_a is not None:
      y = y + (x @ self.lora_a[...]) @ self.lora_b[...]
    return y + self.bias[...]


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.num_heads = cfg.num_heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = Linear(d, 3 * d, cfg.lora_rank, rngs)
    self.proj = Linear(d, d, cfg.lora_rank, rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc = Linear(d, cfg.mlp_ratio * d, cfg.lora_rank, rngs)
    self.fc_out = Linear(cfg.mlp_ratio * d, d, cfg.lora_rank, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.proj(causal_attention(self.qkv(self.ln1(x)), self.num_heads))
    return x + self.fc_out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """A byte-level GPT: token + position embeddings, pre-LN blocks, tied head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02))
    self.pos = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[...][:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln_f(x))


def init_model(cfg: ModelConfig, seed: int):
  """Returns ``(graphdef, params, template)``.

  ``params`` (the trained ``nnx.Param``s) is a plain nested dict, which every
  optimizer handles; ``template`` is ``(param_state, rest)``, the
  ``nnx.State``s :func:`make_loss_fn` rebuilds the model from (``rest`` holds
  the other variables, e.g. LoRA's frozen kernels).
  """
  model = GPT(cfg, nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), (params, rest)


def make_loss_fn_with_rest(graphdef, param_state) -> Callable[..., jax.Array]:
  """``loss(params, rest, tokens)``: mean next-byte cross-entropy."""

  def loss_fn(params, rest, tokens):
    state = jax.tree.map(lambda x: x, param_state)  # a fresh copy
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state, rest)
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:].astype(jnp.int32)).mean()

  return loss_fn


def make_loss_fn(graphdef, template) -> Callable[..., jax.Array]:
  """``loss(params, tokens)`` with the non-trained variables of ``template``."""
  param_state, rest = template
  loss_fn = make_loss_fn_with_rest(graphdef, param_state)
  return lambda params, tokens: loss_fn(params, rest, tokens)


