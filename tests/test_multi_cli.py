"""Many tasks on one backbone from the command line (configs/multi_task.py:test): tasks trained one
after another leave the earlier ones bit-identical, a fusion is saved and served like any adapter,
every task is evaluated in one table, prediction picks a task by name or directory, and bad input
is one line before any work."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from cli_runner import run_cli, run_main
from config_overrides import load_config
from vadapt import adapter_dir, backbones, checkpoint, inject, multi, multi_task
from vadapt.adapters import BottleneckConfig
from vadapt.composition import Stack
from vadapt.pretrained.common import flatten

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG = os.path.join(REPO, 'configs', 'multi_task.py')


def argv(workdir, *extra):
  return [f'--config={CONFIG}:test', f'--workdir={workdir}', '--config.eval_at_start=False',
          '--config.total_steps=2', *extra]


def table(workdir):
  with open(os.path.join(workdir, multi_task.EVAL_TABLE)) as f:
    return json.load(f)


def outputs(directories, name, images, **call):
  """Logits of adapter `name` with the adapters of `directories` loaded on the test backbone."""
  config = load_config('multi_task')
  backbone = backbones.make_model(config.backbone, None)
  params = backbones.load_params(config.backbone, backbone, rng=jax.random.fold_in(
      jax.random.PRNGKey(config.seed), 1))
  model = multi.adapt(backbone, [])
  for d in directories:
    model, params = adapter_dir.add(model, params, d)
  return np.asarray(model.apply({'params': params}, images, adapter=name, **call))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """even, then odd, then the fusion of both; what each stage saw."""
  w = tmp_path_factory.mktemp('tasks')
  images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  run_main(argv(w, '--config.task=even', '--config.eval_all_tasks=False'))
  even = os.path.join(w, 'adapters', 'even')
  first = {'logits': outputs([even], 'even', images),
           'files': {f: open(os.path.join(even, f), 'rb').read() for f in os.listdir(even)}}
  # odd trains with AdapterDrop (each layer's adapter left out of a step with a probability
  # that ramps up to 0.3).
  run_main(argv(w, '--config.task=odd', '--config.eval_all_tasks=False',
                '--config.adapters.odd.drop_rate=0.3',
                '--config.adapters.odd.drop_schedule=linear'))
  run_main(argv(w, '--config.task=fused'))
  return w, images, first


def test_tasks_trained_one_after_another_leave_the_earlier_ones_bit_identical(trained):
  w, images, first = trained
  root = os.path.join(w, 'adapters')
  assert json.load(open(os.path.join(root, 'adapters.json'))) == {
      'adapters': ['even', 'odd', 'fused']}
  # Training odd and the fusion changed nothing of even: files, outputs, evaluation.
  even = os.path.join(root, 'even')
  assert {f: open(os.path.join(even, f), 'rb').read() for f in os.listdir(even)} == first['files']
  dirs = [os.path.join(root, n) for n in ('even', 'odd')]
  np.testing.assert_array_equal(outputs(dirs, 'even', images), first['logits'])
  # The table after the last run: every task on its own eval split.
  after = table(w)
  assert all(after[n]['trained'] for n in ('even', 'odd', 'fused'))
  assert [after[n]['num_classes'] for n in ('even', 'odd', 'fused')] == [5, 5, 10]
  assert [after[n]['eval/examples'] for n in ('even', 'odd', 'fused')] == [31, 33, 64]
  # Each run's checkpoint holds its own task's parameters only.
  for name in ('odd', 'fused'):
    ckpt = checkpoint.Checkpointer(os.path.join(w, 'tasks', name))
    stored = ckpt.stored_shapes(ckpt.latest_step(), 'delta')
    ckpt.close()
    owners = {multi.owner(p, ['even', 'odd', 'fused'])
              or ('fusion' if 'fusion_fused' in p.split('/') else None) for p in stored}
    assert owners == ({'odd'} if name == 'odd' else {'fused', 'fusion'}), owners


def test_fusion_layers_are_saved_and_served_like_any_adapter(trained):
  w, images, _ = trained
  root = os.path.join(w, 'adapters')
  saved, weights = adapter_dir.read(os.path.join(root, 'fused'))
  assert saved['fusion']['members'] == ['even', 'odd'] and saved['targets'] == []
  assert any('/*fusion/query/kernel' in k for k in weights) and 'heads/*/kernel' in weights
  block = adapter_dir.fuse_block(os.path.join(root, 'fused'))
  assert block.members == ('even', 'odd') and block.name == 'fusion_fused'
  dirs = [os.path.join(root, n) for n in ('even', 'odd', 'fused')]
  fused = outputs(dirs, block, images, head='fused')
  assert fused.shape == (4, 10) and np.all(np.isfinite(fused))
  # The directory holds exactly what the run trained: the fusion layers and head of its last step.
  ckpt = checkpoint.Checkpointer(os.path.join(w, 'tasks', 'fused'))
  trained_delta = flatten(ckpt.restore_delta(ckpt.latest_step()))
  ckpt.close()
  assert len(trained_delta) == len(weights)
  for path, value in trained_delta.items():
    saved_path = path.replace('/fusion_fused/', '/*fusion/').replace('heads/fused/', 'heads/*/')
    np.testing.assert_array_equal(weights[saved_path], value)
  # A fusion without its members cannot be loaded.
  config = load_config('multi_task')
  backbone = backbones.make_model(config.backbone, None)
  params = backbones.load_params(config.backbone, backbone, rng=jax.random.fold_in(
      jax.random.PRNGKey(config.seed), 1))
  with pytest.raises(ValueError, match=r"AdapterFusion of \['even', 'odd'\].*add \['odd'\] first"):
    model, loaded = adapter_dir.add(multi.adapt(backbone, []), params, dirs[0])
    adapter_dir.add(model, loaded, dirs[2])
  # --mode=export copies the set; it loads as one, the fusion with its members.
  out = os.path.join(w, 'exported')
  assert run_cli(argv(w, '--mode=export', f'--out={out}')) == 0
  model, _ = adapter_dir.load_set(out, backbone, params)
  assert model.names() == ('even', 'odd', 'fused')
  assert run_cli(argv(w, '--mode=export', f'--out={out}')) == 2  # Nothing is overwritten.


def test_predict_by_task_name_or_adapter_directory(trained, tmp_path, capsys):
  w, _, _ = trained
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(2):
    Image.new('RGB', (20, 16), (90 * i, 120, 30)).save(folder / f'{i}.png')
  capsys.readouterr()
  assert run_cli(argv(w, '--mode=predict', '--adapter=fused', f'--images={folder}',
                      '--top_k=3')) == 0
  by_name = capsys.readouterr().out.strip().splitlines()
  # The directory alone (no config): the backbone, preprocessing and the fused members' sibling
  # directories are found from it.
  assert run_cli(['--mode=predict', f'--adapter={w}/adapters/fused', f'--images={folder}',
                  '--top_k=3']) == 0
  assert capsys.readouterr().out.strip().splitlines() == by_name
  assert len(by_name) == 2 and by_name[0].startswith(f'{folder}/0.png: ')
  top = [pair.rsplit(' ', 1) for pair in by_name[0].split(': ')[1].split(', ')]
  assert len(top) == 3 and {c for c, _ in top} <= set('0123456789')
  assert sum(float(p) for _, p in top) < 1 and float(top[0][1]) >= float(top[1][1])


def _images(folder, n):
  folder.mkdir()
  for i in range(n):
    Image.new('RGB', (20 + i, 16), (40 * i, 120, 200 - 30 * i)).save(folder / f'{i}.png')
  return [str(folder / f'{i}.png') for i in range(n)]


def test_a_manifest_is_served_in_mixed_batches_equal_to_each_task_alone(trained, tmp_path,
                                                                        capsys):
  w, _, _ = trained
  paths = _images(tmp_path / 'images', 5)
  tasks = ['even', 'odd', 'fused', 'odd', 'even']
  manifest = tmp_path / 'requests.txt'
  manifest.write_text('# image task\n' + ''.join(f'images/{os.path.basename(p)}  {t}\n'
                                                  for p, t in zip(paths, tasks)) + '\n')
  config = load_config('multi_task')
  mixed = multi_task.MixedPredictor.from_config(config, w, ['even', 'odd', 'fused'], batch_size=2)
  requests = list(zip(paths, tasks))
  probs = mixed.probabilities(requests)
  assert mixed.traces == 1  # Two mixed batches (one padded), one compiled program.
  for name in ('even', 'odd', 'fused'):
    alone = multi_task.TaskPredictor.from_config(config, w, name)
    for (path, task), p in zip(requests, probs):
      if task == name:
        image = alone.preprocess(np.asarray(Image.open(path).convert('RGB')))
        np.testing.assert_allclose(p, alone.probabilities(image[None])[0], rtol=1e-6, atol=1e-6)
  # From the command line: one line per request, in manifest order, naming its task.
  capsys.readouterr()
  assert run_cli(argv(w, '--mode=predict', f'--manifest={manifest}', '--top_k=2')) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split(': ')[0] for line in lines] == [f'{p} [{t}]' for p, t in requests]
  for line, p in zip(lines, probs):
    top = [pair.rsplit(' ', 1) for pair in line.split(': ')[1].split(', ')]
    assert [float(q) for _, q in top] == pytest.approx(sorted(p)[::-1][:2], abs=1e-3)
  # An unknown task, or a missing image, is one line before anything loads.
  manifest.write_text('images/0.png even\nimages/1.png nope\n')
  assert run_cli(argv(w, '--mode=predict', f'--manifest={manifest}')) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0] == (f"vadapt: error: ValueError: {manifest}: 'nope' is not a task of "
                    'config.adapters; tasks: all_a, all_b, even, odd, soup, fused, ensemble.'), err
  manifest.write_text('images/9.png even\n')
  assert run_cli(argv(w, '--mode=predict', f'--manifest={manifest}')) == 2
  assert f"{manifest}:1: image 'images/9.png' does not exist" in capsys.readouterr().err


def test_mixed_evaluation_equals_the_per_task_evaluation(trained):
  w, _, _ = trained
  config = load_config('multi_task')
  per_task = table(w)  # The per-task evaluation after training the last task.
  with config.unlocked():
    config.eval_mixed = True
  mixed = multi_task.evaluate_tasks(config, w)
  assert mixed.keys() == per_task.keys()
  trained = [n for n in mixed if mixed[n]['trained']]
  assert trained == ['even', 'odd', 'fused']
  assert all(mixed[n] == per_task[n] == {'trained': False} for n in mixed if n not in trained)
  for name in trained:
    assert mixed[name]['eval/accuracy'] == per_task[name]['eval/accuracy'], name
    assert mixed[name]['eval/examples'] == per_task[name]['eval/examples'], name
    np.testing.assert_allclose(mixed[name]['eval/loss'], per_task[name]['eval/loss'], rtol=1e-6)
  # The mixed batches themselves: every example's logits equal its task's alone.
  from vadapt import input_pipeline
  tasks = multi_task.plan(config, w)
  loaded = multi_task.load(config, tasks, skip=['fused'])
  model, names = loaded.model, ['even', 'odd']
  streams = lambda: [input_pipeline.make_eval_iterator(
      tasks[n].config.input, global_batch_size=16, image_size=32, process_index=0,
      process_count=1) for n in names]
  run = jax.jit(lambda p, x, i: model.apply({'params': p}, x, adapter=i, head=i))
  batches = list(multi_task.interleave(streams(), [model.index(n) for n in names], 8))
  # 31 + 1 padding rows of even, 33 + 15 of odd: two rounds of both, then odd's last batch.
  assert len(batches) == 10
  assert all(set(b['adapter'][b['mask']].tolist()) == {0, 1} for b in batches[:8])
  for k, n in enumerate(names):
    alone = np.concatenate([model.apply({'params': loaded.params}, b['image'], adapter=n)
                            for b in streams()[k]])
    for b in batches:
      rows = b['row'][:, 0] == k
      got = np.asarray(run(loaded.params, b['image'], b['adapter']))[rows]
      np.testing.assert_allclose(got, alone[b['row'][rows, 1]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('extra, cause', [
    (['--config.task=nope'], "config.task='nope' is not a task of config.adapters; tasks: all_a, "
                             'all_b, even, odd, soup, fused, ensemble.'),
    (['--mode=predict', '--adapter=nope', '--images=x.png'],
     "--adapter='nope' is not a task of config.adapters"),
    (['--config.task=fused'], "Task 'fused' fuses ['even', 'odd']; train ['even', 'odd'] first"),
    (['--config.adapters.odd.drop_rate=1.5'],
     'adapters.odd: drop_rate (AdapterDrop) must be in [0, 1)'),
    (['--config.adapters.odd.members=("even",)'],
     "members is an option of method='fusion' or 'average'"),
    (['--config.adapters.odd.method=vpt_deep'], 'a named adapter is one of houlsby'),
    (['--config.adapters.even.dir=/no/such/dir'], "adapter config not found: '/no/such/dir/"),
    (['--mode=zeroshot'], '--mode=zeroshot does not take a multi-task config'),
    (['--mode=eval_tasks'], 'No task of'),
    (['--mode=predict', '--manifest=requests.txt', '--adapter=even'],
     '--manifest names every image and its task; drop --images and --adapter.'),
    (['--mode=predict', '--manifest=/no/requests.txt'],
     "Manifest '/no/requests.txt' does not exist."),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, extra, cause):
  w = tmp_path / 'w'
  assert run_cli(argv(w, *extra)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith('vadapt: error: ') and cause in err[0], err
  assert not os.path.exists(w / 'tasks')


@pytest.mark.parametrize('extra, cause', [
    # Another architecture: refused from the layout, before any weights load.
    (['--config.backbone.overrides.num_layers=1'], 'other parameter paths, shapes or dtypes'),
    # Same architecture, other weights (another random init).
    (['--config.seed=3'], 'other weights (the weight digests differ)'),
])
def test_an_adapter_directory_of_another_backbone_is_refused(trained, tmp_path, capsys, extra,
                                                             cause):
  w, _, _ = trained
  other = tmp_path / 'other'
  assert run_cli(argv(other, '--config.task=odd',
                      f'--config.adapters.even.dir={w}/adapters/even', *extra)) == 2
  err = capsys.readouterr().err.strip().splitlines()[0]
  assert err.startswith("vadapt: error: BackboneMismatchError: Adapter 'even'") and cause in err
  assert not os.path.exists(other / 'tasks')


class Blocks(nn.Module):
  """Two residual blocks (encoderblock_0, _1), each a Dense: AdapterDrop's layers."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    for i in range(2):
      x = x + nn.Dense(x.shape[-1], name=f'encoderblock_{i}')(x)
    return x


