"""The batches statistics are computed from: what a batch may look like, and how many to take.

A batch is an array of inputs `x`, a tuple `(x,)` / `(x, y)`, or a dict {"x": ..., "y": ...}
(the benchmarks' convention); `y` holds integer class labels, needed only for the empirical
Fisher. Batches are consumed in the order given: the same batches in the same order give the same
statistics, bit for bit.

>>> import numpy as np
>>> data = {"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5)}
>>> [b["x"].shape[0] for b in batched(data, 2)]
[2, 2, 1]
>>> [unpack(b)[0].shape[0] for b in take(batched(data, 2), 3)]
[2, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np


def unpack(batch: Any) -> tuple[Any, Any]:
  """Returns `(x, y)` of a batch (`y` is None when the batch holds no labels).

  Args:
    batch: an array `x`, a tuple `(x,)` or `(x, y)`, or a dict with "x" (and "y").

  Returns:
    The inputs and the labels (or None).
  """
  if isinstance(batch, Mapping):
    if "x" not in batch:
      raise ValueError(
        f"A dict batch needs an 'x' entry (and 'y' for labels); got {sorted(batch)}."
      )
    return batch["x"], batch.get("y")
  if isinstance(batch, tuple | list):
    if len(batch) not in (1, 2):
      raise ValueError(f"A tuple batch is (x,) or (x, y); got {len(batch)} elements.")
    return batch[0], (batch[1] if len(batch) == 2 else None)
  return batch, None


def num_examples(batch: Any) -> int:
  """The number of examples in a batch (the leading axis of its inputs)."""
  x, _ = unpack(batch)
  shape = np.shape(x)
  if not shape:
    raise ValueError("A batch's inputs need a leading batch axis; got a scalar.")
  return int(shape[0])


def take(batches: Iterable[Any], max_examples: int | None) -> Iterator[Any]:
  """Yields whole batches until at least `max_examples` examples have been yielded.

  This is the reference code's rule (FusionBench's Fisher and RegMean loops stop *before* a
  batch once the count reached the target): with 256 examples and batches of 32, exactly 8
  batches; with batches of 100, 3 batches (300 examples).

  Args:
    batches: any iterable of batches.
    max_examples: the target; None takes every batch.

  Yields:
    The batches, in order.
  """
  seen = 0
  for batch in batches:
    if max_examples is not None and seen >= max_examples:
      return
    seen += num_examples(batch)
    yield batch


def batched(data: Mapping[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
  """Cuts a dict of arrays ({"x": [n, ...], "y": [n]}) into consecutive batches, in order.

  Args:
    data: arrays sharing their leading axis (e.g. one task's split of a benchmark).
    batch_size: examples per batch (the last batch may be smaller).

  Yields:
    Dicts with the same keys, each holding the next `batch_size` rows.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  sizes = {k: np.shape(v)[0] for k, v in data.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"The arrays of a batch must share their leading axis; got {sizes}.")
  (n,) = set(sizes.values())
  for start in range(0, n, batch_size):
    yield {k: v[start : start + batch_size] for k, v in data.items()}
