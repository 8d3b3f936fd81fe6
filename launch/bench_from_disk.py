r"""Benchmark (not a test): `rules.merge` as a user calls it, on inputs as they come from disk.

  python launch/bench_from_disk.py                         # 22M params x 8 experts
  python launch/bench_from_disk.py --layers=2 --repeats=2  # a quick look

Writes bench_rules' ViT-S/16-shaped θ0 and 8 experts (fp32) as safetensors files under --data
(once), then, one fresh process per cell, times `rules.merge(rule, base, experts, **defaults)`:
  * "disk": inputs from `checkpoint.load_params` (read-only memory-mapped numpy views), default
    arguments (finite checks on);
  * "device": the same values as device arrays with `check_finite=False` (how the rules benchmark
    calls it: the merge's own cost, nothing else).
Reports the first call (trace + compile + run) and the median of the next --repeats calls; the
ratio disk / device is what the user pays for checks and for host inputs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_rules  # launch/ is the script's directory, so on sys.path.
from absl import app, flags

# --layers, --experts, --repeats, --rules and --worker are bench_rules' flags.
_LAYERS, _EXPERTS, _REPEATS = bench_rules._LAYERS, bench_rules._EXPERTS, bench_rules._REPEATS
_RULES, _WORKER = bench_rules._RULES, bench_rules._WORKER
_DATA = flags.DEFINE_string("data", "/tmp/mergejax_bench_from_disk", "Where inputs are written.")
DEFAULT_RULES = ("task_arithmetic", "ties", "dare")


def _paths(data: Path, n: int) -> tuple[Path, list[Path]]:
  return data / "base.safetensors", [data / f"expert{i}.safetensors" for i in range(n)]


def write_inputs(data: Path, layers: int, n: int) -> None:
  from mergejax.io import checkpoint

  base_path, expert_paths = _paths(data, n)
  stamp = data / f"layers{layers}_experts{n}.done"
  if stamp.exists():
    return
  data.mkdir(parents=True, exist_ok=True)
  base, experts = bench_rules.make_inputs(layers, n)
  checkpoint.save_params(base_path, base)
  for path, e in zip(expert_paths, experts, strict=True):
    checkpoint.save_params(path, e)
  stamp.write_text("")


def load_inputs(mode: str, base_path, expert_paths):
  """The inputs and keyword arguments of one mode: "disk" (as a user calls `rules.merge`:
  memory-mapped numpy views, defaults) or "device" (device arrays, no finite checks)."""
  import jax

  from mergejax.io import checkpoint

  base = checkpoint.load_params(base_path)
  experts = [checkpoint.load_params(p) for p in expert_paths]
  kw = {}
  if mode == "device":
    base, experts = jax.device_put((base, experts))
    kw["check_finite"] = False
  return base, experts, kw


def time_calls(call, repeats: int) -> dict:
  """First call (trace + compile + run) and the median of `repeats` more."""
  start = time.perf_counter()
  out = call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    del out  # The previous result's memory is free before the next call, as in a sweep.
    start = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - start)
  del out
  return {"first_s": first, "median_s": statistics.median(times), "times_s": times}


def worker(mode: str, rule: str, data: Path, n: int, repeats: int) -> dict:
  import jax

  from mergejax import rules

  base, experts, kw = load_inputs(mode, *_paths(data, n))
  kw |= rules.add_key(rule, {}, 0)
  result = time_calls(
    lambda: jax.block_until_ready(rules.merge(rule, base, experts, **kw)), repeats
  )
  return {"mode": mode, "rule": rule, **result}


def main(argv):
  del argv
  data = Path(_DATA.value)
  if _WORKER.value:
    mode, rule = _WORKER.value.split(":")
    print(json.dumps(worker(mode, rule, data, _EXPERTS.value, _REPEATS.value)))
    return
  write_inputs(data, _LAYERS.value, _EXPERTS.value)
  print(
    "| rule | disk, defaults: median (s) | first (s) | device, no checks: median (s) "
    "| first (s) | ratio |"
  )
  print("|---|---|---|---|---|---|")
  for rule in _RULES.value or DEFAULT_RULES:
    cell = {}
    for mode in ("disk", "device"):
      cmd = [
        sys.executable,
        __file__,
        f"--worker={mode}:{rule}",
        f"--data={data}",
        f"--experts={_EXPERTS.value}",
        f"--repeats={_REPEATS.value}",
      ]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode:
        raise RuntimeError(f"{mode}:{rule} failed:\n{done.stderr[-3000:]}")
      cell[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    d, v = cell["disk"], cell["device"]
    print(
      f"| {rule} | {d['median_s']:.3f} | {d['first_s']:.2f} | {v['median_s']:.3f} | "
      f"{v['first_s']:.2f} | {d['median_s'] / v['median_s']:.1f}x |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
