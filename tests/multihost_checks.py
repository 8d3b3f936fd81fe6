"""Worker of tests/sharding_test.py: one of two processes of a multi-host run on localhost.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python tests/multihost_checks.py PROCESS_ID PORT WORKDIR

Two processes with 4 CPU devices each connect through `jax.distributed` (gloo collectives), build
one 8-device mesh and run, as a multi-host job would: data-free merges of tiny models (each
process placing only its own slices of host arrays, which it records), `run.merge_from_disk` on
safetensors files written by the test (process 0 alone writes the output), and a few learned
steps on a 4 x 2 mesh, checkpointed. Process 0 saves the results for the test to compare with
one process.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from mergejax.distributed import hosts

MERGED = ("task_arithmetic", "ties", "dare", "emr")  # Elementwise, selection, random, gathered.


class RecordingArray:
  """A host array that records which entries `layout.put` reads (one process's slices)."""

  def __init__(self, array):
    self.array, self.shape, self.dtype = array, array.shape, array.dtype
    self.read = np.zeros(array.shape, bool)

  def __getitem__(self, index):
    self.read[index] = True
    return self.array[index]


def main(process_id: int, port: int, workdir: pathlib.Path) -> None:
  hosts.initialize(
    {"coordinator_address": f"localhost:{port}", "num_processes": 2, "process_id": process_id}
  )
  # Imported after initialize: nothing may touch the backend before it.
  import sharding_checks  # noqa: PLC0415 (this directory is sys.path[0])

  from configs import merge as merge_config  # noqa: PLC0415
  from mergejax import distributed, rules, run  # noqa: PLC0415
  from mergejax import tree as tree_lib  # noqa: PLC0415

  assert jax.process_count() == 2 and jax.device_count() == 8
  out = {}
  base, experts = sharding_checks._models()
  layout = distributed.LeafSharding(distributed.merge_mesh(), min_size=0)
  recorded = jax.tree.map(lambda x: RecordingArray(np.asarray(x)), base)
  layout.place(recorded)
  out["fraction_read"] = {p: float(r.read.mean()) for p, r in tree_lib.flatten(recorded).items()}
  for name in MERGED:
    merged = rules.merge(name, base, experts, mesh=layout, **rules.add_key(name, {}, 0))
    host = jax.tree.map(hosts.to_host, merged)
    for path, leaf in tree_lib.flatten(host).items():
      out[f"merge/{name}/{path}"] = leaf

  # From disk, the CLI's library path: every process merges, process 0 writes.
  for engine in ("memory", "streaming"):
    config = merge_config.get_config("ties")
    config.base = str(workdir / "base.safetensors")
    config.experts = tuple(str(workdir / f"expert{i}.safetensors") for i in range(3))
    config.engine = engine
    run.merge_from_disk(config, workdir / f"cli_{engine}")

  # A few learned steps on a 4 x 2 mesh spanning both processes.
  from mergejax.learned import sharding  # noqa: PLC0415

  # Checkpointed every step by both processes together (orbax); the test resumes it on one device.
  config, problem, basis, parametrization = sharding_checks._learned_setup(steps=3)
  config.ckpt.every_steps = 1
  placement = sharding.Placement(distributed.make_mesh(data=4, model=2))
  result = sharding_checks._train(
    config, problem, basis, parametrization, placement, workdir=workdir / "learned"
  )
  out["learned/coeffs"] = hosts.to_host(result.final_coeffs)
  out["learned/loss"] = np.asarray([loss for _, loss in result.history["loss"]])
  out["learned/base_split"] = np.asarray(
    sum(sharding_checks._split(placement.model(problem.base), placement.params))
  )
  if hosts.is_primary():
    fractions = out.pop("fraction_read")
    np.savez(workdir / "multihost.npz", **out)
    (workdir / "fraction_read.json").write_text(json.dumps(fractions))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
