r"""Command line: parses flags and dispatches to the mode's module; nothing else lives here.

  python -m vadapt.main --config=configs/vit_b16_adapter.py --workdir=workdir/pets \
      --config.backbone.checkpoint=ViT-B_16.npz --config.adapter.bottleneck=32
  python -m vadapt.main --config=configs/vit_b16_adapter.py --workdir=workdir/pets --mode=eval
  python -m vadapt.main --config=... --workdir=workdir/pets --mode=export --out=adapter.safetensors
  python -m vadapt.main --mode=predict --adapter=workdir/pets/adapter.safetensors \
      --images=photo.jpg,dir/ [--backbone=ViT-B_16.npz] [--top_k=3]
  python -m vadapt.main --config=configs/clip_adapter_fewshot.py --workdir=w --mode=zeroshot
  python -m vadapt.main --config=configs/clip_adapter_fewshot.py --workdir=w --mode=tip_adapter
  python -m vadapt.main --config=configs/clip_b16_adapter.py --workdir=w --mode=retrieval \
      --config.retrieval.path=captioned_images
  python -m vadapt.main --config=configs/dinov2_fashion_mnist.py --workdir=w --mode=compare
  python -m vadapt.main --config=configs/transfer_study.py --workdir=w --mode=study
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --config.task=pets   # one task
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=eval_tasks   # every task
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=predict --adapter=pets \
      --images=photo.jpg           # or --adapter=w/adapters/pets (an adapter directory)
  python -m vadapt.main --config=configs/multi_task.py --workdir=w --mode=predict \
      --manifest=requests.txt      # 'IMAGE TASK' lines, served in mixed batches
  python -m vadapt.main --help [--config=configs/vit_b16_adapter.py]   # modes, methods, options

A user error (a bad option, a missing file) prints one line and exits with status 2; -v (or
--verbosity=1) shows the traceback too.
"""

import os
import sys

# Set before TensorFlow, XLA or gRPC load: their C++ start-up logging is noise on the command line.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
os.environ.setdefault('GLOG_minloglevel', '2')
# XLA:CPU's default schedule favours concurrency and keeps about 0.5 GiB more of ViT-B/16's
# activations alive; it also undoes remat entirely (benchmarks/results/train_step_cpu.md). XLA
# reads its flags once, before JAX starts, so the CLI sets this here unless the user chose.
# GPU and TPU compilers ignore it.
_CPU_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'
if _CPU_SCHEDULER_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_CPU_SCHEDULER_FLAG}=false'.strip()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

# What each mode does, for --help; the modules are imported when the mode runs.
MODES = {
    'train': 'train (resuming from WORKDIR/checkpoints), evaluate, export the adapter',
    'eval': "evaluate the workdir's latest checkpoint on config.input's eval split",
    'export': "write the latest checkpoint's adapter as one .safetensors file (--out)",
    'predict': 'classify image files or folders (--images) with the exported adapter: top-k '
               'class names and probabilities',
    'zeroshot': "CLIP zero-shot accuracy (with the workdir's trained adapters, if any)",
    'tip_adapter': "training-free Tip-Adapter (with the workdir's trained adapters, if any)",
    'retrieval': "CLIP image-text retrieval recall (with the workdir's trained adapters, if any)",
    'compare': 'train every method of config.compare.methods at the same budget, one workdir '
               'each, and print them side by side (make demo)',
    'study': 'the transfer study of config.study: every method, learning rates chosen on '
             'validation, seeds, a data-size sweep; tables and plots (vadapt.study)',
    'eval_tasks': 'a multi-task config (config.adapters): every trained task\'s adapter on its '
                  'own eval split, one table',
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with an argument: file.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and exports go here.')
_MODE = flags.DEFINE_enum('mode', None, list(MODES), 'What to do; defaults to config.mode (train).')
_OUT = flags.DEFINE_string('out', None, 'export: the .safetensors file to write '
                           '(default WORKDIR/adapter.safetensors).')
_IMAGES = flags.DEFINE_list('images', [], 'predict: image files and/or folders of images.')
_ADAPTER = flags.DEFINE_string('adapter', None, 'predict: the exported adapter '
                               '(default WORKDIR/adapter.safetensors), an adapter directory, or '
                               'with a multi-task config a task name (default config.task).')
_BACKBONE = flags.DEFINE_string('backbone', None, 'predict: the backbone checkpoint the adapter '
                                'was trained on (default: the path stored in the adapter file).')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'predict: how many classes to print per image.')
