r"""Benchmark (not a test): computing the data-dependent rules' statistics, mergejax vs FusionBench.

  PYTHONPATH=. .venv/bin/python launch/bench_statistics.py
  PYTHONPATH=. .venv/bin/python launch/bench_statistics.py --experts=3  # a quicker look

The workload of the rules benchmark (launch/bench_rules.py: ViT-S/16 shapes, ~21.5M parameters,
8 experts) as a real model: a CLIP vision tower with 12 layers of width 384 (MLP 1536, 6 heads) on
32×32 images in 16×16 patches (5 tokens, so that the forward passes fit this CPU), FusionBench's
CLIP head (frozen projection and per-task text embeddings), 256 images per task in batches of 32
(FusionBench's settings). FusionBench 0.2.33 runs in its own Python on the torch twin
(launch/check_fusionbench_datadep.py's worker, size "vits": its `get_fisher_weights` and
`get_regmean_weights` for every expert, and `RegMeanAlgorithmForCLIPPlusPlus.run`, which computes
the statistics layer by layer and merges); mergejax on the flax twin of the same weights and
images. Reported per phase: wall seconds for all experts, mergejax's first run (compilations
included) and a second run, and the agreement of the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import check_fusionbench_datadep as check
import numpy as np
from absl import app, flags

_EXPERTS = flags.DEFINE_integer("experts", 8, "Number of experts (tasks).")
_FB_PYTHON = flags.DEFINE_string(
  "fusionbench_python", "/work/venvs/peers/bin/python", "FusionBench's Python."
)
_OUT = flags.DEFINE_string("out", "results/bench_statistics.json", "Where to write the JSON.")
_FLOAT64 = flags.DEFINE_bool(
  "float64_reference", True, "Also run RegMean++ in float64 (jax x64) as a rounding reference."
)
_X64_WORKER = flags.DEFINE_string("x64_worker", None, "Internal: 'inputs.npz,outputs.npz'.")


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  import jax

  jax.block_until_ready(out)
  return out, time.perf_counter() - start


def _twin(data: dict, num_experts: int, dtype):
  """θ0, the experts, the tower, images and batches in flax, from the worker's torch tensors."""
  import jax
  import jax.numpy as jnp

  from mergejax.io import names
  from mergejax.models import clip

  def state_dict(prefix):
    return {k[len(prefix) + 1 :]: v for k, v in data.items() if k.startswith(prefix + "/")}

  def to_flax(sd):
    tree = clip.vision_tower(names.state_dict_to_params(sd))
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)

  base = to_flax(state_dict("base"))
  experts = [to_flax(state_dict(f"e{t}")) for t in range(num_experts)]
  tower = clip.CLIPVisionTransformer(clip.CLIPVisionConfig(**check.CONFIG_VITS), dtype=dtype)
  nhwc = lambda t: jnp.asarray(np.transpose(data[f"images{t}"], (0, 2, 3, 1)), dtype)
  images = [nhwc(t) for t in range(num_experts)]
  batches = [
    [images[t][i : i + check.BATCH] for i in range(0, check.EXAMPLES, check.BATCH)]
    for t in range(num_experts)
  ]
  return base, experts, tower, images, batches


def float64_worker(src: str, dst: str) -> None:
  """RegMean++ (statistics and merge) in float64, in its own process (jax x64 is global)."""
  import jax

  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp

  from mergejax import rules, statistics
  from mergejax.io import names

  data = dict(np.load(src))
  num = sum(1 for k in data if k.startswith("images"))
  base, experts, tower, _, batches = _twin(data, num, jnp.float64)
  apply_fn = lambda p, x: tower.apply({"params": p}, x)[1]  # The head is never read.
  alpha = check.PLUSPLUS_ALPHA
  plus = statistics.regmean_plusplus_statistics(apply_fn, experts, batches, alpha=alpha)
  merged = rules.merge(
    "regmean_plusplus", base, experts, statistics=plus, alpha=alpha, exclude="post_layernorm/.*"
  )
  np.savez(dst, **names.params_to_state_dict(jax.device_get(merged)))


