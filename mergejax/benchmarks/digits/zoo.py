"""The benchmark's model zoo: pre-trained model, experts per fine-tuning mode, multi-task model.

Building is deterministic given the zoo config and the seed. The result is cached as one orbax
checkpoint under `<cache_dir>/<key>/`, where the key is a hash of the zoo config and the seed: a
changed config gets a new key (a rebuild); an unchanged one loads in about a second.
"""

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from mergejax import finetune, models, provenance
from mergejax.benchmarks.common.data import TaskData, concat_splits
from mergejax.benchmarks.digits.data import make_tasks
from mergejax.io import checkpoint
from mergejax.tree import Params

_META = "zoo.json"
_CKPT = "params"


@dataclasses.dataclass
class Zoo:
  """A built (or loaded) zoo.

  Attributes:
    key: the cache key (hash of the zoo config and seed).
    tasks: benchmark task names, in the order of every per-task list.
    pretrained: {"backbone", "head"} after pre-training; the head is shared and frozen.
    experts: {mode: [backbone per task]}.
    multitask: backbone trained on all tasks' training data (head frozen).
    meta: build record (config, seed, build seconds, versions).
    cache_hit: whether the zoo was loaded from the cache.
  """

  key: str
  tasks: tuple[str, ...]
  pretrained: Params
  experts: dict[str, list[Params]]
  multitask: Params
  meta: dict[str, Any]
  cache_hit: bool


def zoo_key(zoo_config: ml_collections.ConfigDict | Mapping[str, Any], seed: int) -> str:
  """Returns the cache key: a 16-hex-digit hash of the zoo config and the seed.

  Args:
    zoo_config: `config.zoo` of configs/benchmark.py (or its dict).
    seed: the run's seed.

  Returns:
    The key, also the name of the cache sub-directory.
  """
  cfg = zoo_config.to_dict() if hasattr(zoo_config, "to_dict") else dict(zoo_config)
  blob = json.dumps({"zoo": cfg, "seed": seed}, sort_keys=True, default=list)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_data(zoo_config: ml_collections.ConfigDict) -> dict[str, TaskData]:
  """Loads the pre-training and benchmark tasks named by the zoo config.

  Args:
    zoo_config: `config.zoo` of configs/benchmark.py.

  Returns:
    {task name: TaskData}, pre-training tasks first.
  """
  names = tuple(dict.fromkeys((*zoo_config.pretrain_tasks, *zoo_config.tasks)))
  d = zoo_config.data
  return make_tasks(
    names, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed
  )


def build_model(zoo_config: ml_collections.ConfigDict):
  """Builds the flax model named by the zoo config.

  Args:
    zoo_config: `config.zoo` of configs/benchmark.py.

  Returns:
    The flax.linen module (params {"backbone", "head"}).
  """
  return models.build_model(zoo_config.model_name, **zoo_config.model.to_dict())


def _train_config(section: ml_collections.ConfigDict, **overrides: Any) -> finetune.TrainConfig:
  return finetune.TrainConfig(**{**section.to_dict(), **overrides})