_MANIFEST = flags.DEFINE_string('manifest', None, "predict with a multi-task config: a file of "
                                "'IMAGE TASK' lines; each image is classified by its own task, "
                                'in mixed batches (one compiled program).')

# Errors a user causes (bad options, missing or wrong files, a diverged run): one line, no
# traceback, unless verbosity asks for it.
USER_ERRORS = (ValueError, KeyError, TypeError, OSError, FloatingPointError, ImportError,
               flags.Error, app.UsageError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every save at INFO; the progress lines are printed, so keep the log quiet.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  mode = _MODE.value or (config.get('mode', 'train') if config is not None else 'train')
  if config is None and mode != 'predict':
    raise app.UsageError('--config is required, e.g. --config=configs/vit_b16_adapter.py:test.')
  if mode not in MODES:
    raise app.UsageError(f'Unknown mode {mode!r}; expected one of {", ".join(MODES)}.')
  workdir = _WORKDIR.value
  if workdir is None and not (mode == 'predict' and _ADAPTER.value):
    raise app.UsageError(f'--workdir is required for --mode={mode}.')
  adapter_is_dir = mode == 'predict' and _ADAPTER.value and os.path.isdir(_ADAPTER.value)
  manifest = mode == 'predict' and _MANIFEST.value
  if ((config is not None and 'adapters' in config) or adapter_is_dir or manifest
      or mode == 'eval_tasks'):
    _multi_task(config, workdir, mode)
  elif mode == 'train':
    from vadapt import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == 'eval':
    from vadapt import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)
  elif mode == 'export':
    from vadapt import export  # pylint: disable=g-import-not-at-top
    export.export_adapter(config, workdir, _OUT.value)
  elif mode == 'predict':
    from vadapt import predict  # pylint: disable=g-import-not-at-top
    if not _IMAGES.value:
      raise app.UsageError('--mode=predict needs --images=FILE_OR_FOLDER[,...].')
    predict.predict_cli(config, workdir, _IMAGES.value, adapter_path=_ADAPTER.value,
                        backbone=_BACKBONE.value, top_k=_TOP_K.value)
  elif mode == 'zeroshot':
    from vadapt import clip_modes  # pylint: disable=g-import-not-at-top
    clip_modes.zero_shot(config, workdir)
  elif mode == 'tip_adapter':
    from vadapt import clip_modes  # pylint: disable=g-import-not-at-top
    clip_modes.tip_adapter(config, workdir)
  elif mode == 'retrieval':
    from vadapt import retrieval  # pylint: disable=g-import-not-at-top
    retrieval.evaluate_retrieval(config, workdir)
  elif mode == 'compare':
    from vadapt import demo  # pylint: disable=g-import-not-at-top
    demo.compare(config, workdir)
  elif mode == 'study':
    from vadapt import study  # pylint: disable=g-import-not-at-top
    study.run_study(config, workdir)


def _multi_task(config, workdir, mode):
  """The modes of a multi-task config (config.adapters) and of adapter directories."""
  from vadapt import multi_task  # pylint: disable=g-import-not-at-top
  if mode not in multi_task.MODES:
    raise app.UsageError(f'--mode={mode} does not take a multi-task config (config.adapters); '
                         f'its modes: {", ".join(multi_task.MODES)}.')
  if mode == 'train':
    multi_task.train(config, workdir)
  elif mode == 'eval':
    multi_task.evaluate_tasks(config, workdir, [config.get('task')])
  elif mode == 'eval_tasks':
    multi_task.evaluate_tasks(config, workdir)
  elif mode == 'export':
    multi_task.export(config, workdir, _OUT.value)
  elif mode == 'predict' and _MANIFEST.value:
    if _IMAGES.value or _ADAPTER.value:
      raise app.UsageError('--manifest names every image and its task; drop --images and '
                           '--adapter.')
    multi_task.predict_manifest_cli(config, workdir, _MANIFEST.value, backbone=_BACKBONE.value,
                                    top_k=_TOP_K.value)
  elif mode == 'predict':
    if not _IMAGES.value:
      raise app.UsageError('--mode=predict needs --images=FILE_OR_FOLDER[,...].')
    multi_task.predict_cli(config, workdir, _IMAGES.value, adapter=_ADAPTER.value,
                           backbone=_BACKBONE.value, top_k=_TOP_K.value)


# ------------------------------------------------------------------------------ argv handling


