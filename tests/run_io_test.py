"""Merging from disk: every input and output format, dtypes, one commit point, kills, debris."""

import errno
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from configs import merge as merge_config
from mergejax import run
from mergejax.io import atomic, checkpoint, hf, safetensors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state_dict(shift=0.0, dtype=np.float32):
  rng = np.random.default_rng(0)
  return {
    "model.embed.weight": (rng.standard_normal((16, 8)) + shift).astype(dtype),
    "model.h.0.ln_1.weight": (np.ones(8) + shift).astype(dtype),
    "model.h.0.fc.weight": (rng.standard_normal((8, 8)) + shift).astype(dtype),
    "lm_head.weight": (rng.standard_normal((16, 8)) + shift).astype(dtype),
    "model.position_ids": np.arange(4, dtype=np.int64) + 2**33,
  }


def _hf_models(tmp_path, n=2, dtype=np.float32):
  """A base and `n` experts as Hugging Face directories (config.json + tokenizer.json)."""
  paths = []
  for i in range(n + 1):
    d = tmp_path / ("base" if i == 0 else f"expert{i}")
    hf.write_dir(d, _state_dict(shift=0.1 * i, dtype=dtype), {"model_type": "toy"})
    (d / "tokenizer.json").write_text('{"toy": true}')
    paths.append(str(d))
  return paths[0], paths[1:]


def _config(rule="task_arithmetic", base=None, experts=(), **fields):
  config = merge_config.get_config(rule)
  config.base, config.experts = base, tuple(experts)
  for k, v in fields.items():
    if k == "scale":
      config.rule.scale = v
    else:
      setattr(config, k, v)
  return config


def _expected_ta(scale, n=2):
  base = _state_dict()
  return {
    k: (v + scale * sum(_state_dict(0.1 * i)[k] - v for i in range(1, n + 1))).astype(v.dtype)
    if v.dtype != np.int64
    else v
    for k, v in base.items()
  }


def test_hf_in_hf_out_sharded_with_side_files(tmp_path):
  base, experts = _hf_models(tmp_path)
  record = run.merge_from_disk(
    _config(base=base, experts=experts, shard_size="600B"), tmp_path / "w"
  )
  out = tmp_path / "w" / "merged"
  assert record["outputs"] == [str(out)] and record["output_format"] == "hf"
  assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
  assert (out / "tokenizer.json").read_text() == '{"toy": true}'
  assert json.loads((out / "config.json").read_text())["model_type"] == "toy"
  merged = hf.read_state_dict(out)
  for k, v in _expected_ta(0.3).items():
    np.testing.assert_allclose(merged[k], v, rtol=1e-6, err_msg=k)
  assert merged["model.position_ids"].dtype == np.int64
  assert int(merged["model.position_ids"][0]) == 2**33  # Copied, never narrowed.
  written = json.loads((tmp_path / "w" / "run.json").read_text())
  assert written["kind"] == run.RUN_KIND and set(written["phases_s"]) == {
    "load",
    "plan",
    "merge_write",
  }
  assert written["bytes_read"] == 3 * sum(v.nbytes for v in _state_dict().values())
  assert written["bytes_written"] >= sum(f.stat().st_size for f in out.glob("*.safetensors"))
  assert written["peak_rss_mib"] > 0


@pytest.mark.parametrize("output_format", ["safetensors", "orbax", "hf"])
@pytest.mark.parametrize("dtype", ["base", "bfloat16"])
def test_output_formats_and_dtypes(tmp_path, output_format, dtype):
  base, experts = _hf_models(tmp_path)
  config = _config(base=base, experts=experts, output_format=output_format, dtype=dtype)
  record = run.merge_from_disk(config, tmp_path / "w")
  merged = checkpoint.to_flat_names(checkpoint.load_params(record["outputs"][0]))
  want = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  assert merged["lm_head.weight"].dtype == want
  assert merged["model.position_ids"].dtype == np.int64
  assert int(merged["model.position_ids"][0]) == 2**33


