r"""Benchmark (not a test): sharded merges and learned steps against the device count.

Runs in one process with 8 forced CPU devices (the script sets XLA_FLAGS itself before JAX
starts) and times, on meshes of the first 1, 2, 4 and 8 devices:

* data-free merges (`rules.merge(..., mesh=...)`) of `--experts` experts of an MLP-shaped tree
  (`--layers` blocks of [d, 4d] and [4d, d] kernels with biases; 8.4M parameters at the
  default d = 512), against the single-device merge of the same process;
* the learned-merging step (AdaMerging layer-wise, entropy, the shape of
  launch/bench_adamerging.py: 8 tasks, a 345k-parameter MLP, batch 16 per task) on ("data",
  "model") meshes.

For each it reports the median time (of `--repeats` calls after a warm-up that compiles) and
the bytes the compiled program's collectives move per call (`distributed.comms`: all-reduce,
all-gather, ... counted once per execution, while-loop bodies once per trip; "sent per device"
under ring algorithms). A merge that gathers whole leaves (`distributed.spmd`'s "gathered"
mode) moves them outside its program: the bytes of that gather and of the split back are
counted from the leaf sizes.

The 8 CPU "devices" share this machine's cores, so times do not show a speed-up with devices:
the point is correctness at every count (each merge is checked bit for bit against one device,
each step's loss against the single-device step) and the communication volume.

  python launch/bench_sharding.py                     # ~5 min on 2 cores
  python launch/bench_sharding.py --dim=256 --repeats=3 --rules=task_arithmetic,ties
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from mergejax import distributed, rules  # noqa: E402
from mergejax.benchmarks import synthetic  # noqa: E402
from mergejax.distributed import comms, spmd  # noqa: E402
from mergejax.learned import objectives, parametrizations, sharding  # noqa: E402
from mergejax.learned import step as step_lib  # noqa: E402
from mergejax.rules import front_door  # noqa: E402

_DIM = flags.DEFINE_integer("dim", 512, "Model width d of the merge tree.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Blocks of the merge tree.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts merged.")
_RULES = flags.DEFINE_list(
  "rules", ["task_arithmetic", "ties", "dare", "emr"], "Rules to time (emr also with exact=False)."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls; the median is reported.")
_STEPS = flags.DEFINE_integer("steps", 10, "Learned steps per timed window.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")

DEVICE_COUNTS = (1, 2, 4, 8)
LEARNED_MESHES = ((1, 1), (2, 1), (4, 1), (8, 1), (2, 4), (1, 8))


def _tree(seed: int):
  rng = np.random.default_rng(seed)
  d, tree = _DIM.value, {}
  for i in range(_LAYERS.value):
    tree[f"block{i}"] = {
      "up": {"kernel": rng.standard_normal((d, 4 * d), np.float32) * 0.02},
      "up_bias": rng.standard_normal((4 * d,), np.float32) * 0.02,
      "down": {"kernel": rng.standard_normal((4 * d, d), np.float32) * 0.02},
      "norm": np.ones((d,), np.float32),
    }
  return tree


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # Warm-up: compiles.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench_merges() -> list[dict]:
  base = _tree(0)
  experts = [
    jax.tree.map(
      lambda x, i=i: (
        x + np.float32(0.01) * np.random.default_rng(i).standard_normal(x.shape, np.float32)
      ),
      base,
    )
    for i in range(1, _EXPERTS.value + 1)
  ]
  # Device arrays on the first device: the single-device merge is timed as the sharded ones, on
  # arrays already in place (host inputs would add a copy per call).
  base, experts = jax.device_put((base, experts))
  rows = []
  cases = [(r, True) for r in _RULES.value] + [("emr", False)] * ("emr" in _RULES.value)
  for name, exact in cases:
    hparams = rules.add_key(name, {}, 0)
    expected = rules.merge(name, base, experts, **hparams)
    one = _median_time(lambda n=name, h=hparams: rules.merge(n, base, experts, **h), 3)
    for n in DEVICE_COUNTS:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), (distributed.MODEL,))
      layout = distributed.LeafSharding(mesh, exact=exact)
      placed = (layout.place(base), [layout.place(e) for e in experts])

      def merge(n=name, h=hparams, p=placed, lay=layout):
        return rules.merge(n, p[0], p[1], mesh=lay, **h)

      seconds = _median_time(merge, _REPEATS.value)
      out = merge()
      identical = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(out), strict=True)
      )
      max_abs = max(
        float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(out), strict=True)
      )
      mode = next(
        m
        for k, m in front_door._MODES.items()
        if k[3] == layout and k[0] is rules.REGISTRY[name].fn
      )
      stats = comms.collective_bytes(
        rules.lower(name, placed[0], placed[1], mesh=layout, **hparams).compile().as_text(), n
      )
      sent = stats["sent_bytes_per_device"]
      if mode == spmd.GATHERED and n > 1:  # Split leaves gathered onto one device, outputs split.
        split = sum(
          x.nbytes for t in (base, *experts) for x in jax.tree.leaves(t) if layout.is_split(x.shape)
        )
        sent += split * (n - 1) / n + _nbytes(out) * (n - 1) / n
      rows.append(
        {
          "rule": name + ("" if exact else " (exact=False)"),
          "devices": n,
          "mode": mode,
          "seconds": seconds,
          "single_device_seconds": one,
          "identical_to_one_device": identical,
          "max_abs_diff": max_abs,
          "collectives": len(stats["ops"]),
          "payload_bytes": stats["payload_bytes"],
          "sent_bytes_per_device": sent,
        }
      )
      print(json.dumps(rows[-1]), flush=True)
  return rows


def bench_learned() -> list[dict]:
  problem = synthetic.make_problem(
    0,
    num_tasks=8,
    in_dim=128,
    hidden=384,
    depth=3,
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
  rows, reference = [], None
  for data_n, model_n in LEARNED_MESHES:
    placement = None
    if data_n * model_n > 1:
      devices = jax.devices()[: data_n * model_n]
      placement = sharding.Placement(
        distributed.make_mesh(data=data_n, model=model_n, devices=devices)
      )
    step = step_lib.make_train_step(
      problem.apply_fn, scaling, objectives.entropy(), opt, batch_size=16, placement=placement
    )
    coeffs = scaling.init(base, basis)
    state = step_lib.TrainState(
      coeffs=coeffs,
      opt_state=opt.init(coeffs),
      step=jnp.zeros([], jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
    )
    b, v, d = base, basis, data
    if placement is not None:
      b, v = placement.model(base), [placement.model(x) for x in basis]
      d, state = placement.replicated(data), placement.replicated(state)
    compiled = step.lower(state, b, v, d).compile()
    stats = comms.collective_bytes(compiled.as_text(), data_n * model_n)
    losses = []
    state, metrics = step(state, b, v, d)
    losses.append(float(metrics["loss"]))
    rates = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = step(state, b, v, d)
      jax.block_until_ready(metrics["loss"])
      rates.append(_STEPS.value / (time.perf_counter() - start))
    losses.append(float(metrics["loss"]))
    if reference is None:
      reference = losses
    rows.append(
      {
        "mesh": f"{data_n}x{model_n}",
        "devices": data_n * model_n,
        "steps_per_s": statistics.median(rates),
        "first_loss": losses[0],
        "loss_abs_diff_vs_one_device": max(
          abs(a - b) for a, b in zip(losses, reference, strict=True)
        ),
        "collectives": len(stats["ops"]),
        "payload_bytes": stats["payload_bytes"],
        "sent_bytes_per_device": stats["sent_bytes_per_device"],
        "backbone_params": sum(x.size for x in jax.tree.leaves(base)),
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _table(rows, keys):
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for r in rows:
    cells = []
    for k in keys:
      v = r[k]
      if isinstance(v, float):
        v = f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
      cells.append(str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  merges = bench_merges()
  learned = bench_learned()
  print(
    _table(
      merges,
      [
        "rule",
        "devices",
        "mode",
        "seconds",
        "single_device_seconds",
        "identical_to_one_device",
        "sent_bytes_per_device",
      ],
    )
  )
  print(
    _table(
      learned,
      [
        "mesh",
        "steps_per_s",
        "loss_abs_diff_vs_one_device",
        "collectives",
        "sent_bytes_per_device",
      ],
    )
  )
  out = {"merges": merges, "learned": learned, "devices": [str(d) for d in jax.devices()]}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
