"""The synthvision data pool: the pre-training mixture and every task's train / val / test splits,
generated offline from seeds and cached as one .npz file.

Seeds: split s of task t is drawn from `np.random.default_rng([seed, crc32(t), s])`, so every
split has a seed of its own (changing the size of one split changes no other), and the pre-training
mixture has its own. Labels are balanced (each class count differs by at most one) and shuffled.
As a guard against leakage, a validation image identical to a training image, or a test image
identical to a training or validation image, is dropped (with continuous random parameters this
is rare; `make_pool` reports how many).
"""

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mergejax.benchmarks.common.data import Split, TaskData
from mergejax.benchmarks.synthvision import pretraining
from mergejax.benchmarks.synthvision import tasks as tasks_lib
from mergejax.io import atomic

SPLITS = ("train", "val", "test")
# The generators' behaviour, part of the pool's cache key: bump it whenever a change to `render`,
# `scene`, `pretraining` or `tasks` alters the images or labels drawn from a seed.
GENERATOR_VERSION = 6


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What determines the pool.

  Attributes:
    seed: the data seed (independent of the model seed).
    image_size: side of the square RGB images.
    supersample: rendering oversampling per side.
    pretrain_size: number of pre-training images.
    train: training examples per task.
    val: validation examples per task.
    test: test examples per task.
    tasks: names of the downstream tasks (keys of `tasks.TASKS`).
  """

  seed: int = 0
  image_size: int = 16
  supersample: int = 2
  pretrain_size: int = 40_000
  train: int = 2000
  val: int = 400
  test: int = 800
  tasks: tuple[str, ...] = tasks_lib.DEFAULT_TASKS

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> "DataConfig":
    d = dict(d)
    d["tasks"] = tuple(d.get("tasks", cls.tasks))
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Pool:
  """The generated data.

  Attributes:
    pretrain_x: uint8 [n, size, size, 3] pre-training images.
    pretrain_y: {attribute: int32 [n]} pre-training labels (keys of `pretraining.ATTRIBUTES`).
    tasks: {task name: TaskData} with uint8 images; see `as_float` for model inputs.
    dropped: {task name: duplicates dropped from val / test}.
  """

  pretrain_x: np.ndarray
  pretrain_y: dict[str, np.ndarray]
  tasks: dict[str, TaskData]
  dropped: dict[str, int]


def split_rng(seed: int, name: str, split: str) -> np.random.Generator:
  """Returns the generator of one split of one task (or of "pretrain")."""
  return np.random.default_rng([seed, zlib.crc32(name.encode()), SPLITS.index(split)])


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
  """Returns `n` labels, each class `n // num_classes` or one more times, shuffled."""
  return rng.permutation(np.resize(np.arange(num_classes, dtype=np.int32), n))


def make_split(cfg: DataConfig, name: str, split: str) -> Split:
  """Generates one split of one task from its own seed.

  Args:
    cfg: the data config.
    name: a key of `tasks.TASKS`.
    split: "train", "val" or "test".

  Returns:
    The split (uint8 images, int32 labels).
  """
  task = tasks_lib.TASKS[name]
  rng = split_rng(cfg.seed, name, split)
  labels = balanced_labels(rng, getattr(cfg, split), task.num_classes)
  x = task.generate(rng, labels, cfg.image_size, cfg.supersample, split)
  return Split(x=x, y=labels)


def _row_keys(x: np.ndarray) -> set[bytes]:
  return {r.tobytes() for r in x.reshape(len(x), -1)}


def drop_duplicates(split: Split, seen: set[bytes]) -> tuple[Split, int]:
  """Removes examples whose image bytes are in `seen`; returns (split, number removed)."""
  keep = np.array([r.tobytes() not in seen for r in split.x.reshape(len(split), -1)], bool)
  return Split(x=split.x[keep], y=split.y[keep]), int((~keep).sum())


def make_task(cfg: DataConfig, name: str) -> tuple[TaskData, int]:
  """Generates a task's three splits and drops cross-split duplicates.

  Returns:
    (TaskData, number of val / test examples dropped as duplicates).
  """
  splits = {s: make_split(cfg, name, s) for s in SPLITS}
  seen = _row_keys(splits["train"].x)
  splits["val"], dropped_val = drop_duplicates(splits["val"], seen)
  seen |= _row_keys(splits["val"].x)
  splits["test"], dropped_test = drop_duplicates(splits["test"], seen)
  return TaskData(name=name, **splits), dropped_val + dropped_test


def make_pool(cfg: DataConfig) -> Pool:
  """Generates everything: the pre-training mixture and each task's splits.

  Args:
    cfg: the data config.

  Returns:
    The pool.
  """
  unknown = [t for t in cfg.tasks if t not in tasks_lib.TASKS]
  if unknown:
    raise ValueError(f"Unknown task(s) {unknown}; known: {sorted(tasks_lib.TASKS)}.")
  x, y = pretraining.pretraining_mixture(
    split_rng(cfg.seed, "pretrain", "train"), cfg.pretrain_size, cfg.image_size, cfg.supersample
  )
  built, dropped = {}, {}
  for name in cfg.tasks:
    built[name], dropped[name] = make_task(cfg, name)
  return Pool(pretrain_x=x, pretrain_y=y, tasks=built, dropped=dropped)


def pool_key(cfg: DataConfig) -> str:
  """A 16-hex-digit hash of the data config (the cache file's name)."""
  record = {**dataclasses.asdict(cfg), "generator_version": GENERATOR_VERSION}
  blob = json.dumps(record, sort_keys=True, default=list)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_make_pool(cfg: DataConfig, cache_dir: str | Path | None) -> tuple[Pool, bool]:
  """Loads the pool from `<cache_dir>/pool-<key>.npz`, or generates and caches it.

  Args:
    cfg: the data config.
    cache_dir: cache root (None: generate, do not cache).

  Returns:
    (pool, whether it came from the cache).
  """
  if cache_dir is None:
    return make_pool(cfg), False
  path = Path(cache_dir).expanduser() / f"pool-{pool_key(cfg)}.npz"
  if path.exists():
    return _read(path, cfg), True
  pool = make_pool(cfg)
  arrays = {"pretrain/x": pool.pretrain_x}
  arrays.update({f"pretrain/y/{k}": v for k, v in pool.pretrain_y.items()})
  for name, task in pool.tasks.items():
    for s in SPLITS:
      arrays[f"{name}/{s}/x"] = getattr(task, s).x
      arrays[f"{name}/{s}/y"] = getattr(task, s).y
    arrays[f"{name}/dropped"] = np.int64(pool.dropped[name])
  with atomic.atomic_file(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  return pool, False


def _read(path: Path, cfg: DataConfig) -> Pool:
  with np.load(path) as z:
    tasks = {
      name: TaskData(
        name=name,
        **{s: Split(x=z[f"{name}/{s}/x"], y=z[f"{name}/{s}/y"]) for s in SPLITS},
      )
      for name in cfg.tasks
    }
    return Pool(
      pretrain_x=z["pretrain/x"],
      pretrain_y={k: z[f"pretrain/y/{k}"] for k in pretraining.ATTRIBUTES},
      tasks=tasks,
      dropped={name: int(z[f"{name}/dropped"]) for name in cfg.tasks},
    )


def as_float(x: np.ndarray) -> np.ndarray:
  """Model inputs from uint8 images: float32 in [-0.5, 0.5]."""
  return np.asarray(x, np.float32) / 255.0 - 0.5


def float_tasks(pool: Pool, names: Sequence[str] | None = None) -> dict[str, TaskData]:
  """Returns {task: TaskData} with float32 model inputs (see `as_float`).

  Args:
    pool: the pool.
    names: which tasks (default: all, in pool order).

  Returns:
    TaskData whose splits hold float32 images.
  """
  names = tuple(pool.tasks) if names is None else tuple(names)
  out = {}
  for name in names:
    t = pool.tasks[name]
    splits = {s: Split(x=as_float(getattr(t, s).x), y=getattr(t, s).y) for s in SPLITS}
    out[name] = TaskData(name=name, **splits)
  return out
