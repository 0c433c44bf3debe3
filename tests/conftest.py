"""Test-wide settings, applied before JAX initialises."""

import os

# Parity references (transformers) must never try the network.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

# Eight simulated CPU devices so sharding tests can build meshes; single-device code is unaffected.
jax.config.update('jax_num_cpu_devices', 8)
# Tiny models compile much faster without XLA's optimisation passes; numerics stay f32-exact.
jax.config.update('jax_disable_most_optimizations', True)
