r"""The digits stress test: 8 pixel bijections of scikit-learn's digits (one task seen 8 ways, the
permutation-symmetric worst case for merging), one pre-trained backbone, experts, merges.

  python launch/benchmark.py --config=configs/digits.py --workdir=/tmp/digits
  python launch/benchmark.py --config=configs/digits.py:smoke --workdir=/tmp/digits_smoke
  python launch/benchmark.py --config=configs/digits.py:vit --workdir=/tmp/digits_vit

`arg` is a comma-separated list of switches: "smoke" (alias "runlocal") shrinks everything so the
zoo builds in seconds (tests, notebook); "vit" swaps the MLP for the small ViT; "nolearned" turns
the learned methods (AdaMerging, aTLAS, DV-BASI) off. The learned methods are every recipe in
configs/learned/ (a new recipe file is a new row, in `table_rank` order). Three seeds, mean ± std:

  bash launch/digits_seeds.sh               # seeds 0 1 2 into results/digits_seeds
"""

import ml_collections

from configs import learned as learned_configs

# λ grids. Task arithmetic follows METHODS.md ({0, 0.05, ..., 1}); rules whose merged vector is a
# mean over tasks (TIES's disjoint mean) need λ around 1 and get a wider grid.
_TA_SCALES = tuple(round(0.05 * i, 2) for i in range(21))
_MEAN_SCALES = tuple(round(0.1 * i, 1) for i in range(1, 21))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; see the module docstring for `arg`."""
  switches = {s.strip() for s in arg.split(",") if s.strip()}
  unknown = switches - {"smoke", "runlocal", "vit", "nolearned"}
  if unknown:
    raise ValueError(
      f"Unknown config switch(es) {sorted(unknown)}; use smoke, runlocal, vit, nolearned."
    )
  smoke = bool(switches & {"smoke", "runlocal"})
  vit = "vit" in switches

  config = ml_collections.ConfigDict()
  config.benchmark = "digits"  # Which runner launch/benchmark.py calls.
  config.seed = 0
  # Zoo cache: one sub-directory per hash of `config.zoo` (and the seed).
  config.cache_dir = "~/.cache/mergejax/zoo"

  # Everything that determines the zoo (pre-trained model, experts, multi-task model).
  config.zoo = ml_collections.ConfigDict()
  config.zoo.model_name = "vit" if vit else "mlp"  # Key in mergejax.models.MODELS.
  if vit:
    config.zoo.model = dict(patch_size=2, dim=64, depth=2, num_heads=4, mlp_dim=128, pool="gap")
  else:
    config.zoo.model = dict(width=512, depth=2)
  # Tasks: keys of mergejax.benchmarks.digits.data.TRANSFORMS. The backbone and the shared head
  # are pre-trained on `pretrain_tasks`, so the pre-trained model is weak on every benchmark task.
  config.zoo.tasks = (
    "rot90",
    "rot180",
    "rot270",
    "hflip",
    "vflip",
    "transpose",
    "invert",
    "permute",
  )
  config.zoo.pretrain_tasks = ("identity",)
  config.zoo.data = dict(val_fraction=0.15, test_fraction=0.25, split_seed=0)
  config.zoo.pretrain = dict(
    steps=500, batch_size=128, learning_rate=1e-3, warmup_steps=50, weight_decay=0.0
  )
  config.zoo.finetune = dict(
    steps=500, batch_size=128, learning_rate=1e-3, warmup_steps=50, weight_decay=0.1
  )
  # SAM / ASAM radii from METHODS.md (SAFT: ASAM 0.5, SAM 0.05).
  config.zoo.rho = dict(sam=0.05, asam=0.5)
  # The multi-task reference: one backbone trained on the union of all tasks' training splits.
  config.zoo.multitask_steps = 2000
  # Fine-tuning modes built into the zoo: standard | sam | asam | linearized.
  config.zoo.modes = ("standard", "sam")
  if vit:
    config.zoo.pretrain.learning_rate = 3e-3
    config.zoo.pretrain.steps = 1000
  if smoke:
    config.zoo.tasks = ("rot90", "hflip", "permute")
    config.zoo.model = (
      dict(patch_size=4, dim=16, depth=1, num_heads=2, mlp_dim=32, pool="gap")
      if vit
      else dict(width=64, depth=1)
    )
    # Few, large steps: the smoke zoo still learns (pre-trained weak, experts clearly better).
    config.zoo.pretrain.steps = 200
    config.zoo.finetune.steps = 150
    config.zoo.multitask_steps = 300
    config.zoo.pretrain.learning_rate = config.zoo.finetune.learning_rate = 3e-3
    config.zoo.modes = ("standard",)
    config.zoo.pretrain.warmup_steps = config.zoo.finetune.warmup_steps = 5

  # Merging: the rules run for each fine-tuning mode, with their validation grids. Every grid
  # entry is a tuple of candidate values; the best combination by mean normalized validation
  # accuracy is reported on test.
  config.rules = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "consensus",
    "emr",
    "magmax",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "tsv_c",
  )
  config.grids = ml_collections.ConfigDict()
  config.grids.task_arithmetic = dict(scale=_TA_SCALES)
  config.grids.ties = dict(density=(0.1, 0.2, 0.3), scale=_MEAN_SCALES)
  config.grids.dare_ties = dict(density=(0.1, 0.2, 0.3), scale=_MEAN_SCALES)
  config.grids.breadcrumbs = dict(
    density=(0.1, 0.15, 0.2), gamma=(0.001, 0.006, 0.01), scale=_TA_SCALES[1:]
  )
  config.grids.consensus = dict(tall_lambda=(0.2, 0.4, 0.6), scale=_TA_SCALES[1:])
  # MagMax keeps one task's entry per weight and the spectral rules' updates have a task vector's
  # size (TSV-M: α = 1, ISO: α ~ 1-1.5 on CLIP), so they get the wide grid around 1. TSV-C is
  # per task (task id at inference) at the paper's α = 1 and rank 1/T.
  config.grids.magmax = dict(scale=_MEAN_SCALES)
  config.grids.tsv_m = dict(scale=_MEAN_SCALES)
  config.grids.iso_c = dict(scale=_MEAN_SCALES)
  config.grids.iso_cts = dict(scale=_MEAN_SCALES)
  if smoke:
    config.grids.task_arithmetic = dict(scale=(0.0, 0.3, 0.6, 1.0))
    config.grids.ties = dict(density=(0.2,), scale=(0.5, 1.0))
    config.grids.dare_ties = dict(density=(0.2,), scale=(0.5, 1.0))
    config.grids.breadcrumbs = dict(density=(0.15,), gamma=(0.006,), scale=(0.3, 0.6))
    config.grids.consensus = dict(tall_lambda=(0.4,), scale=(0.3, 0.6))
    for rule in ("magmax", "tsv_m", "iso_c", "iso_cts"):
      config.grids[rule] = dict(scale=(0.5, 1.0))
  if vit and not smoke:
    # The ViT's many leaves make each merge slower: search λ at the rules' published points.
    config.grids.ties.density = (0.2,)
    config.grids.dare_ties.density = (0.1, 0.2)
    config.grids.breadcrumbs.density = (0.15,)
    config.grids.breadcrumbs.gamma = (0.006,)

  # Learned merging (mergejax.learned): every method on every mode's experts, head frozen and
  # shared. Λ is adapted on the split each recipe names (test inputs for AdaMerging and DV-BASI
  # unsupervised: transductive, marked † in the table) and selected on validation only.
  config.learned = ml_collections.ConfigDict()
  config.learned.enabled = "nolearned" not in switches
  # Every recipe of configs/learned/, in table order (its `table_rank`); its row is its `label`.
  recipes = learned_configs.recipes()
  # Which methods run, in table order (keys of config.learned.methods).
  config.learned.run = tuple(recipes)
  # Seed offsets: each learned method runs once per offset with seed config.seed + offset (batch
  # order, DARE masks); with several, its row reports the mean and the std over them.
  config.learned.seeds = (0,)
  # Modes whose experts get learned rows; () = every mode in config.zoo.modes.
  config.learned.modes = ()
  # Method whose Λ heatmap and curves are plotted (DV-BASI's trajectory is plotted whenever
  # "dv_basi" runs).
  config.learned.plot_method = "adamerging"
  # One full recipe per learned method ("runlocal" recipes for the smoke run), so any field can
  # be overridden from the command line, e.g. --config.learned.methods.adamerging.train.steps=100.
  config.learned.methods = ml_collections.ConfigDict(
    {name: module.get_config("runlocal" if smoke else "") for name, module in recipes.items()}
  )
  config.plots = True
  return config
