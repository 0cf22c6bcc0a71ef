"""Test configuration: 8 simulated CPU devices, reproducible property tests."""

import glob
import importlib
import os
import pkgutil

import jax

from benchmarks import common

# Before any computation (and inherited by the tests' subprocesses).
common.avoid_xla_cpu_hang()

# Must run before JAX's backends start; conftest is imported before tests.
jax.config.update('jax_num_cpu_devices', 8)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_local_modules() -> None:
  """Imports every module of this checkout that a test may import.

  Recent hypothesis versions draw some examples from the constants of the
  *local* modules present in ``sys.modules`` when a test runs (not test
  files). A test's examples then depended on which tests had run earlier in
  its worker (issue 21: a property test failed only in the full ``-n 2``
  run), although every test says ``derandomize=True``. With every local
  module imported up front the pool is the same in any order.
  """
  for package in ('flora_optax', 'benchmarks'):
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
      if info.name != '__main__':
        importlib.import_module(f'{package}.{info.name}')
  # The examples run as scripts with examples/ on sys.path (benchmarks.common
  # puts it there), and the tests import them under their top-level names.
  for path in sorted(glob.glob(os.path.join(_ROOT, 'examples', '*.py'))):
    importlib.import_module(os.path.splitext(os.path.basename(path))[0])


_import_local_modules()