def build_zoo(
  zoo_config: ml_collections.ConfigDict,
  seed: int,
  data: Mapping[str, TaskData] | None = None,
  *,
  progress: bool = True,
) -> dict[str, Any]:
  """Trains the zoo from scratch.

  Phases: pre-train backbone + head on the pre-training mixture; fine-tune one expert per task
  and mode from the pre-trained backbone with the head frozen; train the multi-task reference.

  Args:
    zoo_config: `config.zoo` of configs/benchmark.py.
    seed: seed of the initialization and of every batch sampler.
    data: tasks from `load_data` (loaded if None).
    progress: show tqdm progress bars.

  Returns:
    {"pretrained": {"backbone", "head"}, "experts": {mode: {task: backbone}},
     "multitask": backbone, "seconds": {phase: wall seconds}}.
  """
  data = load_data(zoo_config) if data is None else data
  model = build_model(zoo_config)
  tasks = tuple(zoo_config.tasks)
  desc = (lambda s: s) if progress else (lambda s: None)
  seconds = {}

  # 1. Pre-training: backbone and head on the pre-training mixture.
  start = time.time()
  sample = data[tasks[0]].train.x[:1]
  init = model.init(jax.random.key(seed), jnp.asarray(sample))["params"]
  mixture = concat_splits([data[n].train for n in zoo_config.pretrain_tasks])
  pretrained, _ = finetune.train(
    model,
    init,
    mixture,
    _train_config(zoo_config.pretrain),
    train_head=True,
    seed=seed,
    desc=desc("pre-train"),
  )
  seconds["pretrain"] = time.time() - start

  # 2. Experts: one per (mode, task), head frozen, all starting from the pre-trained backbone.
  experts = {}
  for mode in zoo_config.modes:
    start = time.time()
    rho = zoo_config.rho.get(mode, 0.0)
    cfg = _train_config(zoo_config.finetune, rho=rho)
    experts[mode] = {}
    bar = tqdm.tqdm(tasks, desc=f"experts ({mode})", disable=not progress, leave=False)
    for i, name in enumerate(bar):
      params, _ = finetune.train(
        model, pretrained, data[name].train, cfg, mode=mode, seed=seed * 1000 + i + 1
      )
      experts[mode][name] = params["backbone"]
    seconds[f"experts_{mode}"] = time.time() - start

  # 3. Multi-task reference: one backbone on the union of the tasks' training data.
  start = time.time()
  union = concat_splits([data[n].train for n in tasks])
  multitask, _ = finetune.train(
    model,
    pretrained,
    union,
    _train_config(zoo_config.finetune, steps=zoo_config.multitask_steps),
    seed=seed * 1000,
    desc=desc("multi-task"),
  )
  seconds["multitask"] = time.time() - start
  return {
    "pretrained": pretrained,
    "experts": experts,
    "multitask": multitask["backbone"],
    "seconds": seconds,
  }


def load_or_build(
  zoo_config: ml_collections.ConfigDict,
  seed: int,
  cache_dir: str | Path,
  data: Mapping[str, TaskData] | None = None,
  *,
  progress: bool = True,
) -> Zoo:
  """Loads the zoo for (zoo_config, seed) from `cache_dir`, or builds and caches it.

  Args:
    zoo_config: `config.zoo` of configs/benchmark.py.
    seed: the run's seed.
    cache_dir: cache root; the zoo lives in `<cache_dir>/<zoo_key(...)>/`.
    data: tasks from `load_data` (loaded if needed and None).
    progress: show tqdm progress bars while building.

  Returns:
    The `Zoo`, with `cache_hit` telling whether it was loaded.
  """
  key = zoo_key(zoo_config, seed)
  root = Path(cache_dir).expanduser() / key
  tasks = tuple(zoo_config.tasks)
  meta_path = root / _META
  # The metadata file is written last, so its presence marks a complete entry.
  if meta_path.exists():
    meta = json.loads(meta_path.read_text())
    tree = checkpoint.load_pytree(root / _CKPT)
    tree = jax.tree.map(jnp.asarray, tree)
    hit = True
  else:
    start = time.time()
    built = build_zoo(zoo_config, seed, data, progress=progress)
    seconds = built.pop("seconds")
    tree = built
    checkpoint.save_pytree(root / _CKPT, tree)
    meta = {
      "key": key,
      "zoo_config": zoo_config.to_dict(),
      "seed": seed,
      "build_seconds": round(time.time() - start, 2),
      "phase_seconds": {k: round(v, 2) for k, v in seconds.items()},
      "versions": provenance.package_versions(),
    }
    meta_path.write_text(json.dumps(meta, indent=2, default=list))
    hit = False
  experts = {mode: [tree["experts"][mode][t] for t in tasks] for mode in tree["experts"]}
  return Zoo(
    key=key,
    tasks=tasks,
    pretrained=tree["pretrained"],
    experts=experts,
    multitask=tree["multitask"],
    meta=meta,
    cache_hit=hit,
  )
