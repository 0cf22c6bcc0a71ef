"""Test configuration: 8 simulated CPU devices for the sharding tests."""

import jax

# Must run before JAX's backends start; conftest is imported before tests.
jax.config.update('jax_num_cpu_devices', 8)
