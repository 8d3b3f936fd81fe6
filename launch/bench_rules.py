r"""Benchmark (not a test): every data-free rule on a ViT-shaped tree, against NumPy, in one run.

  python launch/bench_rules.py                 # ~22M params x 8 experts, fp32 (ViT-S/16 shapes)
  python launch/bench_rules.py --layers=2      # a quick look

Builds ViT-S/16-shaped parameters (~21.7M fp32 entries: 12 pre-LN blocks of width 384, MLP 1536,
patch embedding and position embeddings) and 8 experts (θ0 + N(0, 0.01²) noise, fixed seed); the
data-dependent rules (Fisher merging, RegMean) also get synthetic statistics per expert (a Fisher
diagonal per leaf; a well-conditioned Gram matrix A Aᵀ / 64 + 0.1 I per kernel). For each rule it
reports, from a fresh subprocess per implementation:
  * first-call time (trace + compile + run) and the median wall time of the next `--repeats` calls;
  * memory in model copies: XLA's temporaries + output of the compiled merge (what every call
    needs; target ≤ 2), and the process's peak RSS above the resident inputs (compiler included);
  * a NumPy implementation of the same rule, timed the same way, and whether both agree (max abs
    difference; for the random rules, where the two draw different masks, the kept fraction and
    the norm of the merged task vector instead).
Results are printed as a Markdown table and written to --out (JSON, with provenance).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from mergejax.testing.numpy_reference import NUMPY, NUMPY_DATA

_LAYERS = flags.DEFINE_integer("layers", 12, "Transformer blocks (12: ~21.7M parameters).")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Number of experts.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after the first (median reported).")
_RULES = flags.DEFINE_list("rules", None, "Rules to run (default: all benchmarked ones).")
_OUT = flags.DEFINE_string("out", "results/bench_rules.json", "Where to write the JSON results.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one 'impl:rule' and print JSON.")
_FB_PYTHON = flags.DEFINE_string(
  "fusionbench_python",
  "/work/peers/fusionbench/bin/python",
  "FusionBench's Python, to time its MagMax/TSV-M/ISO on the same inputs ('' to skip).",
)

# (rule name, hyper-parameters); scalars are those of the paper defaults or typical sweeps.
CASES = {
  "task_arithmetic": {"scale": 0.3},
  "weight_average": {},
  "ties": {"density": 0.2, "scale": 1.0},
  "dare": {"density": 0.1, "scale": 1.0},
  "dare_ties": {"density": 0.1, "scale": 1.0},
  "breadcrumbs": {"density": 0.15, "gamma": 0.006, "scale": 0.2},
  "consensus": {"tall_lambda": 0.4, "min_tasks": 2, "scale": 0.3},
  "emr": {},
  "model_stock": {},
  "magmax": {"scale": 0.5},
  "tsv_m": {"scale": 1.0},
  "iso_c": {"scale": 1.0},
  "iso_cts": {"scale": 1.0},
  "fisher": {},
  "regmean": {"alpha": 0.9},
}
RANDOM_RULES = {"dare", "dare_ties"}
# Data-dependent rules: the merge given statistics (synthetic, fixed seed: a Fisher per leaf, a
# Gram matrix per kernel). RegMean++'s merge is RegMean's on other Gram matrices: the same row.
# Computing the statistics from a model and data: launch/bench_statistics.py.
DATA_RULES = {"fisher", "regmean"}
# SVD-based rules: LAPACK float32 SVDs in different orders agree to ~1e-6 relative, not to ulps.
SPECTRAL_RULES = {"tsv_m", "iso_c", "iso_cts"}
# Rules also timed with FusionBench's own functions (in its virtual environment) on the inputs.
FUSIONBENCH_RULES = {"magmax", "tsv_m", "iso_c", "iso_cts", *DATA_RULES}
# The settings the NumPy references below implement, where a rule's default is now another
# (issue 10: DARE-TIES trims after the drop, Breadcrumbs ranks per output neuron with int()
# counts, EMR's rescaler sums per-tensor means). Passed to mergejax only.
JAX_SETTINGS = {
  "dare_ties": {"trim_density": None},
  "breadcrumbs": {"scope": "leaf", "counting": "round"},
  "emr": {"rescaler": "paper"},
}


# ---------------------------------------------------------------------------- inputs
def vit_shapes(layers: int, width: int = 384, mlp: int = 1536, patch: int = 16, tokens: int = 197):
  """Returns {path: shape} for a ViT image encoder (ViT-S/16 at the defaults)."""
  shapes = {
    "embed/kernel": (patch * patch * 3, width),
    "embed/bias": (width,),
    "cls": (1, width),
    "pos_embed": (tokens, width),
    "final_norm/scale": (width,),
    "final_norm/bias": (width,),
  }
  for i in range(layers):
    b = f"block_{i:02d}"
    shapes |= {
      f"{b}/norm1/scale": (width,),
      f"{b}/norm1/bias": (width,),
      f"{b}/attn/qkv/kernel": (width, 3 * width),
      f"{b}/attn/qkv/bias": (3 * width,),
      f"{b}/attn/out/kernel": (width, width),
      f"{b}/attn/out/bias": (width,),
      f"{b}/norm2/scale": (width,),
      f"{b}/norm2/bias": (width,),
      f"{b}/mlp/fc1/kernel": (width, mlp),
      f"{b}/mlp/fc1/bias": (mlp,),
      f"{b}/mlp/fc2/kernel": (mlp, width),
      f"{b}/mlp/fc2/bias": (width,),
    }
  return shapes


def make_inputs(layers: int, n_experts: int, convert=lambda x: x) -> tuple[dict, list[dict]]:
  """Returns flat {path: array} trees: θ0 ~ N(0, 0.02²), θt = θ0 + N(0, 0.01²).

  Leaves are passed through `convert` (e.g. jnp.asarray) one at a time, so the peak memory of
  building the inputs stays one leaf above the inputs themselves.
  """
  rng = np.random.default_rng(0)
  shapes = vit_shapes(layers)
  base_np = {p: rng.standard_normal(s, np.float32) * np.float32(0.02) for p, s in shapes.items()}
  experts = []
  for _ in range(n_experts):
    experts.append(
      {
        p: convert(x + rng.standard_normal(x.shape, np.float32) * np.float32(0.01))
        for p, x in base_np.items()
      }
    )
  return {p: convert(x) for p, x in base_np.items()}, experts


def make_statistics(rule: str, base: dict, n_experts: int, flip: bool = False) -> list[dict]:
  """Synthetic statistics per expert (fixed seed), in flax layout (torch layout with `flip`)."""
  rng = np.random.default_rng(1)
  if rule == "fisher":
    t = lambda x: np.ascontiguousarray(x.T) if flip and x.ndim == 2 else x
    return [
      {"fisher": {p: t(rng.random(x.shape, np.float32) ** 2) for p, x in base.items()}}
      for _ in range(n_experts)
    ]
  grams = []
  for _ in range(n_experts):
    expert = {}
    for p, x in base.items():
      if p.endswith("/kernel") and x.ndim == 2:
        a = rng.standard_normal((x.shape[0], 64), np.float32)
        expert[p] = a @ a.T / np.float32(64) + np.float32(0.1) * np.eye(len(a), dtype=np.float32)
    grams.append({"grams": expert})
  return grams


def fusionbench_data_call(rule, base, experts, stats, **hparams):
  """FusionBench's merge functions given statistics, on torch-named, torch-layout state dicts."""
  import torch
  from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
  from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

  names = {
    p: p.replace("/", ".").removesuffix(".kernel") + (".weight" if p.endswith("/kernel") else "")
    for p in base
  }
  params = {names[p]: [e[p] for e in experts] for p in base}
  with torch.no_grad():
    if rule == "fisher":
      fishers = [{names[p]: torch.from_numpy(s["fisher"][p]) for p in base} for s in stats]
      coefficients = torch.ones(len(experts)) / len(experts)
      out = merging_with_fisher_weights(params, fishers, coefficients, True, 1e-6)
    else:
      grams = [
        {names[p].removesuffix(".weight"): torch.from_numpy(g) for p, g in s["grams"].items()}
        for s in stats
      ]
      out = merging_with_regmean_weights(params, grams, hparams["alpha"], weight_transpose=True)
  return {p: out[names[p]] for p in base}


