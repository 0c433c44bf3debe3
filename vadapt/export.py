"""`--mode=export`: a workdir's latest delta plus its adapter spec as one .safetensors file."""

from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections

from vadapt import checkpoint as ckpt_lib
from vadapt import experiment
from vadapt import metrics as metrics_lib

def export_adapter(config: ml_collections.ConfigDict, workdir: str,
                   out_path: Optional[str] = None) -> str:
  """Writes the latest checkpoint's delta + adapter spec as one .safetensors file.

  Needs no backbone weights: the delta's structure comes from tracing the model.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {checkpointer.directory}: train first.')
  exp = experiment.setup(config, load_weights=False)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      exp.delta, exp.delta_shardings)
  opt_like = jax.eval_shape(exp.tx.init, exp.delta)
  opt_like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          opt_like, experiment.opt_state_shardings(exp))
  restored = experiment.restore_latest(exp, checkpointer, like, opt_like, purpose='export')
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f'No intact checkpoint in {checkpointer.directory}: train first.')
  step, delta, _, meta = restored
  out_path = out_path or os.path.join(os.path.abspath(workdir), 'adapter.safetensors')
  if jax.process_index() == 0:
    ckpt_lib.save_adapter(out_path, jax.device_get(delta), meta)
  metrics_lib.log(f'Exported the adapter of step {step} to {out_path}.')
  return out_path
