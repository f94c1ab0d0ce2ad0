"""Test-wide JAX settings: 8 virtual CPU devices for the sharding tests.

Set before any test touches a JAX backend (the option only acts then).
"""

import jax

try:
  jax.config.update("jax_num_cpu_devices", 8)
except (AttributeError, RuntimeError):  # an older jax, or a backend already initialised
  pass