def current_rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


def fusionbench_call(rule, base, experts, scale):
  """FusionBench's functions on torch-layout state dicts: θ0 + α Δ (task vectors included)."""
  import torch
  from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
  from fusion_bench.method.magmax.magmax import _magmax_select
  from fusion_bench.method.task_singular_vector.utils import TSVM_utils

  with torch.no_grad():
    tvs = [{p: e[p] - base[p] for p in base} for e in experts]
    if rule == "magmax":
      delta = _magmax_select(tvs)
    elif rule == "tsv_m":
      delta = TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    elif rule == "iso_c":
      delta = iso_c(tvs, accelerator="cpu")
    else:
      delta = iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu")
    return {p: base[p] + delta[p] * scale for p in base}


def xla_memory_copies(rule, base, experts, kw, stats=None) -> float:
  """XLA's own account of the merge's run-time memory (temporaries + output), in model copies.

  Peak RSS also counts the compiler's memory (LLVM, for ~150 leaves x 8 experts), which is freed
  after the first call but stays in the process's high-water mark; this figure is what each
  further call needs. It compiles the front door's executable (`rules.lower`).
  """
  import jax

  from mergejax import rules

  data = {} if stats is None else {"statistics": stats}
  analysis = rules.lower(rule, base, experts, **kw, **data).compile().memory_analysis()
  model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
  return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / model_bytes


