"""Pieces shared by the experiment configs: argument parsing and the default training recipe.

A config file's `get_config(arg)` receives the text after ':' in `--config=file.py:arg`, e.g.
`variant=Ti/16,method=pfeiffer,test`. `parse_arg` turns it into typed values (a bare key means
True) and rejects keys the config does not know.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from vadapt import input_pipeline

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('0', 'false', 'no', 'off')


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f'Config argument {key}={text!r}: expected a boolean (true/false).')
  for typ in (int, float):
    if isinstance(default, typ):
      try:
        return typ(text)
      except ValueError:
        raise ValueError(f'Config argument {key}={text!r}: expected {typ.__name__}.') from None
  return text


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2,k3=v3' into a ConfigDict typed like `defaults`.

  Args:
    arg: the config argument (None or '' gives the defaults).
    **defaults: every accepted key with its default value; the default's type is the value's type.

  Raises:
    ValueError: on a key not in `defaults` or a value of the wrong type.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; this config accepts: '
                       f'{", ".join(sorted(defaults))}.')
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f'Config argument {key!r} needs a value ({key}=...).')
      values[key] = True
    else:
      values[key] = _convert(key, text.strip(), defaults[key])
  return ml_collections.ConfigDict(values)


def _placeholders(field_type, names) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({n: config_dict.placeholder(field_type) for n in names})


def vit_overrides() -> ml_collections.ConfigDict:
  """backbone.overrides for a ViT: every architecture field, unset."""
  c = _placeholders(int, ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'patch_size',
                          'representation_size'))
  c.classifier = config_dict.placeholder(str)  # 'token' | 'gap' | 'token_gap' (DINOv2) | ...
  c.attention_dropout_rate = config_dict.placeholder(float)
  c.scan = config_dict.placeholder(bool)  # Blocks under nn.scan (faster compile; all layers).
  return c


def clip_overrides() -> ml_collections.ConfigDict:
  """backbone.overrides for CLIP: every architecture field, unset."""
  return _placeholders(int, ('embed_dim', 'image_size', 'patch_size', 'vision_width',
                             'vision_layers', 'vision_heads', 'text_width', 'text_layers',
                             'text_heads', 'context_length', 'vocab_size'))


def base_config() -> ml_collections.ConfigDict:
  """The training recipe every experiment starts from (adapter on a ViT, AdamW, cosine)."""
  c = ml_collections.ConfigDict()
  c.mode = 'train'  # 'train' | 'eval' | 'export'.
  c.seed = 0

  c.backbone = ml_collections.ConfigDict()
  c.backbone.model = 'vit'
  c.backbone.variant = 'B/16'
  # Path to a vit_jax/big_vision .npz or a Hugging Face .safetensors; '' = random init (tests).
  c.backbone.checkpoint = ''
  c.backbone.checkpoint_format = 'auto'
  c.backbone.image_size = 224
  c.backbone.dtype = 'float32'  # Compute dtype; 'bfloat16' on TPU/GPU.
  c.backbone.dropout_rate = 0.0
  c.backbone.remat = False  # Recompute block activations in the backward pass (less memory).
  # With remat, what each block keeps: 'nothing' (least memory) or 'dots' (Dense outputs: most
  # of the saving for adapters at little extra compute). ViT only.
  c.backbone.remat_policy = 'nothing'
  # Recompute each MLP's element-wise work (the GELU, and with a trained Dense_1 the activation
  # its weight gradient reads) in the backward pass from the MLP's matmul outputs instead of
  # keeping it: one or two hidden-sized arrays per block less (XLA step memory 12-21% lower for
  # Pfeiffer, LoRA and full fine-tuning on ViT-Ti/S/B at the same speed,
  # benchmarks/results/ab_step_cpu_amd.md); the gradient's last bits may differ, so it is opt-in.
  # Transformer backbones (vit, dinov2, clip).
  c.backbone.recompute_activation = False
  # Zero the loaded head even when its class count matches (the new task's labels differ).
  c.backbone.reset_head = False
  # Architecture fields that replace the variant's (e.g. hidden_size for a custom width); unset
  # (None) keeps the variant's value. Typed, so --config.backbone.overrides.num_layers=6 works.
  c.backbone.overrides = vit_overrides()

  # method: houlsby | pfeiffer | parallel | parallel_attn (adapters in transformer blocks),
  # vpt_shallow | vpt_deep (visual prompts: adapter.prompts, adapter.dropout on the prompts),
  # lora | dora | ssf | ia3 (weight-space, mergeable: vadapt.merge) | bitfit (biases),
  # full (every parameter trains) | linear (the head only).
  c.adapter = ml_collections.ConfigDict()
  c.adapter.method = 'houlsby'
  c.adapter.bottleneck = config_dict.FieldReference(64, field_type=int)
  # Hidden width = input width // reduction_factor; when set, it replaces bottleneck.
  c.adapter.reduction_factor = config_dict.placeholder(float)
  c.adapter.layers = config_dict.placeholder(tuple)
  c.adapter.activation = 'relu'
  # None: the method's default (1.0 / no LayerNorm; 0.1 / LayerNorm for the parallel methods).
  c.adapter.scale = config_dict.placeholder(float)
  c.adapter.learnable_scale = False
  c.adapter.layer_norm = config_dict.placeholder(bool)
  c.adapter.dropout = 0.0
  c.adapter.prompts = 50  # VPT: prompt tokens per set.
  # AdapterDrop: each layer's adapters are left out of a training step with this probability;
  # drop_schedule='linear' raises it from 0 at the first step to drop_rate at drop_ramp_steps
  # (0: at total_steps), 'constant' uses drop_rate throughout.
  c.adapter.drop_rate = 0.0
  c.adapter.drop_schedule = 'constant'
  c.adapter.drop_ramp_steps = 0
  # LoRA/DoRA rank and alpha (scale alpha / rank; None: alpha = rank), and the block layers the
  # weight-space methods adapt (None: the method's default, e.g. ('query', 'value') for LoRA).
  c.adapter.rank = 8
  c.adapter.alpha = config_dict.placeholder(float)
  c.adapter.modules = config_dict.placeholder(tuple)
  c.train_head = True

  c.input = input_pipeline.default_config()
  c.preprocess = 'vit'  # Pixel normalisation family: 'vit' ([-1, 1]), 'clip', 'imagenet'.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # 'adamw' | 'sgd'.
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.momentum = 0.9  # SGD only.
  # (regex, factor) pairs over parameter paths: a matching parameter's learning rate times the
  # factor (big_vision's lr_mults; first match wins), e.g. (('^head/', 10.0),) for a faster head.
  c.optimizer.lr_mults = ()
  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_steps = 100
  c.schedule.decay = 'cosine'  # 'cosine' | 'constant'.
  c.schedule.end_factor = 0.0  # Final learning rate as a fraction of the peak.
  c.label_smoothing = 0.0
  c.grad_clip_norm = 1.0  # 0 disables clipping.

  c.batch_size = 512
  c.eval_batch_size = 512
  c.total_steps = 2000
  c.log_every = 50
  c.eval_every = 500  # 0 evaluates only at the start and the end.
  c.eval_at_start = True
  c.checkpoint_every = 500
  c.max_to_keep = 2
  # Resuming a workdir: its checkpoints must match this config's adapter and backbone weights.
  c.checkpoint = ml_collections.ConfigDict()
  # Continue (or evaluate) on backbone weights other than those the checkpoint was trained on.
  c.checkpoint.allow_other_backbone = False
  # Start over in a used workdir: its checkpoints, metrics and adapter move to previous_runs/.
  c.checkpoint.restart = False
  c.prefetch = 2
  # Run the frozen backbone once per train example and train the head on the cached features
  # (vadapt.feature_cache): linear probe and CLIP-Adapter without augmentation or dropout; with
  # adapter.layers on the top blocks only, the input of the lowest adapted block is cached and
  # the blocks below it run once. The cache lives on the host; above this size it is refused.
  c.cache_features = False
  c.cache_features_max_mib = 2048

  # XLA options for compiling the train, eval and feature-cache steps (jax.jit's
  # compiler_options), e.g. {'xla_cpu_enable_fast_math': False}; names and values are checked
  # before any work.
  c.compiler_options = ml_collections.ConfigDict()
  # CPU only (ignored on accelerators): every matmul as its own YNNPACK call rather than inside
  # XLA's dot fusions. On a 2-core AMD EPYC, measured in one process step by step
  # (benchmarks/results/ab_step_cpu_amd.md): frozen-backbone methods at ViT-Ti's width 192 run
  # 1.10x (Pfeiffer) to 1.25x (LoRA) faster; at width 384 (ViT-S) even, at 768 (ViT-B) 3% slower;
  # full fine-tuning 8-10% slower at every width. So: on for adapters/LoRA on ViT-Ti-sized models.
  c.xla_cpu_individual_dots = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.num_devices = -1  # Use the first N devices; -1 = all (of every process).
  c.mesh.fsdp_min_size = 2 ** 14  # Leaves smaller than this stay replicated under 'fsdp'.
  c.param_sharding = 'replicate'  # 'replicate' | 'fsdp' (frozen backbone split over 'fsdp').

  # Multi-host: one process per host, each reading its own shard of every batch.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  # Test hook: a loss of NaN at this step exercises the divergence handling (-1 = off).
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_step = -1

  # An optional stage that pre-trains the backbone before adapting it (see digits_demo.py).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.enabled = False
  c.pretrain.classes = config_dict.placeholder(tuple)  # Source-task classes (input.classes).
  c.pretrain.total_steps = 0
  c.pretrain.learning_rate = 1e-3
  c.pretrain.output = 'pretrained/backbone.npz'  # vit_jax .npz, relative to the workdir.
  return c


def apply_test_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long CPU run: tiny ViT at 32x32, offline digits, few steps."""
  c.backbone.variant = 'mu/4'
  c.backbone.checkpoint = ''
  c.backbone.image_size = 32
  c.backbone.dtype = 'float32'
  c.input.source = 'digits'
  c.input.name = 'digits'
  c.input.train_split = 'train'
  c.input.eval_split = 'test[:64]'
  c.adapter.bottleneck = 8
  c.adapter.prompts = 8
  c.batch_size = 8
  c.eval_batch_size = 32
  c.total_steps = 4
  c.log_every = 2
  c.eval_every = 0
  c.checkpoint_every = 2
  c.schedule.warmup_steps = 1
  c.prefetch = 1
  return c


