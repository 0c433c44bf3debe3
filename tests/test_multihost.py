"""Two processes on localhost (2 CPU devices each) train exactly like one process with 4 devices.

Each process initialises jax.distributed from the config, reads only its own rows of every
batch, and builds global arrays with jax.make_array_from_process_local_data. This file is also
the worker: `python tests/test_multihost.py PROCESS_ID PORT WORKDIR`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from config_overrides import load_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
OVERRIDES = {'total_steps': 2, 'log_every': 1, 'checkpoint_every': 1, 'eval_at_start': False}


def get_config(**overrides):
  return load_config(**overrides)


def _losses(workdir):
  from vadapt import metrics as metrics_lib
  return [r['train/loss'] for r in metrics_lib.read_jsonl(workdir) if 'train/loss' in r]


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker(process_id: int, port: int, workdir: str) -> None:
  import jax
  jax.config.update('jax_num_cpu_devices', 2)
  jax.config.update('jax_disable_most_optimizations', True)
  from vadapt import train
  config = get_config(**OVERRIDES, **{
      'distributed.initialize': True, 'distributed.coordinator_address': f'127.0.0.1:{port}',
      'distributed.num_processes': 2, 'distributed.process_id': process_id})
  result = train.train_and_evaluate(config, workdir)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  flat = {'/'.join(k): np.asarray(v).tolist() for k, v in
          __import__('flax').traverse_util.flatten_dict(result.delta).items()}
  with open(os.path.join(workdir, f'result_{process_id}.json'), 'w') as f:
    json.dump({'delta': flat, 'accuracy': result.metrics['eval/accuracy']}, f)


def test_two_processes_match_one(tmp_path):
  from vadapt import train
  port = _free_port()
  workdir = str(tmp_path / 'multi')
  env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), workdir], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]

  single = train.train_and_evaluate(get_config(**OVERRIDES, **{'mesh.num_devices': 4}),
                                    str(tmp_path / 'single'))
  np.testing.assert_allclose(_losses(workdir), _losses(str(tmp_path / 'single')),
                             rtol=0, atol=1e-6)
  for i in range(2):
    with open(os.path.join(workdir, f'result_{i}.json')) as f:
      got = json.load(f)
    assert got['accuracy'] == single.metrics['eval/accuracy']
    for key, value in __import__('flax').traverse_util.flatten_dict(single.delta).items():
      np.testing.assert_allclose(np.asarray(got['delta']['/'.join(key)]), value,
                                 rtol=0, atol=1e-6, err_msg='/'.join(key))
  # Both processes wrote one shared checkpoint directory.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
