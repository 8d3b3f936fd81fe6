r"""Check (not a test): Fisher merging, RegMean and RegMean++ against FusionBench, same inputs.

  PYTHONPATH=. .venv/bin/python launch/check_fusionbench_datadep.py
  PYTHONPATH=. .venv/bin/python launch/check_fusionbench_datadep.py \
      --fusionbench_python=/work/venvs/peers/bin/python

The model is a tiny random Hugging Face CLIP vision tower (hidden 32, 2 layers, 2 heads, 8×8
images, 4×4 patches: 5 tokens) and its flax twin (`mergejax.models.clip`, the same weights through
`mergejax.io.names`); the classifier is FusionBench's CLIP head (pooled output → visual projection
→ L2 normalization → cosine with per-task "zero-shot" text embeddings × the logit scale), frozen,
with random projection and text embeddings. θ0 and each expert (θ0 + noise) get 256 random
images per task; both sides read the same images in the same order, in batches of 32.

A worker in FusionBench's Python (fusion-bench 0.2.33, torch 2.13, transformers 5) runs the
algorithm classes themselves on in-memory models (`BaseModelPool`):
`FisherMergingForCLIPVisionModel` (`get_fisher_weights` for the statistics, `run` for the
merge), `RegMeanAlgorithmForCLIP`
(`get_regmean_weights`, `run`) and `RegMeanAlgorithmForCLIPPlusPlus` (`run`), each with
FusionBench's config values (Fisher: 256 examples, normalized, minimal weight 1e-6; RegMean: 256
examples, α = 0.6; RegMean++: 256 examples, α = 0.95). What the worker changes, and why:
* the zero-shot heads are given (random) instead of built from a CLIP text tower
  (`on_*_start` is a no-op), and the images need no processor (an identity callable);
* RegMean++ for CLIP reads `model.vision_model.encoder.layers`, the layout of transformers 4's
  `CLIPVisionModel`; transformers 5's is the vision transformer itself (no `.vision_model`,
  tensor names without "vision_model."), so its models are wrapped in a module holding the
  tower as `.vision_model` (Fisher merging and RegMean take the models as they are);
* the data loaders' `shuffle=True` (RegMean, RegMean++) is turned off, so that both sides read
  the same examples in the same order (the Gram matrices are sums: shuffling only reorders them);
* `RegMeanAlgorithmForCLIPPlusPlus` cannot be constructed as shipped (its `_config_mapping` is a
  plain dict where its parent's `__init__` needs a bidict): the worker gives it its parent's
  mapping plus its own entry, as `FisherMergingForCLIPVisionModel` declares it;
* RegMean++'s `layer_batches_forward` indexes the encoder layer's output with `[0]`, which in
  transformers 5 (a tensor, no longer a tuple) is the batch's *first example*: the layers above
  the first then see one example per batch. The worker runs the class as shipped (row "as
  shipped") and with that one line reading the whole output (the row compared).

mergejax runs `mergejax.statistics` and `rules.merge` on the flax twin: Fisher with FusionBench's
estimator (`labels="expected", per_example=False`), RegMean with α = 0.6, RegMean++ with α = 0.95
and `exclude="post_layernorm/.*"` (FusionBench's RegMean++ never merges the final LayerNorm: it
stays θ0). Printed per rule: the max abs difference and the relative error ‖mergejax − FusionBench‖
/ ‖FusionBench − θ0‖ over all tensors, and for the statistics ‖Δ‖ / ‖FusionBench‖. The control
rows must disagree: mergejax's default Fisher (per-example squares) and RegMean at α = 0.9.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CONFIG = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  image_size=8,
  patch_size=4,
)
# ViT-S/16-shaped (21.4M parameters, the rules benchmark's workload) on 32×32 images (5 tokens),
# for launch/bench_statistics.py.
CONFIG_VITS = dict(
  hidden_size=384,
  intermediate_size=1536,
  num_hidden_layers=12,
  num_attention_heads=6,
  image_size=32,
  patch_size=16,
)
CONFIGS = {"tiny": CONFIG, "vits": CONFIG_VITS}
EXAMPLES, BATCH, CLASSES, PROJ = 256, 32, 5, 16
FISHER = dict(normalize_fisher_weight=True, minimal_fisher_weight=1e-6)
REGMEAN_ALPHA, PLUSPLUS_ALPHA = 0.6, 0.95


# ------------------------------------------------------------------------- FusionBench worker
def fusionbench_worker(dst: str, num_experts: int, seed: int, size: str = "tiny") -> None:
  """Runs in FusionBench's Python: builds the models and data, runs the three algorithms.

  With size="vits" (launch/bench_statistics.py) it also records each phase's seconds under
  "seconds/<phase>" and skips the merges of Fisher and RegMean (their statistics are timed) and
  RegMean++ as shipped.
  """
  import copy
  import time

  import torch
  import transformers
  from fusion_bench.method.fisher_merging import clip_fisher_merging
  from fusion_bench.method.regmean import clip_regmean
  from fusion_bench.method.regmean.utils import get_modules_to_merge
  from fusion_bench.method.regmean_plusplus import clip_regmean_plusplus
  from fusion_bench.modelpool import BaseModelPool

  torch.manual_seed(seed)
  timing = size != "tiny"
  config = transformers.CLIPVisionConfig(**CONFIGS[size])
  base = transformers.CLIPVisionModel(config).eval()
  experts = []
  for _ in range(num_experts):
    e = copy.deepcopy(base)
    with torch.no_grad():
      for p in e.parameters():
        p.add_(0.05 * torch.randn_like(p))
    experts.append(e)
  projection = torch.nn.Linear(config.hidden_size, PROJ, bias=False).requires_grad_(False)
  text = [torch.nn.functional.normalize(torch.randn(CLASSES, PROJ), dim=-1) for _ in experts]
  scale = torch.tensor(2.6592).exp()
  side = config.image_size
  images = [torch.randn(EXAMPLES, 3, side, side) + 0.5 * t for t in range(num_experts)]
  labels = [torch.randint(0, CLASSES, (EXAMPLES,)) for _ in experts]
  names = [f"task{t}" for t in range(num_experts)]
  data = {
    name: torch.utils.data.TensorDataset(x, y)
    for name, x, y in zip(names, images, labels, strict=True)
  }

  def no_shuffle(loader_cls):
    # Same examples, same order on both sides (see the module docstring).
    return lambda *a, **kw: loader_cls(*a, **{**kw, "shuffle": False})

  for module in (clip_regmean, clip_regmean_plusplus):
    module.DataLoader = no_shuffle(torch.utils.data.DataLoader)

  class Wrapped(torch.nn.Module):
    """transformers 4's CLIPVisionModel layout (`.vision_model`), which RegMean++ for CLIP reads."""

    def __init__(self, tower):
      super().__init__()
      self.vision_model = tower

    @property
    def device(self):
      return self.vision_model.device

    def forward(self, pixel_values):
      return self.vision_model(pixel_values)

  def pool(wrap=False):  # Fresh copies: the algorithms write into the pretrained model in place.
    fresh = lambda m: Wrapped(copy.deepcopy(m)) if wrap else copy.deepcopy(m)
    models = {"_pretrained_": fresh(base)}
    models.update({n: fresh(e) for n, e in zip(names, experts, strict=True)})
    modelpool = BaseModelPool(models)
    modelpool.load_train_dataset = data.__getitem__  # In-memory datasets, not configs.
    return modelpool

  def prepare(algo):
    algo._clip_processor = lambda image: image  # Already tensors.
    algo.zeroshot_weights = dict(zip(names, text, strict=True))
    algo.visual_projection = projection
    algo.logit_scale_exp = scale
    return algo

  loader = {"batch_size": BATCH, "num_workers": 0}
  out = {}
  sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
  for key, value in sd(base).items():
    out[f"base/{key}"] = value
  for t, e in enumerate(experts):
    for key, value in sd(e).items():
      out[f"e{t}/{key}"] = value
  out["projection"] = projection.weight.numpy()
  out["scale"] = scale.numpy()
  for t in range(num_experts):
    out[f"text{t}"], out[f"images{t}"] = text[t].numpy(), images[t].numpy()

  # Fisher merging: statistics, then the merge.
  algo = prepare(
    clip_fisher_merging.FisherMergingForCLIPVisionModel(
      exclude_param_names_regex=[],
      num_fisher_examples=EXAMPLES,
      dataloader_kwargs=loader,
      **FISHER,
    )
  )
  algo.on_fisher_merging_start = lambda: None
  params = list(base.state_dict())
  models = [copy.deepcopy(e) for e in experts]
  start = time.perf_counter()
  for t, name in enumerate(names):
    fisher = algo.get_fisher_weights(name, models[t], data[name], params)
    for key, value in fisher.items():
      out[f"fisher_stats{t}/{key}"] = value.numpy()
  out["seconds/fisher_statistics"] = np.float64(time.perf_counter() - start)
  if not timing:
    for key, value in sd(algo.run(pool())).items():
      out[f"fisher/{key}"] = value

  # RegMean: Gram matrices, then the merge.
  algo = prepare(
    clip_regmean.RegMeanAlgorithmForCLIP(
      exclude_param_names_regex=[],
      num_regmean_examples=EXAMPLES,
      reduce_non_diagonal_ratio=REGMEAN_ALPHA,
      weight_transpose=True,
      dataloader_kwargs=loader,
    )
  )
  algo.on_regmean_start = lambda: None
  models = [copy.deepcopy(e) for e in experts]
  start = time.perf_counter()
  for t, name in enumerate(names):
    linear = get_modules_to_merge(models[t], [torch.nn.Linear])
    for key, value in algo.get_regmean_weights(name, models[t], data[name], linear).items():
      out[f"grams{t}/{key}"] = value.numpy()
  out["seconds/regmean_statistics"] = np.float64(time.perf_counter() - start)
  if not timing:
    for key, value in sd(algo.run(pool())).items():
      out[f"regmean/{key}"] = value

  # RegMean++, as shipped and with the whole layer output passed on. Its class cannot be built
  # as shipped: it replaces the bidict `_config_mapping` of its @auto_register_config parent by a
  # plain dict, whose missing `.inverse` fails in __init__; merged as FisherMergingFor... does.
  cls = clip_regmean_plusplus.RegMeanAlgorithmForCLIPPlusPlus
  parent = clip_regmean_plusplus.RegMeanAlgorithmPlusPlus
  cls._config_mapping = parent._config_mapping | {"_dataloader_kwargs": "dataloader_kwargs"}
  kwargs = dict(
    exclude_param_names_regex=[],
    num_regmean_examples=EXAMPLES,
    reduce_non_diagonal_ratio=PLUSPLUS_ALPHA,
    weight_transpose=True,
    dataloader_kwargs=loader,
  )

  def whole_output(self, layer, batches_input):
    outputs = []
    for batch in batches_input:
      y = layer(batch, attention_mask=None, causal_attention_mask=None)
      outputs.append((y[0] if isinstance(y, tuple) else y).detach().cpu())
    return outputs

  runs = [("regmean_plusplus", whole_output)]
  if not timing:
    runs.insert(0, ("regmean_plusplus_as_shipped", None))
  for label, patch in runs:
    algo = (
      cls(**kwargs)
      if patch is None
      else type("Patched", (cls,), {"layer_batches_forward": patch})(**kwargs)
    )
    algo = prepare(algo)
    algo.on_regmean_start = lambda: None
    try:
      models = pool(wrap=True)
      start = time.perf_counter()
      merged = algo.run(models)
      out[f"seconds/{label}"] = np.float64(time.perf_counter() - start)
      for key, value in sd(merged).items():
        out[f"{label}/{key.removeprefix('vision_model.')}"] = value
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
      out[f"{label}/error"] = np.array(f"{type(e).__name__}: {e}")
  np.savez(dst, **out)


