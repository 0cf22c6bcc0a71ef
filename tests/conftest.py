"""Test configuration: 8 simulated CPU devices, reproducible property tests."""

import importlib
import pkgutil

import jax

from benchmarks import common

# Before any computation (and inherited by the tests' subprocesses).
common.avoid_xla_cpu_hang()

# Must run before JAX's backends start; conftest is imported before tests.
jax.config.update('jax_num_cpu_devices', 8)


def _import_local_modules() -> None:
  """Imports every module of this checkout that a test may import.

  Recent hypothesis versions draw some examples from the constants of the
  *local* modules present in ``sys.modules`` when a test runs (not test
  files). A test's examples then depended on which tests had run earlier in
  its worker (issue 21: a property test failed only in the full ``-n 2``
  run), although every test says ``derandomize=True``. With every local
  module imported up front the pool is the same in any order.
  """
  for package in ('flora_optax', 'benchmarks', 'examples'):
    pkg = importlib.import_module(package)
    # Subpackages too (benchmarks.quality); not the command-line entry points.
    for info in pkgutil.walk_packages(pkg.__path__, f'{package}.'):
      if info.name.split('.')[-1] != '__main__':
        importlib.import_module(info.name)


_import_local_modules()
