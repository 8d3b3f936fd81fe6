"""The synthvision model zoo: a broadly pre-trained backbone, one frozen zero-shot head per task,
experts fine-tuned briefly with small updates (per fine-tuning mode), and the multi-task reference.

Phases of `build_zoo`:
1. pre-train the backbone on the multi-attribute mixture (label smoothing); discard its heads;
2. build each task's head from the pre-trained features of a few training shots per class
   (cosine prototypes with a temperature; `mergejax.models.prototype`);
3. fine-tune one expert per (mode, task) from θ0 with the head frozen (AdamW at a small learning
   rate, weight decay towards θ0 by default);
4. train the multi-task reference from θ0 on all tasks, each through its own frozen head.

Seeds: the pre-trained backbone is one fixed model, like a released CLIP checkpoint: its seed is
`config.zoo.pretrain.seed`. A run's seed (`load_or_build(config, seed)`) is the seed of everything
after it: the experts' and the multi-task model's batch order; the benchmark repeats over seeds
on one pre-trained backbone and one set of heads.

Three cache entries under `config.cache_dir` (`zoo_keys`): the data pool (`data.load_or_make_pool`,
keyed by the data config and the generators' version), the pre-trained backbone (keyed by pool,
model, pre-training recipe and its seed) and the rest (keyed by everything and the run's seed), so
a new fine-tuning recipe or seed reuses the pre-trained backbone.

What a runner needs:

    zoo = load_or_build(config, seed)            # config: configs/benchmark.py
    base, experts = zoo.base, zoo.experts[mode]  # backbones: what gets merged
    apply_fn = zoo.apply_fn(mode)                # logits = apply_fn(backbone, x, task_index)
    splits = zoo.learned_splits()                # {"train" | "validation" | "test": per task}
    acc, entropy = zoo.evaluate(backbone, "val", mode)  # per task, all tasks in one call
    x, y = zoo.split("test")                     # [T, n, 16, 16, 3] float32, [T, n]
"""

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mergejax import finetune, learned
from mergejax.benchmarks.common import zoo_cache
from mergejax.benchmarks.common.data import TaskData
from mergejax.benchmarks.synthvision import data as data_lib
from mergejax.benchmarks.synthvision import heads as heads_lib
from mergejax.benchmarks.synthvision import pretraining, training
from mergejax.benchmarks.synthvision import tasks as tasks_lib
from mergejax.models import prototype
from mergejax.models.resmlp import ResMLPBackbone
from mergejax.models.vit import ViTBackbone
from mergejax.tree import Params

BACKBONES = {"resmlp": ResMLPBackbone, "vit": ViTBackbone}
# The training code's behaviour, part of the cache keys: bump one whenever a change to the
# pre-training, or to fine-tuning and the multi-task loop, alters what a config builds (as
# data.GENERATOR_VERSION does for the images).
PRETRAIN_VERSION = 1
ZOO_VERSION = 2


def build_backbone(zoo_config: ml_collections.ConfigDict) -> nn.Module:
  """The image encoder named by `zoo_config.model_name` with `zoo_config.model` attributes."""
  if zoo_config.model_name not in BACKBONES:
    raise ValueError(f"Unknown model {zoo_config.model_name!r}; known: {sorted(BACKBONES)}.")
  return BACKBONES[zoo_config.model_name](**zoo_config.model.to_dict())


def num_head_rows(task_names) -> int:
  """Rows of every (padded) task head: the largest task's number of classes."""
  return max(tasks_lib.TASKS[t].num_classes for t in task_names)


def build_model(config: ml_collections.ConfigDict) -> prototype.PrototypeClassifier:
  """Backbone + cosine prototype head (params {"backbone", "head"}), heads padded to one size."""
  return prototype.PrototypeClassifier(
    backbone=build_backbone(config.zoo), num_classes=num_head_rows(config.data.tasks)
  )


def data_config(config: ml_collections.ConfigDict) -> data_lib.DataConfig:
  return data_lib.DataConfig.from_mapping(config.data.to_dict())


