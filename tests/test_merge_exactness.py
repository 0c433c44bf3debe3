"""How exact merging is, measured against float64 evaluations of the same weights.

Merging LoRA, DoRA, SSF or (IA)³ into a ViT-Ti/16's kernels replaces one f32 computation
(frozen layer + adapter) with another (the folded layer). Compared with each other, the two f32
models' logits differ by 0.5-1.9e-6 relative (max|Δ| / max|ref|; ViT-Ti/16 at 224 and 32 px,
six draws of weights and adapters), so a 1e-6 bound between them does not hold at this depth. To
tell where the difference comes from, every model here is also run in float64 on the very same
(f32) weights:

  truth      the adapted model in float64: what the adapted f32 model approximates;
  fold       the bare backbone in float64 on the merged f32 weights: what merging changed (each
             merged weight rounded to f32) with no f32 forward rounding at all.

Asserted, per method:
  1. Merging computes each merged weight in float64 and rounds it once: a merged kernel equals
     the correctly rounded float64 fold bit for bit (checked for LoRA against numpy's
     W + s A B; then the order of the terms does not matter).
  2. The fold itself is exact within MERGE_RTOL = 1e-6 relative: |fold - truth| (measured
     0.3-2.5e-7 over those draws).
  3. In f32 the merged model is as close to the truth as the adapted model is:
     err(merged f32) <= F32_RATIO * err(adapted f32), both against the truth (measured ratios
     0.5-2.0; each error 0.4-1.6e-6).
So the remaining merged-vs-adapted gap is the f32 rounding of two different but equally exact
forward computations, which no merge can remove. test_weight_methods.py bounds that gap directly
(1e-6) on a 2-block ViT, where it holds.

Unmerging (LoRA, SSF, (IA)³) subtracts or divides in float64 and rounds once. For LoRA that
restores a weight bit for bit wherever the merged weight is in a finer binade than the original
(its rounding error is then below half an ulp of the original) and within half an ulp of each
elsewhere; for the multiplicative methods a kernel weight comes back within one ulp.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import api, merge
from vadapt.models import vit
from vadapt.pretrained.common import flatten, unflatten

MERGE_RTOL = 1e-6
F32_RATIO = 3.0
KERNELS = ('query', 'key', 'value', 'out', 'fc1', 'fc2')
METHODS = {
    'lora': dict(rank=4, alpha=8, modules=KERNELS),
    'dora': dict(rank=4, alpha=8, modules=KERNELS),
    'ssf': {},
    'ia3': dict(modules=KERNELS),
}
# ViT-Ti/16 (12 blocks of width 192) on 32x32 images: the depth and width the f32 rounding
# accumulates over, at 5 tokens so the float64 runs stay cheap; nn.scan over the blocks (one block
# to compile; merging handles the stacked layout).
VARIANT, IMAGE, VIT = 'Ti/16', 32, dict(num_classes=10, scan=True)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def float64():
  """A float64 context (the ViT's attention softmax keeps float64: only narrower compute dtypes
  are raised to float32 for it)."""
  return jax.enable_x64


@pytest.fixture(scope='module')
def setup():
  model = vit.from_variant(VARIANT, **VIT)
  images = np.asarray(jax.random.normal(jax.random.key(2), (2, IMAGE, IMAGE, 3), jnp.float32))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), params['head']['kernel'].shape)
  return model, params, images, _run(model, flatten(params), images, jnp.float32)


def _adapted_params(adapted, bb_params, images, method):
  """Trained-looking adapters: every adapter leaf moved off its initial value."""
  flat = flatten(api.init_with_pretrained(adapted, bb_params, jax.random.key(4), images))
  rng = np.random.default_rng(5)
  return {k: np.asarray(v) + (0.1 * rng.standard_normal(v.shape, np.float32)
                              if f'/{method}/' in k else 0) for k, v in flat.items()}


def _run(model, flat, images, dtype):
  params = unflatten({k: jnp.asarray(v, dtype) for k, v in flat.items()})
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(
      params, jnp.asarray(images, dtype)))


@pytest.mark.parametrize('method', sorted(METHODS))
def test_merged_model_is_as_exact_as_the_adapted_model(method, setup, float64):
  model, bb_params, images, bare = setup
  adapted = api.adapt(model, method, **METHODS[method])
  flat = _adapted_params(adapted, bb_params, images, method)
  merged = flatten(merge.merge(adapted, unflatten(flat)))
  adapted_f32 = _run(adapted, flat, images, jnp.float32)
  merged_f32 = _run(model, merged, images, jnp.float32)
  with float64(True):
    model64 = vit.from_variant(VARIANT, **VIT, dtype=jnp.float64, param_dtype=jnp.float64)
    adapted64 = api.adapt(model64, method, **METHODS[method])
    truth = _run(adapted64, flat, images, jnp.float64)
    fold = _run(model64, merged, images, jnp.float64)
  assert truth.dtype == np.float64
  assert _rel(truth, bare) > 1e-2  # The adapters matter.
  err_adapted, err_merged = _rel(adapted_f32, truth), _rel(merged_f32, truth)
  print(f'\n{method} on {VARIANT} at {IMAGE} px, relative to float64: fold {_rel(fold, truth):.1e}'
        f'; f32 adapted {err_adapted:.2e}, f32 merged {err_merged:.2e}; merged vs adapted '
        f'{_rel(merged_f32, adapted_f32):.2e}')
  assert _rel(fold, truth) <= MERGE_RTOL
  assert err_merged <= F32_RATIO * err_adapted

  if method == 'lora':  # One rounding of the exact W + s A B, bit for bit.
    for layer in {k.rpartition('/lora/')[0] for k in flat if '/lora/' in k}:
      w = flat[f'{layer}/kernel']
      a, b = (flat[f'{layer}/lora/{n}'].astype(np.float64) for n in 'ab')
      n = w.shape[0]  # nn.scan's layer axis leads every leaf.
      delta = (a.reshape(n, -1, a.shape[-1]) @ b.reshape(n, b.shape[1], -1)).reshape(w.shape)
      scale = METHODS['lora']['alpha'] / METHODS['lora']['rank']
      want = (w.astype(np.float64) + scale * delta).astype(np.float32)
      np.testing.assert_array_equal(merged[f'{layer}/kernel'], want, err_msg=layer)


@pytest.mark.parametrize('method', ['lora', 'ssf', 'ia3'])
def test_unmerge_restores_within_the_rounding_of_the_merged_weight(method, setup):
  model, bb_params, images, _ = setup
  adapted = api.adapt(model, method, **METHODS[method])
  flat = _adapted_params(adapted, bb_params, images, method)
  params = unflatten(flat)
  bare = merge.merge(adapted, params)
  restored = flatten(merge.unmerge(adapted, bare, merge.adapter_params(adapted, params)))
  merged = flatten(bare)
  assert set(restored) == set(flat)
  exact = total = 0
  for path, w in flat.items():
    got = np.asarray(restored[path])
    if f'/{method}/' in path or np.array_equal(merged[path], w):
      np.testing.assert_array_equal(got, w, err_msg=path)
      continue
    w_merged = np.asarray(merged[path])
    exact += int(np.sum(got == w))
    total += w.size
    if method == 'lora':
      finer = np.spacing(np.abs(w_merged)) < np.spacing(np.abs(w))
      np.testing.assert_array_equal(got[finer], w[finer], err_msg=path)
      bound = (np.spacing(np.abs(w_merged)) + np.spacing(np.abs(w))) / 2
    elif path.endswith('/kernel'):
      bound = np.spacing(np.abs(w))
    else:  # SSF's bias b γ + β: half an ulp of the merged bias, divided by γ, plus one rounding.
      scale = np.asarray(flat[f'{path.rpartition("/")[0]}/ssf/scale'])
      bound = np.spacing(np.abs(w_merged)) / (2 * np.abs(scale)) + np.spacing(np.abs(w))
    assert np.all(np.abs(got - w) <= bound), path
  print(f'\n{method}: unmerge restores {exact / total:.1%} of the merged weights bit for bit')
  assert exact > 0
