"""The CLIP 8-task benchmark's data: one task's split from local files, preprocessed and cached.

Layouts: image folders `root/split/<class>/<image>`, or a `datasets` dataset saved to disk. Images
are decoded, resized and center-cropped once on the host as CLIPImageProcessor does, and cached as
uint8 arrays.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclasses.dataclass
class ImageSplit:
  """One split of a task's images: uint8 pixels, int32 labels, class names in label order."""

  images: np.ndarray  # [N, S, S, 3] uint8 (possibly a read-only memory map of the cache).
  labels: np.ndarray  # [N] int32
  classnames: list[str]


def resize_and_crop(image: Any, size: int) -> np.ndarray:
  """CLIPImageProcessor's geometry: RGB, shortest side to `size` (bicubic), center crop.

  Args:
    image: a PIL image.
    size: output side (224 for ViT-B/32 and ViT-L/14).

  Returns:
    `[size, size, 3]` uint8.
  """
  from PIL import Image  # noqa: PLC0415 (optional dependency)

  image = image.convert("RGB")
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new = (size, new_long) if w <= h else (new_long, size)
  if new != (w, h):
    image = image.resize(new, Image.Resampling.BICUBIC)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _read_classnames(directory: pathlib.Path, default: list[str]) -> list[str]:
  # classnames.txt (one per line, label order) overrides folder or ClassLabel names: the published
  # numbers use the task-vectors benchmark's readable names ("annual crop land", not "AnnualCrop").
  path = directory / "classnames.txt"
  if not path.exists():
    return default
  names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if len(names) != len(default):
    raise ValueError(f"{path} lists {len(names)} classes, the data has {len(default)}.")
  return names


def _decode_all(images: Sequence[Any], size: int, open_fn) -> np.ndarray:
  out = np.empty((len(images), size, size, 3), np.uint8)
  # PIL releases the GIL while decoding and resizing, so threads do scale here.
  with concurrent.futures.ThreadPoolExecutor() as pool:
    for i, arr in enumerate(pool.map(lambda x: resize_and_crop(open_fn(x), size), images)):
      out[i] = arr
  return out


def load_task_data(
  root: str | pathlib.Path,
  split: str,
  *,
  image_size: int,
  cache_dir: str | pathlib.Path | None = None,
  max_examples: int | None = None,
) -> ImageSplit:
  """Loads one task's split from local files and preprocesses it (cached).

  Layouts, tried in order:
    * `datasets.load_from_disk(root)` is a DatasetDict with `split`, or `root/split` is a saved
      Dataset (columns "image" and "label"; class names from the ClassLabel feature);
    * image folders `root/split/<class>/<image>` (class order = sorted folder names).
  In both, an optional `classnames.txt` in `root` (or `root/split`) gives display names.

  Args:
    root: the task's directory.
    split: "test", "validation", "train", ...
    image_size: output side after resize-and-crop.
    cache_dir: where to keep the preprocessed uint8 arrays (None: no cache). The key is the
      path, split, size and subsample, not the file contents: clear it if the data change.
    max_examples: keep the first N examples (evenly strided) for smoke runs.

  Returns:
    The preprocessed split.
  """
  root = pathlib.Path(root)
  key = hashlib.sha1(f"{root.resolve()}|{split}|{image_size}|{max_examples}".encode()).hexdigest()
  cached = pathlib.Path(cache_dir) / f"data_{key[:16]}" if cache_dir else None
  if cached and (cached / "meta.json").exists():
    meta = json.loads((cached / "meta.json").read_text())
    return ImageSplit(
      np.load(cached / "images.npy", mmap_mode="r"),
      np.load(cached / "labels.npy"),
      meta["classnames"],
    )

  if (root / "dataset_dict.json").exists() or (root / split / "dataset_info.json").exists():
    data = _load_hf_dataset(root, split, image_size, max_examples)
  else:
    data = _load_image_folder(root, split, image_size, max_examples)

  if cached:
    cached.mkdir(parents=True, exist_ok=True)
    np.save(cached / "images.npy", data.images)
    np.save(cached / "labels.npy", data.labels)
    (cached / "meta.json").write_text(
      json.dumps({"classnames": data.classnames, "root": str(root)})
    )
  return data


def _subsample(n: int, max_examples: int | None) -> np.ndarray:
  if not max_examples or max_examples >= n:
    return np.arange(n)
  return np.linspace(0, n - 1, max_examples).round().astype(int)


def _load_image_folder(root, split, image_size, max_examples) -> ImageSplit:
  from PIL import Image  # noqa: PLC0415

  folder = root / split
  if not folder.is_dir():
    raise FileNotFoundError(
      f"No {folder} (expected {folder}/<class>/<images>, or a saved dataset)."
    )
  classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
  files, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted((folder / name).iterdir()):
      if f.suffix.lower() in _IMAGE_SUFFIXES:
        files.append(f)
        labels.append(label)
  if not files:
    raise FileNotFoundError(f"No images under {folder}/<class>/.")
  keep = _subsample(len(files), max_examples)
  images = _decode_all([files[i] for i in keep], image_size, Image.open)
  names = _read_classnames(folder, _read_classnames(root, classes))
  return ImageSplit(images, np.asarray(labels, np.int32)[keep], names)


def _load_hf_dataset(root, split, image_size, max_examples) -> ImageSplit:
  try:
    import datasets  # noqa: PLC0415 (optional dependency)
  except ImportError as e:
    raise ImportError(f"{root} is a saved `datasets` dataset; pip install datasets.") from e
  loaded = datasets.load_from_disk(str(root / split if (root / split).is_dir() else root))
  if isinstance(loaded, datasets.DatasetDict):
    loaded = loaded[split]
  keep = _subsample(len(loaded), max_examples)
  loaded = loaded.select(keep.tolist())
  feature = loaded.features["label"]
  names = list(getattr(feature, "names", None) or map(str, range(max(loaded["label"]) + 1)))
  images = _decode_all(loaded["image"], image_size, lambda im: im)
  return ImageSplit(images, np.asarray(loaded["label"], np.int32), _read_classnames(root, names))
