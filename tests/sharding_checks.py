"""Worker of tests/sharding_test.py: runs in its own process with 8 forced CPU devices.

JAX fixes its device count when it starts, so the suite's own process (one device) cannot test
meshes. `python tests/sharding_checks.py PART OUT.json` (PART: a key of `PARTS`) must be
started with XLA_FLAGS=--xla_force_host_platform_device_count=8; it runs the part's checks and
writes what it saw as JSON for the test to assert on. Trees are tiny: compiles dominate.
"""

import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from configs.learned import adamerging
from mergejax import distributed, rules, streaming
from mergejax import tree as tree_lib
from mergejax.benchmarks import synthetic
from mergejax.io import checkpoint
from mergejax.learned import bases, loop, objectives, sharding
from mergejax.learned import parametrizations as pz
from mergejax.learned import step as step_lib
from mergejax.rules import front_door
from mergejax.testing.random_models import random_flat_models

# Leaves that split along axis 0 (both meshes), along a later axis (8 devices), or stay whole.
SHAPES = {"a/w": (16, 24), "c/k": (4, 32), "d": (5, 7)}


def _models(n=3, seed=0):
  base, experts = random_flat_models(SHAPES, n, seed)
  return tree_lib.unflatten(base), [tree_lib.unflatten(e) for e in experts]


def _mesh(n):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("model",))


