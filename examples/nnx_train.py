r"""Train a Flax NNX classifier with Flora, on MNIST-like synthetic data.

The same synthetic 8×8, 10-class data as ``linen_mnist_like.py`` (class
prototypes plus noise, nothing downloaded; both take it, the optimizer and
the flags from ``mnist_like.py``), an NNX MLP and
``nnx.Optimizer(model, flora_optax.flora(...), wrt=nnx.Param)``;
``--accumulate K`` wraps the optimizer in ``flora_optax.MultiSteps``. At the
end it prints the optimizer-state bytes next to those of Adafactor with
uncompressed momentum, the optimizer Flora compresses.

Run from the repository root (a few seconds on a CPU)::

    python -m examples.nnx_train
    python -m examples.nnx_train --accumulate 4 --steps 400
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from examples.memory import tree_bytes
from examples.mnist_like import (NUM_CLASSES, SIDE, make_batch,
                                 make_optimizer, make_parser)


class MLP(nnx.Module):
  """A two-layer perceptron on flattened images."""

  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(SIDE * SIDE, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  return make_parser(__doc__.split('\n')[0], hidden=256).parse_args(argv)


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
  flora_bytes = tree_bytes(nnx.as_pure(optimizer.opt_state))
  dense_bytes = tree_bytes(
      jax.eval_shape(optax.adafactor(1e-2, momentum=0.9).init,
                     nnx.as_pure(params)))
  print(f'optimizer state: flora {flora_bytes:,} bytes, adafactor with '
        f'momentum {dense_bytes:,} bytes ({flora_bytes / dense_bytes:.2f}x); '
        f'params {tree_bytes(nnx.as_pure(params)):,} bytes')
  return {'initial_loss': float(loss0), 'loss': float(loss),
          'accuracy': float(acc), 'state_bytes': flora_bytes,
          'dense_state_bytes': dense_bytes}


if __name__ == '__main__':
  main()
