"""Test-wide settings, applied before JAX initialises."""

import atexit
import os
import shutil
import tempfile

# Parity references (transformers) must never try the network.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

# Eight simulated CPU devices so sharding tests can build meshes; single-device code is unaffected.
jax.config.update('jax_num_cpu_devices', 8)
# Tiny models compile much faster without XLA's optimisation passes; numerics stay f32-exact.
jax.config.update('jax_disable_most_optimizations', True)

# Many tests build the same tiny experiment (train step, eval step, init) with fresh jit objects,
# which JAX's in-memory caches cannot share; XLA's persistent cache, keyed on the lowered program,
# compiles each distinct program once per run. A throwaway directory unless
# JAX_COMPILATION_CACHE_DIR names one to keep between runs.
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  _cache = tempfile.mkdtemp(prefix='vadapt-test-xla-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  jax.config.update('jax_compilation_cache_dir', _cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
