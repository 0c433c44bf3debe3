r"""One PyTorch peer configuration: Hugging Face ViT with AdapterHub `adapters` or `peft`.

Run by benchmarks/peers/compare.py in benchmarks/peers/.venv (setup.sh), one configuration per
process; prints one line `RESULT {json}`.

  benchmarks/peers/.venv/bin/python benchmarks/peers/peer_step.py --model=B/16 --mode=houlsby

Modes: forward (inference, no grad; with --weights=DIR the model loads from a save_pretrained
directory, which --save=DIR writes), full (every parameter), pfeiffer (adapters `seq_bn`), houlsby
(`double_seq_bn`), parallel (`par_bn`), lora (peft, r=8 on query and value), linear (head only);
--layers=8,9,10,11 puts the adapters / LoRA on those blocks only (AdapterHub `leave_out`, peft
`layers_to_transform`).
The step is what a PyTorch user writes: zero_grad, forward, cross-entropy, backward, AdamW over
the trainable parameters, SDPA attention, torch.set_num_threads(threads). Before timing, the
worker checks that exactly the method's parameters train (adapter/LoRA names plus the head) and,
after timing, that a frozen weight did not change.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import time

import torch

# (hidden, layers, heads, mlp) as in vadapt.models.vit.WIDTHS.
WIDTHS = {'Ti': (192, 12, 3, 768), 'S': (384, 12, 6, 1536), 'B': (768, 12, 12, 3072)}
MODES = ('forward', 'full', 'linear', 'pfeiffer', 'houlsby', 'parallel', 'lora')


def _rss_mib() -> float:
  """This process's peak resident set (VmHWM; ru_maxrss would start from the parent's at fork)."""
  try:
    with open('/proc/self/status') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024.0
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _random_model(args):
  import transformers  # pylint: disable=g-import-not-at-top
  width, patch = args.model.split('/')
  hidden, layers, heads, mlp = WIDTHS[width]
  config = transformers.ViTConfig(
      hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=mlp, image_size=args.image_size, patch_size=int(args.patch_size or patch),
      num_labels=args.num_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      hidden_act=args.hidden_act)
  torch.manual_seed(0)
  return transformers.ViTForImageClassification._from_config(  # pylint: disable=protected-access
      config, attn_implementation='sdpa')


def save(args) -> dict:
  """Writes the suite's randomly initialised ViT (model.safetensors + config.json) to args.save:
  the file both sides' forward rows load, as a user serving a checkpoint would."""
  _random_model(args).save_pretrained(args.save)
  return {'saved': args.save}


def build(args):
  import transformers  # pylint: disable=g-import-not-at-top
  hidden, layers, _, _ = WIDTHS[args.model.split('/')[0]]
  if args.weights:
    if args.mode != 'forward':
      raise ValueError('--weights is for --mode=forward.')
    model = transformers.ViTForImageClassification.from_pretrained(
        args.weights, attn_implementation='sdpa')
  else:
    model = _random_model(args)
  mode = args.mode
  selected = [int(i) for i in args.layers.split(',')] if args.layers else None
  trainable_prefixes: tuple[str, ...]
  if mode in ('pfeiffer', 'houlsby', 'parallel'):
    import adapters  # pylint: disable=g-import-not-at-top
    adapters.init(model)
    factor = hidden / args.bottleneck
    leave_out = [i for i in range(layers) if i not in selected] if selected else []
    cfg = {'pfeiffer': adapters.SeqBnConfig, 'houlsby': adapters.DoubleSeqBnConfig,
           'parallel': adapters.ParBnConfig}[mode](reduction_factor=factor, leave_out=leave_out)
    model.add_adapter('task', config=cfg)
    model.train_adapter('task')
    for p in model.classifier.parameters():  # The new task's head trains too, as in vadapt.
      p.requires_grad_(True)
    trainable_prefixes = ('adapters.task', 'classifier.')
  elif mode == 'lora':
    import peft  # pylint: disable=g-import-not-at-top
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=['query', 'value'], lora_dropout=0.0,
        modules_to_save=['classifier'], layers_to_transform=selected))
    trainable_prefixes = ('lora_', 'classifier')
  elif mode == 'linear':
    for name, p in model.named_parameters():
      p.requires_grad_(name.startswith('classifier.'))
    trainable_prefixes = ('classifier.',)
  elif mode in ('full', 'forward'):
    trainable_prefixes = ('',)
  else:
    raise ValueError(f'Unknown mode {mode!r}; known: {MODES}.')
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  if mode not in ('full', 'forward'):
    wrong = [n for n, _ in trainable if not any(t in n for t in trainable_prefixes)]
    assert not wrong, f'{mode}: unexpected trainable parameters {wrong[:5]}'
    if selected:
      elsewhere = [n for n, _ in trainable
                   if (m := re.search(r'layer\.(\d+)\.', n)) and int(m[1]) not in selected]
      assert not elsewhere, f'{mode}: trainable parameters outside {selected}: {elsewhere[:3]}'
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any('attention.attention.query.weight' in n or 'query.base_layer.weight' in n
               for n in frozen), f'{mode}: the backbone is not frozen'
  return model, trainable


