"""Test configuration: 8 simulated CPU devices for the sharding tests."""

import jax

from benchmarks import common

# Before any computation (and inherited by the tests' subprocesses).
common.avoid_xla_cpu_hang()

# Must run before JAX's backends start; conftest is imported before tests.
jax.config.update('jax_num_cpu_devices', 8)
