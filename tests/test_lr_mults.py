"""optimizer.lr_mults: per-parameter learning-rate factors by path (big_vision's lr_mults)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from configs import vit_b16_adapter
from tests import cli_runner
from vadapt import experiment
from vadapt import partition

PARAMS = {'head': {'kernel': jnp.full((3, 2), 0.5), 'bias': jnp.zeros(2)},
          'Transformer': {'block': {'kernel': jnp.full((3, 3), 0.25)}}}
GRADS = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), PARAMS)


def labels(method):
  if method == 'full':
    return jax.tree.map(lambda _: 'full', PARAMS)
  return {'head': {'kernel': 'head', 'bias': 'head'},
          'Transformer': {'block': {'kernel': 'frozen'}}}


def step(config, method):
  schedule = experiment.make_schedule(config)
  tx = experiment.make_optimizer(config, labels(method), schedule)
  updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  return updates


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_a_factor_is_that_parameters_learning_rate_times_the_factor(name):
  c = vit_b16_adapter.get_config('test')
  c.optimizer.name = name
  c.schedule.warmup_steps = 0
  c.schedule.decay = 'constant'
  c.grad_clip_norm = 0.0
  base = step(c, 'full')
  c.optimizer.lr_mults = (('^head/', 10.0),)
  scaled = step(c, 'full')
  np.testing.assert_allclose(scaled['head']['kernel'], 10 * base['head']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(scaled['head']['bias'], 10 * base['head']['bias'], rtol=1e-6)
  np.testing.assert_array_equal(scaled['Transformer']['block']['kernel'],
                                base['Transformer']['block']['kernel'])  # No match: untouched.
  assert np.abs(base['head']['kernel']).max() > 0
  # Same as building the optimizer at ten times the rate, for the matched leaves.
  c.optimizer.lr_mults = ()
  c.optimizer.learning_rate *= 10
  np.testing.assert_allclose(step(c, 'full')['head']['kernel'], scaled['head']['kernel'],
                             rtol=1e-6)


def test_first_matching_rule_wins_and_frozen_leaves_stay_zero():
  rules = (('kernel$', 3.0), ('^head/', 100.0))
  tx = partition.scale_by_path(rules, labels('linear'))
  ones = jax.tree.map(jnp.ones_like, PARAMS)
  out, _ = tx.update(ones, tx.init(PARAMS))
  assert float(out['head']['kernel'][0, 0]) == 3.0 and float(out['head']['bias'][0]) == 100.0
  c = vit_b16_adapter.get_config('test')
  c.optimizer.lr_mults = (('^head/', 5.0),)
  frozen = step(c, 'linear')['Transformer']['block']['kernel']
  np.testing.assert_array_equal(frozen, np.zeros((3, 3)))


@pytest.mark.parametrize('rules, message', [
    ((('^head/(', 2.0),), 'not a valid regex'),
    ((('^head/', 0.0),), 'must be positive'),
    ((('^Transformer/', 2.0),), 'matches no trainable parameter'),  # Frozen under 'linear'.
    ((('^head/',),), r'\(regex, factor\) pairs'),
])
def test_bad_rules_are_refused_before_any_step(rules, message):
  with pytest.raises(ValueError, match=message):
    partition.scale_by_path(rules, labels('linear'))


def test_the_command_line_sets_it():
  with flagsaver.flagsaver():
    cli_runner.parse_flags(['--config=configs/vit_b16_adapter.py:test',
                            "--config.optimizer.lr_mults=(('^head/', 10.0),)"])
    assert tuple(flags.FLAGS.config.optimizer.lr_mults) == (('^head/', 10.0),)
    flags.FLAGS.unparse_flags()
