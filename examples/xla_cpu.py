"""A work-around for an XLA:CPU hang in jaxlib 0.10, shared by the scripts.

Needs only the standard library: it must run before JAX's first computation.
"""

import importlib.metadata
import os

# XLA:CPU in jaxlib 0.10 can hang for good running some programs that hold
# LAPACK calls (the r×r inverse of residual flora, a QR) and fused dots inside
# a loop, e.g. a vmapped lax.scan of training steps (cf. jax-ml/jax#39257).
# Turning off its concurrency-optimised scheduler removed every hang we
# reproduced. (Turning off its "ynn" fusions instead also helped in some, but
# changes rounding between programs that must agree bit for bit.)
_XLA_CPU_HANG_FLAGS = (
    '--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def avoid_xla_cpu_hang() -> None:
  """Sets those flags; call before JAX's first computation.

  Only for jaxlib 0.10, the version where the hang was seen (an XLA flag
  that another version does not know stops JAX at start-up). A flag the user
  already set is kept.
  """
  if not importlib.metadata.version('jaxlib').startswith('0.10.'):
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in _XLA_CPU_HANG_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags
