"""Progress: compile time reported apart from throughput and ETA; bars that stay out of logs."""

import io

import pytest

from vadapt import metrics


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_first_interval_excludes_compile_time(monkeypatch):
  clock = Clock()
  monkeypatch.setattr(metrics.time, 'perf_counter', clock)
  progress = metrics.Progress(total_steps=11, global_batch_size=8, bar=False)
  clock.now = 30.0  # Step 1: compilation plus one step.
  assert progress.compiled(1) == 30.0
  assert progress.tick(1) == {}  # Nothing but the compiled step yet: no rate.
  assert 'compiled in 30.0s' in progress.line(1, {'loss': 1.0})
  clock.now = 32.0  # Steps 2 and 3: one second each.
  timing = progress.tick(3)
  assert timing == {'img_per_sec': 8.0, 'sec_per_step': 1.0, 'eta_sec': 8.0}
  line = progress.line(3, {'loss': 0.5}, timing)
  assert line == 'step  3/11 | loss 0.5000 | 8.0 img/s | ETA 0m08s'


def test_bars_only_on_a_terminal_and_logs_print_above_them(monkeypatch, capsys):
  assert metrics.make_bar(total=3) is None  # Tests and logs are not terminals.
  assert list(metrics.progress_iter(iter(range(3)), total=3, desc='eval')) == [0, 1, 2]
  stream = io.StringIO()
  monkeypatch.setattr(metrics.sys, 'stderr', stream)
  bar = metrics.make_bar(total=4, desc='train', unit='step', enable=True)
  bar.update(2)
  metrics.log('step 2/4 | loss 1.0')
  bar.close()
  assert 'train' in stream.getvalue() and '2/4' in stream.getvalue()
  assert 'step 2/4 | loss 1.0' in capsys.readouterr().out
  assert not metrics._BARS
  progress = metrics.Progress(total_steps=4, global_batch_size=2, bar=True)
  progress.compiled(1)
  progress.update(3)
  progress.close()
  assert '3/4' in stream.getvalue()
