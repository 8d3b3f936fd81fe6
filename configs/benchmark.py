r"""The main job: the synthvision benchmark (broad pre-training, 8 distinct tasks with frozen
zero-shot heads, experts fine-tuned with small updates), every merging method, 3 seeds, the
regime checks first.

  python launch/benchmark.py --config=configs/benchmark.py --workdir=results/benchmark
  python launch/benchmark.py --config=configs/benchmark.py:smoke --workdir=/tmp/bench_smoke
  python launch/benchmark.py --config=configs/benchmark.py:regime --workdir=/tmp/regime
  python launch/benchmark.py --config=configs/benchmark.py:wide --workdir=/tmp/bench_wide

`arg` is a comma-separated list of switches: "smoke" (alias "runlocal") shrinks everything so the
whole run takes seconds (tests, notebook); "regime" builds the zoo and measures the regime checks
only (one seed, no rules, no learned methods: what the design is tuned against); "nolearned"
turns the learned methods off; "sam" adds SAM experts (and their rows) to the standard ones;
"adamw" fine-tunes the experts and the multi-task model with AdamW (lr 1e-4, 800 steps) instead
of SGD; "wide" doubles the backbone's width; "vit" swaps the residual MLP for a small ViT.
The digits stress test has its own config, configs/digits.py.
"""

import ml_collections

from configs import learned as learned_configs
from mergejax.benchmarks.synthvision import tasks