# ------------------------------------------------------------------------- mergejax side
def mergejax_outputs(data: dict, num_experts: int) -> dict[str, dict[str, np.ndarray]]:
  """mergejax's statistics and merges on the flax twin, returned under torch names."""
  import jax
  import jax.numpy as jnp

  from mergejax import rules, statistics
  from mergejax.io import names
  from mergejax.models import clip

  def state_dict(prefix):
    return {k[len(prefix) + 1 :]: v for k, v in data.items() if k.startswith(prefix + "/")}

  def to_flax(sd):
    return clip.vision_tower(names.state_dict_to_params(sd))

  def to_torch(tree):  # transformers 5 writes CLIPVisionModel's tensors without "vision_model.".
    return names.params_to_state_dict(jax.device_get(tree))

  base = to_flax(state_dict("base"))
  experts = [to_flax(state_dict(f"e{t}")) for t in range(num_experts)]
  tower = clip.CLIPVisionTransformer(clip.CLIPVisionConfig(**CONFIG))
  projection = jnp.asarray(data["projection"]).T  # torch Linear [out, in] -> x @ W.T.
  scale = jnp.asarray(data["scale"])

  def apply_for(t):
    text = jnp.asarray(data[f"text{t}"])

    def apply_fn(params, x):  # FusionBench's compute_logits, in flax.
      emb = tower.apply({"params": params}, x)[1] @ projection
      emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
      return scale * emb @ text.T

    return apply_fn

  apply_fns = [apply_for(t) for t in range(num_experts)]
  images = [np.transpose(data[f"images{t}"], (0, 2, 3, 1)) for t in range(num_experts)]  # NHWC.
  batches = [
    [images[t][i : i + BATCH] for i in range(0, EXAMPLES, BATCH)] for t in range(num_experts)
  ]

  out: dict[str, dict[str, np.ndarray]] = {}
  fb_fisher = [
    statistics.fisher_statistics(apply_fns[t], experts[t], batches[t], per_example=False)
    for t in range(num_experts)
  ]
  for t, s in enumerate(fb_fisher):
    out[f"fisher_stats{t}"] = to_torch(s["fisher"])
  out["fisher"] = to_torch(rules.merge("fisher", base, experts, statistics=fb_fisher))
  own = [
    statistics.fisher_statistics(apply_fns[t], experts[t], batches[t]) for t in range(num_experts)
  ]
  out["fisher[per_example]"] = to_torch(rules.merge("fisher", base, experts, statistics=own))

  grams = [
    statistics.regmean_statistics(apply_fns[t], experts[t], batches[t]) for t in range(num_experts)
  ]
  for t, s in enumerate(grams):
    # Gram matrices are keyed by kernel path; FusionBench keys them by module name.
    flat = {k.removesuffix("/kernel"): v for k, v in _flatten(s["grams"]).items()}
    out[f"grams{t}"] = {
      k.replace("/", ".").replace("layers_", "layers."): np.asarray(v) for k, v in flat.items()
    }
  out["regmean"] = to_torch(
    rules.merge("regmean", base, experts, statistics=grams, alpha=REGMEAN_ALPHA)
  )
  out["regmean[alpha=0.9]"] = to_torch(rules.merge("regmean", base, experts, statistics=grams))

  plus = statistics.regmean_plusplus_statistics(apply_fns, experts, batches, alpha=PLUSPLUS_ALPHA)
  out["regmean_plusplus"] = to_torch(
    rules.merge(
      "regmean_plusplus",
      base,
      experts,
      statistics=plus,
      alpha=PLUSPLUS_ALPHA,
      exclude="post_layernorm/.*",
    )
  )
  return out


