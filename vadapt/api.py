"""One-call entry points: add adapters to a backbone, and initialise them on pre-trained weights.

  model = api.adapt(vit.from_variant('B/16', num_classes=10), 'houlsby', bottleneck=64)
  params = api.init_with_pretrained(model, backbone_params, jax.random.key(0),
                                    jnp.zeros((1, 224, 224, 3)))

`backbone_params` and the result are the 'params' collection (a nested dict). Models with more
collections (a ResNet's 'batch_stats') pass them as `backbone_state` and get full variables back.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt import inject
from vadapt import placements
from vadapt.adapters.bottleneck import BottleneckConfig
from vadapt.adapters.conv import ConvAdapterConfig
from vadapt.adapters.dora import DoRAConfig
from vadapt.adapters.ia3 import IA3Config
from vadapt.adapters.lora import LoRAConfig
from vadapt.adapters.prompts import PromptConfig
from vadapt.adapters.ssf import SSFConfig
from vadapt.inject import Adapted, Target
from vadapt.inject import Adapted as _Adapted
from vadapt.pretrained.common import check_matches, flatten, unflatten

# Methods that change what a layer's weights compute; vadapt.merge folds them into the backbone.
WEIGHT_METHODS = ('lora', 'dora', 'ssf', 'ia3')
PROMPT_METHODS = ('vpt_shallow', 'vpt_deep')
CNN_METHODS = ('conv', 'conv_parallel')
# What has a default placement on vadapt's CNNs: conv adapters at the residual blocks, LoRA/DoRA
# on the convolutions inside them (placements.cnn_lora), BitFit on the BatchNorm shifts and head.
ON_CNN = CNN_METHODS + ('lora', 'dora', 'bitfit')
# BitFit adds no modules: it is a labelling (partition.bitfit_rules).
METHODS = (('houlsby', 'pfeiffer', 'parallel', 'parallel_attn') + CNN_METHODS + WEIGHT_METHODS
           + PROMPT_METHODS + ('bitfit',))

# AdaptFormer's defaults for the parallel methods (Chen et al., 2022): s = 0.1, LayerNorm inside.
_PARALLEL_DEFAULTS = {'scale': 0.1, 'layer_norm': True}


def adapt(backbone: nn.Module, method: str = 'houlsby', *, bottleneck: Optional[int] = None,
          reduction_factor: Optional[float] = None, layers: placements.Layers = None,
          activation: str = 'relu', scale: Optional[float] = None, learnable_scale: bool = False,
          layer_norm: Optional[bool] = None, dropout: float = 0.0,
          targets: Optional[Iterable[Union[Target, str]]] = None,
          scope: Optional[str] = None, drop_rate: float = 0.0, rank: Optional[int] = None,
          alpha: Optional[float] = None,
          modules: Optional[Iterable[str]] = None, prompts: Optional[int] = None,
          drop_schedule: str = 'constant', drop_ramp_steps: int = 0) -> Adapted:
  """Wraps `backbone` with adapters placed by `method`.

  Args:
    backbone: a Flax model; ViT/CLIP blocks for the transformer methods, vadapt.models.resnet or
      vadapt.models.efficientnet for 'conv' / 'conv_parallel' and for 'lora', 'dora' (on the
      convolutions of the blocks) and 'bitfit', or any compact model with explicit `targets`.
    method: 'houlsby', 'pfeiffer', 'parallel' (AdaptFormer), 'parallel_attn'; for CNNs 'conv'
      (after each residual block) or 'conv_parallel' (alongside it); a weight-space method
      ('lora', 'dora', 'ssf', 'ia3'; vadapt.merge folds them into the backbone), visual prompts:
      'vpt_shallow', 'vpt_deep' (vadapt.adapters.prompts), or 'bitfit' (no modules: train with
      partition.bitfit_rules).
    bottleneck: adapter hidden width (give this or reduction_factor).
    reduction_factor: hidden width = input width // reduction_factor.
    layers: None (all blocks), block indices, or placements.skip_lowest(k). Not for scan models.
    activation: 'relu', 'gelu' or 'quick_gelu'.
    scale: output multiplier; defaults to 0.1 for the parallel methods, else 1.0.
    learnable_scale: train the scale.
    layer_norm: LayerNorm inside the adapter; defaults to on for the parallel methods.
    dropout: adapter dropout (active when the model is called with train=True); for VPT, the
      prompt dropout.
    targets: instead of `method`'s placement, these Targets, or module-path regexes that get the
      adapter described by the other options ('parallel' position for the parallel methods).
    scope: regex for the encoder whose blocks the transformer methods adapt; by default every
      module named 'Transformer' (both CLIP towers); e.g. 'vision/Transformer' for CLIP's image
      tower only.
    drop_rate: AdapterDrop during training: each layer's adapters are left out of a training
      call with this probability (see vadapt.inject); with a schedule, the rate it reaches.
    drop_schedule: 'constant', or 'linear': the rate rises from 0 at step 0 to drop_rate at
      step drop_ramp_steps (training calls then pass adapter_step=; vadapt.train does).
    drop_ramp_steps: the linear ramp's length in steps.
    rank: LoRA/DoRA rank r (default 8).
    alpha: LoRA/DoRA scale numerator: the update is alpha / rank * B A (default alpha = rank).
    modules: the block layers a weight-space method adapts, names from
      placements.BLOCK_LAYERS ('query', 'key', 'value', 'out', 'fc1', 'fc2', 'norm1',
      'norm2'). Defaults: LoRA/DoRA query and value; SSF all eight; (IA)³ key, value and fc2
      (its input, the MLP hidden). On a CNN, LoRA/DoRA take convolution names from
      placements.CNN_CONVS, all of them by default.
    prompts: VPT's prompt count per set (the VPT methods only).

  Returns:
    An inject.Adapted module; its backbone params keep their paths.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown adaptation method {method!r}; known methods: {", ".join(METHODS)}.')
  inject.check_drop(drop_rate, drop_schedule, drop_ramp_steps)
  # Every model built below carries the AdapterDrop rate and schedule.
  Adapted = functools.partial(  # pylint: disable=invalid-name
      _Adapted, drop_rate=drop_rate, drop_schedule=drop_schedule, drop_ramp_steps=drop_ramp_steps)
  targets = None if targets is None else tuple(targets)
  if targets is not None and all(isinstance(t, Target) for t in targets):
    given = {k: v for k, v in dict(bottleneck=bottleneck, reduction_factor=reduction_factor,
                                   layers=layers).items() if v is not None}
    if given:
      raise ValueError(f'Options {sorted(given)} would be ignored: the given Targets already '
                       'carry their adapter configs.')
    return Adapted(backbone=backbone, targets=targets)
  _check_family(backbone, method, targets)
  if prompts is not None and method not in PROMPT_METHODS:
    raise ValueError(f'prompts={prompts!r} is an option of the VPT methods, not of {method!r}.')
  if method == 'bitfit':
    given = {k: v for k, v in dict(
        bottleneck=bottleneck, reduction_factor=reduction_factor, layers=layers, scale=scale,
        layer_norm=layer_norm, targets=targets, rank=rank, alpha=alpha, modules=modules,
        learnable_scale=learnable_scale or None, dropout=dropout or None,
        drop_rate=drop_rate or None, prompts=prompts).items()
        if v is not None}
    if given:
      raise ValueError(f"Options {sorted(given)} do not apply to 'bitfit', which adds no modules "
                       '(it trains the biases: partition.bitfit_rules).')
    return Adapted(backbone=backbone, targets=())
  if method in WEIGHT_METHODS:
    return _adapt_weights(Adapted, backbone, method, rank=rank, alpha=alpha, dropout=dropout,
                          modules=modules, layers=layers, targets=targets, scope=scope,
                          unused=dict(bottleneck=bottleneck, reduction_factor=reduction_factor,
                                      scale=scale, layer_norm=layer_norm,
                                      learnable_scale=learnable_scale or None))
  unused = {k: v for k, v in dict(rank=rank, alpha=alpha, modules=modules).items()
            if v is not None}
  if unused:
    raise ValueError(f'Options {sorted(unused)} apply to the weight-space methods '
                     f'{WEIGHT_METHODS}, not to {method!r}.')
  if method in PROMPT_METHODS:
    return Adapted(backbone=backbone, targets=_vpt_targets(
        backbone, method, prompts=prompts, layers=layers, dropout=dropout, scope=scope,
        drop_rate=drop_rate, others=dict(bottleneck=bottleneck, reduction_factor=reduction_factor,
                                         targets=targets)))

  parallel = method in ('parallel', 'parallel_attn')
  defaults = _PARALLEL_DEFAULTS if parallel else {'scale': 1.0, 'layer_norm': False}
  scale = defaults['scale'] if scale is None else scale
  layer_norm = defaults['layer_norm'] if layer_norm is None else layer_norm

  if method in CNN_METHODS:
    if learnable_scale:
      raise ValueError(f'learnable_scale is not supported by method {method!r}.')
    config = ConvAdapterConfig(bottleneck=bottleneck, reduction_factor=reduction_factor,
                               activation=activation, layer_norm=layer_norm, dropout=dropout,
                               scale=scale)
  else:
    config = BottleneckConfig(bottleneck=bottleneck, reduction_factor=reduction_factor,
                              activation=activation, layer_norm=layer_norm, dropout=dropout,
                              scale=scale, learnable_scale=learnable_scale)

  if targets is not None:
    if layers is not None:
      raise ValueError('layers selects blocks for a named placement; with explicit targets put '
                       'the selection into the patterns.')
    bad = [t for t in targets if not isinstance(t, str)]
    if bad:
      raise TypeError(f'targets must all be Targets or all be regex strings; found {bad[:3]}.')
    position = 'parallel' if parallel or method == 'conv_parallel' else 'output'
    return Adapted(backbone=backbone, targets=tuple(
        Target(pattern=p, adapter=config, position=position) for p in targets))

  if method in CNN_METHODS:
    return Adapted(backbone=backbone, targets=placements.CNN_PLACEMENTS[method](
        config, layers=layers))

  num_layers = getattr(backbone, 'num_layers', None)
  if isinstance(num_layers, int) and layers is not None and not isinstance(
      layers, placements.SkipLowest):
    missing = sorted(i for i in set(layers) if not 0 <= i < num_layers)
    if missing:
      raise ValueError(f'layers={tuple(layers)} names block(s) {missing} that the backbone does '
                       f'not have: it has {num_layers} blocks, indices 0-{num_layers - 1}.')
  if layers is not None and getattr(backbone, 'scan', False):
    raise ValueError(
        f'layers={layers!r} selects blocks, but this backbone runs its blocks under nn.scan '
        '(scan=True): all blocks are one module sharing one adapter slot. Build the backbone with '
        'scan=False (same weights, unstacked) to adapt a subset of blocks.')
  return Adapted(backbone=backbone, targets=placements.PLACEMENTS[method](
      config, layers=layers, scope=placements.DEFAULT_SCOPE if scope is None else scope))


