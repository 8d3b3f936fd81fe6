"""The synthvision task heads: frozen zero-shot-style classifiers built from the pre-trained
backbone's features of a few labelled shots per class (cosine prototypes with a temperature,
`mergejax.models.prototype`), like CLIP's text heads: never trained, shared by every expert,
merge and the multi-task model.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mergejax.benchmarks.common.data import TaskData
from mergejax.benchmarks.synthvision import tasks as tasks_lib
from mergejax.models import prototype
from mergejax.tree import Params


def shots(split, num_classes: int, per_class: int) -> np.ndarray:
  """Indices of the first `per_class` examples of each class in `split` (its order is random)."""
  idx = [np.flatnonzero(split.y == c)[:per_class] for c in range(num_classes)]
  return np.concatenate(idx)


def build_heads(
  model: prototype.PrototypeClassifier,
  backbone: Params,
  data: dict[str, TaskData],
  head_config: ml_collections.ConfigDict,
) -> dict[str, Params]:
  """One frozen cosine-prototype head per task from the features of a few training shots.

  Args:
    model: the classifier (its backbone computes the features).
    backbone: the pre-trained backbone params.
    data: {task: TaskData} with float inputs.
    head_config: `shots` per class, `temperature`, `center`.

  Returns:
    {task: head params}, all padded to `model.num_classes` rows.
  """
  heads = {}
  features = jax.jit(lambda b, x: model.backbone.apply({"params": b}, x))
  for name, task in data.items():
    k = tasks_lib.TASKS[name].num_classes
    idx = shots(task.train, k, head_config.shots)
    feats = features(backbone, jnp.asarray(task.train.x[idx]))
    heads[name] = prototype.prototype_head(
      feats,
      task.train.y[idx],
      num_classes=k,
      pad_to=model.num_classes,
      temperature=head_config.temperature,
      center=head_config.center,
    )
  return heads
