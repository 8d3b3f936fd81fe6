"""Plots for learned merging: Λ heatmap, loss/validation curves, DV-BASI trajectory.

Each function writes one PNG and returns its path. matplotlib is imported inside the functions
(Agg backend) so the library does not need it unless you plot.
"""

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
  import matplotlib  # noqa: PLC0415  (optional dependency)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def plot_coefficients(
  coeffs,
  block_names: Sequence[str],
  path: str | pathlib.Path,
  *,
  vector_names: Sequence[str] | None = None,
  title: str = "Λ",
) -> pathlib.Path:
  """Heatmap of Λ: one row per block (layer), one column per basis vector (task).

  Args:
    coeffs: Λ, `[num_vectors, num_blocks]`.
    block_names: names of the blocks (`LearnedMerge.extras["blocks"]`).
    path: output PNG.
    vector_names: column labels (task names); defaults to "v0", "v1", ...
    title: figure title.

  Returns:
    The written path.
  """
  plt = _pyplot()
  values = np.asarray(coeffs, np.float32).T  # [blocks, vectors]
  vector_names = vector_names or [f"v{k}" for k in range(values.shape[1])]
  height = min(2.0 + 0.22 * values.shape[0], 40.0)
  fig, ax = plt.subplots(figsize=(1.5 + 0.7 * values.shape[1], height))
  image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
  ax.set_xticks(range(values.shape[1]), vector_names, rotation=45, ha="right")
  ax.set_yticks(range(values.shape[0]), block_names, fontsize=7)
  ax.set_title(title)
  fig.colorbar(image, ax=ax)
  return _save(fig, plt, path)


def plot_curves(history: Mapping[str, list], path: str | pathlib.Path) -> pathlib.Path:
  """Training loss and validation selection metric against the step.

  Args:
    history: `LearnedMerge.history` ({"loss": [[step, loss]...], "eval": [[step, metric, ...]...]}).
    path: output PNG.

  Returns:
    The written path.
  """
  plt = _pyplot()
  fig, loss_ax = plt.subplots(figsize=(6, 3.5))
  if history["loss"]:
    steps, losses = zip(*[(s, v) for s, v in history["loss"]], strict=True)
    loss_ax.plot(steps, losses, color="tab:blue", label="training loss")
  loss_ax.set_xlabel("step")
  loss_ax.set_ylabel("training loss (sum over tasks)", color="tab:blue")
  if history["eval"]:
    val_ax = loss_ax.twinx()
    steps, metrics = zip(*[(e[0], e[1]) for e in history["eval"]], strict=True)
    val_ax.plot(steps, metrics, "o-", color="tab:orange", label="validation")
    val_ax.set_ylabel("validation selection metric", color="tab:orange")
  return _save(fig, plt, path)


def plot_dv_basi_trajectory(
  val_metrics: Sequence[float],
  path: str | pathlib.Path,
  *,
  best_iteration: int | None = None,
  test_metrics: Sequence[float] | None = None,
) -> pathlib.Path:
  """Validation metric of θ^(0), θ^(1), ... over DV-BASI's outer iterations.

  Args:
    val_metrics: DV-BASI's `LearnedMerge.extras["trajectory"]`.
    path: output PNG.
    best_iteration: marked with a star (the iteration selected on validation).
    test_metrics: optional test metric per iteration, computed by the caller after selection,
      drawn for reference only.

  Returns:
    The written path.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  iterations = np.arange(len(val_metrics))
  ax.plot(iterations, val_metrics, "o-", label="validation (selects)")
  if test_metrics is not None:
    ax.plot(iterations, test_metrics, "s--", alpha=0.6, label="test (reported only)")
  if best_iteration is not None:
    ax.plot(
      [best_iteration],
      [val_metrics[best_iteration]],
      "*",
      markersize=16,
      color="red",
      label="selected",
    )
  ax.set_xticks(iterations)
  ax.set_xlabel("outer iteration m (0 = start)")
  ax.set_ylabel("metric")
  ax.legend()
  return _save(fig, plt, path)


def _save(fig, plt, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
