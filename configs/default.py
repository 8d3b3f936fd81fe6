r"""Shared fields of every merge config; the per-rule files override `rule_name` and `rule`.

  python launch/merge.py --config=configs/task_arithmetic.py \
      --config.base=/ckpt/base.safetensors \
      --config.experts=/ckpt/a.safetensors,/ckpt/b.safetensors \
      --config.rule.scale=0.3 --workdir=/tmp/ta
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the shared fields; `arg` is unused (kept for the config_flags convention)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # Keys of random rules (DARE, DELLA) come from jax.random.key(seed).
  # Checkpoint paths: "*.safetensors" files or orbax directories; must be set on the command line.
  config.base = ml_collections.config_dict.placeholder(str)
  config.experts = ml_collections.config_dict.placeholder(str)  # Comma-separated.
  config.rule_name = "task_arithmetic"  # Key in mergejax.rules.REGISTRY.
  config.rule = ml_collections.ConfigDict({"scale": 0.3})  # Keyword hyper-parameters of the rule.
  # Comma-separated regexes over "a/b/c" leaf paths; "" merges every leaf.
  config.include = ""
  config.exclude = ""
  config.others = "base"  # Unmerged leaves: "base" (θ0) or "average" (mean of the experts).
  config.output = "merged.safetensors"  # Relative to --workdir; no suffix = orbax directory.
  return config


def with_rule(rule_name: str, **hparams) -> ml_collections.ConfigDict:
  """Returns the default config for `rule_name` with the given hyper-parameters."""
  config = get_config()
  config.rule_name = rule_name
  config.rule = ml_collections.ConfigDict(hparams)
  return config
