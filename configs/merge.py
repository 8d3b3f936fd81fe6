r"""Merging checkpoints from disk with any registered rule; hyper-parameters from the rule's spec.

  python launch/merge.py --config=configs/merge.py:ties \
      --config.base=/ckpt/base.safetensors \
      --config.experts=/ckpt/a.safetensors,/ckpt/b.safetensors \
      --config.rule.density=0.2 --workdir=/tmp/ties

`arg` is a rule name of `mergejax.rules.REGISTRY` (default task_arithmetic). `config.rule` holds
that rule's hyper-parameters with their paper defaults, read from the rule's spec (the one place
each default lives), so `--config.rule.<name>=...` overrides any of them and a misspelt name fails
at parse time. A registered rule of your own gets its config the same way. Variant configs (e.g.
configs/ties_fusionbench.py) call `get_config(rule)` and change only what differs.
"""

import ml_collections

from mergejax import rules

# Python types of optional hyper-parameters whose default is None (ml_collections needs a type
# to parse a command-line override into).
_PLACEHOLDER_TYPES = {"float": float, "int": int, "per_expert": tuple}


def rule_fields(rule_name: str) -> ml_collections.ConfigDict:
  """Returns `rule_name`'s hyper-parameters with their defaults (a random rule's key excluded).

  Args:
    rule_name: a key of `mergejax.rules.REGISTRY`.

  Returns:
    A ConfigDict, one field per hyper-parameter.
  """
  spec = rules.spec.get(rule_name)
  fields = {}
  for name, hparam in spec.hparams.items():
    if hparam.kind == "key":
      continue  # Keys come from config.seed (rules.add_key).
    default = spec.defaults[name]
    if default is None:
      default = ml_collections.config_dict.placeholder(_PLACEHOLDER_TYPES.get(hparam.kind, str))
    fields[name] = default
  return ml_collections.ConfigDict(fields)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config for the rule named by `arg` (default "task_arithmetic")."""
  rule_name = arg or "task_arithmetic"
  config = ml_collections.ConfigDict()
  config.seed = 0  # Keys of random rules (DARE, DELLA) come from jax.random.key(seed).
  # Checkpoint paths: "*.safetensors" files or orbax directories; must be set on the command line.
  config.base = ml_collections.config_dict.placeholder(str)
  config.experts = ml_collections.config_dict.placeholder(str)  # Comma-separated.
  config.rule_name = rule_name  # Key in mergejax.rules.REGISTRY.
  config.rule = rule_fields(rule_name)  # Keyword hyper-parameters of the rule.
  # Comma-separated regexes over "a/b/c" leaf paths; "" merges every leaf.
  config.include = ""
  config.exclude = ""
  config.others = "base"  # Unmerged leaves: "base" (θ0) or "average" (mean of the experts).
  config.output = "merged.safetensors"  # Relative to --workdir; no suffix = orbax directory.
  return config
