"""bfloat16 compute (backbone.dtype='bfloat16') against float32 on the tiny ViT.

Params, the trainable delta, the optimizer state and the loss stay float32; the backbone's matmuls
run in bfloat16. Stated bounds: logits within 3% of the float32 logits' largest magnitude, and
each of 12 training steps' loss within 2% of the float32 run's (Houlsby adapters, one batch).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import api
from vadapt import experiment
from vadapt import partition
from vadapt import train
from config_overrides import load_config

NUM_CLASSES = 10
BATCH = 16
STEPS = 12
LOGIT_BOUND = 0.03  # max |bf16 - f32| / max |f32|
LOSS_BOUND = 0.02   # |bf16 - f32| / f32, every step


def _config(dtype, method='houlsby'):
  return load_config(**{'backbone.dtype': dtype, 'adapter.method': method,
                        'mesh.num_devices': 1, 'optimizer.learning_rate': 3e-3,
                        'schedule.warmup_steps': 0, 'total_steps': STEPS})


@pytest.fixture(scope='module')
def setup():
  """Shared params (a random backbone with a random head, so logits are not all zero) + batch."""
  config = _config('float32')
  model, backbone = experiment.build_model(config, NUM_CLASSES)
  size = config.backbone.image_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(BATCH, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH), jnp.int32)
  bb = backbone.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
  bb = {**bb, 'head': {'kernel': jax.random.normal(jax.random.PRNGKey(1),
                                                  bb['head']['kernel'].shape) * 0.5,
                       'bias': bb['head']['bias']}}
  params = api.init_with_pretrained(model, bb, jax.random.PRNGKey(2), images[:1])
  # Non-zero up-projections, so the adapters take part in the forward pass being compared.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(p)), x.shape)
      if 'up' in str(p) and 'adapter' in str(p) else x, params)
  return {'params': params, 'images': images, 'labels': labels}


def _models(dtype):
  config = _config(dtype)
  model, _ = experiment.build_model(config, NUM_CLASSES)
  return config, model


def test_bf16_switch_computes_matmuls_in_bf16_and_keeps_f32_params(setup):
  config, model = _models('bfloat16')
  images = setup['images']
  # The same f32 params serve both dtypes: init in bf16 compute still creates f32 params.
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images[:1], train=False))
  assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, images))(setup['params']))
  dots = [line for line in jaxpr.splitlines() if 'dot_general' in line]
  assert dots and sum('bf16' in line for line in dots) >= len(dots) // 2, jaxpr[:2000]
  # The float32 model has no bf16 anywhere.
  _, model32 = _models('float32')
  assert 'bf16' not in str(jax.make_jaxpr(
      lambda p: model32.apply({'params': p}, images))(setup['params']))
  del config


def test_bf16_logits_within_bound_of_f32(setup):
  out = {}
  for dtype in ('float32', 'bfloat16'):
    _, model = _models(dtype)
    out[dtype] = np.asarray(jax.jit(lambda p, x, m=model: m.apply({'params': p}, x))(
        setup['params'], setup['images']), np.float32)
  scale = np.max(np.abs(out['float32']))
  assert scale > 0.5  # Non-trivial logits.
  err = np.max(np.abs(out['bfloat16'] - out['float32'])) / scale
  assert 1e-5 < err < LOGIT_BOUND, err  # Really rounded, and within the bound.
  agree = np.mean(np.argmax(out['bfloat16'], -1) == np.argmax(out['float32'], -1))
  assert agree >= 0.9


def _train(dtype, setup):
  config, model = _models(dtype)
  params = setup['params']
  labels = partition.label_tree(params, experiment.label_rules(config))
  delta, frozen = partition.split(params, labels)
  delta_labels, _ = partition.split(labels, labels)
  schedule = experiment.make_schedule(config)
  tx = experiment.make_optimizer(config, delta_labels, schedule)
  opt_state = tx.init(delta)
  step = jax.jit(train.make_train_step(model, tx, schedule, num_classes=NUM_CLASSES,
                                       label_smoothing=0.0, seed=0))
  batch = {'image': setup['images'], 'label': setup['labels']}
  losses = []
  for i in range(STEPS):
    delta, opt_state, m = step(delta, opt_state, frozen, batch, i)
    assert m['loss'].dtype == jnp.float32
    losses.append(float(m['loss']))
  return np.asarray(losses), delta, opt_state


def test_bf16_training_loss_curve_close_to_f32_and_state_stays_f32(setup):
  loss32, _, _ = _train('float32', setup)
  loss16, delta16, opt16 = _train('bfloat16', setup)
  assert loss32[-1] < 0.8 * loss32[0]  # It learns (one batch, memorised).
  rel = np.abs(loss16 - loss32) / loss32
  assert np.all(rel < LOSS_BOUND), (loss32, loss16)
  assert np.any(loss16 != loss32)  # Really a different computation.
  dtypes = {x.dtype for x in jax.tree.leaves((delta16, opt16)) if jnp.issubdtype(x.dtype,
                                                                                   jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
