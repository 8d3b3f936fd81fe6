r"""Benchmark (not a test): layer-wise AdaMerging: mergejax's step, FusionBench's, a plain loop.

All learn the same Λ (layer-wise, entropy, Adam 1e-3, clamp [0, 1] in the forward pass) for a
synthetic MLP classifier (8 tasks, ~345k backbone parameters, batch 16 per task, random data):

* fused: `mergejax.learned.step.make_train_step`, one jitted call per step (sample batches, build
  θ(Λ) once, forward all tasks, loss, backward, Adam, clamp);
* FusionBench: its own `LayerWiseMergedModel` and AdaMerging `entropy_loss`, driven as its
  `LayerWiseAdaMergingAlgorithm.test_time_adaptation` does (launch/fusionbench_adamerging.py, run
  in FusionBench's virtual environment, `--fusionbench_python`), on the same weights (the flax
  kernels transposed into torch Linear layers, tanh GELU as flax's) and the very batches the
  fused step samples. Its loss and Λ-gradient at the first step are compared with mergejax's,
  and Λ after the last step;
* straightforward: θ(Λ) built outside any jit (op by op), a Python loop over tasks calling a
  jitted forward, `jax.value_and_grad` around it, the optax update outside the jit.

Each implementation runs in its own child process so that its peak RSS is its own. Reported:
median steps/s over `--repeats` windows of `--steps` steps (after a warm-up that compiles), the
ratio, peak RSS above the post-setup baseline, and for the fused step XLA's own memory analysis
(arguments, outputs and the temporary peak) next to the byte size of one θ and of the basis.

  .venv/bin/python launch/bench_adamerging.py --steps=20 --repeats=5
"""

import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from mergejax import losses
from mergejax.benchmarks import synthetic
from mergejax.learned import objectives, parametrizations
from mergejax.learned import step as step_lib

_IMPL = flags.DEFINE_enum("impl", None, ["fused", "straightforward"], "Child mode: run one.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows; the median is reported.")
_TASKS = flags.DEFINE_integer("tasks", 8, "Number of tasks/experts.")
_HIDDEN = flags.DEFINE_integer("hidden", 384, "MLP width.")
_DEPTH = flags.DEFINE_integer("depth", 3, "MLP layers.")
_IN_DIM = flags.DEFINE_integer("in_dim", 128, "Input features.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch per task.")
_EXPORT = flags.DEFINE_string("export", None, "Fused child: write the problem for FusionBench.")
_FUSIONBENCH = flags.DEFINE_string(
  "fusionbench_python",
  "/work/venvs/peers/bin/python",
  "Python of FusionBench's virtual environment ('' skips the comparison).",
)