_SWITCHES = {"smoke", "runlocal", "regime", "nolearned", "sam", "adamw", "wide", "vit"}
# λ grids. Task arithmetic follows METHODS.md ({0, 0.05, ..., 1}); rules whose merged vector is a
# mean over tasks or keeps one task's entry (TIES's disjoint mean, MagMax, the spectral rules)
# need λ around 1 and get a wider grid.
_TA_SCALES = tuple(round(0.05 * i, 2) for i in range(21))
_MEAN_SCALES = tuple(round(0.1 * i, 1) for i in range(1, 21))
# ISO-C / ISO-CTS flatten the spectrum to its mean singular value, which shrinks the top
# directions: their α sits higher (both chose 2.0, the top of _MEAN_SCALES, in a first run).
_ISO_SCALES = tuple(round(0.1 * i, 1) for i in range(5, 41))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; see the module docstring for `arg`."""
  switches = {s.strip() for s in arg.split(",") if s.strip()}
  unknown = switches - _SWITCHES
  if unknown:
    raise ValueError(f"Unknown config switch(es) {sorted(unknown)}; use {sorted(_SWITCHES)}.")
  smoke = bool(switches & {"smoke", "runlocal"})

  config = ml_collections.ConfigDict()
  config.benchmark = "synthvision"  # Which runner launch/benchmark.py calls.
  # Seeds of the experts, the multi-task model and the learned methods; the table reports the
  # mean ± std over them. The pre-trained backbone has a seed of its own (zoo.pretrain.seed).
  config.seeds = (0, 1, 2)
  # The data pool and the zoo are cached here, one entry per hash of what determines them.
  config.cache_dir = "~/.cache/mergejax/zoo"

  # Data: generated offline from config.data.seed (one seed per task and split).
  config.data = ml_collections.ConfigDict()
  config.data.seed = 0
  config.data.image_size = 16
  config.data.supersample = 2
  config.data.pretrain_size = 40_000
  config.data.train = 4000
  config.data.val = 400
  config.data.test = 800
  config.data.tasks = tasks.DEFAULT_TASKS

  # The zoo: everything that determines the pre-trained model, heads, experts, multi-task model.
  config.zoo = ml_collections.ConfigDict()
  config.zoo.model_name = "resmlp"  # Key of synthvision.zoo.BACKBONES.
  config.zoo.model = dict(width=256, depth=3, expansion=4)
  # Broad supervised pre-training on the multi-attribute mixture (heads discarded afterwards).
  config.zoo.pretrain = dict(
    seed=0,
    steps=4000,
    batch_size=128,
    learning_rate=1e-3,
    warmup_steps=100,
    weight_decay=0.05,
    label_smoothing=0.1,
    chunk=100,
  )
  # Zero-shot heads: cosine prototypes of `shots` training examples per class, logits = cos / T.
  config.zoo.heads = dict(shots=8, temperature=0.05, center=True)
  # Experts: brief fine-tuning with small updates, head frozen, weight decay towards θ0. SGD with
  # momentum (the classic ViT/BiT fine-tuning recipe): its task vectors keep 0.90 of an expert's
  # gain when trimmed to the top 20%, AdamW's 0.66 (":adamw" switches back; README: why). Layer-wise
  # learning-rate decay (BEiT's fine-tuning recipe) keeps the input embedding, which every
  # task shares, near θ0: without it DARE's rescaled drop breaks the texture task's embedding.
  config.zoo.finetune = dict(
    optimizer="sgd",
    momentum=0.9,
    layer_decay=0.75,
    steps=1000,
    batch_size=64,
    learning_rate=3e-3,
    warmup_steps=30,
    weight_decay=0.1,
    decay_to_init=True,
    chunk=100,
  )
  # SAM / ASAM radii from METHODS.md (SAFT: ASAM 0.5, SAM 0.05).
  config.zoo.rho = dict(sam=0.05, asam=0.5)
  # Fine-tuning modes built into the zoo: standard | sam | asam | linearized.
  config.zoo.modes = ("standard", "sam") if "sam" in switches else ("standard",)
  # The multi-task reference: the experts' recipe on every task at once, each through its own
  # frozen head, `batch_size` per task.
  config.zoo.multitask = dict(config.zoo.finetune.to_dict(), batch_size=32)

  # Regime checks (mergejax.benchmarks.common.regime); the targets are the issue's.
  config.regime = ml_collections.ConfigDict()
  config.regime.mode = "standard"  # Whose experts the checks describe.
  config.regime.trim_density = 0.2
  config.regime.dare_density = 0.1  # DARE's p = 0.9.
  # Disentanglement error of each task pair on an α grid (Ortiz-Jiménez et al. 2023).
  config.regime.disentanglement_coeffs = (0.0, 0.5, 1.0)
  config.regime.map_coeffs = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)  # The plotted pair's map.
  config.regime.max_pairs = 28  # All pairs of 8 tasks.

  # Data-free rules, each with its validation grid (every combination is scored; the best by
  # mean normalized validation accuracy is reported on test).
  config.rules = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "dare",
    "dare_ties",
    "breadcrumbs",
    "della",
    "consensus",
    "magmax",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "emr",
    "tall_masks",
    "tsv_c",
    "fisher",
    "regmean",
    "regmean_plusplus",
  )
  # The data-dependent rules' statistics: each expert on the first `max_examples` training
  # examples of its own task (FusionBench's 256), through its frozen head.
  config.statistics = dict(max_examples=256, batch_size=64)
  config.grids = ml_collections.ConfigDict()
  config.grids.task_arithmetic = dict(scale=_TA_SCALES)
  config.grids.ties = dict(density=(0.1, 0.2, 0.3), scale=_MEAN_SCALES)
  # Densities: the papers' search spaces (TIES: k in {10, 20, 30}%; TALL masks: λ in 0.2-0.6),
  # widened where a first run chose the edge of ours (DARE, DARE-TIES, DELLA).
  config.grids.dare = dict(density=(0.1, 0.3, 0.5, 0.7, 0.9), scale=_TA_SCALES[1:])
  config.grids.dare_ties = dict(density=(0.1, 0.2, 0.3, 0.5, 0.7), scale=_MEAN_SCALES)
  config.grids.breadcrumbs = dict(
    density=(0.1, 0.15, 0.2), gamma=(0.001, 0.006, 0.01), scale=_TA_SCALES[1:]
  )
  config.grids.della = dict(density=(0.3, 0.5, 0.7, 0.9), scale=_MEAN_SCALES)
  config.grids.consensus = dict(tall_lambda=(0.2, 0.4, 0.6), scale=_TA_SCALES[1:])
  config.grids.magmax = dict(scale=_MEAN_SCALES)
  config.grids.tsv_m = dict(scale=_MEAN_SCALES)
  config.grids.iso_c = dict(scale=_ISO_SCALES)
  config.grids.iso_cts = dict(scale=_ISO_SCALES)
  config.grids.tall_masks = dict(tall_lambda=(0.2, 0.4, 0.6))

  # Learned merging (mergejax.learned): every recipe of configs/learned/ on each mode's experts,
  # each task read out by its frozen head. Λ is adapted on the split each recipe names (test
  # inputs for AdaMerging and DV-BASI unsupervised: transductive, marked † in the table) and
  # selected on validation only.
  config.learned = ml_collections.ConfigDict()
  config.learned.enabled = not switches & {"nolearned", "regime"}
  recipes = learned_configs.recipes()
  config.learned.run = tuple(recipes)  # Which recipes run, in table order.
  # Offsets: each recipe runs once per offset with seed + offset; with several, its row is
  # their mean (on top of the spread over config.seeds).
  config.learned.seeds = (0,)
  config.learned.modes = ()  # Modes whose experts get learned rows; () = every mode.
  config.learned.plot_method = "adamerging"  # Whose Λ heatmap is plotted.
  config.learned.methods = ml_collections.ConfigDict(
    {name: module.get_config("runlocal" if smoke else "") for name, module in recipes.items()}
  )
  config.plots = True

  if "adamw" in switches:
    for section in (config.zoo.finetune, config.zoo.multitask):
      section.update(optimizer="adamw", learning_rate=1e-4, steps=800, layer_decay=1.0)
  if "wide" in switches:
    config.zoo.model.width = 512
  if "vit" in switches:
    config.zoo.model_name = "vit"
    config.zoo.model = dict(patch_size=4, dim=96, depth=3, num_heads=4, mlp_dim=192, pool="gap")
  if "regime" in switches:
    config.seeds = (0,)
    config.rules = ()
  if smoke:
    config.seeds = (0, 1)
    config.data.pretrain_size = 512
    config.data.train, config.data.val, config.data.test = 60, 40, 40
    config.data.tasks = ("digits", "shapes", "count")
    config.zoo.model = (
      dict(patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32, pool="gap")
      if "vit" in switches
      else dict(width=32, depth=1, expansion=2)
    )
    # One jitted call per phase (chunk = steps): the smoke run's time is compilation.
    config.zoo.pretrain.update(steps=20, batch_size=32, warmup_steps=2, chunk=20)
    config.zoo.heads.shots = 2
    config.zoo.finetune.update(
      steps=10, batch_size=16, learning_rate=0.03, warmup_steps=2, chunk=10
    )
    config.zoo.multitask.update(steps=10, batch_size=8, warmup_steps=2, chunk=10)
    config.statistics = dict(max_examples=16, batch_size=8)
    config.regime.disentanglement_coeffs = (0.0, 1.0)
    config.regime.map_coeffs = (0.0, 1.0)
    config.regime.max_pairs = 1
    # One rule of each kind (plain, sparsified, task-specific, spectral, data-dependent): the rules
    # themselves are tested elsewhere; the smoke run checks the pipeline.
    config.rules = (
      "task_arithmetic",
      "ties",
      "emr",
      "tsv_m",
      "fisher",
      "regmean",
      "regmean_plusplus",
    )
    config.grids.task_arithmetic = dict(scale=(0.0, 0.3, 0.6, 1.0))
    config.grids.ties = dict(density=(0.2,), scale=(0.5, 1.0))
    config.grids.dare = dict(density=(0.3,), scale=(0.3, 0.6))
    config.grids.dare_ties = dict(density=(0.2,), scale=(0.5, 1.0))
    config.grids.breadcrumbs = dict(density=(0.15,), gamma=(0.006,), scale=(0.3, 0.6))
    config.grids.della = dict(density=(0.7,), scale=(0.5, 1.0))
    config.grids.consensus = dict(tall_lambda=(0.4,), scale=(0.3, 0.6))
    config.grids.tall_masks = dict(tall_lambda=(0.4,))
    for rule in ("magmax", "tsv_m", "iso_c", "iso_cts"):
      config.grids[rule] = dict(scale=(0.5, 1.0))
  return config
