"""Device mesh and sharding rules for the train state and the batch.

The mesh has two axes: 'data' (the batch is split over it) and 'fsdp' (the batch is split over it
too, and large parameters are split over it, FSDP style, for backbones that do not fit one device).
With fsdp=1 every parameter is replicated and the step is plain data parallelism.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ('data', 'fsdp')


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a ('data', 'fsdp') mesh with Auto axes.

  Args:
    data: size of the data axis; -1 takes every device not used by fsdp.
    fsdp: size of the parameter-sharding axis.
    devices: devices to use (default: all of jax.devices(), across processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be a positive divisor of the device count {n}.')
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are '
                     'available; set mesh.data=-1 to use all of them.')
  # jax.make_mesh defaults to Explicit axes, under which a plain sharded matmul step can fail;
  # this code relies on the compiler propagating shardings (Auto).
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_size_per_shard(mesh: Mesh, global_batch_size: int, what: str = 'batch_size') -> int:
  """Checks that the batch splits evenly over the mesh; returns the per-device batch."""
  n = mesh.devices.size
  if global_batch_size < 1:
    raise ValueError(f'{what} must be a positive number of images; found {global_batch_size}.')
  if global_batch_size % n:
    raise ValueError(
        f'{what}={global_batch_size} is not divisible by the {n} devices of the mesh '
        f'{dict(mesh.shape)}: use a multiple of {n}.')
  if global_batch_size % jax.process_count():
    raise ValueError(f'{what}={global_batch_size} is not divisible by the process count '
                     f'{jax.process_count()}.')
  return global_batch_size // n


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every mesh axis."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2 ** 14) -> P:
  """Splits the largest dim divisible by fsdp_size over 'fsdp'.

  Leaves under min_size elements, or with no divisible dim, stay whole (replicated).
  """
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rule: str = 'replicate', min_size: int = 2 ** 14) -> Any:
  """NamedShardings for a tree of arrays or ShapeDtypeStructs.

  Args:
    tree: the (abstract) tree.
    mesh: the mesh.
    rule: 'replicate' (every device holds every leaf) or 'fsdp' (largest divisible dim of each
      big leaf split over the 'fsdp' axis).
    min_size: under 'fsdp', leaves with fewer elements stay replicated.
  """
  if rule not in ('replicate', 'fsdp'):
    raise ValueError(f"Unknown sharding rule {rule!r}; expected 'replicate' or 'fsdp'.")
  fsdp_size = mesh.shape['fsdp']

  def one(leaf):
    if rule == 'replicate':
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp_size, min_size))

  return jax.tree.map(one, tree)


def put_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Turns this process's slice of the global batch into global jax.Arrays.

  Every process passes only the rows it read (its process_index shard of the global batch).
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)
