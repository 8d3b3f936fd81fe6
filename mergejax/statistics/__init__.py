"""Statistics of the data-dependent rules, computed in JAX from a model and data.

Fisher merging, RegMean and RegMean++ need more than the weights: the experts' diagonal Fisher
information, or the Gram matrices of their linear layers' inputs on their tasks' examples. They
are computed here, once, from any `apply_fn(params, x)` (a flax linen model applied to the tree
you merge, heads and task closed over) and batches of examples; saved with orbax (`save`) and
reused across merges (`load`); and the merge itself stays a pure function of (base, experts,
statistics): `rules.merge("regmean", base, experts, statistics=stats, alpha=0.9)`.

Each function returns one expert's statistics as a dict ({"fisher": tree} or {"grams": tree};
RegMean++ returns the list for all experts at once, since each layer's inputs depend on the
merge of the layers below); a merge takes the list, one per expert. Same inputs, same batches in
the same order: the same statistics, bit for bit.

Modules: `fisher` (`fisher_statistics`), `grams` (`regmean_statistics`: flax intercepts on the
linear layers), `plusplus` (`regmean_plusplus_statistics`), `batches` (batch formats, `take`,
`batched`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mergejax.io import checkpoint
from mergejax.statistics.batches import batched, take
from mergejax.statistics.fisher import LABELS, fisher_statistics
from mergejax.statistics.grams import linear_layers, regmean_statistics
from mergejax.statistics.plusplus import block_plan, regmean_plusplus_statistics


def save(path: str | os.PathLike, statistics: Sequence[Any]) -> None:
  """Saves statistics (one dict per expert) as an orbax checkpoint directory, atomically.

  Args:
    path: destination directory (replaced only once the new checkpoint is complete).
    statistics: the list a merge takes.
  """
  checkpoint.save_pytree(path, list(statistics))


def load(path: str | os.PathLike) -> list[Any]:
  """Loads statistics written by `save` (a list with one dict per expert).

  Args:
    path: the checkpoint directory.

  Returns:
    The statistics, as jax arrays.
  """
  restored = checkpoint.load_pytree(path)
  if not isinstance(restored, list):
    raise ValueError(
      f"{path} holds a {type(restored).__name__}, not statistics (a list with one entry per "
      "expert, as mergejax.statistics.save writes)."
    )
  return restored


__all__ = [
  "LABELS",
  "batched",
  "block_plan",
  "fisher_statistics",
  "linear_layers",
  "load",
  "regmean_plusplus_statistics",
  "regmean_statistics",
  "save",
  "take",
]