def _adapt_weights(make, backbone, method, *, rank, alpha, dropout, modules, layers, targets,
                   scope, unused) -> _Adapted:
  """adapt() for the weight-space methods: one config, placed by name or by explicit regexes."""
  unused = sorted(k for k, v in unused.items() if v is not None)
  if unused:
    raise ValueError(f'Options {unused} do not apply to method {method!r} (they configure '
                     'bottleneck adapters).')
  if method in ('lora', 'dora'):
    config_cls = LoRAConfig if method == 'lora' else DoRAConfig
    config = config_cls(rank=8 if rank is None else rank, alpha=alpha, dropout=dropout)
    position, place = 'parallel', functools.partial(placements.lora, modules=('query', 'value'))
  else:
    given = sorted(k for k, v in dict(rank=rank, alpha=alpha, dropout=dropout or None).items()
                   if v is not None)
    if given:
      raise ValueError(f'Options {given} do not apply to method {method!r} (it has none).')
    config = SSFConfig() if method == 'ssf' else IA3Config()
    position, place = 'output', placements.ssf if method == 'ssf' else placements.ia3
  if targets is not None:
    if layers is not None or modules is not None:
      raise ValueError('layers and modules select block layers for the default placement; with '
                       'explicit targets put the selection into the patterns.')
    bad = [t for t in targets if not isinstance(t, str)]
    if bad:
      raise TypeError(f'targets must all be Targets or all be regex strings; found {bad[:3]}.')
    return make(backbone=backbone, targets=tuple(
        Target(pattern=p, adapter=config, position=position, name=method) for p in targets))
  if _family(backbone) == 'cnn':  # _check_family let only LoRA/DoRA through.
    if scope is not None:
      raise ValueError(f'scope={scope!r} selects a transformer encoder; {type(backbone).__name__} '
                       'is a CNN: select its residual blocks with layers=.')
    convs = placements.CNN_CONVS if modules is None else tuple(modules)
    return make(backbone=backbone, targets=placements.cnn_lora(config, modules=convs,
                                                               layers=layers, name=method))
  if layers is not None and getattr(backbone, 'scan', False):
    raise ValueError(f'layers={layers!r} selects blocks, but this backbone runs its blocks under '
                     'nn.scan (scan=True): build it with scan=False to adapt a subset of blocks.')
  scope = placements.DEFAULT_SCOPE if scope is None else scope
  if modules is not None:
    place = functools.partial(place, modules=tuple(modules))
  return make(backbone=backbone, targets=place(config, layers=layers, scope=scope, name=method))


