r"""The synthvision benchmark: broad pre-training, 8 distinct tasks with frozen zero-shot heads,
experts fine-tuned with small updates, and the regime checks.

  python launch/synthvision.py --config=configs/synthvision.py --workdir=/tmp/synthvision
  python launch/synthvision.py --config=configs/synthvision.py:smoke --workdir=/tmp/sv_smoke
  python launch/synthvision.py --config=configs/synthvision.py:wide --workdir=/tmp/sv_wide
  python launch/synthvision.py --config=configs/synthvision.py:vit --workdir=/tmp/sv_vit

`arg` is a comma-separated list of switches: "smoke" (alias "runlocal") shrinks everything so the
zoo builds in seconds (tests, notebook); "wide" doubles the backbone's width; "vit" swaps the
residual MLP for a small ViT.
"""

import ml_collections

from mergejax.benchmarks.synthvision import tasks

_SWITCHES = {"smoke", "runlocal", "wide", "vit"}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; see the module docstring for `arg`."""
  switches = {s.strip() for s in arg.split(",") if s.strip()}
  unknown = switches - _SWITCHES
  if unknown:
    raise ValueError(f"Unknown config switch(es) {sorted(unknown)}; use {sorted(_SWITCHES)}.")
  smoke = bool(switches & {"smoke", "runlocal"})

  config = ml_collections.ConfigDict()
  config.seed = 0  # Model seed: initialization, batch order, DARE masks (not the data).
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
  config.zoo.model = dict(width=256, depth=3, expansion=2)
  # Broad supervised pre-training on the multi-attribute mixture (heads discarded afterwards).
  config.zoo.pretrain = dict(
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
  # Experts: brief fine-tuning with small updates, head frozen, weight decay towards θ0.
  config.zoo.finetune = dict(
    steps=800,
    batch_size=64,
    learning_rate=1e-4,
    warmup_steps=30,
    weight_decay=0.1,
    decay_to_init=True,
    chunk=100,
  )
  # SAM / ASAM radii from METHODS.md (SAFT: ASAM 0.5, SAM 0.05).
  config.zoo.rho = dict(sam=0.05, asam=0.5)
  # Fine-tuning modes built into the zoo: standard | sam | asam | linearized.
  config.zoo.modes = ("standard",)
  # The multi-task reference: every task through its own frozen head, `batch_size` per task.
  config.zoo.multitask = dict(
    steps=600,
    batch_size=32,
    learning_rate=1e-4,
    warmup_steps=30,
    weight_decay=0.1,
    decay_to_init=True,
    chunk=100,
  )

  # Regime checks (mergejax.benchmarks.common.regime); the targets are the issue's.
  config.regime = ml_collections.ConfigDict()
  config.regime.mode = "standard"  # Whose experts the checks describe.
  config.regime.trim_density = 0.2
  config.regime.dare_density = 0.1  # DARE's p = 0.9.
  # Disentanglement error of each task pair on an α grid (Ortiz-Jiménez et al. 2023).
  config.regime.disentanglement_coeffs = (0.0, 0.5, 1.0)
  config.regime.map_coeffs = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)  # The plotted pair's map.
  config.regime.max_pairs = 28  # All pairs of 8 tasks.

  # A sanity look at a few merges on validation (not a benchmark table; never used for tuning).
  config.sanity = ml_collections.ConfigDict()
  config.sanity.task_arithmetic = (0.2, 0.3, 0.5, 1.0)
  config.sanity.ties = (0.5, 1.0, 1.5)
  config.sanity.dare = (0.2, 0.3, 0.5)

  config.plots = True  # The disentanglement map of the first task pair.

  if "wide" in switches:
    config.zoo.model.width = 512
  if "vit" in switches:
    config.zoo.model_name = "vit"
    config.zoo.model = dict(patch_size=4, dim=96, depth=3, num_heads=4, mlp_dim=192, pool="gap")
  if smoke:
    config.data.pretrain_size = 512
    config.data.train, config.data.val, config.data.test = 60, 30, 30
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
      steps=10, batch_size=16, learning_rate=1e-3, warmup_steps=2, chunk=10
    )
    config.zoo.multitask.update(steps=10, batch_size=8, warmup_steps=2, chunk=10)
    config.regime.disentanglement_coeffs = (0.0, 1.0)
    config.regime.map_coeffs = (0.0, 1.0)
    config.regime.max_pairs = 1
    config.sanity.task_arithmetic = (0.3,)
    config.sanity.ties = (1.0,)
    config.sanity.dare = (0.3,)
  return config
