"""Average tasks from the command line (configs/multi_task.py:test): two tasks on all ten digits
(all_a, all_b: the two halves of the train split), their weight average (soup) and output average
(ensemble), written without training, then evaluated, served and exported like any task; the
members stay bit-identical; bad input is one line before any work."""

import json
import os
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from cli_runner import run_cli, run_main
from config_overrides import load_config
from vadapt import adapter_dir, arithmetic, multi_task
from vadapt.composition import Average

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG = os.path.join(REPO, 'configs', 'multi_task.py')
MEMBERS = ('all_a', 'all_b')


def argv(workdir, *extra):
  return [f'--config={CONFIG}:test', f'--workdir={workdir}', '--config.eval_at_start=False',
          '--config.total_steps=2', '--config.eval_all_tasks=False', *extra]


def contents(directory):
  return {f: open(os.path.join(directory, f), 'rb').read() for f in sorted(os.listdir(directory))}


@pytest.fixture(scope='module')
def averaged(tmp_path_factory):
  """all_a and all_b trained, then soup and ensemble written; the members' files in between."""
  w = tmp_path_factory.mktemp('averages')
  for name in MEMBERS:
    run_main(argv(w, f'--config.task={name}'))
  members = {n: contents(os.path.join(w, 'adapters', n)) for n in MEMBERS}
  run_main(argv(w, '--config.task=soup'))
  # Writing the last one evaluates every trained task.
  run_main(argv(w, '--config.task=ensemble', '--config.eval_all_tasks=True'))
  return w, members


def test_the_weight_average_is_the_weighted_sum_of_the_members_saved_deltas(averaged):
  w, members = averaged
  root = os.path.join(w, 'adapters')
  saved, weights = adapter_dir.read(os.path.join(root, 'soup'))
  deltas = [adapter_dir.read(os.path.join(root, n))[1] for n in MEMBERS]
  expected = arithmetic.weighted_sum(deltas, [0.5, 0.5])
  assert sorted(weights) == sorted(expected) and 'heads/*/kernel' in weights
  for path, value in expected.items():
    np.testing.assert_array_equal(weights[path], np.asarray(value), err_msg=path)
  assert not np.array_equal(weights['heads/*/kernel'], deltas[0]['heads/*/kernel'])
  # An ordinary adapter: the members' placement and head, served by its name.
  first = adapter_dir.read_config(os.path.join(root, 'all_a'))
  assert saved['targets'] == first['targets'] and 'average' not in saved
  assert saved['class_names'] == first['class_names'] and saved['num_classes'] == 10
  assert saved['meta']['adapter'] == {'method': 'average', 'members': list(MEMBERS),
                                      'weights': [0.5, 0.5], 'combine': 'weights'}
  assert saved['meta']['step'] == 0 and not os.path.exists(os.path.join(w, 'tasks', 'soup'))
  # The members are bit-identical to what their own training saved.
  assert {n: contents(os.path.join(root, n)) for n in MEMBERS} == members


def test_the_output_average_equals_the_average_composition_of_the_members(averaged):
  w, _ = averaged
  saved = adapter_dir.read_config(os.path.join(w, 'adapters', 'ensemble'))
  assert saved['targets'] == [] and saved['average'] == {'members': list(MEMBERS),
                                                         'weights': [0.5, 0.5]}
  config = load_config('multi_task')
  tasks = multi_task.plan(config, w)
  loaded = multi_task.load(config, tasks, skip=[n for n in tasks if n not in
                                                (*MEMBERS, 'ensemble')])
  block = Average(*MEMBERS, weights=(0.5, 0.5))
  assert loaded.selections['ensemble'] == block
  model, params = loaded.model, loaded.params
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  got = np.asarray(model.apply({'params': params}, x, adapter=block, head='ensemble'))
  # The reference: features under the Average block, each member's head, logits averaged.
  features = model.apply({'params': params}, x, adapter=block, head=None)
  want = sum(0.5 * (features @ params['heads'][n]['kernel'] + params['heads'][n]['bias'])
             for n in MEMBERS)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Served by name: the predictor's probabilities are the softmax of those logits.
  predictor = multi_task.TaskPredictor.from_config(config, w, 'ensemble')
  np.testing.assert_allclose(predictor.probabilities(x), jax.nn.softmax(want, -1), rtol=1e-5,
                             atol=1e-6)