def _token_layout(backbone: nn.Module) -> tuple[int, int, bool]:
  """(prefix tokens, patch size, scan) of a vadapt ViT or CLIP model, for VPT."""
  model = getattr(backbone, 'clip', backbone)  # CLIPClassifier holds the CLIP model.
  if hasattr(model, 'vision_width') and hasattr(model, 'patch_size'):  # CLIP: [class, patches].
    return 1, model.patch_size, False
  # ViT and DINOv2: [class token, registers..., patches].
  if hasattr(model, 'classifier') and hasattr(model, 'patch_size'):
    has_cls = model.classifier in ('token', 'token_gap')
    prefix = int(has_cls) + int(getattr(model, 'num_registers', 0) or 0)
    return prefix, model.patch_size, bool(getattr(model, 'scan', False))
  raise ValueError(
      f'VPT inserts prompt tokens into a transformer\'s token sequence; {type(backbone).__name__} '
      'has none that vadapt knows (expected a vadapt.models.vit or CLIP model). For another '
      'transformer, build Targets with vadapt.placements.vpt_deep(PromptConfig(...), scope=...).')


def _vpt_targets(backbone, method, *, prompts, layers, dropout, scope, drop_rate, others):
  given = sorted(k for k, v in others.items() if v is not None)
  if given:
    raise ValueError(f'Options {given} do not apply to {method!r}; VPT takes prompts, layers '
                     '(deep only), dropout and scope.')
  if prompts is None:
    raise ValueError(f'{method!r} needs prompts= (the number of prompt tokens, e.g. 50).')
  if drop_rate:
    raise ValueError(f'drop_rate (AdapterDrop) does not apply to {method!r}: prompt tokens change '
                     'the sequence length instead of adding a residual that could be left out.')
  prefix, patch_size, scan = _token_layout(backbone)
  config = PromptConfig(num_prompts=prompts, prefix_tokens=prefix, patch_size=patch_size,
                        dropout=dropout)
  scope = placements.VPT_SCOPE if scope is None else scope
  if method == 'vpt_deep':
    if layers is not None and scan:
      raise ValueError(f'layers={layers!r} selects blocks, but this backbone runs its blocks under '
                       'nn.scan: build it with scan=False to prompt a subset of blocks.')
    return placements.vpt_deep(config, layers=layers, scope=scope)
  if layers is not None:
    raise ValueError("'vpt_shallow' prompts the input of the first block only; layers= is for "
                     "'vpt_deep'.")
  if scan:
    raise ValueError("'vpt_shallow' inserts prompts before the first block, but this backbone "
                     'runs its blocks under nn.scan (one module for all blocks, whose carry '
                     "keeps its length): use 'vpt_deep', or build the backbone with scan=False "
                     '(same weights).')
  return placements.vpt_shallow(config, scope=scope)
