"""A scheduled AdapterDrop rate: the linear ramp, its effect on training calls, a resumed run that
stays bit-identical, and bad settings."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_overrides import load_config
from vadapt import api, experiment, inject, train
from vadapt import checkpoint as ckpt_lib
from vadapt.models import vit
from vadapt.pretrained.common import flatten, unflatten


def test_linear_ramp_values():
  rate = lambda schedule, ramp, step: float(inject.drop_rate_at(0.4, schedule, ramp, step))
  assert [rate('linear', 8, s) for s in (0, 2, 4, 8, 9, 100)] == pytest.approx(
      [0.0, 0.1, 0.2, 0.4, 0.4, 0.4])
  assert rate('constant', 0, 0) == rate('constant', 0, 50) == pytest.approx(0.4)
  # Traced steps (inside the jitted train step) give the same values.
  assert float(jax.jit(lambda s: inject.drop_rate_at(0.4, 'linear', 8, s))(2)) == pytest.approx(
      0.1)


@pytest.fixture(scope='module')
def lora_vit():
  """mu/4 with LoRA (perturbed, so adapters change the output) under a linear AdapterDrop ramp."""
  model = vit.from_variant('mu/4', num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  bb = jax.jit(model.init)(jax.random.key(1), x)['params']
  bb['head']['kernel'] = jax.random.normal(jax.random.key(4), bb['head']['kernel'].shape)
  adapted = api.adapt(model, 'lora', rank=2, drop_rate=0.6, drop_schedule='linear',
                      drop_ramp_steps=10)
  flat = flatten(api.init_with_pretrained(adapted, bb, jax.random.key(2), x))
  keys = jax.random.split(jax.random.key(3), len(flat))
  params = unflatten({k: v + 0.3 * jax.random.normal(key, v.shape) if '/lora/' in k else v
                      for key, (k, v) in zip(keys, flat.items())})
  return adapted, params, x


def test_rate_follows_the_step(lora_vit):
  adapted, params, x = lora_vit
  every = np.asarray(jax.jit(adapted.apply)({'params': params}, x))  # Eval: no step needed.
  run = jax.jit(lambda rng, step: adapted.apply({'params': params}, x, train=True,
                                                rngs={'dropout': rng}, adapter_step=step))
  keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(12)]
  kept = lambda out: np.allclose(out, every, rtol=1e-5, atol=1e-5)
  # Step 0: rate 0, every adapter kept whatever the key (the same output, bit for bit; equal to
  # the evaluation call's up to the two graphs' rounding).
  first = np.asarray(run(keys[0], 0))
  assert np.abs(every).max() > 0.1 and kept(first)
  for key in keys[1:]:
    np.testing.assert_array_equal(run(key, 0), first)
  # At the end of the ramp (rate 0.6) most keys drop some layer; a (key, step) pair decides.
  late = [np.asarray(run(key, 10)) for key in keys]
  assert sum(not kept(out) for out in late) >= 6
  np.testing.assert_array_equal(run(keys[3], 10), late[3])
  with pytest.raises(ValueError, match=r"drop_schedule='linear' sets the AdapterDrop rate from the "
                     r'training step: call the model with adapter_step=<step>'):
    adapted.apply({'params': params}, x, train=True, rngs={'dropout': keys[0]})


def test_resumed_run_with_a_ramp_is_bit_identical(tmp_path, capsys):
  config = load_config(**{'mesh.num_devices': 1, 'total_steps': 4, 'checkpoint_every': 2,
                          'max_to_keep': 5, 'adapter.method': 'lora', 'adapter.rank': 2,
                          'adapter.drop_rate': 0.5, 'adapter.drop_schedule': 'linear'})
  model, _ = experiment.build_model(config, 10)
  assert (model.drop_schedule, model.drop_ramp_steps) == ('linear', 4)  # 0: total_steps.
  assert experiment.adapter_spec(config)['drop_ramp_steps'] == 0
  work = tmp_path / 'work'
  uninterrupted = train.train_and_evaluate(config, str(work))
  killed = tmp_path / 'killed'
  shutil.copytree(work, killed)
  shutil.rmtree(killed / 'checkpoints' / '4')
  assert ckpt_lib.Checkpointer(str(killed)).latest_step() == 2
  resumed = train.train_and_evaluate(config, str(killed))
  assert 'Resumed from the checkpoint at step 2' in capsys.readouterr().out
  meta = ckpt_lib.Checkpointer(str(killed)).restore_meta(4)
  assert (meta['adapter']['drop_schedule'], meta['adapter']['drop_rate']) == ('linear', 0.5)
  a, b = flatten(uninterrupted.delta), flatten(resumed.delta)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert any('/lora/b' in k and np.any(v) for k, v in a.items())


def test_bad_schedules():
  model = vit.from_variant('mu/4', num_classes=10)
  with pytest.raises(ValueError, match=r"Unknown drop_schedule 'cosine'; expected one of "
                     r"\('constant', 'linear'\)"):
    api.adapt(model, 'lora', drop_rate=0.1, drop_schedule='cosine')
  with pytest.raises(ValueError, match=r"drop_schedule='linear' ramps the AdapterDrop rate from 0 "
                     'up to drop_rate, which is 0'):
    api.adapt(model, 'lora', drop_schedule='linear', drop_ramp_steps=5)
  with pytest.raises(ValueError, match=r"drop_schedule='linear' needs drop_ramp_steps, .* as a "
                     'positive integer; found 0'):
    api.adapt(model, 'houlsby', bottleneck=4, drop_rate=0.1, drop_schedule='linear')
  with pytest.raises(ValueError, match=r"drop_ramp_steps=5 applies to drop_schedule='linear' "
                     "only; found drop_schedule='constant'"):
    api.adapt(model, 'lora', drop_rate=0.1, drop_ramp_steps=5)
  # From the config, before anything is loaded.
  config = load_config(**{'adapter.method': 'lora', 'adapter.drop_schedule': 'linear'})
  with pytest.raises(ValueError, match="drop_schedule='linear' ramps the AdapterDrop rate"):
    experiment.adapter_spec(config)
  config = load_config(**{'adapter.method': 'vpt_deep', 'adapter.drop_schedule': 'linear'})
  with pytest.raises(ValueError, match="adapter.drop_schedule='linear' schedules AdapterDrop, "
                     "which adapter.method='vpt_deep' does not use"):
    experiment.adapter_spec(config)
  with pytest.raises(ValueError, match=r'drop_rate \(AdapterDrop\) must be in \[0, 1\); found 1.5'):
    inject.Adapted(model, (), drop_rate=1.5).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
