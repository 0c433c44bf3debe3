"""Named adapter placements for transformer and CNN backbones, built from a few composable parts.

CNN placements (at the end) put a conv adapter at every selected residual block of
vadapt.models.resnet or vadapt.models.efficientnet ('conv', 'conv_parallel'), or LoRA / DoRA on
the convolutions inside those blocks ('cnn_lora').

Each function returns a tuple of vadapt.inject.Target. Paths follow vadapt.models.vit (also used
by the CLIP towers): blocks are ``<scope>/encoderblock_{i}`` (or ``<scope>/encoderblock`` under
nn.scan), each with ``MultiHeadDotProductAttention_0`` and ``MlpBlock_0``. Both sub-modules
return their branch before the residual add, so position 'output' puts the adapter exactly where
Houlsby et al. put it.

Layer selection (``layers``): None for every block; an iterable of block indices (a list or a
range); or ``skip_lowest(k)`` for every block but the lowest k (AdapterDrop). Scanned models hold
all blocks in one module, so a selection other than all cannot be expressed as a module path:
vadapt.api.adapt rejects it for scan=True with an explanation, and a raw target on a scan model
fails with the module paths it could have matched.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Union

from vadapt.adapters.bottleneck import BottleneckConfig
from vadapt.adapters.prompts import PromptConfig, PromptStripConfig
from vadapt.inject import Target

# Matches the ViT encoder ('Transformer') at any depth, e.g. inside a CLIP tower.
DEFAULT_SCOPE = r'(?:.+/)?Transformer'
ATTENTION = 'MultiHeadDotProductAttention_0'
MLP = 'MlpBlock_0'


@dataclasses.dataclass(frozen=True)
class SkipLowest:
  """Every block except the lowest k (AdapterDrop drops adapters from the first layers).

  Attributes:
    k: number of lowest blocks left without adapters.
  """
  k: int

  def __post_init__(self):
    if int(self.k) != self.k or self.k < 0:
      raise ValueError(f'skip_lowest needs a non-negative integer; found {self.k!r}.')


def skip_lowest(k: int) -> SkipLowest:
  """Layer selection: all blocks but the lowest k."""
  return SkipLowest(k)


Layers = Optional[Union[Iterable[int], SkipLowest]]


def block_pattern(layers: Layers = None, scope: str = DEFAULT_SCOPE) -> str:
  """Regex for the selected encoder blocks; all blocks also matches the scanned 'encoderblock'."""
  if layers is None:
    return rf'{scope}/encoderblock(?:_\d+)?'
  if isinstance(layers, SkipLowest):
    if layers.k == 0:
      return rf'{scope}/encoderblock_\d+'
    low = '|'.join(str(i) for i in range(layers.k))
    return rf'{scope}/encoderblock_(?!(?:{low})(?:/|$))\d+'
  if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
    raise TypeError('layers must be None (all blocks), an iterable of block indices or '
                    f'skip_lowest(k); found {layers!r}.')
  indices = sorted(set(layers))
  if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
    raise ValueError(f'layers must name at least one non-negative block index; found {layers!r}.')
  return rf'{scope}/encoderblock_(?:{"|".join(str(i) for i in indices)})'


def at(submodule: str, adapter, *, position: str = 'output', layers: Layers = None,
       scope: str = DEFAULT_SCOPE, name: str = 'adapter') -> tuple[Target, ...]:
  """One target: `adapter` at `submodule` ('MlpBlock_0', ...) of the selected blocks."""
  return (Target(pattern=f'{block_pattern(layers, scope)}/{submodule}', adapter=adapter,
                 position=position, name=name),)


def houlsby(adapter: BottleneckConfig, *, layers: Layers = None,
            scope: str = DEFAULT_SCOPE) -> tuple[Target, ...]:
  """Houlsby et al. (2019): after the attention output and after the MLP, before each residual."""
  return (at(ATTENTION, adapter, layers=layers, scope=scope)
          + at(MLP, adapter, layers=layers, scope=scope))


def pfeiffer(adapter: BottleneckConfig, *, layers: Layers = None,
             scope: str = DEFAULT_SCOPE) -> tuple[Target, ...]:
  """Pfeiffer et al. (2021): after the MLP only."""
  return at(MLP, adapter, layers=layers, scope=scope)


def parallel(adapter: BottleneckConfig, *, layers: Layers = None,
             scope: str = DEFAULT_SCOPE) -> tuple[Target, ...]:
  """AdaptFormer (Chen et al., 2022): MLP(x) + s * adapter(x), with s and the LayerNorm in the
  adapter config (api.adapt defaults them to 0.1 and on)."""
  return at(MLP, adapter, position='parallel', layers=layers, scope=scope)


def parallel_attn(adapter: BottleneckConfig, *, layers: Layers = None,
                  scope: str = DEFAULT_SCOPE) -> tuple[Target, ...]:
  """An adapter parallel to the attention: Attn(x) + s * adapter(x)."""
  return at(ATTENTION, adapter, position='parallel', layers=layers, scope=scope)


# Layers inside a block by short name (peft's ViT names in parentheses): the targets of the
# weight-space methods (LoRA, DoRA, SSF, (IA)³).
BLOCK_LAYERS = {
    'query': f'{ATTENTION}/query',
    'key': f'{ATTENTION}/key',
    'value': f'{ATTENTION}/value',
    'out': f'{ATTENTION}/out',        # (attention.output.dense)
    'fc1': f'{MLP}/Dense_0',          # (intermediate.dense)
    'fc2': f'{MLP}/Dense_1',          # (output.dense)
    'norm1': 'LayerNorm_0',
    'norm2': 'LayerNorm_1',
}


def layer_pattern(modules) -> str:
  """Regex for the named layers of a block, e.g. ('query', 'value')."""
  if isinstance(modules, str) or not modules:
    raise TypeError(f'modules must be a non-empty sequence of layer names from '
                    f'{sorted(BLOCK_LAYERS)}; found {modules!r}.')
  unknown = [m for m in modules if m not in BLOCK_LAYERS]
  if unknown:
    raise ValueError(f'Unknown block layers {unknown}; known: {sorted(BLOCK_LAYERS)}.')
  return '(?:' + '|'.join(BLOCK_LAYERS[m] for m in dict.fromkeys(modules)) + ')'


def lora(adapter, *, modules=('query', 'value'), layers: Layers = None,
         scope: str = DEFAULT_SCOPE, name: str = 'lora') -> tuple[Target, ...]:
  """LoRA (or DoRA) parallel to the named layers; query and value by default (Hu et al., peft)."""
  return at(layer_pattern(modules), adapter, position='parallel', layers=layers, scope=scope,
            name=name)


# VPT's default encoder: a ViT's, or CLIP's image tower (not its text tower).
VPT_SCOPE = r'(?:(?:.+/)?vision/)?Transformer'


def vpt_shallow(prompts: PromptConfig, *, scope: str = VPT_SCOPE) -> tuple[Target, ...]:
  """VPT-shallow (Jia et al., 2022): prompts enter before the first block and leave the sequence
  at the encoder's output. The first block must be a module of its own (not under nn.scan)."""
  return (Target(pattern=f'{scope}/encoderblock_0', position='wrap',
                 adapter=dataclasses.replace(prompts, strip_output=False)),
          Target(pattern=scope, position='wrap', adapter=PromptStripConfig(
              num_prompts=prompts.num_prompts, prefix_tokens=prompts.prefix_tokens)))


