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
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=predict \
      --manifest=requests.txt      # lines 'IMAGE TASK': mixed batches, one compiled program
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=eval_tasks \
      --config.eval_mixed=True     # every task's eval split interleaved in mixed batches
  python -m vadapt.main --config=configs/multi_task.py:test --workdir=w --config.task=soup
      # an average task (after all_a and all_b): written from its members, nothing trained

config.adapter and config.input hold every task's adapter options and data; a task's own fields
(--config.adapters.<task>.<field>, e.g. --config.adapters.flowers.bottleneck=32 or
--config.adapters.flowers.input.name=cifar100) override them for that task, unset ones follow them;
--config.adapters.pets.dir=trained/pets loads an adapter directory instead of training the task.
An average task (`task(c, 'average', members=, weights=, combine=)`) is derived from trained tasks
of one label space: combine='weights' sums their parameters with the weights (a model soup; weights
may be negative: task arithmetic), combine='outputs' sums their adapter outputs and head logits at
inference (composition.Average); --mode=train writes it without training (vadapt.multi_task).
Tasks:
  pets      houlsby adapters, oxford_iiit_pet
  flowers   houlsby adapters, oxford_flowers102
  fused     AdapterFusion of pets and flowers (adapters placed alike), trained on oxford_iiit_pet
With `test`: tasks even (pfeiffer, digits 0 2 4 6 8), odd (pfeiffer, bottleneck 4, digits 1 3 5 7
9), fused (AdapterFusion of even and odd on all ten digits), all_a and all_b (pfeiffer, all ten
digits, trained on train[:50%] and train[50%:]), soup (their weight average) and ensemble (their
output average).
With `dinov2`: the real DINOv2 ViT-S/14 on Fashion-MNIST, sized for two CPU cores as
configs/dinov2_fashion_mnist.py (`python -m vadapt.artifacts` fetches both): tasks even (Houlsby,
classes 0 2 4 6 8), odd (Houlsby, classes 1 3 5 7 9), all (Houlsby, the ten classes), all_b (as
all, on the next `train` images: train[n:2n]), fused (AdapterFusion of even and odd on the ten
classes), soup and ensemble (the weight and output averages of all and all_b);
benchmarks/multi_adapter.py --real trains the ordinary ones one after another.

