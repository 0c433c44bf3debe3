r"""Several tasks on one frozen ViT: named adapters trained one after another, then fused.

Each task of `config.adapters` has its own adapter (method and options, as config.adapter), its
own data (input) and head; `--config.task` chooses the one --mode=train trains. Tasks trained
before are loaded from WORKDIR/adapters and stay frozen (bit-identical). See vadapt.multi_task.

  python -m vadapt.main --config=configs/multi_task.py --workdir=w --config.task=pets \
      --config.backbone.checkpoint=/path/to/ViT-B_16.npz
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --config.task=flowers ...
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --config.task=fused ...
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=eval_tasks ...
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=predict \
      --adapter=flowers --images=photo.jpg

Tasks (options: --config.adapters.<task>.<field>, e.g. --config.adapters.flowers.bottleneck=32,
--config.adapters.pets.dir=trained/pets to load an adapter directory instead of training it):
  pets      houlsby adapters, oxford_iiit_pet
  flowers   houlsby adapters, oxford_flowers102
  fused     AdapterFusion of pets and flowers (adapters placed alike), trained on oxford_iiit_pet
With `test`: tasks even (pfeiffer, digits 0 2 4 6 8), odd (pfeiffer, bottleneck 4, digits 1 3 5 7
9) and fused (AdapterFusion of even and odd on all ten digits).

Arguments after ':' (comma separated):
  variant=B/16      ViT variant
  steps=2000        training steps per task
  test              a seconds-long CPU run (tiny mu/4 ViT at 32x32, offline digits, 4 steps):

  python -m vadapt.main --config=configs/multi_task.py:test --workdir=/tmp/tasks \
      --config.task=even
"""

import copy

import ml_collections
from ml_collections import config_dict

from configs import common


def task(template: ml_collections.ConfigDict, method: str, data: ml_collections.ConfigDict,
         *, members: tuple[str, ...] = (), **options) -> ml_collections.ConfigDict:
  """One entry of config.adapters: the adapter options of `template` (config.adapter) with
  `method` and `options`, the task's data, an adapter directory to load, fusion members."""
  t = copy.deepcopy(template)
  t.method = method
  for key, value in options.items():
    t[key] = value
  t.input = data
  t.dir = config_dict.placeholder(str)  # A trained adapter directory: loaded, not trained.
  t.members = config_dict.FieldReference(tuple(members), field_type=tuple)
  return t


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='B/16', steps=2000, test=False)
  c = common.base_config()
  c.backbone.variant = arg.variant
  c.backbone.image_size = 224
  c.optimizer.learning_rate = 1e-3
  c.label_smoothing = 0.1
  c.total_steps = arg.steps
  c.batch_size = 256
  c.eval_batch_size = 256
  c.input.source = 'tfds'
  if arg.test:
    common.apply_test_settings(c)

  def data(**fields):
    d = copy.deepcopy(c.input)
    for key, value in fields.items():
      d[key] = value
    return d

  template = c.adapter
  if arg.test:
    c.adapters = ml_collections.ConfigDict({
        'even': task(template, 'pfeiffer', data(classes=(0, 2, 4, 6, 8))),
        'odd': task(template, 'pfeiffer', data(classes=(1, 3, 5, 7, 9)), bottleneck=4),
        'fused': task(template, 'fusion', data(), members=('even', 'odd')),
    })
    c.task = 'even'
  else:
    c.adapters = ml_collections.ConfigDict({
        'pets': task(template, 'houlsby', data(name='oxford_iiit_pet', eval_split='test')),
        'flowers': task(template, 'houlsby', data(name='oxford_flowers102', eval_split='test')),
        'fused': task(template, 'fusion', data(name='oxford_iiit_pet', eval_split='test'),
                      members=('pets', 'flowers')),
    })
    c.task = 'pets'
  # After training a task, evaluate every trained task (one table).
  c.eval_all_tasks = True
  # Each task carries its own adapter options and data.
  del c['adapter']
  del c['input']
  return c
