"""benchmarks/ab_step.py: variant parsing and one tiny in-process A/B through the trainer's step."""

import argparse

import pytest

import benchmark_module

ab_step = benchmark_module.load('ab_step.py')


def test_parse_variants():
  assert ab_step.parse_variants(
      'base=;act=backbone.recompute_activation=True,compiler_options.xla_cpu_ftz=1;'
      'named=adapter.activation=gelu') == [
          ('base', {}),
          ('act', {'backbone.recompute_activation': True, 'compiler_options.xla_cpu_ftz': 1}),
          ('named', {'adapter.activation': 'gelu'})]


@pytest.mark.parametrize('spec,match', [
    ('base=', 'two or more variants'),
    ('a=;a=x=1', 'distinct names'),
    ('a=;b', "'name=overrides'; found 'b'"),
    ('a=;b=x', "'key=value'; found 'x'"),
])
def test_parse_variants_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    ab_step.parse_variants(spec)


def test_tiny_ab_through_the_trainer_step():
  args = argparse.Namespace(variants='plain=;act=backbone.recompute_activation=True', rounds=2,
                            warmup=1, bottleneck=4, rank=2)
  table = ab_step.run(args, 'mu4', 'pfeiffer')
  rows = [line for line in table.splitlines() if line.startswith('| plain') or
          line.startswith('| act')]
  assert len(rows) == 2
  assert rows[0].split('|')[5].strip().startswith('1.000x')  # The baseline against itself.
  assert '`backbone.recompute_activation=True`' in rows[1]