def _flag_value(argv: list[str], name: str):
  """The value of --name=V or --name V in argv (the last one), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def add_config_root_to_path(argv: list[str]) -> None:
  """Makes `from configs import common` work in a config file run from any directory.

  The configs import their shared module as `configs.common`, so the folder above the config
  file's folder goes on sys.path (the repository root for configs/*.py).
  """
  config = _flag_value(argv, 'config')
  if not config:
    return
  path = config.split(':', 1)[0]
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if os.path.isfile(path) and root not in sys.path:
    sys.path.insert(0, root)


def _config_options(config, prefix: str = 'config') -> list[str]:
  """'--config.a.b=default' for every leaf of a ConfigDict."""
  lines = []
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, 'keys'):
      lines += _config_options(value, f'{prefix}.{key}')
    else:
      field_type = config.get_type(key) if hasattr(config, 'get_type') else type(value)
      kind = getattr(field_type, '__name__', str(field_type))
      lines.append(f'  --{prefix}.{key}={value!r}  ({kind})')
  return lines


def help_text(argv: list[str]) -> str:
  """Usage, modes, methods, flags, and the config's arguments and options when --config is given."""
  from vadapt import experiment  # pylint: disable=g-import-not-at-top
  width = max(len(m) for m in MODES)
  lines = ['Usage: python -m vadapt.main --config=CONFIG.py[:ARGS] --workdir=DIR [--mode=MODE] '
           '[--config.KEY=VALUE ...]', '', 'Modes (--mode; default config.mode, usually train):']
  lines += [f'  {m:<{width}}  {d}' for m, d in MODES.items()]
  lines += ['', 'Methods (--config.adapter.method=...):', '  ' + ', '.join(experiment.METHODS), '',
            'Flags:']
  for name in ('config', 'workdir', 'mode', 'out', 'images', 'adapter', 'backbone', 'top_k'):
    lines.append(f'  --{name}: {flags.FLAGS[name].help}')
  lines.append('  -v, --verbosity=1: show tracebacks and log messages')
  config_arg = _flag_value(argv, 'config')
  if not config_arg:
    lines += ['', 'Give --config=FILE.py with --help to list that config\'s arguments and every '
              '--config.KEY option with its default.']
    return '\n'.join(lines)
  path, _, arg = config_arg.partition(':')
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('_vadapt_help_config', path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'Config file {path!r} does not exist.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  lines += ['', f'Config {path}:', (module.__doc__ or '').strip(), '',
            'Options (--config.KEY=VALUE; defaults shown):']
  lines += _config_options(config)
  return '\n'.join(lines)


_HELP = ('-h', '--help', '--helpshort', '--helpfull', '-?')


def _verbose(argv: list[str]) -> bool:
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbosity >= 1
  value = _flag_value(argv, 'verbosity')
  try:
    return value is not None and int(value) >= 1
  except ValueError:
    return False


def one_line(error: BaseException) -> str:
  """The error's message on one line (KeyError's repr quotes dropped)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  message = ' '.join(str(message).split())
  return f'{type(error).__name__}: {message}' if message else type(error).__name__


def _set_up_logging(verbose: bool):
  """absl's log format under -v; otherwise warnings as one plain line on stderr."""
  if verbose:
    logging.use_absl_handler()  # Level, time, file and line.
    return None
  # Warnings as one plain line; absl's prefix (level, time, thread, file) only adds noise here.
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  handler = py_logging.StreamHandler(sys.stderr)
  handler.setFormatter(py_logging.Formatter('vadapt: %(levelname)s: %(message)s'))
  absl_logger = logging.get_absl_logger()
  absl_logger.addHandler(handler)
  absl_logger.propagate = False
  return handler


def run(argv=None) -> None:
  """`python -m vadapt.main`: help, flags, the mode; user errors as one line and exit status 2."""
  argv = list(sys.argv if argv is None else argv)
  # A bare -v (absl's short name for --verbosity needs a value) means --verbosity=1.
  argv = [('--verbosity=1' if a == '-v' else a) for a in argv]
  add_config_root_to_path(argv)
  try:
    if any(a in _HELP for a in argv[1:]):
      print(help_text(argv))
      sys.exit(0)
    flags.FLAGS.unparse_flags()
    saved, sys.argv = sys.argv, argv  # config_flags reads the --config.* overrides from sys.argv.
    try:
      remaining = flags.FLAGS(argv)
    finally:
      sys.argv = saved
    handler = _set_up_logging(_verbose(argv))
    try:
      main(remaining)
    finally:  # In-process runs (tests, notebooks) get their logging back.
      if handler is not None:
        logging.get_absl_logger().removeHandler(handler)
        logging.get_absl_logger().propagate = True
  except USER_ERRORS as e:
    if _verbose(argv):
      raise
    print(f'vadapt: error: {one_line(e)}\n(-v shows the traceback)', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
