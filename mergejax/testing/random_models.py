"""Small random models for tests: a θ0 and experts θ0 + 0.1·N(0, 1), as flat {path: leaf} dicts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def random_flat_models(
  shapes: Mapping[str, tuple[int, ...]], n: int = 3, seed: int = 0
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """A float32 base with standard normal leaves of `shapes` and `n` experts near it.

  Args:
    shapes: {"a/b/c": shape}.
    n: number of experts.
    seed: NumPy seed (the base is drawn first, then each expert in turn).

  Returns:
    (base, experts) as flat dicts.
  """
  rng = np.random.default_rng(seed)
  base = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
  experts = [
    {p: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32) for p, x in base.items()}
    for _ in range(n)
  ]
  return base, experts
