"""flora_optax benchmarks: memory, speed and quality against optax's optimizers."""
