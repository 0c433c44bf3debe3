"""Runs `python -m vadapt.main ARGS` in-process, as absl would, for tests."""

import sys
from unittest import mock

from absl import flags
from absl.testing import flagsaver

from vadapt import main


def parse_flags(argv):
  """Parses ['--config=...', ...] into absl's FLAGS (call inside flagsaver.flagsaver())."""
  # config_flags reads the --config.* overrides from sys.argv itself.
  argv = ['vadapt.main'] + list(argv)
  with mock.patch.object(sys, 'argv', argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)


def run_main(argv):
  """vadapt.main with these flags; FLAGS are restored afterwards."""
  with flagsaver.flagsaver():
    parse_flags(argv)
    main.main(['vadapt.main'])


def run_cli(argv) -> int:
  """`python -m vadapt.main ARGS` as a user runs it (help, one-line errors): the exit status."""
  with flagsaver.flagsaver():
    try:
      main.run(['vadapt.main'] + list(argv))
    except SystemExit as e:
      return 0 if e.code is None else int(e.code)
    finally:
      flags.FLAGS.unparse_flags()
  return 0