def _train_config(section: ml_collections.ConfigDict, **overrides: Any) -> finetune.TrainConfig:
  fields = set(finetune.TrainConfig._fields)
  d = {k: v for k, v in section.to_dict().items() if k in fields}
  return finetune.TrainConfig(**{**d, **overrides})


def pretrain_backbone(config: ml_collections.ConfigDict, pool: data_lib.Pool, *, progress=True):
  """Phase 1: pre-trains the backbone on the multi-attribute mixture; its heads are discarded.

  Args:
    config: configs/benchmark.py's config.
    pool: the data pool.
    progress: show a progress bar.

  Returns:
    (backbone params, record {"pretrain_loss": [first 50 steps' mean, last 50 steps' mean],
     "phase_seconds": {"pretrain": s}}).
  """
  start = time.time()
  backbone, _, losses = training.pretrain(
    build_backbone(config.zoo),
    pool.pretrain_x,
    pool.pretrain_y,
    pretraining.ATTRIBUTES,
    _train_config(config.zoo.pretrain),
    label_smoothing=config.zoo.pretrain.label_smoothing,
    seed=config.zoo.pretrain.seed,
    desc="pre-train" if progress else None,
  )
  record = {
    "pretrain_loss": [float(losses[:50].mean()), float(losses[-50:].mean())],
    "phase_seconds": {"pretrain": round(time.time() - start, 2)},
  }
  return backbone, record


def build_zoo(
  config: ml_collections.ConfigDict,
  pool: data_lib.Pool,
  base: Params,
  seed: int,
  *,
  progress: bool = True,
):
  """Phases 2-4 from the pre-trained backbone: heads, experts per mode, multi-task reference.

  Args:
    config: configs/benchmark.py's config.
    pool: the data pool.
    base: the pre-trained backbone θ0 (`pretrain_backbone`).
    seed: the seed of the experts' and the multi-task model's batch order.
    progress: show progress bars.

  Returns:
    (tree {"heads": {task: head}, "experts": {mode: {task: backbone}}, "multitask": backbone},
     record {"phase_seconds": ...}).
  """
  zc = config.zoo
  model = build_model(config)
  data = data_lib.float_tasks(pool, config.data.tasks)
  seconds = {}

  # 2. Zero-shot heads from a few shots per class.
  start = time.time()
  heads = heads_lib.build_heads(model, base, data, zc.heads)
  seconds["heads"] = time.time() - start

  # 3. Experts: head frozen, from θ0, one per (mode, task).
  experts = {}
  for mode in zc.modes:
    start = time.time()
    cfg = _train_config(zc.finetune, rho=zc.rho.get(mode, 0.0))
    experts[mode] = {}
    bar = tqdm.tqdm(config.data.tasks, desc=f"experts ({mode})", disable=not progress, leave=False)
    for i, name in enumerate(bar):
      params, _ = finetune.train(
        model,
        {"backbone": base, "head": heads[name]},
        data[name].train,
        cfg,
        mode=mode,
        seed=seed * 1000 + i + 1,
      )
      experts[mode][name] = params["backbone"]
    seconds[f"experts_{mode}"] = time.time() - start

  # 4. Multi-task reference: one backbone, every task through its own frozen head.
  start = time.time()
  multitask, _ = training.multitask(
    model,
    base,
    [heads[t] for t in config.data.tasks],
    [data[t].train for t in config.data.tasks],
    _train_config(zc.multitask),
    seed=seed * 1000,
    desc="multi-task" if progress else None,
  )
  seconds["multitask"] = time.time() - start
  record = {"phase_seconds": {k: round(v, 2) for k, v in seconds.items()}}
  return {"heads": heads, "experts": experts, "multitask": multitask}, record


