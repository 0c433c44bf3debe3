"""ViT module: shapes, options and call-time errors (checkpoints are tested elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt.models import vit


def _init(model, size=32):
  return model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)))


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_output_shapes(classifier):
  model = vit.from_variant('mu/4', num_classes=7, classifier=classifier, representation_size=16)
  variables = _init(model)
  logits, feats = model.apply(variables, jnp.ones((2, 32, 32, 3)), return_features=True)
  assert logits.shape == (2, 7)
  assert feats['patches'].shape == (2, 64, 32)
  tokens = 65 if classifier == 'token' else 64
  assert feats['blocks'].shape == (2, 2, tokens, 32)
  assert feats['encoded'].shape == (2, tokens, 32)
  assert feats['pre_logits'].shape == (2, 16)


def test_scan_matches_loop_with_same_weights():
  loop = vit.from_variant('mu/4', num_classes=5)
  scan = vit.from_variant('mu/4', num_classes=5, scan=True, remat=True)
  params = _init(loop)['params']
  head = jax.random.normal(jax.random.key(1), params['head']['kernel'].shape)
  params = {**params, 'head': {**params['head'], 'kernel': head}}
  blocks = [params['Transformer'].pop(f'encoderblock_{i}') for i in range(2)]
  stacked = dict(params, Transformer=dict(params['Transformer'],
                                          encoderblock=jax.tree.map(lambda *x: jnp.stack(x), *blocks)))
  for i, b in enumerate(blocks):
    params['Transformer'][f'encoderblock_{i}'] = b
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  np.testing.assert_allclose(loop.apply({'params': params}, x),
                             scan.apply({'params': stacked}, x), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
  model = vit.from_variant('mu/4', num_classes=3, dropout_rate=0.5)
  variables = _init(model)
  x = jnp.ones((2, 32, 32, 3))
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)})


def test_unknown_variant_lists_known():
  with pytest.raises(ValueError, match='known variants:.*B/16'):
    vit.from_variant('B/17')


def test_unknown_option_is_an_error():
  with pytest.raises(TypeError, match='representaton_size'):
    vit.from_variant('mu/4', representaton_size=8)


def test_wrong_channel_count():
  model = vit.from_variant('mu/4', num_classes=3)
  variables = _init(model)
  with pytest.raises(ValueError, match=r'\(batch, height, width, 3\); found shape \(2, 32, 32, 1\)'):
    model.apply(variables, jnp.ones((2, 32, 32, 1)))


def test_wrong_image_size():
  model = vit.from_variant('mu/4', num_classes=3)
  variables = _init(model)
  with pytest.raises(ValueError, match='position embedding holds 65'):
    model.apply(variables, jnp.ones((2, 48, 48, 3)))
  with pytest.raises(ValueError, match='not divisible by the patch size 4'):
    model.apply(variables, jnp.ones((2, 30, 30, 3)))


@pytest.mark.parametrize('policy', ['nothing', 'dots'])
def test_remat_policies_keep_outputs_and_gradients(policy):
  plain = vit.from_variant('mu/4', num_classes=5)
  remat = vit.from_variant('mu/4', num_classes=5, remat=True, remat_policy=policy)
  params = _init(plain)['params']
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  loss = lambda model: lambda p: jnp.sum(model.apply({'params': p}, x, return_features=True)[1]
                                         ['encoded'] ** 2)
  np.testing.assert_allclose(loss(remat)(params), loss(plain)(params), rtol=1e-6)
  for g_remat, g_plain in zip(jax.tree.leaves(jax.grad(loss(remat))(params)),
                              jax.tree.leaves(jax.grad(loss(plain))(params))):
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-4, atol=1e-6)


def test_unknown_remat_policy():
  model = vit.from_variant('mu/4', num_classes=3, remat=True, remat_policy='everything')
  with pytest.raises(ValueError, match="Unknown remat policy 'everything'; known: \\['dots', 'nothing'\\]"):
    _init(model)


@pytest.mark.parametrize('activation', ['gelu', 'gelu_exact'])
def test_recompute_activation_keeps_the_function_and_its_gradient_and_keeps_less(activation):
  """backbone.recompute_activation: the same forward pass, the gradient to rounding, and smaller
  temporaries in the compiled gradient."""
  batch, size, patch, mlp, layers = 8, 16, 4, 256, 2
  kwargs = dict(num_classes=10, patch_size=patch, hidden_size=32, num_layers=layers, num_heads=2,
                mlp_dim=mlp, activation=activation)
  plain = vit.VisionTransformer(**kwargs)
  lean = vit.VisionTransformer(**kwargs, recompute_activation=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
  params = plain.init(jax.random.PRNGKey(0), x)['params']

  def grad_of(model):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({'params': p}, x) ** 2)))

  np.testing.assert_array_equal(jax.jit(plain.apply)({'params': params}, x),
                                jax.jit(lean.apply)({'params': params}, x))
  g_plain, g_lean = grad_of(plain)(params, x), grad_of(lean)(params, x)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_lean)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
  # What the gradient of every weight (full fine-tuning) keeps of the MLP hidden: Dense_1's weight
  # gradient reads the activation's output, recomputed from Dense_0's matmul output, the one
  # hidden-sized array a block kept. (XLA's step memory is not asserted: at real sizes it drops
  # 12-21% for ViT-Ti/S/B, benchmarks/results/ab_step_cpu_amd.md, but on a model this small the
  # memory-ordered scheduler's plan for the rematerialised MLP can come out a few percent larger.)
  assert _hidden_residuals(lean, params, x, mlp) == ['dot_general'] * layers
  assert len(_hidden_residuals(plain, params, x, mlp)) > layers


def _hidden_residuals(model, params, x, width):
  """The primitives whose [B, T, width] outputs the gradient keeps for its backward pass (from
  jax.ad_checkpoint.print_saved_residuals: 'f32[2,17,256] output of dot_general from ...')."""
  import contextlib, io, re  # pylint: disable=g-import-not-at-top,g-multiple-import
  from jax.ad_checkpoint import print_saved_residuals  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(
        lambda p: jnp.sum(model.apply({'params': p}, x) ** 2), params)
  return re.findall(rf'^\w+\[\d+,\d+,{width}\] output of (\w+)', out.getvalue(), re.M)


@pytest.mark.parametrize('method,options', [
    ('pfeiffer', dict(bottleneck=4)),  # An adapter on the MLP's output, inside its remat.
    ('lora', dict(rank=2, modules=('fc1', 'fc2'))),  # Low-rank updates of both MLP matmuls.
    ('ia3', dict(modules=('fc2',))),  # A scale on the activation's output (Dense_1's input).
])
def test_recompute_activation_with_adapters_in_the_mlp(method, options):
  """Methods placed inside the recomputed MLP: the same forward pass and gradients."""
  from vadapt import api  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_classes=10, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                mlp_dim=64)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  plain = api.adapt(vit.VisionTransformer(**kwargs), method, **options)
  lean = api.adapt(vit.VisionTransformer(**kwargs, recompute_activation=True), method, **options)
  params = plain.init(jax.random.PRNGKey(0), x)['params']
  # Adapters away from their identity init, so their gradients reach the backbone's.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                        params)
  assert jax.tree.map(jnp.shape, lean.init(jax.random.PRNGKey(0), x)['params']) == (
      jax.tree.map(jnp.shape, params))
  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))
  (l_plain, g_plain), (l_lean, g_lean) = loss(plain)(params), loss(lean)(params)
  np.testing.assert_allclose(l_lean, l_plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_lean)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_recompute_activation_from_the_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vadapt import backbones  # pylint: disable=g-import-not-at-top
  base = {'image_size': 32, 'dtype': 'float32', 'recompute_activation': True}
  model = backbones.make_model(ml_collections.ConfigDict(
      {**base, 'model': 'vit', 'variant': 'mu/4'}), 10)
  assert model.recompute_activation
  clip = backbones.make_model(ml_collections.ConfigDict(
      {**base, 'model': 'clip', 'variant': 'tiny'}), 2, class_names=['a', 'b'])
  assert clip.clip.recompute_activation
  with pytest.raises(ValueError, match=r"transformer MLP activations .*found backbone.model="
                                       r"'resnet'"):
    backbones.make_model(ml_collections.ConfigDict({**base, 'model': 'resnet', 'variant': '18'}),
                         10)