def add_clip_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CLIP fields on top of base_config: the backbone family, prompts, loss, CLIP-/Tip-Adapter."""
  c.mode = 'train'  # Also 'zeroshot' | 'tip_adapter' | 'retrieval' (no training).
  c.backbone.model = 'clip'
  c.backbone.variant = 'ViT-B/16'  # A vadapt.models.clip config name.
  c.backbone.overrides = clip_overrides()
  # Hugging Face CLIP safetensors (file or directory) or an OpenAI .pt; '' = random init (tests).
  c.backbone.checkpoint = ''
  c.preprocess = 'clip'
  # Regex for the encoders whose blocks get adapters: 'vision/Transformer', 'text/Transformer',
  # or None for both towers. Adapters in the text tower make the classifier recomputed each step.
  c.adapter.scope = config_dict.placeholder(str)
  c.train_head = False  # CLIP has no head; its classifier is the frozen text-embedding matrix.
  c.loss = 'ce'  # 'ce' over the text-embedding classifier | 'contrastive' (FLYP's InfoNCE).
  c.clip = ml_collections.ConfigDict()
  c.clip.templates = ('a photo of a {}.',)  # e.g. vadapt.zeroshot.SIMPLE_IMAGENET_TEMPLATES.
  c.clip.ratio = 0.2  # CLIP-Adapter residual ratio alpha (adapter.method='clip_adapter').
  c.clip.reduction = 4  # CLIP-Adapter bottleneck reduction.
  c.clip.tip_alpha = 1.0  # Tip-Adapter cache weight and sharpness (--mode=tip_adapter) ...
  c.clip.tip_beta = 1.0
  c.clip.tip_search_split = ''  # ... or searched on this split of the source when set.
  # --mode=retrieval: a folder with captions.jsonl and images (vadapt.retrieval).
  c.retrieval = ml_collections.ConfigDict(dict(path=''))
  return c


def apply_clip_test_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """apply_test_settings for CLIP: the tiny random CLIP at 32x32 on offline digits."""
  apply_test_settings(c)
  c.backbone.variant = 'tiny'
  c.clip.templates = ('a photo of a {}.', 'a digit {}.')
  # Disjoint from the train split the few-shot cache is drawn from.
  c.input.train_split = 'train[200:]'
  c.clip.tip_search_split = 'train[:200]'
  return c