def test_eval_tasks_lists_the_averages_and_predict_and_export_serve_them(averaged, tmp_path,
                                                                          capsys):
  w, _ = averaged
  with open(os.path.join(w, multi_task.EVAL_TABLE)) as f:
    table = json.load(f)
  for name in (*MEMBERS, 'soup', 'ensemble'):
    assert table[name]['trained'] and table[name]['eval/examples'] == 64, name
  assert table['soup']['method'] == table['ensemble']['method'] == 'average'
  assert not table['even']['trained']
  with open(os.path.join(w, 'adapters', 'adapters.json')) as f:
    assert json.load(f) == {'adapters': ['all_a', 'all_b', 'soup', 'ensemble']}
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(2):
    Image.new('RGB', (20, 16), (90 * i, 120, 30)).save(folder / f'{i}.png')
  capsys.readouterr()
  lines = {}
  for name in ('soup', 'ensemble'):
    assert run_cli(argv(w, '--mode=predict', f'--adapter={name}', f'--images={folder}',
                        '--top_k=2')) == 0
    lines[name] = capsys.readouterr().out.strip().splitlines()
    assert len(lines[name]) == 2 and lines[name][0].startswith(f'{folder}/0.png: '), lines
  # The ensemble's directory alone: its members come from the sibling directories.
  assert run_cli(['--mode=predict', f'--adapter={w}/adapters/ensemble', f'--images={folder}',
                  '--top_k=2']) == 0
  assert capsys.readouterr().out.strip().splitlines() == lines['ensemble']
  # Mixed requests over members and averages.
  manifest = tmp_path / 'requests.txt'
  manifest.write_text(''.join(f'images/{i}.png {t}\n'
                              for i, t in enumerate(('soup', 'ensemble', 'all_a'))))
  (tmp_path / 'images' / '2.png').write_bytes((folder / '0.png').read_bytes())
  assert run_cli(argv(w, '--mode=predict', f'--manifest={manifest}', '--top_k=2')) == 0
  served = capsys.readouterr().out.strip().splitlines()
  assert [s.split(': ')[0] for s in served] == [
      f'{folder}/0.png [soup]', f'{folder}/1.png [ensemble]', f'{folder}/2.png [all_a]']
  assert served[0].split(': ')[1] == lines['soup'][0].split(': ')[1]
  assert served[1].split(': ')[1] == lines['ensemble'][1].split(': ')[1]
  out = tmp_path / 'exported'
  assert run_cli(argv(w, '--mode=export', f'--out={out}')) == 0
  assert sorted(os.listdir(out)) == ['adapters.json', 'all_a', 'all_b', 'ensemble', 'soup']


def test_writing_an_average_again_is_refused_unless_asked(averaged, capsys):
  w, _ = averaged
  soup = os.path.join(w, 'adapters', 'soup')
  before = contents(soup)
  assert run_cli(argv(w, '--config.task=soup')) == 2
  err = capsys.readouterr().err.strip().splitlines()[0]
  assert f"{soup} already holds task 'soup'; pass --config.checkpoint.restart=True" in err, err
  assert contents(soup) == before
  run_main(argv(w, '--config.task=soup', '--config.checkpoint.restart=True'))
  # The same members, the same average; the old one moved aside.
  weights = adapter_dir.WEIGHTS
  assert contents(soup)[weights] == before[weights]
  moved = os.path.join(w, 'tasks', 'soup', 'previous_runs', '1', 'adapter_dir')
  assert contents(moved) == before


def test_negative_weights_subtract_a_task(averaged, tmp_path):
  w, _ = averaged
  shutil.copytree(os.path.join(w, 'adapters'), tmp_path / 'adapters',
                  ignore=shutil.ignore_patterns('soup', 'ensemble'))
  run_main(argv(tmp_path, '--config.task=soup', '--config.adapters.soup.weights=(1.5,-0.5)'))
  _, weights = adapter_dir.read(tmp_path / 'adapters' / 'soup')
  deltas = [adapter_dir.read(os.path.join(w, 'adapters', n))[1] for n in MEMBERS]
  for path, value in arithmetic.weighted_sum(deltas, [1.5, -0.5]).items():
    np.testing.assert_array_equal(weights[path], np.asarray(value), err_msg=path)


