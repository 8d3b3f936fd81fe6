r"""Check (not a test): TSV-M, ISO-C, ISO-CTS and MagMax against FusionBench on the same inputs.

  PYTHONPATH=. python launch/check_fusionbench_spectral.py
  PYTHONPATH=. python launch/check_fusionbench_spectral.py --fusionbench_python=/path/bin/python

Writes a torch-layout state dict (weights [out, in], biases, a LayerNorm, a 3-D leaf, a 10-row
head whose rank is close to the number of tasks) for θ0 and each expert to an .npz file, then:
  * runs FusionBench 0.2.33's own functions on it in a subprocess with FusionBench's Python
    (`TSVM_utils.compute_and_sum_svd_mem_reduction`, `iso_utils.iso_c`, `iso_utils.iso_cts`,
    `magmax.magmax_merge`), θ = θ0 + α · Δ as its algorithms do;
  * runs mergejax's rules through `rules.merge` on the *flax* layout (2-D leaves transposed to
    [in, out]) and transposes back; ISO-CTS also on the torch layout with layout="torch";
and prints, per rule and per number of experts, the max abs difference and the relative error
‖mergejax − FusionBench‖ / ‖FusionBench − θ0‖ over all leaves. MagMax must agree exactly.
The last row is a control that must disagree: ISO-CTS on flax kernels told they are torch-layout
(the common subspace removed on the input side).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# (name, torch-layout shape). 2-D: matrices for the spectral rules; others: mean of τ.
SHAPES = {
  "attn.in_proj.weight": (96, 32),
  "attn.out_proj.weight": (32, 32),
  "mlp.fc1.weight": (64, 32),
  "mlp.fc2.weight": (32, 64),
  "mlp.fc1.bias": (64,),
  "norm.weight": (32,),
  "conv.weight": (8, 3, 2, 2),
  "head.weight": (10, 32),
}
CASES = {"tsv_m": {"scale": 1.0}, "iso_c": {"scale": 1.3}, "iso_cts": {"scale": 1.3}}
MAGMAX = {"scale": 0.5}


def make_inputs(num_experts: int, seed: int = 0) -> dict[str, np.ndarray]:
  """θ0 and experts θ0 + a low-rank + noise update, as {"base/<name>": ..., "e<t>/<name>": ...}."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, shape in SHAPES.items():
    base = rng.normal(size=shape).astype(np.float32)
    arrays[f"base/{name}"] = base
    for t in range(num_experts):
      delta = 0.01 * rng.normal(size=shape)
      if len(shape) == 2:  # Give each task a dominant low-rank part, as fine-tuning does.
        a, b = rng.normal(size=(shape[0], 2)), rng.normal(size=(2, shape[1]))
        delta += 0.05 * a @ b
      arrays[f"e{t}/{name}"] = (base + delta).astype(np.float32)
  # Ties in magnitude and sign for MagMax: equal |τ| with both signs on a few entries.
  b = arrays["base/norm.weight"]
  b[:4] = 1.0  # So that 1 ± 0.25 − 1 is exactly ±0.25: true ties.
  for t in range(num_experts):
    e = arrays[f"e{t}/norm.weight"]
    e[:4] = b[:4] + np.float32(0.25) * np.array([1, -1, 1, -1], np.float32) * (-1) ** t
  return arrays


