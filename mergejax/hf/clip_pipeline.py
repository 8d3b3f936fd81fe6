"""The 8-task CLIP merging benchmark: model pool, image datasets, zero-shot heads, evaluation.

The standard benchmark (METHODS.md) merges CLIP image encoders fine-tuned on SUN397, Cars,
RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD, and classifies each task's test set with a frozen
zero-shot head built by the pre-trained text tower. `merge_and_evaluate` runs it for any rule of
`mergejax.rules`:

  1. load the pool: a pre-trained CLIPModel directory and one CLIPVisionModel (or CLIPModel)
     directory per task, as transformers writes them (FusionBench's `tanganke/clip-vit-*_<task>`);
  2. load each task's split from local files (image folders, or `datasets` saved to disk), decode
     and resize once on the host and cache the uint8 pixels;
  3. build each task's head from class names x prompt templates with the text tower (cached);
  4. merge the image encoders with `rules.merge`;
  5. evaluate (jitted, fixed batch shapes, optional bf16), write results.json / results.md;
  6. export the merged encoder as a CLIPVisionModel directory transformers loads unchanged.

Classifier parameters are `{"backbone": vision tower, "head": {...}}`: only "backbone" is merged.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mergejax.hf import clip, convert

Params = Any

TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")

# Prompt templates of the task-vectors benchmark (OpenAI CLIP's per-dataset prompts).
TEMPLATES: dict[str, tuple[str, ...]] = {
  "sun397": ("a photo of a {}.", "a photo of the {}."),
  "stanford-cars": (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
  ),
  "resisc45": tuple(
    f"{kind} {view} of {article}{{}}."
    for article in ("", "a ", "the ")
    for kind, view in (
      ("satellite", "imagery"),
      ("aerial", "imagery"),
      ("satellite", "photo"),
      ("aerial", "photo"),
      ("satellite", "view"),
      ("aerial", "view"),
    )
  ),
  "eurosat": (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
  ),
  "svhn": ('a photo of the number: "{}".',),
  "gtsrb": (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
  ),
  "mnist": ('a photo of the number: "{}".',),
  "dtd": tuple(
    f"a photo of {article} {{}} {thing}."
    for article in ("a", "the")
    for thing in ("texture", "pattern", "thing", "object")
  ),
}
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
  """One task's split, preprocessed: uint8 pixels, int32 labels, class names in label order."""

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
) -> TaskData:
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
    return TaskData(
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


def _load_image_folder(root, split, image_size, max_examples) -> TaskData:
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
  return TaskData(images, np.asarray(labels, np.int32)[keep], names)


def _load_hf_dataset(root, split, image_size, max_examples) -> TaskData:
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
  return TaskData(images, np.asarray(loaded["label"], np.int32), _read_classnames(root, names))


# ---------------------------------------------------------------------------------------------
# Model pool and zero-shot heads
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelPool:
  """The pre-trained CLIP (both towers) and the task experts' image encoders."""

  clip_config: clip.CLIPConfig
  clip_params: Params  # Full CLIPModel tree: text_model, vision_model, projections, logit_scale.
  experts: dict[str, Params]  # task -> vision tower.
  expert_layout: tuple[dict, bool]  # (config.json of the first expert, names prefixed?)
  pretrained_dir: pathlib.Path


def load_pool(pretrained: str, experts: dict[str, str]) -> ModelPool:
  """Loads the pre-trained CLIPModel and each task's fine-tuned image encoder.

  Args:
    pretrained: a CLIPModel checkpoint directory (with tokenizer.json for the heads).
    experts: `{task: directory}`, each a CLIPVisionModel or CLIPModel checkpoint.

  Returns:
    The pool, vision towers in the layout of `clip.CLIPVisionTransformer`.
  """
  params, config = convert.load_pretrained(pretrained)
  if config.get("model_type") != "clip":
    raise ValueError(f"{pretrained} must hold a full CLIPModel (text tower needed for heads).")
  towers, layout = {}, None
  for task, directory in experts.items():
    p, c = convert.load_pretrained(directory)
    towers[task] = clip.vision_tower(p)
    if layout is None:  # Export in the experts' own format: their config, their name prefix.
      vision = c.get("vision_config", c) if c.get("model_type") == "clip" else c
      layout = (dict(vision, model_type="clip_vision_model"), "vision_model" in p)
  return ModelPool(
    clip.CLIPConfig.from_dict(config), params, towers, layout, pathlib.Path(pretrained)
  )


@functools.partial(jax.jit, static_argnums=0)
def _text_features(module, params, ids, mask):
  return module.apply({"params": params}, ids, mask, method=clip.CLIPModel.get_text_features)


def zero_shot_head(
  pool: ModelPool,
  classnames: Sequence[str],
  templates: Sequence[str],
  *,
  cache_dir: str | pathlib.Path | None = None,
  batch_size: int = 256,
) -> np.ndarray:
  """Class embeddings from the text tower: mean over templates of unit text features, renormed.

  Args:
    pool: supplies the pre-trained CLIP and its tokenizer.json.
    classnames: display names, label order.
    templates: format strings with one "{}" slot.
    cache_dir: cache `[C, P]` arrays here, keyed by checkpoint, names and templates.
    batch_size: prompts per jitted text-tower call (fixed shape: one compilation).

  Returns:
    `[C, projection_dim]` fp32, unit rows.
  """
  weights = pool.pretrained_dir / "model.safetensors"
  stamp = weights.stat().st_mtime_ns if weights.exists() else 0
  key = hashlib.sha1(
    json.dumps(
      [str(pool.pretrained_dir.resolve()), stamp, list(classnames), list(templates)]
    ).encode()
  ).hexdigest()
  cached = pathlib.Path(cache_dir) / f"head_{key[:16]}.npy" if cache_dir else None
  if cached and cached.exists():
    return np.load(cached)

  text_cfg = pool.clip_config.text_config
  tokenizer = convert.load_tokenizer(
    pool.pretrained_dir, max_length=text_cfg.max_position_embeddings
  )
  prompts = [t.format(c) for c in classnames for t in templates]
  module = clip.CLIPModel(pool.clip_config)
  feats = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    ids, mask = convert.encode(tokenizer, chunk + [""] * (batch_size - len(chunk)))
    if text_cfg.eos_token_id != 2 and not np.all(np.any(ids == text_cfg.eos_token_id, axis=1)):
      # The pooled state is read at the first EOS: a tokenizer.json without the post-processor
      # that appends it would silently pool the wrong position.
      raise ValueError(f"tokenizer.json in {pool.pretrained_dir} does not append EOS.")
    # Pad to the full context so every call has one shape (the causal mask makes trailing padding
    # invisible to the EOS state that is pooled).
    width = text_cfg.max_position_embeddings - ids.shape[1]
    ids, mask = np.pad(ids, ((0, 0), (0, width))), np.pad(mask, ((0, 0), (0, width)))
    feats.append(np.asarray(_text_features(module, pool.clip_params, ids, mask))[: len(chunk)])
  f = np.concatenate(feats).reshape(len(classnames), len(templates), -1)
  f /= np.linalg.norm(f, axis=-1, keepdims=True)
  head = f.mean(axis=1)
  head /= np.linalg.norm(head, axis=-1, keepdims=True)
  head = head.astype(np.float32)
  if cached:
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached, head)
  return head


