"""Plots of the regime checks (PNG, matplotlib Agg): the disentanglement map of a task pair."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot_disentanglement_map(
  xi: np.ndarray, coeffs: Sequence[float], pair: Sequence[str], path: str | Path
) -> Path:
  """Saves ξ(α1, α2) of one task pair as a heat map (Ortiz-Jiménez et al. 2023, Fig. 3 style).

  Args:
    xi: [len(coeffs), len(coeffs)] from `regime.disentanglement_map` (rows: α1).
    coeffs: the α values of both axes.
    pair: the two task names (α1's task first).
    path: PNG path.

  Returns:
    The path written.
  """
  import matplotlib  # Imported lazily: only plotting needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xi = np.asarray(xi)
  fig, ax = plt.subplots(figsize=(4.8, 4))
  # Rows are α1 (y axis, increasing upwards), columns α2 (x axis).
  im = ax.imshow(xi, origin="lower", vmin=0, vmax=max(1.0, float(xi.max())), cmap="viridis")
  ticks = range(len(coeffs))
  ax.set_xticks(ticks, [f"{c:g}" for c in coeffs])
  ax.set_yticks(ticks, [f"{c:g}" for c in coeffs])
  ax.set_xlabel(f"α2 ({pair[1]})")
  ax.set_ylabel(f"α1 ({pair[0]})")
  for i in ticks:
    for j in ticks:
      ax.text(j, i, f"{xi[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
  fig.colorbar(im, ax=ax, label="ξ (disagreement, max 2)")
  ax.set_title("Disentanglement error")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)