def test_adapter_drop_trains_named_adapters_layer_by_layer():
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  adapters = [multi.NamedAdapter(n, (inject.Target(r'encoderblock_\d', BottleneckConfig(
      bottleneck=2)),), num_classes=3) for n in ('a', 'b')]
  model = multi.adapt(Blocks(), adapters, drop_rate=0.5)
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32), params)
  assert model.with_adapter(multi.NamedAdapter('c')).drop_rate == 0.5
  run = jax.jit(lambda p, i, seed, **kw: model.apply(
      {'params': p}, x, adapter=i, rngs={'dropout': jax.random.key(seed)}, **kw),
                static_argnames=('train', 'drop_lowest'))
  index = model.index('b')
  kept = run(params, index, 0, train=False)
  # References: nothing dropped, the lowest block dropped, both dropped (the head alone).
  refs = {'kept': kept, 'lowest': run(params, index, 0, train=False, drop_lowest=1),
          'all': run(params, index, 0, train=False, drop_lowest=2)}
  assert not np.allclose(refs['kept'], refs['lowest']) and not np.allclose(refs['kept'],
                                                                          refs['all'])
  seen = set()
  for seed in range(24):
    out = run(params, index, seed, train=True)
    seen |= {k for k, r in refs.items() if np.array_equal(out, r)} or {'upper'}
  assert seen == {'kept', 'lowest', 'all', 'upper'}, seen  # Each layer drawn on its own.
  # Inference never drops; composition blocks are gated the same way.
  np.testing.assert_array_equal(run(params, index, 5, train=False), kept)
  stacked = {str(np.asarray(model.apply({'params': params}, x, adapter=Stack('a', 'b'), train=True,
                                        rngs={'dropout': jax.random.key(s)})).tobytes())
             for s in range(12)}
  assert len(stacked) > 1
  # A linear schedule: no drop at step 0 (the rate ramps from 0), the full rate from step 4 on.
  ramp = multi.adapt(Blocks(), adapters, drop_rate=0.5, drop_schedule='linear', drop_ramp_steps=4)
  ramped = jax.jit(lambda p, seed, step: ramp.apply(
      {'params': p}, x, adapter=index, train=True, adapter_step=step,
      rngs={'dropout': jax.random.key(seed)}))
  assert all(np.array_equal(ramped(params, seed, 0), kept) for seed in range(6))
  np.testing.assert_array_equal(ramped(params, 3, 4), run(params, index, 3, train=True))
  with pytest.raises(ValueError, match='call the model with adapter_step'):
    ramp.apply({'params': params}, x, adapter=index, train=True,
               rngs={'dropout': jax.random.key(0)})


def test_an_adapter_not_trained_in_the_workdir_is_not_overwritten(trained, tmp_path, capsys):
  w, _, _ = trained
  other = tmp_path / 'other'
  os.makedirs(other / 'adapters')
  shutil.copytree(os.path.join(w, 'adapters', 'even'), other / 'adapters' / 'even')
  before = (other / 'adapters' / 'even' / 'adapter.safetensors').read_bytes()
  assert run_cli(argv(other, '--config.task=even')) == 2
  err = capsys.readouterr().err.strip().splitlines()[0]
  assert 'already holds an adapter that this workdir has no checkpoints of' in err, err
  assert (other / 'adapters' / 'even' / 'adapter.safetensors').read_bytes() == before
  assert not os.path.exists(other / 'tasks')
