"""The side-by-side benchmark's aggregation (benchmarks/peers/compare.py) on hand-made results."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                     'peers', 'compare.py')
_spec = importlib.util.spec_from_file_location('peer_compare', _PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _r(side, rnd, ips, rss, mode='houlsby', suite='Ti4'):
  return {'side': side, 'suite': suite, 'mode': mode, 'round': rnd, 'img_per_sec': ips,
          'peak_rss_mib': rss, 'trainable': 7}


HAND_MADE = [
    _r('vadapt', 0, 60.0, 1000), _r('peer', 0, 100.0, 800), _r('fast', 0, 66.0, 990),
    _r('vadapt', 1, 50.0, 1200), _r('peer', 1, 120.0, 900), _r('fast', 1, 54.0, 1100),
    _r('vadapt', 0, 5.0, 900, mode='forward'),
    {'side': 'peer', 'suite': 'Ti4', 'mode': 'forward', 'round': 0, 'error': 'exit 1: boom'},
    _r('vadapt', 0, 2.0, 3000, mode='full', suite='B16'), _r('peer', 0, 4.0, 2000, mode='full',
                                                             suite='B16'),
]


def test_summarise_medians_ratios_and_order():
  rows = compare.summarise(HAND_MADE, ('fast',))
  # Suites in SUITES order, modes in MODES order.
  assert [(r['suite'], r['mode']) for r in rows] == [('B16', 'full'), ('Ti4', 'forward'),
                                                     ('Ti4', 'houlsby')]
  full, forward, houlsby = rows
  assert full['speed_ratio'] == pytest.approx(0.5) and full['rss_ratio'] == pytest.approx(1.5)
  assert houlsby['vadapt_img_per_sec'] == pytest.approx(55.0)  # median of the two rounds
  assert houlsby['peer_img_per_sec'] == pytest.approx(110.0)
  assert houlsby['speed_ratio'] == pytest.approx(0.5)
  assert houlsby['vadapt_rss_mib'] == pytest.approx(1100)
  assert houlsby['fast_img_per_sec'] == pytest.approx(60.0)
  assert houlsby['fast_vs_vadapt'] == pytest.approx(60.0 / 55.0)
  assert forward['peer_error'] == 'exit 1: boom' and 'speed_ratio' not in forward
  assert 'fast_img_per_sec' not in forward  # no extra side ran there


def test_markdown_lists_errors_and_extra_sides():
  rows = compare.summarise(HAND_MADE, ('fast',))
  text = compare.markdown(rows, {'shape': [1, 2, 3], 'jax_float32': 250.0}, 'HEADER', ('fast',))
  assert text.startswith('HEADER\n')
  assert '| Ti4 | houlsby | 110.00 | 55.00 | 0.50x | 850 | 1100 | 1.29x | 7 / 7 |' in text
  assert '- Ti4 forward (peer): exit 1: boom' in text
  assert '| Ti4 | houlsby | 60.00 | 1.09x |' in text
  assert '| Ti4 | forward | n/a | n/a |' in text
  assert '| Ti4 | forward | n/a | 5.00 | n/a | n/a | 900 | n/a |' in text
  assert 'jax_float32 250' in text
  # Without extra sides, no extra table.
  assert 'extra XLA flags' not in compare.markdown(compare.summarise(HAND_MADE), {}, 'H')


def test_plot_writes_a_png(tmp_path):
  pytest.importorskip('matplotlib')
  rows = compare.summarise(HAND_MADE, ('fast',))
  path = str(tmp_path / 'peers.png')
  assert compare.plot(rows, path, ('fast',))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_work_rate_and_cached_prefix_tables():
  results = [dict(_r('vadapt', 0, 64.0, 1000, mode='pfeiffer+top4_cached'), step_gflop=10.0,
                  prefix_sec_per_batch=0.5),
             _r('peer', 0, 32.0, 900, mode='pfeiffer+top4_cached')]
  rows = compare.summarise(results)
  assert rows[0]['prefix_img_per_sec'] == pytest.approx(128.0)  # Ti4's batch 64 in 0.5 s.
  text = compare.markdown(rows, {'jax_float32': 100.0, 'torch_float32': 50.0}, 'float32, H')
  # 10 GFLOP a step of 64 images: vadapt 10 GFLOP/s of 100, the peer 5 of 50.
  assert '| Ti4 | pfeiffer+top4_cached | 10.0 | 10 | 10% | 5 | 10% |' in text
  # Over E epochs: 1 / (1/64 + 1/(E * 128)) img/s, against the peer's 32.
  assert '| Ti4 | pfeiffer+top4_cached | 128.00 | 42.67 / 54.86 / 60.95 | 1.33x / 1.71x / 1.90x |' \
      in text


def test_forward_rows_report_the_logit_difference():
  results = [dict(_r('vadapt', 0, 5.0, 400, mode='forward'), logits0=[0.5, -1.0, 2.0]),
             dict(_r('peer', 0, 4.0, 450, mode='forward'), logits0=[0.5, -1.0 + 3e-6, 2.0]),
             _r('vadapt', 0, 60.0, 1000), _r('peer', 0, 100.0, 800)]
  rows = compare.summarise(results)
  forward = next(r for r in rows if r['mode'] == 'forward')
  assert forward['max_logit_diff'] == pytest.approx(3e-6)
  assert all('max_logit_diff' not in r for r in rows if r['mode'] != 'forward')
  text = compare.markdown(rows, {}, 'H')
  assert 'largest |logit difference| between the sides on the same images: Ti4 3.0e-06' in text
