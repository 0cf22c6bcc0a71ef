"""A small GPT trained for real on CPU, on bytes of Python's own sources.

The model is the pure-JAX GPT of ``examples/gpt.py`` in GPT-2's parameter
layout (``wte``, ``wpe``, ``h/<i>/attn/c_attn/kernel``, ... with in×out
kernels), with 64-wide heads as in GPT-2, so the same ``loss_fn`` serves two
purposes:

* the small LM (byte-level, vocabulary 256) whose train steps are timed;
* GPT-2 small/medium shapes (``benchmarks.common.gpt2_shapes``), whose full
  train step is only compiled, for its memory figures.

The text is the concatenated ``.py`` files of the standard library
(``examples/data.py``'s ``stdlib_bytes``), which ships with every Python:
nothing is downloaded. This module holds the benchmark's sizes and data
stream; the model and the text loader are the examples' (one copy each).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from examples import data as data_lib
from examples import gpt
from examples.data import stdlib_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """The GPT of ``examples/gpt.py`` in GPT-2's layout, and its batch.

  The one model configuration of the benchmarks (this small LM,
  :mod:`benchmarks.accumulation`, :mod:`benchmarks.gpu`).

  Attributes:
    n_layer: blocks.
    d_model: width.
    n_head: attention heads; ``None``: 64-wide heads, as in GPT-2 (this
      module's ``loss_fn``).
    vocab: vocabulary size.
    seq_len: positions (and tokens per sequence).
    batch: sequences per step.
  """

  n_layer: int
  d_model: int
  n_head: int | None = None
  vocab: int
  seq_len: int
  batch: int

  @property
  def tokens(self) -> int:
    """Tokens per step."""
    return self.batch * self.seq_len

  def record(self) -> dict[str, Any]:
    """The fields, for the results JSON (an unset ``n_head`` left out)."""
    return {k: v for k, v in dataclasses.asdict(self).items()
            if v is not None}


# 2048 tokens per step; d_model = 384 > 256, so ranks up to 256 compress.
FULL = GPTConfig(n_layer=2, d_model=384, vocab=256, seq_len=128, batch=16)
QUICK = GPTConfig(n_layer=1, d_model=64, vocab=256, seq_len=32, batch=4)


def param_shapes(cfg: GPTConfig) -> dict[str, Any]:
  """GPT-2-layout parameter shapes of ``cfg`` (float32)."""
  return common.gpt2_layout(cfg.n_layer, cfg.d_model, cfg.vocab, cfg.seq_len)


def init_params(shapes: Any, seed: int = 0, random_biases: bool = False
                ) -> Any:
  """GPT-2's initialisation: N(0, 0.02) kernels, LayerNorm scale 1, bias 0
  (N(0, 0.02) too with ``random_biases``)."""
  return gpt.gpt2_init(shapes, seed, random_biases=random_biases)


def loss_fn(params: Any, batch: jax.Array, scan_layers: bool = True
            ) -> jax.Array:
  """Mean next-token cross-entropy of ``batch`` (``(b, seq + 1)`` tokens);
  64-wide heads, blocks in a ``lax.scan`` unless ``scan_layers=False`` (see
  ``gpt.gpt2_forward``)."""
  return gpt.gpt2_loss(params, batch, None, scan_layers,
                       heads_before_split=True)


def make_train_step(tx: optax.GradientTransformation,
                    scan_layers: bool = True):
  """``(params, opt_state, batch) -> (params, opt_state, loss)``."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, scan_layers)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


class Batches:
  """Random windows of ``seq_len + 1`` bytes, from a seeded NumPy generator."""

  def __init__(self, cfg: GPTConfig, seed: int = 0, max_bytes: int = 4 << 20):
    self.text = stdlib_bytes(max_bytes).astype(np.int32)
    self.cfg = cfg
    self._windows = data_lib.windows(self.text, cfg.batch, cfg.seq_len, seed)

  def __call__(self) -> jax.Array:
    return jnp.asarray(next(self._windows))


def batch_shape(cfg: GPTConfig) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len + 1), jnp.int32)
