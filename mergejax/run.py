"""Library functions behind the launch entries: merge checkpoints from disk and write the result."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from mergejax import provenance, rules
from mergejax.io import checkpoint


def _patterns(value: str | None) -> list[str] | None:
  """Config strings hold comma-separated regexes; empty means "no pattern"."""
  if not value:
    return None
  return [p.strip() for p in value.split(",") if p.strip()]


def merge_from_disk(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Loads θ0 and the experts, merges them with `config.rule_name`, writes the merged model.

  Phases: load checkpoints (validated), build the rule's hyper-parameters, merge, save atomically,
  record provenance in `workdir/run.json`.

  Args:
    config: see configs/default.py (base, experts, rule_name, rule, include, exclude, others,
      seed, output).
    workdir: output directory.

  Returns:
    The provenance record written to run.json (with "outputs").
  """
  started = time.time()
  workdir = Path(workdir)
  if not config.base or not config.experts:
    raise ValueError("Set --config.base=PATH and --config.experts=PATH1,PATH2,... .")

  # 1. Load checkpoints (safetensors files or orbax directories).
  base = checkpoint.load_params(config.base)
  expert_paths = [p for p in config.experts.split(",") if p]
  experts = [checkpoint.load_params(p) for p in expert_paths]
  logging.info("Loaded base %s and %d experts.", config.base, len(experts))

  # 2. Hyper-parameters: the config's rule dict, plus a key for random rules.
  hparams = rules.add_key(
    config.rule_name, config.rule.to_dict() if config.rule else {}, config.seed
  )

  # 3. Merge.
  merged = rules.merge(
    config.rule_name,
    base,
    experts,
    include=_patterns(config.include),
    exclude=_patterns(config.exclude),
    others=config.others,
    **hparams,
  )

  # 4. Save; a task-specific result (EMR, TALL masks) is written as one model per task.
  output = workdir / config.output
  if isinstance(merged, rules.TaskSpecificMerge):
    suffix = ".safetensors" if config.output.endswith(".safetensors") else ""
    stem = config.output.removesuffix(".safetensors")
    outputs = []
    for t in range(len(experts)):
      path = workdir / f"{stem}_task{t}{suffix}"
      checkpoint.save_params(path, merged.task_model(base, t))
      outputs.append(str(path))
  else:
    checkpoint.save_params(output, merged)
    outputs = [str(output)]

  # 5. Provenance next to the result.
  record = provenance.record(config, seed=config.seed, started=started)
  record["outputs"] = outputs
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "run.json").write_text(json.dumps(record, indent=2, default=str))
  logging.info("Wrote %s", outputs)
  return record
