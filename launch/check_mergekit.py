r"""Checks mergejax's mergekit configs against mergekit itself, tensor by tensor (not a test).

  python launch/check_mergekit.py --workdir=/tmp/check_mergekit \
      --mergekit_bin=/work/peers/mergekit/bin/mergekit-yaml

Builds a small Qwen2-shaped Hugging Face checkpoint (float32 safetensors with its torch names: 2-D
projections, q/k/v biases, RMSNorm scales, embeddings) and `--experts` fine-tuned copies, merges
them with mergekit (`mergekit-yaml`, in its own virtual environment) and with mergejax's
configs/*_mergekit.py through launch/merge.py, and prints, per case and tensor kind, the max
absolute difference and the count of mismatching entries (any difference at all). DARE draws
differently in the two libraries, so dare_ties is compared element for element at density 1 and
by statistics below 1 (kept fraction of the merged task vector, ratio of L1 norms).

Each mergejax case runs twice: with XLA's default CPU flags, and with fused multiply-adds off
(`XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`). XLA contracts a·w + b into one FMA (one rounding) where
torch rounds the product and the sum separately, so with FMAs the weighted sums and λ ≠ 1 differ
from mergekit by at most one float32 ulp; without them they are equal element for element.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import bench_util  # launch/ is the script's directory, so on sys.path.
import numpy as np
from absl import app, flags
from safetensors.numpy import load_file, save_file

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/check_mergekit", "Scratch directory.")
_MERGEKIT = flags.DEFINE_string(
  "mergekit_bin", "/work/peers/mergekit/bin/mergekit-yaml", "mergekit-yaml of mergekit's venv."
)
_EXPERTS = flags.DEFINE_integer("experts", 3, "Number of fine-tuned models.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Hidden size (intermediate = 2.75 x hidden).")

_REPO = Path(__file__).resolve().parents[1]
WEIGHTS = (1.0, 0.6, 0.3, 0.8, 0.5, 0.9, 0.7, 0.4)


def qwen2_config(hidden: int) -> dict:
  return {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": hidden,
    "intermediate_size": int(hidden * 2.75),
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 200,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
  }


def qwen2_tensors(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
  shapes = {
    "model.embed_tokens.weight": (v, h),
    "model.norm.weight": (h,),
    "lm_head.weight": (v, h),
  }
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes |= {
      p + "self_attn.q_proj.weight": (h, h),
      p + "self_attn.q_proj.bias": (h,),
      p + "self_attn.k_proj.weight": (kv, h),
      p + "self_attn.k_proj.bias": (kv,),
      p + "self_attn.v_proj.weight": (kv, h),
      p + "self_attn.v_proj.bias": (kv,),
      p + "self_attn.o_proj.weight": (h, h),
      p + "mlp.gate_proj.weight": (f, h),
      p + "mlp.up_proj.weight": (f, h),
      p + "mlp.down_proj.weight": (h, f),
      p + "input_layernorm.weight": (h,),
      p + "post_attention_layernorm.weight": (h,),
    }
  out = {}
  for name, shape in shapes.items():
    if name.endswith("norm.weight"):
      out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
  return out


def write_model(path: Path, cfg: dict, tensors: dict) -> None:
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def read_model(path: Path) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    out |= load_file(str(f))
  return out


def kind(name: str) -> str:
  if "norm" in name:
    return "norm"
  if name.endswith(".bias"):
    return "bias"
  if "embed" in name or "lm_head" in name:
    return "embedding"
  return "2-D weight"


def run_mergekit(work: Path, method: str, base: Path, experts, model_params, shared) -> Path:
  models = "".join(
    f"  - model: {e}\n    parameters: {json.dumps(p)}\n"
    for e, p in zip(experts, model_params, strict=True)
  )
  yaml = (
    f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
    f"parameters: {json.dumps(shared)}\ndtype: float32\n"
  )
  (work / "mergekit.yml").write_text(yaml)
  out = work / "mergekit_out"
  subprocess.run(
    [_MERGEKIT.value, str(work / "mergekit.yml"), str(out), "--quiet", "--random-seed", "0"],
    check=True,
    capture_output=True,
  )
  return out


NO_FMA = {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}


def run_mergejax(work: Path, config: str, base: Path, experts, overrides: dict, env=None) -> Path:
  out = work / ("mergejax_out" if env is None else "mergejax_nofma_out")
  cmd = [sys.executable, str(_REPO / "launch/merge.py"), f"--config={_REPO / config}"]
  cmd += [f"--config.base={base}"] + [f"--config.experts={e}" for e in experts]
  cmd += [f"--config.rule.{k}={v}" for k, v in overrides.items()] + [f"--workdir={out}"]
  env = None if env is None else {**os.environ, **env}
  subprocess.run(cmd, check=True, capture_output=True, cwd=_REPO, env=env)
  return out / "merged"


def compare(a: dict, b: dict) -> dict[str, tuple[float, int, int]]:
  """Per tensor kind: (max |a − b|, entries that differ, entries)."""
  rows: dict[str, list] = {}
  for name in sorted(a):
    x, y = a[name].astype(np.float64), b[name].astype(np.float64)
    r = rows.setdefault(kind(name), [0.0, 0, 0])
    r[0] = max(r[0], float(np.max(np.abs(x - y))))
    r[1] += int(np.sum(x != y))
    r[2] += x.size
  return {k: tuple(v) for k, v in rows.items()}


def dare_stats(merged: dict, base: dict) -> tuple[float, float]:
  """(fraction of entries changed from θ0, Σ|θ − θ0|) over all tensors."""
  changed = sum(int(np.sum(merged[n] != base[n])) for n in base)
  total = sum(base[n].size for n in base)
  l1 = sum(float(np.sum(np.abs(merged[n].astype(np.float64) - base[n]))) for n in base)
  return changed / total, l1


def main(argv):
  del argv
  work = Path(_WORKDIR.value)
  cfg = qwen2_config(_HIDDEN.value)
  rng = np.random.default_rng(0)
  base_t = qwen2_tensors(cfg, rng)
  write_model(work / "base", cfg, base_t)
  experts = []
  for t in range(_EXPERTS.value):
    tensors = {
      n: (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32) for n, x in base_t.items()
    }
    write_model(work / f"expert{t}", cfg, tensors)
    experts.append(work / f"expert{t}")
  weights = WEIGHTS[: len(experts)]
  wtuple = "(" + ", ".join(str(w) for w in weights) + ")"
  version = bench_util.mergekit_version(_MERGEKIT.value)
  print(
    f"mergekit {version}; Qwen2-shaped model, hidden {cfg['hidden_size']}, "
    f"{len(base_t)} tensors, {sum(x.size for x in base_t.values())} entries, "
    f"{len(experts)} experts, weights {weights}"
  )

  # (label, mergekit method, per-model params, shared params, mergejax config, overrides)
  cases = [
    (
      "ties d=0.2 weights",
      "ties",
      {"density": 0.2},
      {},
      "configs/ties_mergekit.py",
      {"density": 0.2},
    ),
    (
      "ties d=0.35 normalize=false lambda=0.7",
      "ties",
      {"density": 0.35},
      {"normalize": False, "lambda": 0.7},
      "configs/ties_mergekit.py",
      {"density": 0.35, "reduce": "sum", "scale": 0.7},
    ),
    (
      "ties d=0.2, mergejax counting=round",
      "ties",
      {"density": 0.2},
      {},
      "configs/ties_mergekit.py",
      {"density": 0.2, "counting": "round"},
    ),
    (
      "breadcrumbs d=0.9 g=0.01 weights",
      "breadcrumbs",
      {"density": 0.9, "gamma": 0.01},
      {},
      "configs/breadcrumbs_mergekit.py",
      {"density": 0.9, "gamma": 0.01},
    ),
    (
      "breadcrumbs d=0.15 g=0.006 weights",
      "breadcrumbs",
      {"density": 0.15, "gamma": 0.006},
      {},
      "configs/breadcrumbs_mergekit.py",
      {"density": 0.15, "gamma": 0.006},
    ),
    (
      "breadcrumbs d=0.9 g=0.01, mergejax counting=round",
      "breadcrumbs",
      {"density": 0.9, "gamma": 0.01},
      {},
      "configs/breadcrumbs_mergekit.py",
      {"density": 0.9, "gamma": 0.01, "counting": "round"},
    ),
    (
      "dare_ties d=1 weights",
      "dare_ties",
      {"density": 1.0},
      {},
      "configs/dare_ties_mergekit.py",
      {"density": 1.0},
    ),
  ]
  for label, method, model_p, shared, config, overrides in cases:
    case_dir = work / label.replace(" ", "_").replace(",", "").replace("=", "")
    case_dir.mkdir(parents=True, exist_ok=True)
    mk = read_model(
      run_mergekit(
        case_dir, method, work / "base", experts, [model_p | {"weight": w} for w in weights], shared
      )
    )
    over = overrides | {"weights": wtuple}
    mj = read_model(run_mergejax(case_dir, config, work / "base", experts, over))
    mj_exact = read_model(run_mergejax(case_dir, config, work / "base", experts, over, NO_FMA))
    assert set(mk) == set(mj), sorted(set(mk) ^ set(mj))
    print(f"\n{label}   (default XLA flags | FMA off)")
    fused, exact = compare(mk, mj), compare(mk, mj_exact)
    for k, (diff, bad, n) in fused.items():
      diff2, bad2, _ = exact[k]
      print(f"  {k:<11} max|diff| {diff:.3g} | {diff2:.3g}   mismatching {bad} | {bad2} of {n}")

  # DARE-TIES below density 1: different random draws, so statistics only.
  d = 0.5
  case_dir = work / "dare_ties_d0.5"
  case_dir.mkdir(parents=True, exist_ok=True)
  mk = read_model(
    run_mergekit(
      case_dir,
      "dare_ties",
      work / "base",
      experts,
      [{"density": d, "weight": w} for w in weights],
      {},
    )
  )
  mj = read_model(
    run_mergejax(
      case_dir,
      "configs/dare_ties_mergekit.py",
      work / "base",
      experts,
      {"density": d, "weights": wtuple},
    )
  )
  (fk, lk), (fj, lj) = dare_stats(mk, base_t), dare_stats(mj, base_t)
  print(f"\ndare_ties d={d} weights (statistics; different draws)")
  print(f"  changed fraction: mergekit {fk:.4f}, mergejax {fj:.4f}")
  print(f"  L1 of merged task vector: mergekit {lk:.2f}, mergejax {lj:.2f} (ratio {lj / lk:.4f})")


if __name__ == "__main__":
  app.run(main)
