"""Metric writers (TensorBoard + JSON lines), progress bars and the progress line of training."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Optional

import jax


class MetricWriter:
  """Writes scalars for TensorBoard (tf.summary) and to `metrics.jsonl` in the log dir.

  Only the primary process writes; on the others every call is a no-op.

  Attributes:
    logdir: directory of the event files and metrics.jsonl.
  """

  def __init__(self, logdir: str, *, tensorboard: bool = True):
    self.logdir = logdir
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self._active:
      return
    os.makedirs(logdir, exist_ok=True)
    self._jsonl = open(os.path.join(logdir, 'metrics.jsonl'), 'a')
    if tensorboard:
      # Imported lazily: it costs seconds and only the writer needs it.
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(logdir)
      # tf.summary.scalar needs the tensorboard package; the raw op with the scalars plugin's
      # metadata writes the same event without it.
      self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    # Each row reaches the OS at once: a run killed -9 (or preempted) keeps what it logged.
    self._jsonl.flush()
    if self._tb is not None:
      with self._tb.as_default():
        for name, value in scalars.items():
          self._tf.summary.write(name, self._tf.constant(value, self._tf.float32),
                                 step=int(step), metadata=self._scalar_metadata)

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(logdir: str) -> list[dict]:
  """The records written by MetricWriter, oldest first."""
  with open(os.path.join(logdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def machine() -> dict:
  """This machine's CPU model, the flags that decide matmul speed, core count and Python: what a
  benchmark records next to its numbers (only ratios from one machine compare)."""
  import platform  # pylint: disable=g-import-not-at-top
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
  except OSError:
    pass
  wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile',
            'amx_int8')
  return {'cpu': model, 'flags': [f for f in wanted if f in flags], 'cores': os.cpu_count(),
          'python': platform.python_version()}


def machine_line() -> str:
  """machine() and the JAX backend as one line, for a benchmark's results file."""
  import jax  # pylint: disable=g-import-not-at-top
  info = machine()
  return (f'{info["cpu"]} ({", ".join(info["flags"]) or "no listed SIMD flags"}); '
          f'{info["cores"]} cores visible; jax {jax.__version__} ({jax.default_backend()}); '
          f'Python {info["python"]}')


def report_benchmark(title: str, text: str, load_before, machine: str, out=None,
                     wall_seconds=None) -> str:
  """Prints a benchmark's table with the machine and the load average over the run (before /
  after), and writes it as markdown to `out` with the command that produced it."""
  fmt = lambda xs: ', '.join(f'{x:.2f}' for x in xs)
  load = (f'Load average (1/5/15 min) before the run: {fmt(load_before)}; after: '
          f'{fmt(os.getloadavg())}.' + (f' Wall time {wall_seconds:.0f} s.'
                                         if wall_seconds is not None else ''))
  print(f'{text}\n\nMachine: {machine}\n{load}')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The repository's root.
  script = os.path.relpath(os.path.abspath(sys.argv[0]), root)
  page = (f'# {title}\n\nCommand: `python {script} '
          f'{" ".join(sys.argv[1:])}`\n\nMachine: {machine}\n\n{load}\n\n{text.rstrip()}\n')
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
      f.write(page)
  return page


def peak_memory() -> tuple[int, str]:
  """(bytes, what) of this process's peak memory so far.

  The largest peak_bytes_in_use of the local accelerators where they report one (GPU, TPU), else
  the process's peak resident set size (CPU; it never decreases, so it covers every earlier run in
  the same process).
  """
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  if peaks:
    return max(peaks), f'{jax.local_devices()[0].platform} peak bytes in use'
  import resource  # pylint: disable=g-import-not-at-top
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux.
  return int(kib) * 1024, 'process peak RSS'


