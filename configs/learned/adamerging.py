r"""AdaMerging, layer-wise (Yang et al., ICLR 2024): the defaults of every learned-merging recipe.

Entropy of the merged model's predictions on unlabeled *test* inputs (transductive), one Λ per
task vector and leaf, init 0.3, clamped to [0, 1] inside the forward pass (the raw Λ stays free);
Adam lr 1e-3, 500 steps, two batches of 16 per task and step (the reference code's recipe).

  python launch/learn_merge.py --config=configs/learned/adamerging.py:runlocal \
      --workdir=/tmp/adamerging

Variants override only what differs: adamerging_taskwise, adamerging_plus, atlas,
atlas_unsupervised, dv_basi, dv_basi_unsupervised.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  runlocal = arg == "runlocal"
  config = ml_collections.ConfigDict()
  config.label = "AdaMerging layer-wise"  # Row name in tables.
  config.table_rank = 20  # Tables list recipes by rank, then module name.
  config.seed = 0
  config.method = "coefficients"  # Key in mergejax.learned.METHODS: coefficients | dv_basi.
  # Split whose inputs Λ is adapted on: "test" is transductive and reports must say so.
  config.adapt_split = "test"
  # Where launch/learn_merge.py gets its problem; "synthetic" needs no downloads.
  config.problem = "synthetic"
  config.synthetic = dict(
    num_tasks=4,
    in_dim=16,
    hidden=32,
    depth=2,
    num_classes=4,
    num_train=128,
    num_val=64,
    num_test=64,
  )
  # Basis vectors (mergejax.learned.bases): "task_vectors", "ties_split" (AdaMerging++),
  # "ties_trimmed" (the trim alone) or "dare"; `density` is the fraction the trim / DARE keeps.
  config.basis = dict(name="task_vectors", density=0.2)
  # Λ (parametrizations.blockwise_scaling): granularity "task" | "layer" | "patterns" (regexes
  # matched against whole "a/b/c" leaf paths); clamp bounds, applied in the forward pass
  # ("forward") or by projecting Λ after each update ("project").
  config.coefficients = dict(
    granularity="layer", patterns=(), init=0.3, clamp=(0.0, 1.0), clamp_mode="forward"
  )
  # Objective (mergejax.learned.objectives.make): `name` plus that objective's own options.
  config.objective = dict(name="entropy")
  config.optim = dict(name="adam", learning_rate=1e-3, weight_decay=0.0, clip_norm=0.0)
  # batches_per_step: batches per task and step, their losses summed. epochs > 0 overrides steps;
  # epoch_length: "smallest" (tasks in lockstep over the smallest one) or "largest". eval_every:
  # 0 = once per epoch, -1 = never (AdaMerging has no validation: the last Λ is the result). mgda:
  # combine per-task gradients by their min-norm convex combination instead of summing them.
  config.train = dict(
    batch_size=16,
    batches_per_step=2,
    steps=20 if runlocal else 500,
    epochs=0,
    epoch_length="smallest",
    eval_every=-1,
    eval_batch_size=512,
    log_every=1 if runlocal else 10,
    mgda=False,
  )
  # Selection on validation (never test): "accuracy" (normalized when reference accuracies are
  # given), "neg_entropy" or "neg_cross_entropy"; patience in evaluations, 0 = no early stop.
  config.early_stopping = dict(metric="accuracy", patience=0)
  config.dv_basi = dict(outer_iterations=3, start="learned", start_hparams={})
  config.ckpt = dict(every_steps=10 if runlocal else 100, keep=2)
  # Devices (mergejax.learned.sharding): θ0 and the basis split over `model` devices (FSDP-style),
  # task batches over `data` devices (None: every device not on the model axis), Λ replicated.
  # One device in all runs the single-device path. Checkpoints restore onto any mesh.
  config.mesh = dict(data=ml_collections.config_dict.placeholder(int), model=1)
  # Several hosts (mergejax.distributed.hosts.initialize): "host:port" of process 0, the process
  # count and this process's index; unset, JAX's own launchers are detected (TPU pods, SLURM).
  config.distributed = dict(
    coordinator_address=ml_collections.config_dict.placeholder(str),
    num_processes=ml_collections.config_dict.placeholder(int),
    process_id=ml_collections.config_dict.placeholder(int),
  )
  return config
