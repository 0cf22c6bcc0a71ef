"""What ``linen_mnist_like.py`` and ``nnx_train.py`` share: the synthetic
MNIST-like data, the optimizer and the command-line flags.

The data are 8×8 "images" of 10 classes: a fixed random prototype per class
plus noise, generated on the fly (nothing is downloaded).
"""

from __future__ import annotations

import argparse

import jax
import optax

import flora_optax

NUM_CLASSES = 10
SIDE = 8


def make_batch(step: int, batch_size: int,
               noise: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """A batch of synthetic images: class prototype plus Gaussian noise."""
  prototypes = jax.random.normal(jax.random.key(0),
                                 (NUM_CLASSES, SIDE, SIDE))
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(1), step))
  labels = jax.random.randint(k1, (batch_size,), 0, NUM_CLASSES)
  images = prototypes[labels] + noise * jax.random.normal(
      k2, (batch_size, SIDE, SIDE))
  return images, labels


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
  """``flora_optax.flora`` with a cosine schedule; wrapped in
  ``flora_optax.MultiSteps`` (a compressed accumulator) when
  ``args.accumulate > 1``."""
  tx = flora_optax.flora(
      learning_rate=optax.cosine_decay_schedule(args.learning_rate,
                                                args.steps),
      rank=args.rank,
      resample_every=args.resample_every,
      key=args.seed)
  if args.accumulate > 1:
    tx = flora_optax.MultiSteps(tx, every_k_schedule=args.accumulate,
                                rank=args.rank, key=args.seed + 1)
  return tx


def make_parser(description: str, hidden: int) -> argparse.ArgumentParser:
  """The flags both scripts take (``hidden``: the default hidden width)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--steps', type=int, default=300,
                 help='micro-steps (gradient evaluations)')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--hidden', type=int, default=hidden)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--resample-every', type=int, default=50)
  p.add_argument('--learning-rate', type=float, default=1e-2)
  p.add_argument('--accumulate', type=int, default=1)
  p.add_argument('--seed', type=int, default=0)
  return p
