"""Moving host batches onto a device mesh ahead of the step that needs them."""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator, Mapping, Union

import jax

Sharding = jax.sharding.Sharding


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       sharding: Union[Sharding, Mapping[str, Sharding], Any]) -> Iterator[Any]:
  """Yields the batches of ``iterator`` as global jax.Arrays, keeping ``size`` batches in flight.

  Each batch holds this process's rows; ``jax.make_array_from_process_local_data`` assembles the
  global array, so the same code runs on one host or many. ``sharding`` is one sharding for every
  leaf (e.g. ``NamedSharding(mesh, P('data'))``, which splits the leading batch axis whatever the
  rank) or a pytree of shardings matching the batch.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}.')

  def put(batch):
    if isinstance(sharding, Sharding):
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, x),
                        sharding, batch, is_leaf=lambda s: isinstance(s, Sharding))

  queue = collections.deque()
  iterator = iter(iterator)
  for batch in iterator:
    # device_put is asynchronous: enqueueing starts the transfer, popping waits only if needed.
    queue.append(put(batch))
    if len(queue) == size:
      break
  while queue:
    yield queue.popleft()
    batch = next(iterator, None)
    if batch is not None:
      queue.append(put(batch))