class ZeroShotHead(nn.Module):
  """visual_projection -> unit norm -> cosine with the class embeddings x exp(logit_scale)."""

  num_classes: int
  projection_dim: int

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    x = nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(
      pooled.astype(jnp.float32)
    )
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    classes = self.param(
      "class_embeddings", nn.initializers.zeros, (self.num_classes, self.projection_dim)
    )
    scale = self.param("logit_scale", nn.initializers.zeros, ())
    return jnp.exp(scale) * x @ classes.T


class ZeroShotClassifier(nn.Module):
  """uint8 NHWC images -> logits; params `{"backbone": vision tower, "head": ZeroShotHead}`."""

  vision_config: clip.CLIPVisionConfig
  num_classes: int
  projection_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    pixels = clip.normalize_pixels(images, self.dtype)
    _, pooled = clip.CLIPVisionTransformer(self.vision_config, self.dtype, name="backbone")(pixels)
    return ZeroShotHead(self.num_classes, self.projection_dim, name="head")(pooled)


def classifier_params(pool: ModelPool, backbone: Params, class_embeddings: np.ndarray) -> Params:
  """Assembles `ZeroShotClassifier` parameters: a (merged) vision tower + the task's frozen head.

  Args:
    pool: supplies the pre-trained projection and temperature.
    backbone: vision-tower parameters.
    class_embeddings: `[C, P]` from `zero_shot_head`.

  Returns:
    `{"backbone": ..., "head": {...}}`.
  """
  head = {
    "visual_projection": {"kernel": pool.clip_params["visual_projection"]["kernel"]},
    "class_embeddings": class_embeddings,
    "logit_scale": pool.clip_params["logit_scale"],
  }
  return {"backbone": backbone, "head": head}


@functools.partial(jax.jit, static_argnums=0)
def _correct(module, params, images, labels, valid):
  logits = module.apply({"params": params}, images)
  return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)


