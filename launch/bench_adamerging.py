r"""Benchmark (not a test): layer-wise AdaMerging, fused jitted step vs a straightforward loop.

Both learn the same Λ (layer-wise, entropy, Adam 1e-3, clamp [0, 1]) for a synthetic flax MLP
classifier (8 tasks, ~345k backbone parameters, batch 16 per task, random data):

* fused: `mergejax.learned.step.make_train_step`, one jitted call per step (sample batches, build
  θ(Λ) once, forward all tasks, loss, backward, Adam, clamp);
* straightforward: θ(Λ) built outside any jit (op by op), a Python loop over tasks calling a
  jitted forward, `jax.value_and_grad` around it, the optax update outside the jit.

Each implementation runs in its own child process so that its peak RSS is its own. Reported:
median steps/s over `--repeats` windows of `--steps` steps (after a warm-up that compiles), the
ratio, peak RSS above the post-setup baseline, and for the fused step XLA's own memory analysis
(arguments, outputs and the temporary peak) next to the byte size of one θ and of the basis.

  .venv/bin/python launch/bench_adamerging.py --steps=20 --repeats=5
"""

import json
import resource
import statistics
import subprocess
import sys
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
  return out


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
  for impl in ("fused", "straightforward"):
    proc = subprocess.run(
      [
        sys.executable,
        __file__,
        f"--impl={impl}",
        *argv[1:],
        *[
          f"--{f}={flags.FLAGS[f].value}"
          for f in ("steps", "repeats", "tasks", "hidden", "depth", "in_dim", "batch_size")
        ],
      ],
      capture_output=True,
      text=True,
      check=True,
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results[impl] = json.loads(line[len("RESULT ") :])
  fused, naive = results["fused"], results["straightforward"]
  results["speedup_median"] = fused["steps_per_s_median"] / naive["steps_per_s_median"]
  results["device"] = str(jax.devices()[0])
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
