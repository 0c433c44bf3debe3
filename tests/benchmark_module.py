"""Imports a script under benchmarks/ for tests, as running it from there would see its siblings."""

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def load(relative_path: str):
  """The module at benchmarks/<relative_path>, with benchmarks/ on sys.path (train_step.py)."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  name = os.path.splitext(os.path.basename(relative_path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