def _max_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _child(impl: str) -> dict:
  problem = synthetic.make_problem(
    0,
    num_tasks=_TASKS.value,
    in_dim=_IN_DIM.value,
    hidden=_HIDDEN.value,
    depth=_DEPTH.value,
    num_classes=10,
    num_train=512,
    num_val=16,
    num_test=512,
  )
  base = problem.base
  basis = [jax.tree.map(jnp.subtract, e, base) for e in problem.experts]
  data = tuple({"x": d["x"]} for d in problem.test)
  blocks = parametrizations.make_blocks(base, granularity="layer")
  scaling = parametrizations.blockwise_scaling(blocks, init=0.3, clamp=(0.0, 1.0))
  opt = optax.adam(1e-3)
  coeffs = scaling.init(base, basis)
  jax.block_until_ready((base, basis, data, coeffs))
  if impl == "fused" and _EXPORT.value:
    _export(problem, blocks, coeffs, data, _EXPORT.value)
  del problem  # Keep only what the step needs: θ0, the basis (once), the data.
  baseline_rss = _max_rss_mib()
  out = {
    "impl": impl,
    "backbone_params": sum(x.size for x in jax.tree.leaves(base)),
    "theta_mib": _nbytes(base) / 2**20,
    "basis_mib": _nbytes(basis) / 2**20,
    "num_blocks": blocks.num_blocks,
  }

  if impl == "fused":
    step = step_lib.make_train_step(
      _apply_fn(), scaling, objectives.entropy(), opt, batch_size=_BATCH.value
    )
    state = step_lib.TrainState(
      coeffs=coeffs,
      opt_state=opt.init(coeffs),
      step=jnp.zeros([], jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
    )
    compiled = step.lower(state, base, basis, data).compile()
    out.update(_first_step(scaling, base, basis, data, coeffs))
    mem = compiled.memory_analysis()
    if mem is not None:
      out.update(
        xla_argument_mib=mem.argument_size_in_bytes / 2**20,
        xla_output_mib=mem.output_size_in_bytes / 2**20,
        xla_temp_mib=mem.temp_size_in_bytes / 2**20,
      )

    def run(state, n):
      for _ in range(n):
        state, metrics = step(state, base, basis, data)
      jax.block_until_ready(metrics["loss"])
      return state
  else:
    apply_fn = _apply_fn()
    forward = jax.jit(apply_fn, static_argnums=2)
    rng = np.random.default_rng(0)
    sizes = [d["x"].shape[0] for d in data]

    def loss_fn(coeffs, batches):
      # Merge outside any jit: one dispatched op per leaf and basis vector.
      params = parametrizations.merge_blockwise(coeffs, base, basis, blocks)
      total = 0.0
      for t, x in enumerate(batches):  # Tasks in a Python loop.
        total = total + losses.entropy(forward(params, x, t))
      return total

    def run(state, n):
      coeffs, opt_state = state
      for _ in range(n):
        batches = [
          d["x"][rng.integers(0, s, _BATCH.value)] for d, s in zip(data, sizes, strict=True)
        ]
        loss, grads = jax.value_and_grad(loss_fn)(coeffs, batches)
        updates, opt_state = opt.update(grads, opt_state, coeffs)
        coeffs = jnp.clip(optax.apply_updates(coeffs, updates), 0.0, 1.0)
      jax.block_until_ready(loss)
      return coeffs, opt_state

    state = (coeffs, opt.init(coeffs))

  state = run(state, 3)  # Warm-up: compiles.
  rates = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    state = run(state, _STEPS.value)
    rates.append(_STEPS.value / (time.perf_counter() - start))
  out.update(
    steps_per_s_median=statistics.median(rates),
    steps_per_s_all=rates,
    peak_rss_mib=_max_rss_mib(),
    rss_above_setup_mib=_max_rss_mib() - baseline_rss,
  )
  if impl == "fused":
    out["final_coeffs"] = np.asarray(state.coeffs).tolist()
  return out


def _step_batches(data, steps):
  """The batches the fused step draws at steps 0..steps-1: [steps, tasks, batch, in_dim]."""
  key = jax.random.key(0)
  return np.stack(
    [
      np.stack([b["x"] for b in step_lib.sample_batches(key, jnp.int32(s), data, _BATCH.value)])
      for s in range(steps)
    ]
  )


def _first_step(scaling, base, basis, data, coeffs):
  """Summed entropy over tasks and its Λ-gradient on step 0's batches (FusionBench's check)."""
  apply_fn, batches = _apply_fn(), _step_batches(data, 1)[0]

  def loss(c):
    params = scaling.merge(c, base, basis)
    return sum(losses.entropy(apply_fn(params, batches[t], t)) for t in range(len(batches)))

  value, grad = jax.value_and_grad(loss)(coeffs)
  return {"first_loss": float(value), "first_grad": np.asarray(grad).tolist()}


def _torch_order(blocks):
  """Λ's columns in FusionBench's order (torch named_parameters: layer i's weight, then bias)."""
  return [
    blocks.names.index(f"dense_{i}/{name}")
    for i in range(_DEPTH.value)
    for name in ("kernel", "bias")
  ]


def _export(problem, blocks, coeffs, data, path):
  """θ0, experts and heads in torch layout, Λ0 in torch order and every step's batches."""
  arrays = {"depth": _DEPTH.value, "num_tasks": _TASKS.value, "lr": 1e-3}
  for prefix, params in [("base", problem.base)] + [
    (f"expert{t}", e) for t, e in enumerate(problem.experts)
  ]:
    for i in range(_DEPTH.value):
      layer = params[f"dense_{i}"]
      arrays[f"{prefix}/{i}/weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
      arrays[f"{prefix}/{i}/bias"] = np.asarray(layer["bias"])
  for t, head in enumerate(problem.heads):
    arrays[f"head{t}/w"], arrays[f"head{t}/b"] = np.asarray(head["w"]), np.asarray(head["b"])
  arrays["init"] = np.asarray(coeffs)[:, _torch_order(blocks)]
  arrays["batches"] = _step_batches(data, 3 + _REPEATS.value * _STEPS.value)
  np.savez(path, **arrays)


_APPLY = {}


def _apply_fn():
  # The child's problem is rebuilt deterministically; keep its apply_fn (heads closed over).
  if "fn" not in _APPLY:
    _APPLY["fn"] = synthetic.make_problem(
      0,
      num_tasks=_TASKS.value,
      in_dim=_IN_DIM.value,
      hidden=_HIDDEN.value,
      depth=_DEPTH.value,
      num_classes=10,
      num_train=_BATCH.value,
      num_val=1,
      num_test=1,
    ).apply_fn
  return _APPLY["fn"]


def main(argv):
  if _IMPL.value is not None:
    print("RESULT " + json.dumps(_child(_IMPL.value)))
    return
  results = {}
  tmp = tempfile.mkdtemp(prefix="bench_adamerging_")
  shape = [
    f"--{f}={flags.FLAGS[f].value}"
    for f in ("steps", "repeats", "tasks", "hidden", "depth", "in_dim", "batch_size")
  ]
  for impl in ("fused", "straightforward"):
    export = [f"--export={tmp}/problem.npz"] if impl == "fused" else []
    proc = subprocess.run(
      [sys.executable, __file__, f"--impl={impl}", *shape, *export],
      capture_output=True,
      text=True,
      check=True,
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results[impl] = json.loads(line[len("RESULT ") :])
  fused, naive = results["fused"], results["straightforward"]
  results["speedup_median"] = fused["steps_per_s_median"] / naive["steps_per_s_median"]
  if _FUSIONBENCH.value:
    results.update(_fusionbench(fused, tmp))
    summed = _fusionbench(fused, tmp, summed=True)
    results["fusionbench_summed_loss"] = summed["fusionbench"]
    results["speedup_vs_fusionbench_summed_loss"] = summed["speedup_vs_fusionbench"]
  for r in results.values():
    if isinstance(r, dict):
      r.pop("final_coeffs", None), r.pop("first_grad", None)
  results["device"] = str(jax.devices()[0])
  print(json.dumps(results, indent=2))


def _fusionbench(fused: dict, tmp: str, summed: bool = False) -> dict:
  """Runs FusionBench's AdaMerging in its virtual environment; compares it with `fused`."""
  child = pathlib.Path(__file__).with_name("fusionbench_adamerging.py")
  subprocess.run(
    [
      _FUSIONBENCH.value,
      str(child),
      f"--npz={tmp}/problem.npz",
      f"--out={tmp}/fusionbench.json",
      f"--steps={_STEPS.value}",
      f"--repeats={_REPEATS.value}",
      *(["--summed"] if summed else []),
    ],
    check=True,
  )
  fb = json.loads(pathlib.Path(f"{tmp}/fusionbench.json").read_text())
  blocks = parametrizations.make_blocks(
    synthetic.make_problem(
      0,
      num_tasks=_TASKS.value,
      in_dim=_IN_DIM.value,
      hidden=_HIDDEN.value,
      depth=_DEPTH.value,
      num_classes=10,
      num_train=1,
      num_val=1,
      num_test=1,
    ).base,
    granularity="layer",
  )
  columns = _torch_order(blocks)
  ours_grad = np.asarray(fused["first_grad"])[:, columns]
  theirs_grad = np.asarray(fb["first_grad"])
  ours_final = np.asarray(fused["final_coeffs"])[:, columns]
  theirs_final = np.asarray(fb["final_coeffs"])
  return {
    "fusionbench": {
      "steps_per_s_median": fb["steps_per_s_median"],
      "steps_per_s_all": fb["steps_per_s_all"],
      "torch": fb["torch"],
      "torch_threads": fb["threads"],
      "first_loss": fb["first_loss"],
    },
    "speedup_vs_fusionbench": fused["steps_per_s_median"] / fb["steps_per_s_median"],
    "first_loss_abs_diff": abs(fused["first_loss"] - fb["first_loss"]),
    "first_loss_rel_diff": abs(fused["first_loss"] - fb["first_loss"]) / abs(fb["first_loss"]),
    "first_grad_max_abs_diff": float(np.max(np.abs(ours_grad - theirs_grad))),
    "first_grad_max_abs": float(np.max(np.abs(theirs_grad))),
    "final_coeffs_max_abs_diff": float(np.max(np.abs(ours_final - theirs_final))),
    "steps_compared": fb["steps"],
  }


if __name__ == "__main__":
  app.run(main)