def _diff(a, b) -> int:
  """Entries that differ, over all leaves (bit for bit; NaN never appears here)."""
  return sum(
    int(np.sum(np.asarray(x) != np.asarray(y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _split(tree, layout) -> list[bool]:
  """Per leaf: truly split (more than one distinct shard) with the layout's spec."""
  out = []
  for x in jax.tree.leaves(tree):
    spec_ok = x.sharding.spec == layout.spec(x.shape)
    shards = {tuple((s.start, s.stop) for s in sh.index) for sh in x.addressable_shards}
    out.append(spec_ok and len(shards) > 1)
  return out


ON_EVERY_MESH = ("task_arithmetic", "ties", "dare", "emr", "tsv_m")


def data_free(report):
  base, experts = _models()
  results = {}
  # Data-dependent rules refuse a mesh (they run on one device): not part of this check.
  for name in sorted(n for n, spec in rules.REGISTRY.items() if not spec.data_dependent):
    ex = experts[:2] if name == "slerp" else experts
    hparams = rules.add_key(name, {}, 0)
    expected = rules.merge(name, base, ex, **hparams)
    results[name] = {}
    # Every rule on 8 devices; on 2 and on a mesh of one (the single-device path itself), the
    # rules of each kind: elementwise, exact selection, random, gathered (per-leaf sums, SVDs).
    for n in (1, 2, 8) if name in ON_EVERY_MESH else (8,):
      layout = distributed.LeafSharding(_mesh(n), min_size=0)
      out = rules.merge(name, base, ex, mesh=layout, **hparams)
      modes = {m for k, m in front_door._MODES.items() if k[3] == layout}
      results[name][n] = {"diff": _diff(expected, out), "split": sum(_split(out, layout))}
      results[name][n]["modes"] = sorted(modes)
      front_door._MODES.clear()
  report["data_free"] = results

  # Options, subsets and the engine's fallback rules, at 8 devices.
  layout = distributed.LeafSharding(_mesh(8), min_size=0)
  cases = [
    ("ties", {"density": 0.5, "election": "count", "weights": [1.0, 0.5, 0.25]}, {}),
    ("dare", {"rescale": "l1", "combine": "ties", "density": 0.3}, {}),
    ("task_arithmetic", {"scale": 0.7}, {"include": ["a/.*"], "others": "average"}),
  ]
  report["options"] = []
  for name, hparams, options in cases:
    hparams = rules.add_key(name, hparams, 1)
    expected = rules.merge(name, base, experts, **options, **hparams)
    out = rules.merge(name, base, experts, mesh=layout, **options, **hparams)
    report["options"].append([name, str(hparams), str(options), _diff(expected, out)])

  # exact=False: EMR's sums reduced by XLA across devices (all-reduce), within rounding.
  loose = distributed.LeafSharding(_mesh(8), min_size=0, exact=False)
  expected = rules.merge("emr", base, experts)
  out = rules.merge("emr", base, experts, mesh=loose)
  report["inexact_emr"] = {
    "max_abs": float(np.max(np.abs(np.asarray(expected.rescalers) - np.asarray(out.rescalers)))),
    "modes": sorted({m for k, m in front_door._MODES.items() if k[3] == loose}),
  }


# Streaming: rules with statistics passes (TIES's host histograms, EMR's `leafwise.total` sums),
# random keys as data (DARE), gathered leaves (TSV-M) and one that falls back to the in-memory
# merge (DARE-TIES).
STREAMED = ("task_arithmetic", "ties", "dare", "emr", "tsv_m", "dare_ties")


def data_free_streaming(report):
  base, experts = _models()
  flat_base = tree_lib.flatten(base)
  flat_experts = [tree_lib.flatten(e) for e in experts]
  results = {}
  for name in STREAMED:
    hparams = rules.add_key(name, {}, 0)
    # The reference is the engine on one device (its bits are `rules.merge`'s, as
    # tests/streaming_test.py checks, up to its own summation order of EMR's sums).
    one = streaming.StreamingMerge(name, flat_base, flat_experts, hparams, memory_budget=2**30)
    layout = distributed.LeafSharding(_mesh(8), min_size=0)
    engine = streaming.StreamingMerge(
      name, flat_base, flat_experts, hparams, memory_budget=2**30, mesh=layout
    )
    diff = 0
    for t in range(one.num_outputs):
      diff += sum(int(np.sum(engine.leaf(p, t) != one.leaf(p, t))) for p in flat_base)
    modes = {k: sorted(v) for k, v in engine.timings.spmd_modes.items()}
    results[name] = {"diff": diff, "modes": modes, "in_memory": engine.reason is not None}
  report["streaming"] = results


def _learned_setup(steps):
  config = adamerging.get_config("runlocal")
  config.synthetic.hidden = 64  # 64 x 64 kernels: large enough to be split.
  config.synthetic.num_tasks = 2
  config.train.steps, config.train.batch_size = steps, 8
  problem = synthetic.make_problem(0, **config.synthetic)  # No validation: AdaMerging's recipe.
  basis = bases.make_basis(problem.base, problem.experts, config.basis)
  blocks = pz.make_blocks(problem.base, granularity="layer")
  parametrization = pz.blockwise_scaling(blocks, init=0.3, clamp=(0.0, 1.0), clamp_mode="forward")
  return config, problem, basis, parametrization


def _train(config, problem, basis, parametrization, placement, workdir=None, compiled=None):
  return loop.train(
    problem.apply_fn,
    problem.base,
    basis,
    problem.test,
    config,
    parametrization=parametrization,
    objective=objectives.make(config.objective),
    optimizer=step_lib.make_optimizer(config.optim),
    placement=placement,
    workdir=workdir,
    compiled=compiled,
  )


def learned(report):
  config, problem, basis, parametrization = _learned_setup(steps=4)
  one = _train(config, problem, basis, parametrization, None)
  results, compiled = {}, {}
  for data, model in ((8, 1), (2, 4)):
    placement = sharding.Placement(distributed.make_mesh(data=data, model=model))
    compiled[data, model] = step_lib.make_compiled(
      problem.apply_fn,
      parametrization,
      objectives.make(config.objective),
      step_lib.make_optimizer(config.optim),
      config.train,
      placement=placement,
    )
    out = _train(config, problem, basis, parametrization, placement, compiled=compiled[data, model])
    split_base = placement.model(problem.base)
    results[f"{data}x{model}"] = {
      "loss_max_abs": max(
        abs(a[1] - b[1]) for a, b in zip(out.history["loss"], one.history["loss"], strict=True)
      ),
      "coeffs_max_abs": float(
        np.max(np.abs(np.asarray(out.final_coeffs) - np.asarray(one.final_coeffs)))
      ),
      "params_max_abs": max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(one.params), strict=True)
      ),
      "base_split": sum(_split(split_base, placement.params)),
      "params_split": sum(_split(out.params, placement.params)),
      "coeffs_replicated": bool(out.final_coeffs.sharding.is_fully_replicated),
      "coeffs_devices": len(out.final_coeffs.sharding.device_set),
    }
  report["learned"] = results

  # Checkpoints: a run saved on an 8 x 1 mesh resumes on 2 x 4 (orbax reshards the state).
  with tempfile.TemporaryDirectory() as tmp:
    config.ckpt.every_steps = 1
    config.train.steps = 2
    first = sharding.Placement(distributed.make_mesh(data=8, model=1))
    _train(config, problem, basis, parametrization, first, tmp, compiled[8, 1])
    config.train.steps = 4
    second = sharding.Placement(distributed.make_mesh(data=2, model=4))
    resumed = _train(config, problem, basis, parametrization, second, tmp, compiled[2, 4])
    report["resume_other_mesh"] = {
      "coeffs_max_abs": float(
        np.max(np.abs(np.asarray(resumed.final_coeffs) - np.asarray(one.final_coeffs)))
      ),
      "history_steps": [s for s, _ in resumed.history["loss"]],
      "coeffs_mesh": dict(resumed.final_coeffs.sharding.mesh.shape),
    }
    # A θ-shaped tree split over 8 devices, saved, restored split over 4 of a 2 x 4 mesh.
    saved = distributed.LeafSharding(_mesh(8), min_size=0).place(problem.base)
    checkpoint.save_pytree(pathlib.Path(tmp) / "theta", saved)
    target = sharding.Placement(distributed.make_mesh(data=2, model=4)).params
    restored = checkpoint.load_pytree(pathlib.Path(tmp) / "theta", target.abstract(problem.base))
    report["restore_tree_other_mesh"] = {
      "diff": _diff(saved, restored),
      "specs_match": all(
        x.sharding.spec == target.spec(x.shape) and x.sharding.mesh == target.mesh
        for x in jax.tree.leaves(restored)
      ),
      "split": sum(_split(restored, target)),
    }


PARTS = {"data_free": (data_free,), "streaming_learned": (data_free_streaming, learned)}


def main(part, out_path):
  assert jax.device_count() == 8, "start with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  report, seconds = {}, {}
  for check in PARTS[part]:
    start = time.perf_counter()
    check(report)
    seconds[check.__name__] = round(time.perf_counter() - start, 1)
  report["seconds"] = seconds
  pathlib.Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
