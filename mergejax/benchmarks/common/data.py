"""Labeled examples of the benchmarks: one split of one task, a task's splits, mixtures."""

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """One task's split: inputs `x` [n, ...] and integer labels `y` [n]."""

  x: np.ndarray
  y: np.ndarray

  def __len__(self) -> int:
    return len(self.y)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """The train / validation / test splits of one task."""

  name: str
  train: Split
  val: Split
  test: Split


def concat_splits(splits: Sequence[Split]) -> Split:
  """Concatenates splits into one (a task mixture).

  Args:
    splits: splits of one or more tasks.

  Returns:
    One `Split` holding all their examples, in order.
  """
  return Split(x=np.concatenate([s.x for s in splits]), y=np.concatenate([s.y for s in splits]))


def stack_splits(splits: Sequence[Split]) -> tuple[np.ndarray, np.ndarray]:
  """Stacks equally sized splits of several tasks.

  Args:
    splits: one split per task, all with the same number of examples.

  Returns:
    (x [T, n, ...], y [T, n]).
  """
  sizes = {len(s) for s in splits}
  if len(sizes) != 1:
    raise ValueError(f"Splits must have one size to be stacked, got {sorted(sizes)}.")
  return np.stack([s.x for s in splits]), np.stack([s.y for s in splits])