def vpt_deep(prompts: PromptConfig, *, layers: Layers = None,
             scope: str = VPT_SCOPE) -> tuple[Target, ...]:
  """VPT-deep: a fresh set of prompts in every selected block (inserted, then removed)."""
  return (Target(pattern=block_pattern(layers, scope), position='wrap',
                 adapter=dataclasses.replace(prompts, strip_output=True)),)


SSF_LAYERS = ('norm1', 'query', 'key', 'value', 'out', 'norm2', 'fc1', 'fc2')


def ssf(adapter, *, modules=SSF_LAYERS, layers: Layers = None, scope: str = DEFAULT_SCOPE,
        name: str = 'ssf') -> tuple[Target, ...]:
  """SSF (Lian et al., 2022): scale and shift after every LayerNorm, attention projection and
  MLP layer of the selected blocks."""
  return at(layer_pattern(modules), adapter, position='output', layers=layers, scope=scope,
            name=name)


IA3_LAYERS = ('key', 'value', 'fc2')
# (IA)³ rescales the MLP hidden, i.e. the input of fc2 (peft's feedforward modules); attention
# projections are rescaled at their outputs.
_INPUT_SIDE = ('fc1', 'fc2')


def ia3(adapter, *, modules=IA3_LAYERS, layers: Layers = None, scope: str = DEFAULT_SCOPE,
        name: str = 'ia3') -> tuple[Target, ...]:
  """(IA)³ (Liu et al., 2022): keys and values rescaled at the output, the MLP hidden at fc2's
  input."""
  layer_pattern(modules)  # Validates the names.
  targets = ()
  for position, names in (('output', [m for m in modules if m not in _INPUT_SIDE]),
                          ('input', [m for m in modules if m in _INPUT_SIDE])):
    if names:
      targets += at(layer_pattern(names), adapter, position=position, layers=layers, scope=scope,
                    name=name)
  return targets


