r"""Merging checkpoints from disk with any registered rule; hyper-parameters from the rule's spec.

  python launch/merge.py --config=configs/merge.py:ties \
      --config.base=/ckpt/base --config.experts=/ckpt/a --config.experts=/ckpt/b \
      --config.exclude='lm_head/.*' --config.rule.density=0.2 --workdir=/tmp/ties

Lists (experts, include, exclude) are tuples: repeat the flag once per element, or pass a Python
tuple (`--config.experts="('/ckpt/a,1', '/ckpt/b')"`). Nothing is split on commas; an element
holding a comma or braces (a regex like `h.{1,3}/w`) is quoted: `--config.exclude="'h.{1,3}/w'"`.

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
    if name == "layout":
      # From disk, run.merge_from_disk resolves "auto": "flax" for orbax checkpoints or
      # flax-named leaves (".../kernel"), else "torch" (safetensors / HF tensors, torch names).
      default = "auto"
    if default is None:
      default = ml_collections.config_dict.placeholder(_PLACEHOLDER_TYPES.get(hparam.kind, str))
    fields[name] = default
  return ml_collections.ConfigDict(fields)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config for the rule named by `arg` (default "task_arithmetic")."""
  rule_name = arg or "task_arithmetic"
  config = ml_collections.ConfigDict()
  config.seed = 0  # Keys of random rules (DARE, DELLA) come from jax.random.key(seed).
  # Checkpoints: a *.safetensors file, a Hugging Face directory (safetensors or pytorch_model.bin,
  # single or sharded), a torch .bin/.pt file or an orbax directory; set on the command line.
  config.base = ml_collections.config_dict.placeholder(str)
  config.experts = ml_collections.config_dict.placeholder(tuple)  # Paths, one per expert.
  config.rule_name = rule_name  # Key in mergejax.rules.REGISTRY.
  config.rule = rule_fields(rule_name)  # Keyword hyper-parameters of the rule.
  # Data-dependent rules (fisher, regmean, regmean_plusplus): an orbax directory written by
  # mergejax.statistics.save, one entry per expert in the order of config.experts (computing
  # statistics takes a model and data: see the README's "Data-dependent rules"). These rules
  # merge in memory whatever config.engine says.
  config.statistics = ml_collections.config_dict.placeholder(str)
  # Regexes over "a/b/c" leaf paths (full match; each must match some leaf); () merges all.
  config.include = ()
  config.exclude = ()
  config.others = "base"  # Unmerged float leaves: "base" (θ0) or "average" (mean of the experts).
  config.non_float = "check"  # Int/bool leaves: "check" (equal in all models) or "base" (θ0's).
  config.cast_experts = False  # Cast the experts' float leaves to the base's dtypes first.
  # The merged model, under --workdir: "auto" writes a Hugging Face directory when the base is
  # one, else one safetensors file; or "hf", "safetensors", "orbax".
  config.output = "merged"  # Name under --workdir (".safetensors" added for that format).
  config.output_format = "auto"
  # Floating leaves written in the base's dtypes ("base"), or "bfloat16", "float16", "float32".
  config.dtype = "base"
  config.shard_size = "5GB"  # Largest safetensors shard of a Hugging Face output.
  # "streaming": leaf by leaf within memory_budget_gb (mergejax.streaming), output shards written
  # as they complete; "memory": the whole merge in one jitted call (rules.merge), then the write.
  config.engine = "streaming"
  # Working memory of the streaming engine, in GiB; None: half of the available memory.
  config.memory_budget_gb = ml_collections.config_dict.placeholder(float)
  # A directory for JAX's persistent compilation cache (later runs reuse the executables).
  config.compile_cache_dir = ml_collections.config_dict.placeholder(str)
  # Devices each merged leaf is split over (mergejax.distributed), with the single-device bits:
  # None = every device of every process, 1 = one device (the single-device path).
  config.mesh = dict(devices=ml_collections.config_dict.placeholder(int))
  # Several hosts (mergejax.distributed.hosts.initialize): "host:port" of process 0, the process
  # count and this process's index; unset, JAX's own launchers are detected (TPU pods, SLURM).
  config.distributed = dict(
    coordinator_address=ml_collections.config_dict.placeholder(str),
    num_processes=ml_collections.config_dict.placeholder(int),
    process_id=ml_collections.config_dict.placeholder(int),
  )
  return config
