r"""The 8-task CLIP image-encoder benchmark (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST,
DTD).

Any data-free rule of mergejax.rules, with its paper defaults (configs/merge.py's `rule_fields`):

  python launch/clip_8task.py --config=configs/clip_8task.py:rule=ties,dtype=bfloat16 \
      --config.pool.pretrained=/ckpt/clip-vit-base-patch32 \
      --config.pool.experts_dir=/ckpt/clip-vit-base-patch32_{task} \
      --config.data.root_dir=/data/{task} --workdir=/tmp/clip8_ties

`{task}` is replaced by each name in `config.tasks` (FusionBench's checkpoints are
tanganke/clip-vit-base-patch32_<task>, pre-trained openai/clip-vit-base-patch32). Writes
workdir/results.md (the table), results.json and merged/ (a CLIPVisionModel directory).
`:runlocal` evaluates 64 images per task. Put a classnames.txt (one readable name per line, label
order, e.g. "annual crop land" for EuroSAT's AnnualCrop) in each task directory: zero-shot heads
are built from these names, and the published numbers use the task-vectors benchmark's names.

Published average absolute accuracy over the 8 test sets (../shared/METHODS.md):

  | model / rule                       | ViT-B/32                | ViT-L/14 |
  |------------------------------------|-------------------------|----------|
  | pre-trained (zero-shot)            | 48.0                    | 64.5     |
  | individually fine-tuned            | 90.5 (FusionBench 90.3) | 94.2     |
  | weight_average                     | 65.8                    | 79.6     |
  | task_arithmetic (λ=0.3 / searched) | 69.1 / 70.1 (FB 68.0)   | 84.5     |
  | ties (λ searched)                  | 72.4 (FB 72.2)          | 86.0     |
  | emr (task id at inference)         | 88.7                    | 93.7     |

FB: FusionBench's own re-fine-tuned checkpoints; compare methods on the same checkpoints.
"""

import ml_collections

from configs import merge
from mergejax.benchmarks.clip8.run import TASKS


def _parse(arg: str) -> dict[str, str]:
  out = {}
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    out[key] = value or "1"
  return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg` is "key=value,..." with rule=<name>, dtype=<name>, runlocal."""
  args = _parse(arg)
  unknown = set(args) - {"rule", "dtype", "runlocal"}
  if unknown:
    raise ValueError(f"Unknown config options {sorted(unknown)}; use rule=, dtype=, runlocal.")
  rule = args.get("rule", "task_arithmetic")

  config = ml_collections.ConfigDict()
  config.seed = 0  # Keys of random rules (DARE, DELLA).
  config.rule_name = rule
  config.rule = merge.rule_fields(rule)  # Paper defaults, from the rule's spec.
  config.tasks = ",".join(TASKS)
  config.pool = ml_collections.ConfigDict()
  config.pool.pretrained = ml_collections.config_dict.placeholder(str)  # A CLIPModel directory.
  config.pool.experts_dir = ml_collections.config_dict.placeholder(str)  # Contains "{task}".
  config.data = ml_collections.ConfigDict()
  config.data.root_dir = ml_collections.config_dict.placeholder(str)  # Contains "{task}".
  config.data.split = "test"  # Choose λ on "validation"; report "test".
  config.data.batch_size = 128
  config.data.max_examples = 64 if "runlocal" in args else 0  # 0: the whole split.
  config.dtype = args.get("dtype", "float32")  # "bfloat16" on GPU: ~2x faster, +-0.1 accuracy.
  config.eval_baselines = True  # Also evaluate pre-trained and fine-tuned (normalized accuracy).
  config.export = True  # Write the merged encoder as a transformers CLIPVisionModel directory.
  config.cache_dir = ""  # Preprocessed images and heads; "" = workdir/cache.
  return config