def run(args) -> dict:
  torch.set_num_threads(args.threads)
  rss_imports = _rss_mib()
  model, trainable = build(args)
  n_trainable = sum(p.numel() for _, p in trainable)
  n_total = sum(p.numel() for p in model.parameters())
  gen = torch.Generator().manual_seed(0)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
  if args.weights:  # The vadapt side's images (NHWC numpy, seed 0), to compare the logits.
    import numpy as np  # pylint: disable=g-import-not-at-top
    images = torch.from_numpy(np.random.default_rng(0).normal(
        size=(args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
                              ).permute(0, 3, 1, 2).contiguous()
  autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if args.dtype == 'bfloat16'
              else torch.autocast('cpu', enabled=False))
  frozen_name, frozen_param = next(((n, p) for n, p in model.named_parameters()
                                    if not p.requires_grad), (None, None))
  frozen_before = None if frozen_param is None else frozen_param.detach().clone()

  if args.mode == 'forward':
    model.eval()

    logits = []

    def step():
      with torch.inference_mode(), autocast:
        out = model(pixel_values=images).logits.float()
        logits[:] = [out[0]]
        return out.sum()
  else:
    model.train()
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, weight_decay=1e-4)

    def step():
      opt.zero_grad(set_to_none=True)
      with autocast:
        logits = model(pixel_values=images).logits
      loss = torch.nn.functional.cross_entropy(logits.float(), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
      opt.step()
      return loss.detach()

  start = time.perf_counter()
  step()  # Warm-up (allocator, oneDNN primitive cache): the analogue of vadapt's compile step.
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    out = step()
    times.append(time.perf_counter() - start)
  if frozen_param is not None:
    assert torch.equal(frozen_before, frozen_param.detach()), f'{frozen_name} changed'
  sec = statistics.median(times)
  return {'side': 'peer', 'mode': args.mode, 'model': args.model, 'dtype': args.dtype,
          'trainable': n_trainable, 'total': n_total, 'sec_per_step': sec,
          'img_per_sec': args.batch_size / sec, 'warmup_s': warmup_s,
          'rss_imports_mib': rss_imports, 'peak_rss_mib': _rss_mib(), 'out': float(out),
          'torch': torch.__version__, 'threads': torch.get_num_threads(),
          'weights': args.weights or None,
          'logits0': logits[0].tolist() if args.mode == 'forward' else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='B/16', help="'B/16', 'Ti/16' (with --patch_size) ...")
  parser.add_argument('--patch_size', type=int, default=0, help='Overrides the variant patch.')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--mode', default='houlsby', choices=MODES)
  parser.add_argument('--layers', default='', help='Adapted blocks, e.g. 8,9,10,11 (all: empty).')
  parser.add_argument('--bottleneck', type=int, default=64)
  parser.add_argument('--num_classes', type=int, default=100)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--hidden_act', default='gelu', choices=('gelu', 'gelu_pytorch_tanh'),
                      help="The MLP's GELU: transformers' default exact form, or the tanh form "
                           "(vadapt's ViT default, as vit_jax and big_vision).")
  parser.add_argument('--weights', default='',
                      help='forward: load the model from this save_pretrained directory.')
  parser.add_argument('--save', default='',
                      help='Only write the random model (save_pretrained) to this directory.')
  args = parser.parse_args()
  print('RESULT ' + json.dumps(save(args) if args.save else run(args)), flush=True)


if __name__ == '__main__':
  main()
