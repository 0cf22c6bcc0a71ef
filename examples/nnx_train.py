r"""Train a Flax NNX classifier with Flora, on MNIST-like synthetic data.

The same synthetic 8×8, 10-class data as ``linen_mnist_like.py`` (class
prototypes plus noise, nothing downloaded), an NNX MLP and
``nnx.Optimizer(model, flora_optax.flora(...), wrt=nnx.Param)``;
``--accumulate K`` wraps the optimizer in ``flora_optax.MultiSteps``. At the
end it prints the optimizer-state bytes next to those of Adafactor with
uncompressed momentum, the optimizer Flora compresses.

Run from the repository root (a few seconds on a CPU)::

    python examples/nnx_train.py
    python examples/nnx_train.py --accumulate 4 --steps 400
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flora_optax

NUM_CLASSES = 10
SIDE = 8


class MLP(nnx.Module):
  """A two-layer perceptron on flattened images."""

  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(SIDE * SIDE, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


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


def loss_and_accuracy(model: MLP, images: jax.Array, labels: jax.Array):
  logits = model(images)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, images, labels):
  grads, _ = nnx.grad(loss_and_accuracy, has_aux=True)(model, images, labels)
  optimizer.update(model, grads)


@nnx.jit
def evaluate(model: MLP, images, labels):
  return loss_and_accuracy(model, images, labels)


def state_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=300,
                 help='micro-steps (gradient evaluations)')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--hidden', type=int, default=256)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--resample-every', type=int, default=50)
  p.add_argument('--learning-rate', type=float, default=1e-2)
  p.add_argument('--accumulate', type=int, default=1)
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  model = MLP(args.hidden, nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, make_optimizer(args), wrt=nnx.Param)
  eval_images, eval_labels = make_batch(10**6, 512)  # never trained on
  loss0, acc0 = evaluate(model, eval_images, eval_labels)
  print(f'step 0: eval loss {float(loss0):.3f}, accuracy {float(acc0):.2f}')
  for step in range(args.steps):
    train_step(model, optimizer, *make_batch(step, args.batch_size))
  loss, acc = evaluate(model, eval_images, eval_labels)
  print(f'step {args.steps}: eval loss {float(loss):.3f}, '
        f'accuracy {float(acc):.2f}')

  # The comparison Flora is about: the same Adafactor, momentum uncompressed.
  params = nnx.state(model, nnx.Param)
  flora_bytes = state_bytes(nnx.as_pure(optimizer.opt_state))
  dense_bytes = state_bytes(
      jax.eval_shape(optax.adafactor(1e-2, momentum=0.9).init,
                     nnx.as_pure(params)))
  print(f'optimizer state: flora {flora_bytes:,} bytes, adafactor with '
        f'momentum {dense_bytes:,} bytes ({flora_bytes / dense_bytes:.2f}x); '
        f'params {state_bytes(nnx.as_pure(params)):,} bytes')
  return {'initial_loss': float(loss0), 'loss': float(loss),
          'accuracy': float(acc), 'state_bytes': flora_bytes,
          'dense_state_bytes': dense_bytes}


if __name__ == '__main__':
  main()
