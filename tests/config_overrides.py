"""Loads an experiment config the way the CLI does, with dotted overrides for tests."""

import importlib

import ml_collections


def load_config(name: str = 'vit_b16_adapter', arg: str = 'test',
                **overrides) -> ml_collections.ConfigDict:
  """configs/<name>.py:<arg>, then e.g. load_config(**{'adapter.dropout': 0.3})."""
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