@dataclasses.dataclass
class Zoo:
  """A built (or loaded) synthvision zoo and its data.

  Attributes:
    key: cache key of the zoo.
    seed: the seed of the experts and the multi-task model.
    tasks: task names, the order of every per-task list.
    model: the classifier module (params {"backbone", "head"}).
    base: pre-trained backbone θ0.
    heads: one frozen head per task (padded to one shape).
    experts: {mode: [backbone per task]}.
    multitask: the multi-task reference backbone.
    data: {task: TaskData} with float32 inputs.
    meta: build record (config, phase seconds, versions, pool cache hit ...).
    cache_hit: whether the zoo was loaded from the cache.
  """

  key: str
  seed: int
  tasks: tuple[str, ...]
  model: prototype.PrototypeClassifier
  base: Params
  heads: list[Params]
  experts: dict[str, list[Params]]
  multitask: Params
  data: dict[str, TaskData]
  meta: dict[str, Any]
  cache_hit: bool

  _fns: dict = dataclasses.field(default_factory=dict, repr=False)

  def _forward(self, mode: str):
    if ("forward", mode) not in self._fns:
      apply = finetune.make_apply(self.model, mode=mode, base_backbone=self.base)
      self._fns[("forward", mode)] = lambda b, h, x: apply(b, h, training.pixels(x))
    return self._fns[("forward", mode)]

  def apply_fn(self, mode: str = "standard") -> learned.TracedTaskApply:
    """Returns `apply(backbone, x, task_index) -> logits` with task `task_index`'s frozen head.

    For mode "linearized" the forward pass is the first-order Taylor model around θ0 (use it for
    linearized experts and their merges). The head is picked from the stacked heads, so
    `task_index` may be a Python int or a traced int32 (`learned.TracedTaskApply`: the learned
    loop then compiles one program for all tasks). One function per mode, so callers that cache
    jitted code on it share compiles.
    """
    if ("apply", mode) not in self._fns:
      forward, heads = self._forward(mode), self.stacked_heads

      def apply(backbone, x, task):
        return forward(backbone, jax.tree.map(lambda h: h[task], heads), x)

      self._fns[("apply", mode)] = learned.TracedTaskApply(apply)
    return self._fns[("apply", mode)]

  def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """All tasks' `name` split stacked: (x [T, n, ...], y [T, n]); n = the smallest split."""
    splits = [getattr(self.data[t], name) for t in self.tasks]
    n = min(len(s) for s in splits)
    return np.stack([s.x[:n] for s in splits]), np.stack([s.y[:n] for s in splits])

  def learned_splits(self) -> dict[str, list[dict[str, np.ndarray]]]:
    """The splits as `mergejax.learned` takes them: {"train" | "validation" | "test": [per task
    {"x", "y"}]}."""
    names = {"train": "train", "validation": "val", "test": "test"}
    return {
      k: [{"x": getattr(self.data[t], v).x, "y": getattr(self.data[t], v).y} for t in self.tasks]
      for k, v in names.items()
    }

  def evaluate(self, backbone: Params, split: str, mode: str = "standard"):
    """Per-task accuracy and mean prediction entropy (nats) on a split, all tasks in one call.

    Args:
      backbone: the backbone to evaluate (an expert, a merge, θ0 ...).
      split: "train", "val" or "test".
      mode: forward pass ("linearized" for linearized experts and their merges).

    Returns:
      (accuracy [T], entropy [T]) as NumPy float arrays.
    """
    if ("eval", mode) not in self._fns:
      forward = self._forward(mode)

      @jax.jit
      def evaluate(backbone, heads, x, y):
        def one(head, x, y):
          logp = jax.nn.log_softmax(forward(backbone, head, x))
          acc = jnp.mean(jnp.argmax(logp, -1) == y)
          return acc, -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1))

        return jax.vmap(one)(heads, x, y)

      self._fns[("eval", mode)] = evaluate
    acc, ent = self._fns[("eval", mode)](backbone, self.stacked_heads, *self.split(split))
    return np.asarray(acc, np.float64), np.asarray(ent, np.float64)

  def predict(self, backbone: Params, split: str, mode: str = "standard") -> np.ndarray:
    """Predicted labels [T, n] of every task's `split`."""
    if ("predict", mode) not in self._fns:
      forward = self._forward(mode)
      self._fns[("predict", mode)] = jax.jit(
        lambda b, heads, x: jax.vmap(lambda h, xt: jnp.argmax(forward(b, h, xt), -1))(heads, x)
      )
    return np.asarray(
      self._fns[("predict", mode)](backbone, self.stacked_heads, self.split(split)[0])
    )

  def predict_task(self, backbone: Params, task: int, split: str, mode: str = "standard"):
    """Predicted labels [n] of task `task`'s `split` (one compilation serves every task)."""
    if ("predict_task", mode) not in self._fns:
      forward = self._forward(mode)
      self._fns[("predict_task", mode)] = jax.jit(lambda b, h, x: jnp.argmax(forward(b, h, x), -1))
    x = getattr(self.data[self.tasks[task]], split).x
    return np.asarray(self._fns[("predict_task", mode)](backbone, self.heads[task], x))

  @property
  def stacked_heads(self) -> Params:
    """The heads stacked along a leading task axis."""
    if "stacked_heads" not in self._fns:
      self._fns["stacked_heads"] = jax.tree.map(lambda *h: jnp.stack(h), *self.heads)
    return self._fns["stacked_heads"]