def _family(backbone: nn.Module) -> Optional[str]:
  """'cnn' or 'transformer' for vadapt's own backbones, None for any other model."""
  from vadapt.models import efficientnet, resnet, vit  # pylint: disable=g-import-not-at-top
  if isinstance(backbone, (resnet.ResNet, efficientnet.EfficientNetLite)):
    return 'cnn'
  if isinstance(backbone, vit.VisionTransformer) or type(backbone).__module__.startswith(
      'vadapt.models.clip'):
    return 'transformer'
  return None


def _check_family(backbone: nn.Module, method: str, targets) -> None:
  """A placement meant for the other family of backbones is an error naming the right ones."""
  family = _family(backbone)
  if targets is not None or family is None:
    return
  name = type(backbone).__name__
  on_cnn = (f'use {" or ".join(map(repr, CNN_METHODS))} (adapters at its residual blocks), '
            "'lora' or 'dora' (on its convolutions) or 'bitfit' (BatchNorm shifts and head)")
  if family == 'cnn' and method in WEIGHT_METHODS and method not in ON_CNN:
    raise ValueError(f'Method {method!r} scales the LayerNorms and projections of transformer '
                     f'blocks (ViT, CLIP) and has no placement on a CNN, whose frozen BatchNorms '
                     f'already scale and shift every convolution; {name} is a CNN: {on_cnn}, or '
                     f'place {method!r} yourself with targets= (module-path regexes).')
  if family == 'cnn' and method not in ON_CNN:
    raise ValueError(f'Method {method!r} places adapters in transformer blocks (ViT, CLIP); '
                     f'{name} is a CNN: {on_cnn}.')
  if family == 'transformer' and method in CNN_METHODS:
    transformer = [m for m in METHODS if m not in CNN_METHODS]
    raise ValueError(f'Method {method!r} places conv adapters in CNN blocks (ResNet, '
                     f'EfficientNet-Lite); {name} is a transformer: use one of {transformer}.')


