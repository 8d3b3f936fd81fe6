"""Zero-shot classification for the CLIP 8-task benchmark: text-tower heads, classifier, accuracy.

Each task's head is the pre-trained text tower's embedding of its class names under the task's
prompt templates (OpenAI CLIP's per-dataset prompts), frozen in merging, as in the standard
benchmark (METHODS.md).
"""

import functools
import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.benchmarks.clip8.data import ImageSplit
from mergejax.benchmarks.clip8.pool import ModelPool
from mergejax.io import tokenizer as tokenizer_lib
from mergejax.models import clip
from mergejax.tree import Params

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
  tokenizer = tokenizer_lib.load_tokenizer(
    pool.pretrained_dir, max_length=text_cfg.max_position_embeddings
  )
  prompts = [t.format(c) for c in classnames for t in templates]
  module = clip.CLIPModel(pool.clip_config)
  feats = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    ids, mask = tokenizer_lib.encode(tokenizer, chunk + [""] * (batch_size - len(chunk)))
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
  module: ZeroShotClassifier, params: Params, data: ImageSplit, *, batch_size: int = 128
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