def zoo_keys(config: ml_collections.ConfigDict, seed: int) -> tuple[str, str]:
  """Cache keys of the pre-trained backbone and of the rest of the zoo.

  The first hashes what determines pre-training (data, model, pre-training recipe and its seed),
  so changing the fine-tuning recipe or the run's seed reuses the pre-trained backbone; the
  second hashes everything and `seed`.
  """
  zoo = config.zoo.to_dict()
  # The pool's key covers the data config and the generators' version.
  pool = data_lib.pool_key(data_config(config))
  pre = {"pool": pool, "model_name": zoo["model_name"], "model": zoo["model"]}
  pre.update(pretrain=zoo["pretrain"], version=PRETRAIN_VERSION)
  full = {"pool": pool, "zoo": zoo, "version": ZOO_VERSION}
  return (
    zoo_cache.config_key(pre, zoo["pretrain"]["seed"], prefix="synthvision-pretrained-"),
    zoo_cache.config_key(full, seed, prefix="synthvision-zoo-"),
  )


def load_or_build(config: ml_collections.ConfigDict, seed: int, *, progress: bool = True) -> Zoo:
  """Loads the zoo of `config` and `seed` from `config.cache_dir`, or builds what is missing.

  Three cache entries: the data pool, the pre-trained backbone, the rest of the zoo.

  Args:
    config: configs/benchmark.py's config.
    seed: the seed of the experts and the multi-task model (not of pre-training).
    progress: show progress bars while building.

  Returns:
    The `Zoo` (with its data); `cache_hit` is True when nothing had to be built.
  """
  start = time.time()
  pool, pool_hit = data_lib.load_or_make_pool(data_config(config), config.cache_dir)
  pool_seconds = time.time() - start
  pre_key, key = zoo_keys(config, seed)
  base, pre_meta, pre_hit = zoo_cache.load_or_build(
    config.cache_dir, pre_key, lambda: pretrain_backbone(config, pool, progress=progress)
  )
  tree, meta, hit = zoo_cache.load_or_build(
    config.cache_dir, key, lambda: build_zoo(config, pool, base, seed, progress=progress)
  )
  meta = {
    **meta,
    "pretrained": pre_meta,
    "cache_hits": {"pool": pool_hit, "pretrained": pre_hit, "zoo": hit},
    "pool_seconds": round(pool_seconds, 2),
    "pool_dropped_duplicates": pool.dropped,
  }
  tasks = tuple(config.data.tasks)
  return Zoo(
    key=key,
    seed=seed,
    tasks=tasks,
    model=build_model(config),
    base=base,
    heads=[tree["heads"][t] for t in tasks],
    experts={m: [tree["experts"][m][t] for t in tasks] for m in tree["experts"]},
    multitask=tree["multitask"],
    data=data_lib.float_tasks(pool, tasks),
    meta=meta,
    cache_hit=pool_hit and pre_hit and hit,
  )