# ---------------------------------------------------------------------------- one worker
def worker(impl: str, rule: str, layers: int, n_experts: int, repeats: int) -> dict:
  """Runs one implementation of one rule in this (fresh) process; returns timings and a digest."""
  import resource

  hparams = CASES[rule]
  if impl == "jax":
    import jax
    import jax.numpy as jnp

    from mergejax import rules

    base, experts = make_inputs(layers, n_experts, convert=jnp.asarray)
    kw = dict(hparams, **JAX_SETTINGS.get(rule, {}))
    if rule in RANDOM_RULES:
      kw["key"] = jax.random.key(0)
    stats = None
    if rule in DATA_RULES:
      stats = jax.tree.map(jnp.asarray, make_statistics(rule, base, n_experts))
    data = {} if stats is None else {"statistics": stats}

    def call():
      out = rules.merge(rule, base, experts, check_finite=False, **kw, **data)
      return jax.block_until_ready(rules.task_models(out, base, len(experts))[0])
  elif impl == "fusionbench":
    import contextlib
    import io

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))

    def to_torch(x):  # flax [in, out] -> torch [out, in], outside the timed calls.
      return torch.from_numpy(np.ascontiguousarray(x.T if x.ndim == 2 else x))

    base, experts = make_inputs(layers, n_experts, convert=to_torch)
    stats = None
    if rule in DATA_RULES:
      shapes = {
        p: np.zeros(tuple(x.shape[::-1]) if x.ndim == 2 else tuple(x.shape))
        for p, x in base.items()
      }
      stats = make_statistics(rule, shapes, n_experts, flip=True)

    def call():
      with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints per leaf.
        if stats is not None:
          out = fusionbench_data_call(rule, base, experts, stats, **hparams)
        else:
          out = fusionbench_call(rule, base, experts, **hparams)
      return {p: (x.numpy().T if x.ndim == 2 else x.numpy()) for p, x in out.items()}
  else:
    base, experts = make_inputs(layers, n_experts)
    stats = make_statistics(rule, base, n_experts) if rule in DATA_RULES else None

    def call():
      if stats is not None:
        return NUMPY_DATA[rule](base, experts, stats, **hparams)
      return NUMPY[rule](base, experts, **hparams)

  inputs_rss = current_rss_mib()
  start = time.perf_counter()
  out = call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    del out
    start = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - start)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  # After the timed calls, so the first-call time includes the compile.
  xla_copies = xla_memory_copies(rule, base, experts, kw, stats) if impl == "jax" else None
  model_mib = sum(np.prod(x.shape) for x in base.values()) * 4 / 2**20
  out = {p: np.asarray(x, np.float32) for p, x in out.items()}
  flip = impl == "fusionbench"  # Its inputs are torch-layout; the digest is in flax layout.
  base_np = {p: np.asarray(x.T if flip and x.ndim == 2 else x) for p, x in base.items()}
  diff = {p: out[p] - base_np[p] for p in out}
  digest = np.concatenate([diff[p].ravel() for p in sorted(diff)])
  np.save(f"/tmp/bench_{impl}_{rule}.npy", digest)
  return {
    "impl": impl,
    "rule": rule,
    "first_s": first,
    "median_s": statistics.median(times),
    "times_s": times,
    "inputs_rss_mib": inputs_rss,
    "peak_rss_mib": peak,
    "extra_model_copies": (peak - inputs_rss) / model_mib,
    "xla_model_copies": xla_copies,
    "model_mib": model_mib,
  }