class Progress:
  """Training progress: a tqdm bar with ETA on a terminal, and the logged progress lines.

  Compilation is timed on its own: `compiled(step)` after the first step of a run reports the
  compile time and starts the throughput clock, so no interval's img/s or ETA includes it.

  Attributes:
    total_steps: the step training ends at.
    global_batch_size: images per step across all devices.
    compile_sec: seconds of the first step (compilation included), once `compiled` was called.
  """

  def __init__(self, total_steps: int, global_batch_size: int, start_step: int = 0, *,
               bar: Optional[bool] = None):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.compile_sec: Optional[float] = None
    self._last_step = start_step
    self._start = self._last_time = time.perf_counter()
    self._enable_bar = bar
    self._bar = None  # Made after compilation, so its rate and ETA never include it.

  def compiled(self, step: int) -> float:
    """Call when `step` (the run's first) has finished: its time is compile time, not progress."""
    now = time.perf_counter()
    self.compile_sec = now - self._start
    self._last_step, self._last_time = step, now
    self._compiled_step, self._compiled_time = step, now
    self._bar = make_bar(total=self.total_steps, initial=step, desc='train', unit='step',
                         enable=self._enable_bar)
    return self.compile_sec

  def totals(self, step: int) -> dict[str, float]:
    """Seconds and img/s of the steps after the compiled one, up to `step` ({} before any)."""
    if self.compile_sec is None or step <= self._compiled_step:
      return {}
    seconds = max(time.perf_counter() - self._compiled_time, 1e-9)
    images = (step - self._compiled_step) * self.global_batch_size
    return {'seconds': seconds, 'img_per_sec': images / seconds, 'compile_seconds': self.compile_sec}

  def update(self, step: int) -> None:
    """Moves the bar to `step` (cheap: call every step)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def tick(self, step: int) -> dict[str, float]:
    """Returns {'img_per_sec', 'sec_per_step', 'eta_sec'} over the steps since the last tick."""
    now = time.perf_counter()
    steps = step - self._last_step
    if steps <= 0:  # Only the (compiling) first step since the start: no rate to report yet.
      return {}
    dt = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    sec_per_step = dt / steps
    return {'img_per_sec': self.global_batch_size / sec_per_step,
            'sec_per_step': sec_per_step,
            'eta_sec': sec_per_step * (self.total_steps - step)}

  def line(self, step: int, metrics: Mapping[str, float], timing: Optional[dict] = None) -> str:
    timing = timing or {}
    parts = [f'step {step:>{len(str(self.total_steps))}}/{self.total_steps}']
    for key, fmt in (('loss', '.4f'), ('accuracy', '.3f'), ('learning_rate', '.2e'),
                     ('grad_norm', '.3f')):
      if key in metrics:
        parts.append(f'{key.replace("learning_rate", "lr")} {metrics[key]:{fmt}}')
    if 'img_per_sec' in timing:
      parts.append(f'{timing["img_per_sec"]:.1f} img/s')
      parts.append(f'ETA {format_duration(timing["eta_sec"])}')
    elif self.compile_sec is not None and step == self._last_step:
      parts.append(f'compiled in {self.compile_sec:.1f}s')
    return ' | '.join(parts)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


_BARS: list = []  # Open bars: log() writes above them instead of through them.


def make_bar(*, total: int, initial: int = 0, desc: str = '', unit: str = 'it',
             enable: Optional[bool] = None, leave: bool = True):
  """A tqdm bar on stderr for the primary process, or None.

  enable=None shows it only when stderr is a terminal (not in logs, pipes or tests).
  """
  if enable is None:
    enable = sys.stderr.isatty()
  if not enable or jax.process_index() != 0:
    return None
  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  bar = tqdm_auto.tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                       dynamic_ncols=True, file=sys.stderr)
  _BARS.append(bar)
  original_close = bar.close

  def close():
    if bar in _BARS:
      _BARS.remove(bar)
    original_close()
  bar.close = close
  return bar


def progress_iter(iterable, *, total: Optional[int], desc: str, unit: str = 'batch'):
  """Iterates `iterable` behind a transient progress bar (evaluation, feature extraction)."""
  bar = make_bar(total=total or 0, desc=desc, unit=unit, leave=False)
  if bar is None:
    yield from iterable
    return
  try:
    for item in iterable:
      yield item
      bar.update(1)
  finally:
    bar.close()


def log(message: str) -> None:
  """Prints on the primary process only (absl's INFO goes to stderr, unseen by default)."""
  if jax.process_index() != 0:
    return
  if _BARS:  # Above the bars, which redraw below.
    from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
    tqdm_auto.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
  else:
    print(message, flush=True)