def mergejax_phases(data: dict, num_experts: int) -> tuple[dict, dict]:
  """Times mergejax's statistics (two runs each); returns (seconds, results under torch names)."""
  import jax
  import jax.numpy as jnp

  from mergejax import rules, statistics
  from mergejax.io import names

  base, experts, tower, images, batches = _twin(data, num_experts, jnp.float32)
  projection, scale = jnp.asarray(data["projection"]).T, jnp.asarray(data["scale"])

  def apply_for(t):
    text = jnp.asarray(data[f"text{t}"])

    def apply_fn(params, x):
      emb = tower.apply({"params": params}, x)[1] @ projection
      return scale * (emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)) @ text.T

    return apply_fn

  apply_fns = [apply_for(t) for t in range(num_experts)]
  phases = {
    "fisher_statistics": lambda: [
      statistics.fisher_statistics(apply_fns[t], experts[t], batches[t], per_example=False)
      for t in range(num_experts)
    ],
    # Gram matrices never read apply_fn's output: one apply_fn (any task's head) serves every
    # task, and every task shares its compilations.
    "regmean_statistics": lambda: [
      statistics.regmean_statistics(apply_fns[0], experts[t], batches[t])
      for t in range(num_experts)
    ],
    "regmean_plusplus": lambda: rules.merge(
      "regmean_plusplus",
      base,
      experts,
      statistics=statistics.regmean_plusplus_statistics(
        apply_fns[0], experts, batches, alpha=check.PLUSPLUS_ALPHA
      ),
      alpha=check.PLUSPLUS_ALPHA,
      exclude="post_layernorm/.*",
    ),
    # mergejax's default Fisher (per-example, exact expectation over the 5 classes), one task,
    # in batches of 8 (each example's gradient is held per batch).
    "fisher_statistics[default, 1 task]": lambda: statistics.fisher_statistics(
      apply_fns[0], experts[0], [images[0][i : i + 8] for i in range(0, check.EXAMPLES, 8)]
    ),
  }
  seconds, results = {}, {}
  for name, fn in phases.items():
    out, first = _timed(fn)
    out, second = _timed(fn)
    seconds[name] = (first, second)
    results[name] = out
    print(f"  mergejax {name}: first {first:.1f} s, second {second:.1f} s", flush=True)
  to_torch = lambda tree: names.params_to_state_dict(jax.device_get(tree))
  torch_results = {
    "fisher_statistics": [to_torch(s["fisher"]) for s in results["fisher_statistics"]],
    "regmean_plusplus": to_torch(results["regmean_plusplus"]),
    "regmean_statistics": [
      {
        k.removesuffix("/kernel").replace("/", ".").replace("layers_", "layers."): np.asarray(v)
        for k, v in check._flatten(s["grams"]).items()
      }
      for s in results["regmean_statistics"]
    ],
  }
  return seconds, torch_results


def main(argv):
  del argv
  if _X64_WORKER.value:
    float64_worker(*_X64_WORKER.value.split(","))
    return
  from mergejax import provenance

  started = time.time()
  num = _EXPERTS.value
  with tempfile.TemporaryDirectory() as tmp:
    dst = Path(tmp, "fb.npz")
    worker = Path(check.__file__)
    cmd = [_FB_PYTHON.value, str(worker), "--worker", str(dst), str(num), "0", "vits"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f"FusionBench worker failed:\n{done.stderr[-3000:]}")
    data = dict(np.load(dst))
    float64 = None
    if _FLOAT64.value:
      f64 = Path(tmp, "f64.npz")
      cmd = [sys.executable, __file__, f"--x64_worker={dst},{f64}"]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode:
        raise RuntimeError(f"float64 worker failed:\n{done.stderr[-3000:]}")
      float64 = {k: v.astype(np.float64) for k, v in np.load(f64).items()}
  fb = {k.removeprefix("seconds/"): float(v) for k, v in data.items() if k.startswith("seconds/")}
  print(f"  FusionBench: {fb}", flush=True)
  seconds, ours = mergejax_phases(data, num)
  base = {k[5:]: v for k, v in data.items() if k.startswith("base/")}

  def ref(prefix):
    return {k[len(prefix) + 1 :]: v for k, v in data.items() if k.startswith(prefix + "/")}

  agree = {
    "fisher_statistics": max(
      check.compare(ours["fisher_statistics"][t], ref(f"fisher_stats{t}"), None)[1]
      for t in range(num)
    ),
    "regmean_statistics": max(
      check.compare(ours["regmean_statistics"][t], ref(f"grams{t}"), None)[1] for t in range(num)
    ),
    "regmean_plusplus": check.compare(ours["regmean_plusplus"], ref("regmean_plusplus"), base)[1],
  }
  if float64 is not None:  # Whose float32 rounding is it? Both against the float64 run.
    agree["regmean_plusplus: mergejax vs float64"] = check.compare(
      ours["regmean_plusplus"], float64, base
    )[1]
    agree["regmean_plusplus: FusionBench vs float64"] = check.compare(
      ref("regmean_plusplus"), float64, base
    )[1]
    print(f"  float64 reference: {agree}", flush=True)
  rows = [
    f"| statistics ({num} tasks × 256 images) | mergejax first run (s) | mergejax second run (s) "
    "| FusionBench (s) | relative difference |",
    "|---|---|---|---|---|",
  ]
  labels = {
    "fisher_statistics": "Fisher, FusionBench's estimator (per batch)",
    "regmean_statistics": "RegMean Gram matrices",
    "regmean_plusplus": "RegMean++ statistics + merge (α = 0.95)",
    "fisher_statistics[default, 1 task]": "Fisher, mergejax default (per example), 1 task",
  }
  for name, (first, second) in seconds.items():
    theirs = fb.get(name)
    rows.append(
      f"| {labels[name]} | {first:.1f} | {second:.1f} | "
      f"{'' if theirs is None else f'{theirs:.1f}'} | "
      f"{'' if name not in agree else f'{agree[name]:.1e}'} |"
    )
  if float64 is not None:
    mine = agree["regmean_plusplus: mergejax vs float64"]
    theirs = agree["regmean_plusplus: FusionBench vs float64"]
    rows.append(
      f"| RegMean++ merge against the same algorithm in float64 (jax x64) | | | | mergejax "
      f"{mine:.1e}, FusionBench {theirs:.1e} |"
    )
  table = "\n".join(rows)
  print("\n" + table)
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  record = provenance.record({"experts": num, "config": check.CONFIG_VITS}, seed=0, started=started)
  out.write_text(
    json.dumps(
      {
        "mergejax": seconds,
        "fusionbench": fb,
        "agree": agree,
        "table": table,
        "provenance": record,
      },
      indent=2,
    )
  )
  print(f"\nWrote {out}")


if __name__ == "__main__":
  app.run(main)