# ------------------------------------------------------------------------- FusionBench worker
def fusionbench_worker(src: str, dst: str, num_experts: int) -> None:
  """Runs in FusionBench's Python: the reference functions on the npz inputs."""
  import torch
  from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
  from fusion_bench.method.magmax.magmax import magmax_merge
  from fusion_bench.method.task_singular_vector.utils import TSVM_utils

  data = np.load(src)
  base = {n: torch.from_numpy(data[f"base/{n}"]) for n in SHAPES}
  experts = [{n: torch.from_numpy(data[f"e{t}/{n}"]) for n in SHAPES} for t in range(num_experts)]
  tvs = [{n: e[n] - base[n] for n in SHAPES} for e in experts]
  out = {}
  with torch.no_grad():
    deltas = {
      "tsv_m": TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
      "iso_c": iso_c(tvs, accelerator="cpu"),
      "iso_cts": iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
    }
    for rule, delta in deltas.items():
      for n in SHAPES:  # state_dict_add(θ0, state_dict_mul(Δ, α)).
        out[f"{rule}/{n}"] = (base[n] + delta[n] * CASES[rule]["scale"]).numpy()

    class Holder(torch.nn.Module):
      def __init__(self, sd):
        super().__init__()
        for k, v in sd.items():
          self.register_parameter(k.replace(".", "_"), torch.nn.Parameter(v.clone()))

    def holder(sd):
      return Holder(sd)

    merged = magmax_merge(
      holder(base), [holder(e) for e in experts], scaling_factor=MAGMAX["scale"]
    ).state_dict()
    for n in SHAPES:
      out[f"magmax/{n}"] = merged[n.replace(".", "_")].numpy()
  np.savez(dst, **out)


# ------------------------------------------------------------------------- mergejax side
def mergejax_outputs(data, num_experts: int) -> dict[str, np.ndarray]:
  """mergejax's rules on the flax layout (2-D leaves transposed), returned in torch layout."""
  from mergejax import rules

  def tree(prefix, flax):
    return {
      n: (data[f"{prefix}/{n}"].T if flax and len(s) == 2 else data[f"{prefix}/{n}"])
      for n, s in SHAPES.items()
    }

  out = {}
  for flax in (True, False):
    base = tree("base", flax)
    experts = [tree(f"e{t}", flax) for t in range(num_experts)]
    runs = (
      {**CASES, "magmax": MAGMAX, "iso_cts[wrong_layout]": dict(CASES["iso_cts"], layout="torch")}
      if flax
      else {"iso_cts[out_in]": dict(CASES["iso_cts"], layout="torch")}
    )
    for rule, kw in runs.items():
      merged = rules.merge(rule.split("[")[0], base, experts, **kw)
      for n, s in SHAPES.items():
        x = np.asarray(merged[n])
        out[f"{rule}/{n}"] = x.T if flax and len(s) == 2 else x
  return out


def compare(ours, ref, base, rule) -> tuple[float, float]:
  ref_rule = rule.split("[")[0]
  diff = max(np.max(np.abs(ours[f"{rule}/{n}"] - ref[f"{ref_rule}/{n}"])) for n in SHAPES)
  num = sum(np.sum((ours[f"{rule}/{n}"] - ref[f"{ref_rule}/{n}"]) ** 2.0) for n in SHAPES)
  den = sum(np.sum((ref[f"{ref_rule}/{n}"] - base[n]) ** 2.0) for n in SHAPES)
  return float(diff), float(np.sqrt(num / den))


def main(argv: list[str]) -> None:
  if len(argv) > 1 and argv[1] == "--worker":
    fusionbench_worker(argv[2], argv[3], int(argv[4]))
    return
  fb_python = "/work/peers/fusionbench/bin/python"
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
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for num_experts in (8, 3):
      src, dst = Path(tmp, f"in{num_experts}.npz"), Path(tmp, f"fb{num_experts}.npz")
      data = make_inputs(num_experts, seed=num_experts)
      np.savez(src, **data)
      subprocess.run(
        [fb_python, __file__, "--worker", str(src), str(dst), str(num_experts)],
        check=True,
        capture_output=True,
      )
      ref = dict(np.load(dst))
      ours = mergejax_outputs(data, num_experts)
      base = {n: data[f"base/{n}"] for n in SHAPES}
      for rule in (*CASES, "iso_cts[out_in]", "magmax", "iso_cts[wrong_layout]"):
        diff, rel = compare(ours, ref, base, rule)
        rows.append({"rule": rule, "experts": num_experts, "max_abs": diff, "rel": rel})
        print(f"| {rule} | {num_experts} | {diff:.2e} | {rel:.2e} |")
  exact = all(r["max_abs"] == 0.0 for r in rows if r["rule"] == "magmax")
  print(json.dumps({"fusion_bench": version, "magmax_exact": exact, "rows": rows}))
  if not exact:
    sys.exit("MagMax differs from FusionBench.")


if __name__ == "__main__":
  main(sys.argv)