def test_safetensors_and_orbax_inputs_default_to_a_safetensors_file(tmp_path):
  params = checkpoint.from_flat_names(_state_dict())
  checkpoint.save_params(tmp_path / "base.safetensors", params)
  checkpoint.save_params(tmp_path / "e1", checkpoint.from_flat_names(_state_dict(0.1)))  # orbax
  checkpoint.save_params(tmp_path / "e2.safetensors", checkpoint.from_flat_names(_state_dict(0.2)))
  experts = [str(tmp_path / "e1"), str(tmp_path / "e2.safetensors")]
  config = _config(base=str(tmp_path / "base.safetensors"), experts=experts)
  record = run.merge_from_disk(config, tmp_path / "w")
  assert record["outputs"] == [str(tmp_path / "w" / "merged.safetensors")]
  merged = safetensors.read_safetensors(record["outputs"][0])
  for k, v in _expected_ta(0.3).items():
    np.testing.assert_allclose(merged[k], v, rtol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="needs a Hugging Face directory as the base"):
    config.output_format = "hf"
    run.merge_from_disk(config, tmp_path / "x")


def test_cast_experts(tmp_path):
  base, _ = _hf_models(tmp_path / "bf16", n=0, dtype=ml_dtypes.bfloat16)
  _, experts = _hf_models(tmp_path / "fp32", n=2)
  with pytest.raises(ValueError, match=r"astype\(jnp.bfloat16\).*--config.cast_experts=True"):
    run.merge_from_disk(_config(base=base, experts=experts), tmp_path / "w")
  record = run.merge_from_disk(
    _config(base=base, experts=experts, cast_experts=True), tmp_path / "w"
  )
  assert hf.read_state_dict(record["outputs"][0])["lm_head.weight"].dtype == ml_dtypes.bfloat16


def test_differing_integer_leaves_fail_before_writing(tmp_path):
  base, experts = _hf_models(tmp_path)
  sd = hf.read_state_dict(experts[0])
  sd = {k: np.array(v) for k, v in sd.items()}
  sd["model.position_ids"][0] = 5
  hf.write_dir(experts[0], sd, {"model_type": "toy"})
  with pytest.raises(ValueError, match=r"Leaf 'model/position_ids' \(int64\) differs"):
    run.merge_from_disk(_config(base=base, experts=experts), tmp_path / "w")
  assert not (tmp_path / "w").exists()
  record = run.merge_from_disk(
    _config(base=base, experts=experts, non_float="base"), tmp_path / "w"
  )
  assert int(hf.read_state_dict(record["outputs"][0])["model.position_ids"][0]) == 2**33


# ------------------------------------------------------------------------------ commit point
def _snapshot(directory):
  return {
    str(p.relative_to(directory)): p.read_bytes()
    for p in sorted(pathlib.Path(directory).rglob("*"))
    if p.is_file()
  }


def _checkpoint_like(root):
  """What a glob for checkpoints finds (hidden entries excluded, as in shells)."""
  found = set()
  for pattern in ("**/*.safetensors", "**/*.index.json", "**/_METADATA", "**/run.json"):
    found |= set(glob.glob(os.path.join(root, pattern), recursive=True))
  return found


def _good_run(tmp_path):
  base, experts = _hf_models(tmp_path)
  workdir = tmp_path / "w"
  run.merge_from_disk(_config(base=base, experts=experts), workdir)
  return base, experts, workdir, _snapshot(workdir), _checkpoint_like(tmp_path)


def test_overflow_writes_nothing_and_keeps_the_earlier_output(tmp_path):
  base, experts, workdir, before, found = _good_run(tmp_path)
  config = _config("dare", base=base, experts=experts, scale=3e38)  # Kept τ / 0.1 overflows.
  with pytest.raises(ValueError, match=r"Leaf '[a-z_/0-9]+' of the merged model holds \d+ NaN/Inf"):
    run.merge_from_disk(config, workdir)
  assert _snapshot(workdir) == before and _checkpoint_like(tmp_path) == found
  assert not list(tmp_path.glob(".mergejax-tmp-*"))


def test_disk_full_at_run_json_keeps_the_earlier_output(tmp_path, monkeypatch):
  base, experts, workdir, before, found = _good_run(tmp_path)
  write_text = atomic.write_text

  def full(path, text):
    if pathlib.Path(path).name == "run.json":
      raise OSError(errno.ENOSPC, "No space left on device")
    write_text(path, text)

  monkeypatch.setattr(atomic, "write_text", full)
  with pytest.raises(OSError, match="No space left"):
    run.merge_from_disk(_config(base=base, experts=experts, scale=0.5), workdir)
  assert _snapshot(workdir) == before and _checkpoint_like(tmp_path) == found
  assert not list(tmp_path.glob(".mergejax-tmp-*"))  # The staged run is gone too.


