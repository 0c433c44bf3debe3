"""benchmarks/peers/matmul.py: the backward-pass layouts are the products they are named for."""

import contextlib
import io
import json

import jax
import numpy as np

import benchmark_module

matmul = benchmark_module.load('peers/matmul.py')


def test_layouts_are_the_dense_layers_forward_and_gradient_products():
  m, k, n = matmul.SHAPES['tiny']
  operands = matmul._layout_operands(m, k, n)  # pylint: disable=protected-access
  x, w = operands['fwd']
  dy = operands['dgrad'][0]
  expected = {'fwd': x @ w, 'dgrad': dy @ w.T, 'wgrad': x.T @ dy}
  for layout, (lhs, rhs) in operands.items():
    got = jax.lax.dot_general(lhs, rhs, (matmul._CONTRACT[layout], ((), ())))  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(got), expected[layout], rtol=1e-5, atol=1e-5)


def test_main_reports_every_layout_for_jax_and_its_ynn_path():
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    matmul.main(['--shape=tiny', '--layouts', '--rounds=2'])
  line, = [l for l in buf.getvalue().splitlines() if l.startswith('RESULT ')]
  result = json.loads(line[len('RESULT '):])
  assert result['shape'] == list(matmul.SHAPES['tiny'])
  for prefix in ('jax', 'jax_ynn'):
    for layout in ('fwd', 'dgrad', 'wgrad'):
      assert result[f'{prefix}_float32_{layout}'] > 0
