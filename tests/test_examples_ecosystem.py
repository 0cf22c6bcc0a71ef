"""Smoke tests of the Linen and NNX example scripts, at tiny sizes."""

import importlib

import pytest

pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')


def _load(name):
  return importlib.import_module(f'examples.{name}')


TINY = ['--steps', '80', '--hidden', '32', '--batch-size', '32',
        '--resample-every', '20', '--learning-rate', '3e-2']


def test_linen_example_learns_and_checkpoints(tmp_path, capsys):
  out = _load('linen_mnist_like').main(
      TINY + ['--accumulate', '2', '--checkpoint-dir', str(tmp_path)])
  assert out['loss'] < 0.5 * out['initial_loss']
  assert out['accuracy'] > 0.5  # chance is 0.1
  assert 'restored state identical: True' in capsys.readouterr().out


def test_nnx_example_learns_with_a_smaller_state():
  out = _load('nnx_train').main(TINY)
  assert out['loss'] < 0.5 * out['initial_loss']
  assert out['accuracy'] > 0.5
  assert out['state_bytes'] < out['dense_state_bytes']