_KILLER = textwrap.dedent(
  """
  import os, pathlib, signal, sys, time
  from configs import merge as merge_config
  from mergejax import run
  from mergejax.io import atomic, safetensors

  point, base, workdir, *experts = sys.argv[1:]
  def die():
    os.kill(os.getpid(), signal.SIGKILL)
  if point == "mid_write":  # After the first tensor of the first file is on disk.
    safetensors.memoryview = lambda a: die()
  elif point == "slow_write":  # Wait to be killed from outside, mid-file.
    def slow(a):
      (pathlib.Path(workdir).parent / "writing").touch()
      time.sleep(60)
    safetensors.memoryview = slow
  elif point == "run_json":
    write_text = atomic.write_text
    atomic.write_text = lambda p, t: die() if p.name == "run.json" else write_text(p, t)
  elif point == "between_renames":
    replace = os.replace
    def once(src, dst):
      replace(src, dst)
      if "-old-" in str(dst):
        die()
    atomic.os.replace = once
  config = merge_config.get_config("task_arithmetic")
  config.base, config.experts, config.rule.scale = base, tuple(experts), 0.5
  run.merge_from_disk(config, workdir)
  """
)


@pytest.mark.parametrize("point", ["mid_write", "run_json", "between_renames", "slow_write"])
def test_a_killed_run_leaves_nothing_partial(tmp_path, point):
  base, experts, workdir, before, found = _good_run(tmp_path)
  cmd = [sys.executable, "-c", _KILLER, point, base, str(workdir), *experts]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  if point == "slow_write":
    deadline = time.time() + 120
    while not (tmp_path / "writing").exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
  # Nothing a glob for checkpoints finds has changed; the earlier output is intact (after the
  # next run puts back a directory a kill between the two renames left aside).
  assert _checkpoint_like(tmp_path) <= found
  atomic.remove_debris(tmp_path, "w")
  assert _snapshot(workdir) == before
  # The next run cleans up what the killed one left, and succeeds.
  run.merge_from_disk(_config(base=base, experts=experts, scale=0.5), workdir)
  assert not list(tmp_path.glob(".mergejax-tmp-*"))
  assert _snapshot(workdir) != before


def test_debris_of_killed_runs_and_old_versions_is_removed(tmp_path):
  base, experts, workdir, _, _ = _good_run(tmp_path)
  (tmp_path / ".mergejax-tmp-w-0123abcd").mkdir()
  (tmp_path / ".mergejax-tmp-w-0123abcd" / "model.safetensors").write_bytes(b"half")
  (workdir / ".tmp8ds7f").write_bytes(b"old tempfile")
  (workdir / ".merged.safetensors.tmp-x1").write_bytes(b"older")
  (tmp_path / ".mergejax-tmp-other-0123abcd").mkdir()  # Another destination's: left alone.
  run.merge_from_disk(_config(base=base, experts=experts), workdir)
  assert [p.name for p in tmp_path.glob(".mergejax-tmp-*")] == [".mergejax-tmp-other-0123abcd"]
  assert sorted(p.name for p in workdir.iterdir()) == ["merged", "run.json"]


def test_a_workdir_holding_other_files_is_refused(tmp_path):
  base, experts = _hf_models(tmp_path)
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\], which no earlier merge run"):
    run.merge_from_disk(_config(base=base, experts=experts), workdir)
  assert (workdir / "notes.txt").read_text() == "mine"


def test_task_specific_outputs(tmp_path):
  base, experts = _hf_models(tmp_path)
  record = run.merge_from_disk(_config("emr", base=base, experts=experts), tmp_path / "w")
  assert [pathlib.Path(p).name for p in record["outputs"]] == ["merged_task0", "merged_task1"]
  for p in record["outputs"]:
    assert hf.read_state_dict(p)["lm_head.weight"].shape == (16, 8)


def test_float_leaves_are_merged_in_the_base_dtype_and_bf16_stays(tmp_path):
  base, experts = _hf_models(tmp_path, dtype=ml_dtypes.bfloat16)
  record = run.merge_from_disk(_config(base=base, experts=experts), tmp_path / "w")
  out = hf.read_state_dict(record["outputs"][0])
  assert out["lm_head.weight"].dtype == ml_dtypes.bfloat16
  config = json.loads((pathlib.Path(record["outputs"][0]) / "config.json").read_text())
  assert config["dtype"] == "bfloat16"