# CNN blocks: vadapt.models.resnet (and the flax imagenet example) names them
# '[Bottleneck]ResNetBlock_{k}', vadapt.models.efficientnet 'blocks_{k}' (k counts over all stages).
RESNET_BLOCKS = r'(?:.+/)?(?:Bottleneck)?ResNetBlock_\d+'
CNN_BLOCK_NAMES = r'(?:(?:Bottleneck)?ResNetBlock|blocks)'


def cnn_block_pattern(layers: Layers = None) -> str:
  """Regex for the selected residual blocks of a ResNet or EfficientNet-Lite (k counts blocks)."""
  prefix = rf'(?:.+/)?{CNN_BLOCK_NAMES}_'
  if layers is None or (isinstance(layers, SkipLowest) and layers.k == 0):
    return rf'{prefix}\d+'
  if isinstance(layers, SkipLowest):
    low = '|'.join(str(i) for i in range(layers.k))
    return rf'{prefix}(?!(?:{low})(?:/|$))\d+'
  if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
    raise TypeError('layers must be None (all blocks), an iterable of block indices or '
                    f'skip_lowest(k); found {layers!r}.')
  indices = sorted(set(layers))
  if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
    raise ValueError(f'layers must name at least one non-negative block index; found {layers!r}.')
  return rf'{prefix}(?:{"|".join(str(i) for i in indices)})'


def resnet_blocks(adapter, *, position: str = 'output',
                  pattern: str = RESNET_BLOCKS) -> tuple[Target, ...]:
  """Residual adapters after ('output') or alongside ('parallel') every ResNet block."""
  return (Target(pattern=pattern, adapter=adapter, position=position),)


def conv(adapter, *, layers: Layers = None) -> tuple[Target, ...]:
  """Rebuffi et al. (2017) series residual adapters: block(x) + a(block(x)), after each selected
  ResNet / EfficientNet-Lite block."""
  return (Target(pattern=cnn_block_pattern(layers), adapter=adapter, position='output'),)


def conv_parallel(adapter, *, layers: Layers = None) -> tuple[Target, ...]:
  """Rebuffi et al. (2018) parallel adapters: block(x) + a(x); a strided 1x1 conv to the block's
  output width where the block downsamples."""
  return (Target(pattern=cnn_block_pattern(layers), adapter=adapter, position='parallel'),)


CNN_PLACEMENTS = {'conv': conv, 'conv_parallel': conv_parallel}

# The convolutions inside a CNN block with a dense kernel: ResNet's Conv_{j} and projection
# shortcut, EfficientNet-Lite's 1x1 expand and project convs. Blocks have the ones their kind
# uses (a basic ResNet block has no Conv_2, only downsampling blocks have conv_proj).
CNN_CONVS = ('Conv_0', 'Conv_1', 'Conv_2', 'conv_proj', 'expand_conv', 'project_conv')
# EfficientNet-Lite's depthwise conv has one filter per channel (feature_group_count = channels):
# peft's grouped-conv LoRA needs a rank that is a multiple of the group count (here the channel
# count), so the default placement leaves it out; `targets=` can still name it.
_GROUPED_CONVS = ('depthwise_conv',)


def cnn_lora(adapter, *, modules=CNN_CONVS, layers: Layers = None,
             name: str = 'lora') -> tuple[Target, ...]:
  """LoRA (or DoRA) parallel to the convolutions of the selected ResNet / EfficientNet-Lite
  blocks, every dense one by default; peft's LoRA on Conv2d: A is a conv with the layer's kernel
  size, stride and padding and r output channels, B a 1x1 conv from r to the layer's outputs."""
  if isinstance(modules, str) or not modules:
    raise TypeError(f'modules must be a non-empty sequence of convolution names from '
                    f'{list(CNN_CONVS)}; found {modules!r}.')
  grouped = [m for m in modules if m in _GROUPED_CONVS]
  if grouped:
    raise ValueError(f'modules {grouped}: LoRA on a depthwise convolution needs a rank that is a '
                     f'multiple of its channel count (peft\'s grouped-conv rule), so this placement '
                     f'adapts {list(CNN_CONVS)}; name it with targets= to adapt it anyway.')
  unknown = [m for m in modules if m not in CNN_CONVS]
  if unknown:
    raise ValueError(f'Unknown CNN block convolutions {unknown}; known: {list(CNN_CONVS)} '
                     '(ResNet: Conv_0-2, conv_proj; EfficientNet-Lite: expand_conv, '
                     'project_conv).')
  convs = '|'.join(dict.fromkeys(modules))
  return (Target(pattern=f'{cnn_block_pattern(layers)}/(?:{convs})', adapter=adapter,
                 position='parallel', name=name),)


PLACEMENTS = {
    'houlsby': houlsby,
    'pfeiffer': pfeiffer,
    'parallel': parallel,
    'parallel_attn': parallel_attn,
}
