"""Merges and learned steps across devices and hosts (mergejax.distributed), on CPU.

JAX fixes its device count when it starts, and this suite runs on one device, so the checks run
in child processes: two with 8 forced CPU devices (tests/sharding_checks.py, one per part) and
two that form a 2-process, 8-device run over localhost (tests/multihost_checks.py). They start
together (the machine has 2 cores) when the first test here needs them; each test asserts on
what they reported, against references computed here on one device.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import multihost_checks
import numpy as np
import pytest
import sharding_checks

from configs import merge as merge_config
from mergejax import rules, run
from mergejax import tree as tree_lib
from mergejax.io import checkpoint
from mergejax.learned import objectives
from mergejax.learned import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
# Learned steps on a mesh sum partial losses and gradients across devices: float32 rounding.
LOSS_ATOL, COEFFS_ATOL = 2e-6, 1e-6

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(args, devices, log):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return subprocess.Popen(
    [sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
  )


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  """Runs every child process at once; returns their reports (JSON, NumPy) and the workdir."""
  tmp = tmp_path_factory.mktemp("sharding")
  base, experts = sharding_checks._models()
  checkpoint.save_safetensors(tmp / "base.safetensors", base)
  for i, e in enumerate(experts):
    checkpoint.save_safetensors(tmp / f"expert{i}.safetensors", e)
  port, procs = _free_port(), []
  for part in sharding_checks.PARTS:
    log = open(tmp / f"{part}.log", "w")  # noqa: SIM115 (closed with the process)
    args = [str(ROOT / "tests/sharding_checks.py"), part, str(tmp / f"{part}.json")]
    procs.append((part, _start(args, 8, log), log))
  for pid in (0, 1):
    log = open(tmp / f"host{pid}.log", "w")  # noqa: SIM115
    args = [str(ROOT / "tests/multihost_checks.py"), str(pid), str(port), str(tmp)]
    procs.append((f"host{pid}", _start(args, 4, log), log))
  failed = []
  for name, proc, log in procs:
    try:
      code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      code = "timeout"
    log.close()
    if code != 0:
      failed.append(f"{name} ({code}):\n{(tmp / f'{name}.log').read_text()[-3000:]}")
  assert not failed, "\n".join(failed)
  out = {part: json.loads((tmp / f"{part}.json").read_text()) for part in sharding_checks.PARTS}
  out["multihost"] = dict(np.load(tmp / "multihost.npz"))
  out["fraction_read"] = json.loads((tmp / "fraction_read.json").read_text())
  out["tmp"] = tmp
  return out


def test_every_rule_is_bit_identical_on_2_and_8_devices(reports):
  results = reports["data_free"]["data_free"]
  assert sorted(results) == sorted(n for n, s in rules.REGISTRY.items() if not s.data_dependent)
  for name, by_mesh in results.items():
    for devices, r in by_mesh.items():
      assert r["diff"] == 0, (name, devices, r)
      # The outputs really are split (every leaf the layout splits), except on one device.
      assert (r["split"] > 0) == (devices != "1"), (name, devices, r)
  modes = {name: by_mesh["8"]["modes"] for name, by_mesh in results.items()}
  gathered = {n for n, m in modes.items() if "gathered" in m}
  # Per-leaf sums and SVDs are gathered; everything else, TIES's selection included, partitions.
  assert gathered == {"emr", "model_stock", "slerp", "tsv_m", "tsv_c", "iso_c", "iso_cts"}
  assert modes["ties"] == ["partitioned"] and modes["dare"] == ["partitioned"]


def test_options_subsets_and_loose_sums(reports):
  report = reports["data_free"]
  for name, hparams, options, diff in report["options"]:
    assert diff == 0, (name, hparams, options)
  # exact=False lets XLA sum EMR's statistics across devices: partitioned, within rounding.
  loose = report["inexact_emr"]
  assert loose["modes"] == ["partitioned"]
  assert loose["max_abs"] < 1e-6


def test_streaming_engine_on_8_devices_gives_the_one_device_bits(reports):
  results = reports["streaming_learned"]["streaming"]
  assert sorted(results) == sorted(sharding_checks.STREAMED)
  for name, r in results.items():
    assert r["diff"] == 0, (name, r)
  # DARE-TIES streams: its trim's thresholds from the host pass, the apply pass over the mesh.
  assert not results["dare_ties"]["in_memory"]
  assert results["emr"]["modes"] == {
    "apply": ["partitioned"],
    "statistics": ["gathered", "partitioned"],
  }
  assert "gathered" in results["tsv_m"]["modes"]["apply"]


def test_learned_steps_on_meshes_match_one_device(reports):
  results = reports["streaming_learned"]["learned"]
  for shape, r in results.items():
    assert r["loss_max_abs"] <= LOSS_ATOL, (shape, r)
    assert r["coeffs_max_abs"] <= COEFFS_ATOL, (shape, r)
    assert r["params_max_abs"] <= COEFFS_ATOL, (shape, r)
    assert r["coeffs_replicated"] and r["coeffs_devices"] == 8, (shape, r)
  # On the model axis, θ0 and the merged θ are split (the one 64 x 64 kernel), FSDP-style.
  assert results["2x4"]["base_split"] >= 1 and results["2x4"]["params_split"] >= 1
  assert results["8x1"]["base_split"] == 0  # A model axis of one splits nothing.


def test_checkpoints_restore_onto_another_mesh(reports):
  report = reports["streaming_learned"]
  resumed = report["resume_other_mesh"]
  assert resumed["history_steps"] == [1, 2, 3, 4]  # Steps 3-4 ran after the restore.
  assert resumed["coeffs_mesh"] == {"data": 2, "model": 4}
  assert resumed["coeffs_max_abs"] <= COEFFS_ATOL
  tree = report["restore_tree_other_mesh"]
  assert tree["diff"] == 0 and tree["specs_match"] and tree["split"] >= 1


def test_two_processes_merge_like_one(reports):
  saved = reports["multihost"]
  base, experts = sharding_checks._models()
  for name in multihost_checks.MERGED:
    expected = tree_lib.flatten(rules.merge(name, base, experts, **rules.add_key(name, {}, 0)))
    for path, leaf in expected.items():
      np.testing.assert_array_equal(saved[f"merge/{name}/{path}"], np.asarray(leaf), err_msg=path)
  # Each process read only its half of every split leaf, and all of the replicated one.
  fractions = reports["fraction_read"]
  assert fractions == {"a/w": 0.5, "c/k": 0.5, "d": 1.0}


def test_two_processes_write_one_output_from_disk(reports):
  tmp = reports["tmp"]
  config = merge_config.get_config("ties")
  config.base = str(tmp / "base.safetensors")
  config.experts = tuple(str(tmp / f"expert{i}.safetensors") for i in range(3))
  expected = run.merge_from_disk(config, tmp / "one_process")
  want = checkpoint.load_params(expected["outputs"][0])
  for engine in ("memory", "streaming"):
    workdir = tmp / f"cli_{engine}"
    record = json.loads((workdir / "run.json").read_text())
    assert record["distributed"]["process_count"] == 2
    assert record["distributed"]["device_count"] == 8
    assert record["distributed"]["mesh_shape"] == {"model": 8}
    assert sorted(p.name for p in workdir.iterdir()) == ["merged.safetensors", "run.json"]
    got = checkpoint.load_params(workdir / "merged.safetensors")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert expected["distributed"] == {
    "mesh_shape": {"devices": 1},
    "device_count": 1,
    "process_count": 1,
    "platform": "cpu",
  }


def test_two_processes_learn_like_one_and_resume_on_one_device(reports):
  saved = reports["multihost"]
  config, problem, basis, parametrization = sharding_checks._learned_setup(steps=3)
  compiled = step_lib.make_compiled(
    problem.apply_fn,
    parametrization,
    objectives.make(config.objective),
    step_lib.make_optimizer(config.optim),
    config.train,
  )
  one = sharding_checks._train(config, problem, basis, parametrization, None, None, compiled)
  np.testing.assert_allclose(
    saved["learned/coeffs"], np.asarray(one.final_coeffs), atol=COEFFS_ATOL
  )
  loss = [loss for _, loss in one.history["loss"]]
  np.testing.assert_allclose(saved["learned/loss"], loss, atol=LOSS_ATOL, rtol=0)
  assert int(saved["learned/base_split"]) >= 1
  # The checkpoint both processes wrote (a 4 x 2 mesh) restores on this single device.
  config.train.steps = 4
  resumed = sharding_checks._train(
    config, problem, basis, parametrization, None, reports["tmp"] / "learned", compiled
  )
  assert [s for s, _ in resumed.history["loss"]] == [1, 2, 3, 4]
  assert [loss for _, loss in resumed.history["loss"]][:3] == saved["learned/loss"].tolist()
  straight = sharding_checks._train(config, problem, basis, parametrization, None, None, compiled)
  np.testing.assert_allclose(
    np.asarray(resumed.final_coeffs), np.asarray(straight.final_coeffs), atol=COEFFS_ATOL
  )