def _cast_like(tree: Mapping[str, Any], abstract: Mapping[str, Any]) -> dict[str, Any]:
  return {k: jnp.asarray(v, dtype=abstract[k].dtype) for k, v in tree.items()}


def init_with_pretrained(model: Adapted, backbone_params: Mapping[str, Any], rng: jax.Array,
                         *sample_args, backbone_state: Optional[Mapping[str, Any]] = None,
                         **sample_kwargs):
  """Initialises `model`'s adapters and puts the pre-trained backbone weights under them.

  Args:
    model: an Adapted module (from adapt or inject.Adapted).
    backbone_params: the backbone's 'params' collection (nested dict, not {'params': ...}); it
      must match the bare backbone exactly (keys and shapes), or CheckpointMismatchError lists
      every difference.
    rng: PRNG key (or dict of keys) for the adapters' initialisation.
    *sample_args: example inputs, e.g. jnp.zeros((1, 224, 224, 3)); only shapes matter.
    backbone_state: the backbone's other collections, e.g. {'batch_stats': ...}; required when
      the model has any.
    **sample_kwargs: keyword arguments for the model call (e.g. train=False).

  Returns:
    The adapted model's 'params' (backbone weights as given, cast to the model's param dtype;
    adapters freshly initialised). With backbone_state: all variables, {'params': ..., **state}.
  """
  if not isinstance(model, Adapted):
    raise TypeError(f'init_with_pretrained expects an Adapted model (from vadapt.api.adapt); '
                    f'found {type(model).__name__}.')
  if set(backbone_params) == {'params'}:
    raise ValueError("backbone_params must be the 'params' collection itself; found a dict with "
                     "only a 'params' key: pass variables['params'].")
  bare = jax.eval_shape(functools.partial(model.backbone.init, **sample_kwargs), rng,
                        *sample_args)
  extra_collections = sorted(set(bare) - {'params'})
  if extra_collections and backbone_state is None:
    raise ValueError(f'The backbone also holds collections {extra_collections}: pass them as '
                     f'backbone_state={{{", ".join(repr(c) + ": ..." for c in extra_collections)}}} '
                     '(the result is then the full variables dict).')
  given = {'params': backbone_params, **dict(backbone_state or {})}
  unexpected = sorted(set(given) - set(bare))
  if unexpected:
    raise ValueError(f'backbone_state holds collections {unexpected} the backbone does not have; '
                     f'it has {sorted(bare)}.')
  variables = {}
  for c in bare:
    expected = flatten(bare[c])
    found = flatten(given[c])
    check_matches(expected, found, source=f'backbone {c!r}')
    variables[c] = unflatten(_cast_like(found, expected))

  # One forward pass with the backbone's variables in place: Flax creates only what is missing
  # (the adapters), so no backbone initialiser runs. Jitted, and only the new leaves leave the
  # computation: op-by-op execution of a whole forward pass costs seconds even for tiny models.
  abstract = jax.eval_shape(functools.partial(model.init, **sample_kwargs), rng, *sample_args)
  new_paths = {c: sorted(set(flatten(abstract[c])) - set(flatten(bare.get(c, {}))))
               for c in abstract if c != 'intermediates'}
  rngs = rng if isinstance(rng, Mapping) else {'params': rng}

  def create(variables, rngs, sample_args):
    _, created = model.apply(variables, *sample_args, rngs=rngs, mutable=True, **sample_kwargs)
    return {c: {k: flatten(created[c])[k] for k in keys}
            for c, keys in new_paths.items() if keys}

  fresh = jax.jit(create)(variables, rngs, sample_args)
  out = dict(variables)
  for c, flat in fresh.items():
    out[c] = unflatten({**flatten(variables.get(c, {})), **flat})
  return out['params'] if backbone_state is None else out