def _flatten(tree, prefix=""):
  flat = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    flat.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
  return flat


def compare(ours: dict, ref: dict, base: dict | None) -> tuple[float, float]:
  """(max abs difference, relative error) over the tensors both hold."""
  keys = sorted(set(ours) & set(ref))
  if set(ours) != set(ref):
    raise ValueError(f"tensor sets differ: {sorted(set(ours) ^ set(ref))[:5]}")
  diff = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in keys)
  num = sum(float(np.sum((ours[k].astype(np.float64) - ref[k]) ** 2)) for k in keys)
  den = sum(
    float(np.sum((ref[k].astype(np.float64) - (0.0 if base is None else base[k])) ** 2))
    for k in keys
  )
  return diff, float(np.sqrt(num / den))


def main(argv: list[str]) -> None:
  if len(argv) > 1 and argv[1] == "--worker":
    fusionbench_worker(argv[2], int(argv[3]), int(argv[4]), *argv[5:])
    return
  fb_python = "/work/venvs/peers/bin/python"
  for a in argv[1:]:
    if a.startswith("--fusionbench_python="):
      fb_python = a.split("=", 1)[1]
  version = subprocess.run(
    [fb_python, "-c", "import importlib.metadata as m; print(m.version('fusion-bench'))"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  print(f"fusion-bench {version}")
  print("| rule | experts | max abs diff | relative error |\n|---|---|---|---|")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for num_experts in (3, 8):
      dst = Path(tmp, f"fb{num_experts}.npz")
      done = subprocess.run(
        [fb_python, __file__, "--worker", str(dst), str(num_experts), str(num_experts)],
        capture_output=True,
        text=True,
      )
      if done.returncode:
        sys.exit(f"FusionBench worker failed:\n{done.stderr[-4000:]}")
      data = dict(np.load(dst))
      ours = mergejax_outputs(data, num_experts)
      base = {k[5:]: v for k, v in data.items() if k.startswith("base/")}

      def ref(prefix, data=data):
        return {k[len(prefix) + 1 :]: v for k, v in data.items() if k.startswith(prefix + "/")}

      cases = [
        ("fisher statistics (FusionBench's estimator)", "fisher_stats", None, True),
        ("regmean Gram matrices", "grams", None, True),
        ("fisher (normalized, ε = 1e-6)", "fisher", "fisher", False),
        (f"regmean (α = {REGMEAN_ALPHA})", "regmean", "regmean", False),
        (f"regmean_plusplus (α = {PLUSPLUS_ALPHA})", "regmean_plusplus", "regmean_plusplus", False),
        ("control: fisher, mergejax's per-example default", "fisher[per_example]", "fisher", False),
        ("control: regmean at α = 0.9", "regmean[alpha=0.9]", "regmean", False),
        (
          "FusionBench's RegMean++ as shipped (transformers 5: `[0]` takes one example)",
          "regmean_plusplus",
          "regmean_plusplus_as_shipped",
          False,
        ),
      ]
      for label, mine, theirs, per_expert in cases:
        if per_expert:
          results = [
            compare(ours[f"{mine}{t}"], ref(f"{theirs or mine}{t}"), None)
            for t in range(num_experts)
          ]
          diff, rel = max(r[0] for r in results), max(r[1] for r in results)
        else:
          reference = ref(theirs)
          if "error" in reference:
            print(f"| {label} | {num_experts} | error: {reference['error']} | |")
            continue
          diff, rel = compare(ours[mine], reference, base)
        rows.append({"case": label, "experts": num_experts, "max_abs": diff, "rel": rel})
        print(f"| {label} | {num_experts} | {diff:.1e} | {rel:.1e} |")
  print(json.dumps({"fusion_bench": version, "rows": rows}))


if __name__ == "__main__":
  main(sys.argv)
