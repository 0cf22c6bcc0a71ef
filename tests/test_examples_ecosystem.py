"""Smoke tests of the Linen and NNX example scripts, at tiny sizes."""

import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'

pytestmark = pytest.mark.filterwarnings(
    'ignore::flora_optax.TransferStabilityWarning')


def _load(name):
  spec = importlib.util.spec_from_file_location(f'_example_{name}',
                                                EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  # Linen modules are dataclasses, which look their module up by name.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


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