def evaluate(
  module: ZeroShotClassifier, params: Params, data: TaskData, *, batch_size: int = 128
) -> float:
  """Top-1 accuracy of a classifier on a preprocessed split.

  Every batch has the same shape (the last one is padded and masked), so the step compiles once.

  Args:
    module: the classifier.
    params: its parameters.
    data: preprocessed split.
    batch_size: images per step.

  Returns:
    Accuracy in [0, 1].
  """
  if module.dtype != jnp.float32:
    # Cast the backbone once instead of inside every step (halves the weight traffic in bf16).
    params = dict(
      params, backbone=jax.tree.map(lambda a: a.astype(module.dtype), params["backbone"])
    )
  n, correct = len(data.labels), 0
  for start in range(0, n, batch_size):
    images = np.asarray(data.images[start : start + batch_size])
    labels = data.labels[start : start + batch_size]
    valid = np.ones(len(labels), bool)
    if len(labels) < batch_size:
      pad = batch_size - len(labels)
      images = np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
      labels, valid = np.pad(labels, (0, pad)), np.pad(valid, (0, pad))
    correct += _correct(module, params, images, labels, valid)  # Async dispatch; summed lazily.
  return float(correct) / n


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _table(results: dict[str, dict[str, float]], tasks: Sequence[str]) -> str:
  finetuned = results.get("finetuned")
  header = ["model", *tasks, "avg"] + (["normalized avg"] if finetuned else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, accs in results.items():
    row = (
      [name]
      + [f"{100 * accs[t]:.1f}" for t in tasks]
      + [f"{100 * np.mean([accs[t] for t in tasks]):.1f}"]
    )
    if finetuned:
      # A 0-accuracy fine-tuned model (only in toy runs) has no normalized score: nan, not a crash.
      norm = [accs[t] / finetuned[t] if finetuned[t] else np.nan for t in tasks]
      row.append(f"{100 * np.mean(norm):.1f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def merge_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Merges the pool's image encoders with `config.rule_name` and evaluates on every task.

  Args:
    config: see configs/clip_8task.py.
    workdir: receives results.json, results.md, merged/ (a CLIPVisionModel directory; one per
      task for "emr") and cache/ (preprocessed data and heads) unless `config.cache_dir` is set.

  Returns:
    `{"results": {row: {task: accuracy}}, "table": markdown, ...}` as written to results.json.
  """
  from mergejax import provenance, rules  # noqa: PLC0415 (core modules, imported on use)

  started = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cache_dir = pathlib.Path(config.cache_dir) if config.cache_dir else workdir / "cache"
  tasks = [t for t in config.tasks.split(",") if t]
  dtype = jnp.dtype(config.dtype)

  # 1. Model pool.
  experts = {t: str(pathlib.Path(config.pool.experts_dir.format(task=t))) for t in tasks}
  pool = load_pool(config.pool.pretrained, experts)
  base = clip.vision_tower(pool.clip_params)
  logging.info(
    "Loaded pre-trained CLIP and %d experts in %.1f s.", len(tasks), time.time() - started
  )

  # 2. Data and 3. heads, per task.
  data, heads = {}, {}
  for t in tasks:
    data[t] = load_task_data(
      config.data.root_dir.format(task=t),
      config.data.split,
      image_size=pool.clip_config.vision_config.image_size,
      cache_dir=cache_dir,
      max_examples=config.data.max_examples or None,
    )
    templates = TEMPLATES.get(t, DEFAULT_TEMPLATES)
    heads[t] = zero_shot_head(pool, data[t].classnames, templates, cache_dir=cache_dir)
  logging.info("Data and heads ready at %.1f s.", time.time() - started)

  # 4. Merge (only the image encoder; heads stay frozen).
  hparams = dict(config.rule.to_dict()) if config.rule else {}
  if "key" in rules.hparams_of(config.rule_name):
    hparams["key"] = jax.random.key(config.seed)
  merged = rules.merge(config.rule_name, base, [pool.experts[t] for t in tasks], **hparams)
  if isinstance(merged, rules.EMRMerged):  # Task-specific models: needs the task id.
    per_task = {t: rules.emr_task_model(base, merged, i) for i, t in enumerate(tasks)}
  else:
    per_task = dict.fromkeys(tasks, merged)

  # 5. Evaluate.
  def accuracy(backbone, t):
    module = ZeroShotClassifier(
      pool.clip_config.vision_config,
      len(data[t].classnames),
      pool.clip_config.projection_dim,
      dtype,
    )
    params = classifier_params(pool, backbone, heads[t])
    return evaluate(module, params, data[t], batch_size=config.data.batch_size)

  results: dict[str, dict[str, float]] = {}
  if config.eval_baselines:
    results["pretrained"] = {t: accuracy(base, t) for t in tasks}
    results["finetuned"] = {t: accuracy(pool.experts[t], t) for t in tasks}
  label = config.rule_name + "".join(f" {k}={v}" for k, v in sorted((config.rule or {}).items()))
  results[label] = {t: accuracy(per_task[t], t) for t in tasks}
  table = _table(results, tasks)
  logging.info("Results:\n%s", table)

  # 6. Export the merged encoder in the experts' own format, then write the results.
  vision_config, prefixed = pool.expert_layout
  exports = (
    {"merged": merged}
    if per_task[tasks[0]] is merged
    else {f"merged_{t}": per_task[t] for t in tasks}
  )
  outputs = []
  for name, tree in exports.items() if config.export else ():
    tree = {"vision_model": tree} if prefixed else tree
    outputs.append(str(convert.save_pretrained(workdir / name, tree, vision_config)))
  record = provenance.record(config, seed=config.seed, started=started)
  record.update(
    results=results, table=table, outputs=outputs, examples={t: len(data[t].labels) for t in tasks}
  )
  (workdir / "results.json").write_text(json.dumps(record, indent=2, default=str))
  (workdir / "results.md").write_text(table)
  return record
