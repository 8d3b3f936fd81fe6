"""The 8-task CLIP merging benchmark: merge the experts' image encoders, evaluate zero-shot, export.

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

import json
import pathlib
import time
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mergejax import provenance, rules
from mergejax.benchmarks.clip8 import classifier
from mergejax.benchmarks.clip8.data import load_task_data
from mergejax.benchmarks.clip8.pool import load_pool
from mergejax.io import hf
from mergejax.models import clip

TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


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
      task for task-specific rules such as "emr") and cache/ (preprocessed data and heads)
      unless `config.cache_dir` is set.

  Returns:
    `{"results": {row: {task: accuracy}}, "table": markdown, ...}` as written to results.json.
  """
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
    templates = classifier.TEMPLATES.get(t, classifier.DEFAULT_TEMPLATES)
    heads[t] = classifier.zero_shot_head(pool, data[t].classnames, templates, cache_dir=cache_dir)
  logging.info("Data and heads ready at %.1f s.", time.time() - started)

  # 4. Merge (only the image encoder; heads stay frozen).
  hparams = rules.add_key(
    config.rule_name, config.rule.to_dict() if config.rule else {}, config.seed
  )
  merged = rules.merge(config.rule_name, base, [pool.experts[t] for t in tasks], **hparams)
  # One model per task: the same one, or each task's own (EMR, TALL masks: needs the task id).
  per_task = dict(zip(tasks, rules.task_models(merged, base, len(tasks)), strict=True))

  # 5. Evaluate.
  def accuracy(backbone, t):
    module = classifier.ZeroShotClassifier(
      pool.clip_config.vision_config,
      len(data[t].classnames),
      pool.clip_config.projection_dim,
      dtype,
    )
    params = classifier.classifier_params(pool, backbone, heads[t])
    return classifier.evaluate(module, params, data[t], batch_size=config.data.batch_size)

  results: dict[str, dict[str, float]] = {}
  if config.eval_baselines:
    results["pretrained"] = {t: accuracy(base, t) for t in tasks}
    results["finetuned"] = {t: accuracy(pool.experts[t], t) for t in tasks}
  # The row label names the hyper-parameters that are set (None: the rule's default behaviour).
  hparams = sorted((k, v) for k, v in (config.rule or {}).items() if v is not None)
  label = config.rule_name + "".join(f" {k}={v}" for k, v in hparams)
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
    outputs.append(str(hf.save_pretrained(workdir / name, tree, vision_config)))
  record = provenance.record(config, seed=config.seed, started=started)
  record.update(
    results=results, table=table, outputs=outputs, examples={t: len(data[t].labels) for t in tasks}
  )
  (workdir / "results.json").write_text(json.dumps(record, indent=2, default=str))
  (workdir / "results.md").write_text(table)
  return record
