r"""FusionBench's layer-wise AdaMerging on the problem launch/bench_adamerging.py exported.

Runs in FusionBench's own virtual environment (torch, fusion-bench; no JAX, no mergejax):

  /work/venvs/peers/bin/python launch/fusionbench_adamerging.py --npz=PROBLEM.npz \
      --out=RESULT.json --repeats=5 --steps=20

The .npz holds θ0 and the experts of an MLP backbone (torch layout: Linear weights [out, in]),
the frozen task heads, Λ's initial value and the batches of every step (the ones mergejax's
step samples). The step is FusionBench's `LayerWiseAdaMergingAlgorithm.test_time_adaptation`
without Lightning Fabric: `LayerWiseMergedModel` (clamped Λ, task vectors as its modules), per
task the forward pass and `fusion_bench.method.adamerging.entropy_loss`, `backward(retain_graph
=True)`, then Adam's step, `zero_grad` and `merge_weights()`. `--summed` instead sums the tasks'
losses and runs one backward (each per-task backward also runs back through the merge of every
layer and expert, most of FusionBench's step on CPU). Reported: the summed loss and Λ's gradient
at the first step (before any update), Λ after the last step, and steps/s.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from fusion_bench.method.adamerging.entropy_loss import entropy_loss
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel
from torch import nn


class Backbone(nn.Module):
  """flax's MLPBackbone in torch: Linear + tanh-approximated GELU, `depth` times."""

  def __init__(self, sizes):
    super().__init__()
    self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in sizes)

  def forward(self, x):
    for layer in self.layers:
      x = nn.functional.gelu(layer(x), approximate="tanh")
    return x


def _model(arrays, prefix, depth):
  sizes = [tuple(arrays[f"{prefix}/{i}/weight"].shape[::-1]) for i in range(depth)]
  model = Backbone(sizes)
  with torch.no_grad():
    for i, layer in enumerate(model.layers):
      layer.weight.copy_(torch.from_numpy(arrays[f"{prefix}/{i}/weight"]))
      layer.bias.copy_(torch.from_numpy(arrays[f"{prefix}/{i}/bias"]))
  return model


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--npz", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--summed",
    action="store_true",
    help="One backward of the summed loss instead of FusionBench's one per task.",
  )
  args = parser.parse_args()
  arrays = dict(np.load(args.npz))
  depth, tasks = int(arrays["depth"]), int(arrays["num_tasks"])
  base = _model(arrays, "base", depth)
  experts = [_model(arrays, f"expert{t}", depth) for t in range(tasks)]
  heads = [
    (torch.from_numpy(arrays[f"head{t}/w"]), torch.from_numpy(arrays[f"head{t}/b"]))
    for t in range(tasks)
  ]
  batches = torch.from_numpy(arrays["batches"])  # [steps, tasks, batch, in_dim]
  module = LayerWiseMergedModel(
    layer_wise_weight=torch.from_numpy(arrays["init"].copy()),
    pretrained_model=base,
    finetuned_models=experts,
    clamp_weights=True,
  )
  optimizer = torch.optim.Adam([module.merge_weight], lr=float(arrays["lr"]))
  module.train()
  module.merge_weights()

  def step(i, record=None):
    total, summed = 0.0, 0.0
    for t in range(tasks):
      w, b = heads[t]
      logits = module(batches[i % len(batches), t]) @ w + b
      loss = entropy_loss(logits)
      if args.summed:
        summed = summed + loss
      else:  # As FusionBench's test_time_adaptation: a backward per task through the merge.
        loss.backward(retain_graph=True)
      total += float(loss.detach())
    if args.summed:
      summed.backward()
    if record is not None:
      record["first_loss"] = total
      record["first_grad"] = module.merge_weight.grad.detach().numpy().tolist()
    optimizer.step()
    optimizer.zero_grad()
    module.merge_weights()

  out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  step(0, out)
  for i in range(1, 3):  # Warm-up.
    step(i)
  rates, i = [], 3
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      step(i)
      i += 1
    rates.append(args.steps / (time.perf_counter() - start))
  out.update(steps_per_s_median=statistics.median(rates), steps_per_s_all=rates, steps=i)
  out["final_coeffs"] = module.merge_weight.detach().numpy().tolist()
  with open(args.out, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