Arguments after ':' (comma separated):
  variant=B/16      ViT variant (not with dinov2)
  steps=0           training steps per task; 0: 2000 (100 with dinov2)
  dinov2            the real DINOv2 ViT-S/14 and Fashion-MNIST
  size=56           with dinov2: backbone.image_size, a multiple of 14
  train=4000        with dinov2: the first n train images (each task keeps its classes of them)
  eval=2000         with dinov2: the first n test images (likewise)
  test              a seconds-long CPU run (tiny mu/4 ViT at 32x32, offline digits, 4 steps;
                    with dinov2, the real backbone and data at 28 px, 64 images, 2 steps):

  python -m vadapt.main --config=configs/multi_task.py:test --workdir=/tmp/tasks \
      --config.task=even
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def _unset_like(fields: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every field of `fields`, unset (None) but typed: settable from the command line."""
  return ml_collections.ConfigDict({k: config_dict.placeholder(fields.get_type(k))
                                    for k in fields.keys()})


def task(c: ml_collections.ConfigDict, method: str, *, members: tuple[str, ...] = (),
         weights: tuple[float, ...] = (), combine=None, data=None,
         **options) -> ml_collections.ConfigDict:
  """One entry of config.adapters: its method, adapter options and data fields (`data`) that
  differ from config.adapter and config.input (unset ones follow those), an adapter directory to
  load (`dir`), for method='fusion' the fused tasks (`members`), and for method='average' the
  averaged tasks (`members`), their `weights` (default equal) and `combine` ('weights' or
  'outputs')."""
  t = _unset_like(c.adapter)
  t.method = method
  for key, value in options.items():
    t[key] = value
  t.input = _unset_like(c.input)
  for key, value in (data or {}).items():
    t.input[key] = value
  t.dir = config_dict.placeholder(str)  # A trained adapter directory: loaded, not trained.
  t.members = config_dict.FieldReference(tuple(members), field_type=tuple)
  t.weights = config_dict.FieldReference(tuple(weights), field_type=tuple)
  t.combine = config_dict.placeholder(str)
  if combine is not None:
    t.combine = combine
  return t


EVEN, ODD = (0, 2, 4, 6, 8), (1, 3, 5, 7, 9)


def _averages(c: ml_collections.ConfigDict, a: str,
              b: str) -> dict[str, ml_collections.ConfigDict]:
  """soup (the weight average of tasks a and b) and ensemble (their output average): derived
  from the trained a and b, not trained."""
  return {
      'soup': task(c, 'average', members=(a, b), weights=(0.5, 0.5), combine='weights'),
      'ensemble': task(c, 'average', members=(a, b), weights=(0.5, 0.5), combine='outputs'),
  }


def _dinov2(arg) -> ml_collections.ConfigDict:
  """The real DINOv2 ViT-S/14 on Fashion-MNIST (configs/dinov2_fashion_mnist.py's recipe) with
  the tasks even, odd, all, all_b (Houlsby adapters), fused (AdapterFusion of even and odd), soup
  and ensemble (the weight and output averages of all and all_b)."""
  from configs import dinov2_fashion_mnist  # pylint: disable=g-import-not-at-top
  c = dinov2_fashion_mnist.get_config(
      f'method=houlsby,size={arg.size},train={arg.train},steps={arg.steps or 100}'
      + (',test' if arg.test else ''))
  del c['compare']
  if not arg.test:
    c.input.eval_split = f'test[:{arg.eval}]'
  n = 64 if arg.test else arg.train  # c.input.train_split is train[:n].
  c.adapters = ml_collections.ConfigDict({
      'even': task(c, 'houlsby', data=dict(classes=EVEN)),
      'odd': task(c, 'houlsby', data=dict(classes=ODD)),
      'all': task(c, 'houlsby'),
      'all_b': task(c, 'houlsby', data=dict(train_split=f'train[{n}:{2 * n}]')),
      'fused': task(c, 'fusion', members=('even', 'odd')),
      **_averages(c, 'all', 'all_b'),
  })
  c.task = 'even'
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='B/16', steps=0, test=False, dinov2=False, size=56,
                         train=4000, eval=2000)
  if arg.dinov2:
    c = _dinov2(arg)
    c.eval_all_tasks = True
    c.eval_mixed = False
    return c
  c = common.base_config()
  c.backbone.variant = arg.variant
  c.backbone.image_size = 224
  c.optimizer.learning_rate = 1e-3
  c.label_smoothing = 0.1
  c.total_steps = arg.steps or 2000
  c.batch_size = 256
  c.eval_batch_size = 256
  c.input.source = 'tfds'
  c.input.eval_split = 'test'
  if arg.test:
    common.apply_test_settings(c)
    c.adapters = ml_collections.ConfigDict({
        'even': task(c, 'pfeiffer', data=dict(classes=(0, 2, 4, 6, 8))),
        'odd': task(c, 'pfeiffer', data=dict(classes=(1, 3, 5, 7, 9)), bottleneck=4),
        'fused': task(c, 'fusion', members=('even', 'odd')),
        # Two tasks on all ten digits, trained on the two halves of the train split, and their
        # averages.
        'all_a': task(c, 'pfeiffer', data=dict(train_split='train[:50%]')),
        'all_b': task(c, 'pfeiffer', data=dict(train_split='train[50%:]')),
        **_averages(c, 'all_a', 'all_b'),
    })
    c.task = 'even'
  else:
    c.adapters = ml_collections.ConfigDict({
        'pets': task(c, 'houlsby', data=dict(name='oxford_iiit_pet')),
        'flowers': task(c, 'houlsby', data=dict(name='oxford_flowers102')),
        'fused': task(c, 'fusion', data=dict(name='oxford_iiit_pet'),
                      members=('pets', 'flowers')),
    })
    c.task = 'pets'
  # After training a task, evaluate every trained task (one table).
  c.eval_all_tasks = True
  # --mode=eval_tasks: evaluate the ordinary tasks' eval splits interleaved in mixed batches
  # (each example with its own task's adapter and head, one compiled program) instead of one
  # task after another; the accuracies are the same.
  c.eval_mixed = False
  return c
