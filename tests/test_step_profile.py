"""benchmarks/step_profile.py: op time is split between ops that ran at once."""

import pytest

import benchmark_module

step_profile = benchmark_module.load('step_profile.py')


def test_concurrent_ops_share_the_time_they_overlap():
  # a alone 0-4, a and b at once 4-6, b alone 6-7, c alone 10-12 (a gap 7-10 counts for none).
  time_of, overlapped = step_profile.attributed_time(
      [('a', 0, 6), ('b', 4, 7), ('c', 10, 12)])
  assert time_of == {'a': 5.0, 'b': 2.0, 'c': 2.0}
  assert overlapped == pytest.approx(4 / 11)  # 2 x 2 of the 11 summed.


def test_the_same_op_twice_at_once_then_again_and_an_empty_event():
  time_of, overlapped = step_profile.attributed_time(
      [('a', 0, 2), ('a', 0, 2), ('a', 2, 3), ('empty', 1, 1), ('b', 5, 6)])
  assert time_of == {'a': 3.0, 'b': 1.0}
  assert overlapped == pytest.approx(4 / 6)