@pytest.fixture(scope='module')
def other(averaged, tmp_path_factory):
  """A workdir with all_a loaded from the first one, all_b trained with another bottleneck, and
  even (five classes)."""
  w, _ = averaged
  o = tmp_path_factory.mktemp('other')
  shared = [f'--config.adapters.all_a.dir={w}/adapters/all_a']
  run_main(argv(o, *shared, '--config.task=all_b', '--config.adapters.all_b.bottleneck=4'))
  run_main(argv(o, *shared, '--config.task=even'))
  return o, shared


def test_members_of_another_structure_average_outputs_but_not_weights(other, capsys):
  o, shared = other
  assert run_cli(argv(o, *shared, '--config.adapters.all_b.bottleneck=4',
                      '--config.task=soup')) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith("vadapt: error: ValueError: Task 'soup' averages the weights of "
                           "['all_a', 'all_b'], but 'all_a' and 'all_b' differ in structure ("), err
  assert 'bottleneck 8 vs 4' in err[0] and not os.path.exists(o / 'adapters' / 'soup')
  run_main(argv(o, *shared, '--config.adapters.all_b.bottleneck=4', '--config.task=ensemble'))
  config = load_config('multi_task')
  with config.unlocked():
    config.adapters.all_a.dir = shared[0].split('=', 1)[1]
    config.adapters.all_b.bottleneck = 4
  predictor = multi_task.TaskPredictor.from_config(config, str(o), 'ensemble')
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  p = predictor.probabilities(x)
  assert p.shape == (2, 10) and np.allclose(p.sum(-1), 1, atol=1e-5)
  # Members of other label spaces: one line, nothing written.
  assert run_cli(argv(o, *shared, '--config.task=soup',
                      '--config.adapters.soup.members=("all_a","even")')) == 2
  err = capsys.readouterr().err.strip().splitlines()[0]
  assert ("Task 'soup' averages ['all_a', 'even'], whose heads have different label spaces "
          "(all_a: 10 classes ['0', '1', '2']...; even: 5 classes ['0', '2', '4']...)") in err, err
  assert not os.path.exists(o / 'adapters' / 'soup')


@pytest.mark.parametrize('extra, cause', [
    (['--config.task=soup'], "Task 'soup' averages ['all_a', 'all_b']; train ['all_a', 'all_b'] "
                             'first (--config.task=all_a).'),
    (['--config.adapters.soup.members=()'], 'adapters.soup.members is empty'),
    (['--config.adapters.soup.members=("all_a","nope")'],
     "adapters.soup.members=('all_a', 'nope'): ['nope'] are not other tasks of config.adapters"),
    (['--config.adapters.soup.members=("all_a","all_a")'], 'names a task more than once'),
    (['--config.adapters.soup.weights=(1.0,)'],
     "adapters.soup.weights=(1.0,): 1 weights for 2 members ('all_a', 'all_b')."),
    (['--config.adapters.soup.members=("all_a","ensemble")'],
     "adapters.soup.members: ['ensemble'] are fusion or average tasks"),
    (['--config.adapters.soup.combine=sum'],
     "adapters.soup.combine='sum': an average combines the members' 'weights' or 'outputs'."),
    (['--config.adapters.even.weights=(1.0,)'],
     "adapters.even.weights and .combine are options of method='average'"),
    (['--config.adapters.fused.members=("even","ensemble")'],
     "adapters.fused.members: ['ensemble'] are fusion or output-average tasks"),
])
def test_bad_average_input_is_one_line_before_any_work(tmp_path, capsys, extra, cause):
  w = tmp_path / 'w'
  assert run_cli(argv(w, *extra)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith('vadapt: error: ') and cause in err[0], err
  assert not os.path.exists(w / 'tasks') and not os.path.exists(w / 'adapters')
