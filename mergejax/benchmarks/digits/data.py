"""Tasks built from scikit-learn's handwritten digits: one label space, many input distributions.

The 1797 8x8 digit images ship inside scikit-learn, so nothing is downloaded. Every task keeps the
ten digit labels (one frozen head serves them all, like CLIP's zero-shot text head) but shows the
digits through a different fixed input transformation, so each task needs different features:

  identity    the images as they are (used for pre-training, not a task by default)
  rot90/180/270, hflip, vflip, transpose, antitranspose   the symmetries of the square
  invert      1 - x: dark strokes on a bright background
  permute     a fixed random permutation of the 64 pixels (seeded)
  shift       a cyclic shift by two pixels right and down

One split of the *image indices* (fixed seed) is shared by all tasks, so no test image is seen, in
any transformation, by pre-training, fine-tuning or hyper-parameter selection.
"""

from collections.abc import Callable, Sequence

import numpy as np

from mergejax.benchmarks.common.data import Split, TaskData

IMAGE_SIZE = 8
NUM_CLASSES = 10
# Tasks of the default benchmark: eight distributions that conflict with each other and with the
# identity distribution the backbone is pre-trained on.
DEFAULT_TASKS = ("rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "invert", "permute")
_PERMUTATION_SEED = 1234  # Fixed so that "permute" means the same task in every run.


def _permute(x: np.ndarray) -> np.ndarray:
  perm = np.random.default_rng(_PERMUTATION_SEED).permutation(IMAGE_SIZE * IMAGE_SIZE)
  flat = x.reshape(x.shape[0], -1)[:, perm]
  return flat.reshape(x.shape)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "identity": lambda x: x,
  "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
  "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
  "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
  "hflip": lambda x: x[:, :, ::-1],
  "vflip": lambda x: x[:, ::-1, :],
  "transpose": lambda x: np.swapaxes(x, 1, 2),
  "antitranspose": lambda x: np.rot90(np.swapaxes(x, 1, 2), 2, axes=(1, 2)),
  "invert": lambda x: 1.0 - x,
  "permute": _permute,
  "shift": lambda x: np.roll(x, (2, 2), axis=(1, 2)),
}


def load_images() -> tuple[np.ndarray, np.ndarray]:
  """Loads scikit-learn's digits (shipped with the package; nothing is downloaded).

  Returns:
    (images float32 [1797, 8, 8] scaled to [0, 1], labels int32 [1797]).
  """
  from sklearn import datasets  # Imported here: only the data pipeline needs scikit-learn.

  bunch = datasets.load_digits()
  return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def split_indices(
  num: int, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
  """Splits `range(num)` into disjoint, sorted train / val / test index sets.

  Args:
    num: number of examples.
    val_fraction: fraction of examples for validation.
    test_fraction: fraction of examples for test.
    seed: seed of the permutation; the same seed gives the same split.

  Returns:
    {"train": idx, "val": idx, "test": idx}, int64 arrays that partition range(num).
  """
  if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
    raise ValueError(f"Bad split fractions: val={val_fraction}, test={test_fraction}.")
  perm = np.random.default_rng(seed).permutation(num)
  num_test = int(round(test_fraction * num))
  num_val = int(round(val_fraction * num))
  return {
    "test": np.sort(perm[:num_test]),
    "val": np.sort(perm[num_test : num_test + num_val]),
    "train": np.sort(perm[num_test + num_val :]),
  }


def make_tasks(
  names: Sequence[str] = DEFAULT_TASKS,
  *,
  val_fraction: float = 0.15,
  test_fraction: float = 0.25,
  seed: int = 0,
) -> dict[str, TaskData]:
  """Builds the tasks: the same image split for all tasks, each seen through its transformation.

  Args:
    names: keys of `TRANSFORMS`.
    val_fraction: fraction of the images for validation (hyper-parameter selection).
    test_fraction: fraction of the images for test (reporting only).
    seed: seed of the split.

  Returns:
    {name: TaskData} in the order of `names`.
  """
  unknown = [n for n in names if n not in TRANSFORMS]
  if unknown:
    raise ValueError(f"Unknown task(s) {unknown}; known: {sorted(TRANSFORMS)}.")
  images, labels = load_images()
  idx = split_indices(
    len(labels), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
  )
  tasks = {}
  for name in names:
    x = np.ascontiguousarray(TRANSFORMS[name](images), dtype=np.float32)
    splits = {k: Split(x=x[v], y=labels[v]) for k, v in idx.items()}
    tasks[name] = TaskData(name=name, **splits)
  return tasks