def agreement(rule: str, other: str = "numpy") -> str:
  a = np.load(f"/tmp/bench_jax_{rule}.npy")
  b = np.load(f"/tmp/bench_{other}_{rule}.npy")
  if rule in RANDOM_RULES:
    kept_a, kept_b = np.mean(a != 0), np.mean(b != 0)
    norm = np.linalg.norm(a) / np.linalg.norm(b)
    ok = abs(kept_a - kept_b) < 0.005 and abs(norm - 1) < 0.01
    return f"{'yes' if ok else 'NO'} (kept {kept_a:.4f} vs {kept_b:.4f}, norm ratio {norm:.4f})"
  err = float(np.max(np.abs(a - b)))
  scale = float(np.max(np.abs(b))) or 1.0
  # SVDs and linear solves in float32 against float64 (NumPy) or torch: ~1e-6 relative, not ulps.
  ok = err <= (1e-4 if rule in SPECTRAL_RULES | DATA_RULES else 1e-5) * scale + 1e-7
  mismatched = int(np.sum((a == 0) != (b == 0)))
  return f"{'yes' if ok else 'NO'} (max |Δ| {err:.1e}, mask mismatches {mismatched})"


def main(argv):
  del argv
  if _WORKER.value:
    impl, rule = _WORKER.value.split(":")
    print(json.dumps(worker(impl, rule, _LAYERS.value, _EXPERTS.value, _REPEATS.value)))
    return
  from mergejax import provenance

  started = time.time()
  n_params = sum(int(np.prod(s)) for s in vit_shapes(_LAYERS.value).values())
  print(
    f"{n_params / 1e6:.1f}M fp32 parameters x {_EXPERTS.value} experts; median of "
    f"{_REPEATS.value} calls after the first; one fresh process per cell.\n"
  )
  rows, results = [], []
  for rule in _RULES.value or list(CASES):
    cell = {}
    impls = ["jax", "numpy"]
    if _FB_PYTHON.value and rule in FUSIONBENCH_RULES:
      impls.append("fusionbench")
    for impl in impls:
      cmd = [
        _FB_PYTHON.value if impl == "fusionbench" else sys.executable,
        __file__,
        f"--worker={impl}:{rule}",
        f"--layers={_LAYERS.value}",
        f"--experts={_EXPERTS.value}",
        f"--repeats={_REPEATS.value}",
      ]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode:
        raise RuntimeError(f"{impl}:{rule} failed:\n{done.stderr[-3000:]}")
      cell[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    agree = agreement(rule)
    j, n = cell["jax"], cell["numpy"]
    results.append({"rule": rule, "jax": j, "numpy": n, "agree": agree})
    if "fusionbench" in cell:
      f = cell["fusionbench"]
      results[-1] |= {"fusionbench": f, "agree_fusionbench": agreement(rule, "fusionbench")}
      print(
        f"  FusionBench {rule}: median {f['median_s']:.3f} s, first {f['first_s']:.2f} s, "
        f"peak RSS above inputs {f['extra_model_copies']:.2f} model copies, "
        f"agrees with mergejax: {results[-1]['agree_fusionbench']}",
        flush=True,
      )
    rows.append(
      f"| {rule} | {j['median_s']:.3f} | {j['first_s']:.2f} | "
      f"{j['xla_model_copies']:.2f} | {j['extra_model_copies']:.2f} | {n['median_s']:.3f} | "
      f"{n['median_s'] / j['median_s']:.1f}x | {agree} |"
    )
    print(rows[-1], flush=True)
  table = "\n".join(
    [
      "| rule | mergejax median (s) | first call (s) | XLA temps + output (model copies) "
      "| peak RSS above inputs, compiler included (model copies) | NumPy median (s) "
      "| speed-up | outputs agree |",
      "|---|---|---|---|---|---|---|---|",
      *rows,
    ]
  )
  print("\n" + table)
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  record = provenance.record(
    {"layers": _LAYERS.value, "experts": _EXPERTS.value, "repeats": _REPEATS.value, "cases": CASES},
    seed=0,
    started=started,
  )
  out.write_text(json.dumps({"results": results, "table": table, "provenance": record}, indent=2))
  print(f"\nWrote {out}")


if __name__ == "__main__":
  app.run(main)
