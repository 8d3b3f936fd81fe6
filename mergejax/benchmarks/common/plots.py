"""Diagnostics of a set of task vectors and the benchmark's plots (PNG, matplotlib Agg).

The statistics are NumPy helpers so they can be tested without drawing anything.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from mergejax import tree as tree_lib
from mergejax.tree import Params


def cosine_matrix(vectors: Sequence[Params]) -> np.ndarray:
  """Returns the [T, T] cosine similarities between flattened task vectors.

  Args:
    vectors: task vectors (pytrees with one structure).

  Returns:
    float64 matrix; a zero vector has cosine 0 with everything.
  """
  flat = np.stack(
    [np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)]) for v in vectors]
  ).astype(np.float64)
  norms = np.linalg.norm(flat, axis=1)
  safe = np.where(norms > 0, norms, 1.0)
  cos = (flat @ flat.T) / np.outer(safe, safe)
  return np.where(np.outer(norms > 0, norms > 0), cos, 0.0)


def sign_conflict_rates(vectors: Sequence[Params]) -> dict[str, float]:
  """Returns, per leaf path, the fraction of entries where the non-zero task vectors disagree.

  An entry conflicts when at least one task vector is positive there and another negative, the
  interference TIES's sign election resolves.

  Args:
    vectors: task vectors (pytrees with one structure).

  Returns:
    {"a/b/c": rate in [0, 1]} in leaf order.
  """
  flats = [tree_lib.flatten(v) for v in vectors]
  rates = {}
  for path in flats[0]:
    stacked = np.stack([np.asarray(f[path]) for f in flats])
    conflict = np.any(stacked > 0, axis=0) & np.any(stacked < 0, axis=0)
    rates[path] = float(conflict.mean())
  return rates


def _pyplot():
  import matplotlib  # Imported lazily: only plotting needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_cosine(cos: np.ndarray, tasks: Sequence[str], path: str | Path, *, title: str) -> Path:
  """Saves a heat map of task-vector cosine similarities.

  Args:
    cos: [T, T] matrix from `cosine_matrix`.
    tasks: task names.
    path: PNG path.
    title: figure title.

  Returns:
    The path written.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
  ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
  ax.set_yticks(range(len(tasks)), tasks)
  for i in range(len(tasks)):
    for j in range(len(tasks)):
      ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=7)
  fig.colorbar(im, ax=ax)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)


def plot_sign_conflicts(rates: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
  """Saves a grouped bar chart of the sign-conflict rate per layer, one group per leaf.

  Args:
    rates: {label (e.g. fine-tuning mode): {leaf path: rate}}.
    path: PNG path.

  Returns:
    The path written.
  """
  plt = _pyplot()
  labels = list(rates)
  leaves = list(next(iter(rates.values())))
  width = 0.8 / max(len(labels), 1)
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(leaves)), 4))
  for i, label in enumerate(labels):
    xs = np.arange(len(leaves)) + i * width
    ax.bar(xs, [rates[label][p] for p in leaves], width=width, label=label)
  ax.set_xticks(np.arange(len(leaves)) + 0.4 - width / 2, leaves, rotation=60, ha="right")
  ax.set_ylabel("fraction of entries with conflicting signs")
  ax.set_ylim(0, 1)
  ax.legend()
  ax.set_title("Sign conflicts between task vectors, per layer")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)


def plot_accuracy_vs_scale(
  curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *, metric: str = "norm"
) -> Path:
  """Saves validation accuracy against λ, one line per (rule, mode) curve.

  Args:
    curves: {label: {"scale": [...], "avg": [...], "norm": [...]}}.
    path: PNG path.
    metric: "avg" (absolute) or "norm" (normalized) accuracy.

  Returns:
    The path written.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4))
  # One colour per rule, one line style per fine-tuning mode (the "(mode)" suffix of the label).
  styles, colours = {}, {}
  for label, c in curves.items():
    rule, _, mode = label.partition(" (")
    colour = colours.setdefault(rule, f"C{len(colours) % 10}")
    style = styles.setdefault(mode, ("-", "--", ":", "-.")[len(styles) % 4])
    ax.plot(c["scale"], 100 * np.asarray(c[metric]), style, color=colour, marker=".", label=label)
  ax.set_xlabel("λ (scale)")
  ax.set_ylabel(f"validation {'normalized ' if metric == 'norm' else ''}accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.set_title("Validation accuracy against λ")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return Path(path)
