r"""Train a Flax Linen classifier with Flora, on MNIST-like synthetic data.

The data are 8×8 "images" of 10 classes: a fixed random prototype per class
plus noise, generated on the fly (nothing is downloaded; ``mnist_like.py``,
shared with ``nnx_train.py``, with the optimizer and the flags). The model is a
two-layer MLP in a ``flax.training.train_state.TrainState`` whose ``tx`` is
``flora_optax.flora``; ``--accumulate K`` wraps it in
``flora_optax.MultiSteps`` (a compressed gradient accumulator).
``--checkpoint-dir`` saves the train state with Orbax at the end and restores
it into an abstract target, as one would to resume training.

Run from the repository root (a few seconds on a CPU)::

    python -m examples.linen_mnist_like
    python -m examples.linen_mnist_like --accumulate 4 --steps 400
    python -m examples.linen_mnist_like --checkpoint-dir /tmp/flora_ckpt
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from examples.mnist_like import (NUM_CLASSES, SIDE, make_batch,
                                 make_optimizer, make_parser)


class MLP(nn.Module):
  """A two-layer perceptron on flattened images."""

  hidden: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(NUM_CLASSES)(x)


def create_state(args: argparse.Namespace,
                 tx: optax.GradientTransformation) -> train_state.TrainState:
  model = MLP(hidden=args.hidden)
  params = model.init(jax.random.key(args.seed),
                      jnp.zeros((1, SIDE, SIDE)))['params']
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=tx)


def loss_and_accuracy(params: Any, apply_fn: Any,
                      batch: tuple[jax.Array, jax.Array]):
  images, labels = batch
  logits = apply_fn({'params': params}, images)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@jax.jit
def train_step(state: train_state.TrainState, batch):
  # TrainState.apply_gradients calls tx.update without extra args.
  grads, _ = jax.grad(loss_and_accuracy, has_aux=True)(state.params,
                                                       state.apply_fn, batch)
  return state.apply_gradients(grads=grads)


@jax.jit
def evaluate(state: train_state.TrainState, batch):
  return loss_and_accuracy(state.params, state.apply_fn, batch)


def save_and_restore(state: train_state.TrainState, directory: str,
                     args: argparse.Namespace) -> train_state.TrainState:
  """Orbax round trip into an abstract target (shapes only, no values)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.abspath(directory), f'step_{int(state.step)}')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state, force=True)
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: create_state(args, state.tx))
    restored = checkpointer.restore(path, abstract)
  print(f'saved and restored {path}')
  return restored


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = make_parser(__doc__.split('\n')[0], hidden=128)
  p.add_argument('--checkpoint-dir', default=None)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  state = create_state(args, make_optimizer(args))
  eval_batch = make_batch(10**6, 512)  # a step index never trained on
  loss0, acc0 = evaluate(state, eval_batch)
  print(f'step 0: eval loss {float(loss0):.3f}, accuracy {float(acc0):.2f}')
  for step in range(args.steps):
    state = train_step(state, make_batch(step, args.batch_size))
  loss, acc = evaluate(state, eval_batch)
  print(f'step {args.steps}: eval loss {float(loss):.3f}, '
        f'accuracy {float(acc):.2f}')
  if args.checkpoint_dir:
    restored = save_and_restore(state, args.checkpoint_dir, args)
    same = jax.tree.all(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)),
        (restored.params, restored.opt_state), (state.params, state.opt_state)))
    print(f'restored state identical: {same}')
  return {'initial_loss': float(loss0), 'loss': float(loss),
          'accuracy': float(acc)}


if __name__ == '__main__':
  main()
