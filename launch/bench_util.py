"""Helpers the launch benchmarks share (no flags here, so any benchmark can import it).

* `sample`: runs a command as a fresh process and measures it from outside: wall time, CPU time
  (user + sys, from the kernel's rusage of the child), peak RssAnon (anonymous memory; the page
  cache of memory-mapped inputs is reclaimable and not counted) and peak RSS (VmHWM), sampled
  from /proc/<pid>/status every 20 ms.
* `read_once`: the time to read every safetensors file of some checkpoints once.
* mergekit, in a virtual environment of its own: `MERGEKIT_BIN`, `MERGEKIT_METHODS` (the
  mergekit method and parameters of mergejax's rules at their paper defaults), `mergekit_yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# `python3 -m venv /work/venvs/peers && /work/venvs/peers/bin/pip install torch==2.13.0 mergekit`
MERGEKIT_BIN = "/work/venvs/peers/bin/mergekit-yaml"

# rule -> (mergekit method, per-model parameters, shared parameters): the same merges as
# mergejax's configs/merge.py:<rule> at its defaults, where mergekit has the method. mergekit's
# TIES/DARE-TIES/Breadcrumbs count and rank per tensor (mergejax's configs/*_mergekit.py are the
# exact equivalents); the timings compare the methods as each library defines them.
MERGEKIT_METHODS = {
  "task_arithmetic": ("task_arithmetic", {"weight": 0.3}, {}),
  "weight_average": ("linear", {"weight": 1.0}, {}),
  "ties": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
  "dare_ties": ("dare_ties", {"weight": 1.0, "density": 0.1}, {"normalize": True}),
  "breadcrumbs": ("breadcrumbs", {"weight": 0.2, "density": 0.15, "gamma": 0.006}, {}),
  "della": ("della", {"weight": 1.0, "density": 0.2, "epsilon": 0.1}, {"lambda": 1.0}),
  "model_stock": ("model_stock", {}, {}),
}


@dataclasses.dataclass
class Sample:
  """What `sample` measured of one process."""

  wall_s: float
  cpu_s: float  # User + system time of the process and its children.
  peak_anon_mib: float
  peak_rss_mib: float
  returncode: int
  tail: str  # The end of its output (stdout and stderr together).

  def __str__(self) -> str:
    text = (
      f"wall {self.wall_s:.1f} s, CPU {self.cpu_s:.1f} s, peak RssAnon {self.peak_anon_mib:.0f} "
      f"MiB, peak RSS {self.peak_rss_mib:.0f} MiB, exit {self.returncode}"
    )
    return text if self.returncode == 0 else f"{text}\n{self.tail}"


def sample(cmd: Sequence[str], timeout_s: float | None = None, **kwargs) -> Sample:
  """Runs `cmd` (`subprocess.Popen` keyword arguments pass through) and measures it; a process
  running longer than `timeout_s` is killed (return code -9)."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
  peak = {"anon": 0, "rss": 0}
  done = threading.Event()

  def watch():
    while not done.is_set():
      if timeout_s is not None and time.perf_counter() - start > timeout_s:
        proc.kill()
      try:
        with open(f"/proc/{proc.pid}/status") as f:
          for line in f:
            if line.startswith("RssAnon:"):
              peak["anon"] = max(peak["anon"], int(line.split()[1]))
            elif line.startswith("VmHWM:"):
              peak["rss"] = max(peak["rss"], int(line.split()[1]))
      except OSError:
        pass
      time.sleep(0.02)

  t = threading.Thread(target=watch, daemon=True)
  t.start()
  chunks = []
  for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):
    chunks.append(chunk)
  # wait4 reaps the child with its rusage; /proc/<pid> is readable until then.
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  done.set()
  t.join()
  proc.returncode = os.waitstatus_to_exitcode(status)
  out = b"".join(chunks).decode(errors="replace")
  return Sample(
    wall_s=wall,
    cpu_s=usage.ru_utime + usage.ru_stime,
    peak_anon_mib=peak["anon"] / 1024,
    peak_rss_mib=max(peak["rss"], usage.ru_maxrss) / 1024,
    returncode=proc.returncode,
    tail=out[-3000:],
  )


def read_once(paths: Sequence[Path]) -> float:
  """Seconds to read every *.safetensors file under `paths` (directories or files) once."""
  start = time.perf_counter()
  for d in paths:
    files = [Path(d)] if Path(d).is_file() else sorted(Path(d).glob("*.safetensors"))
    for f in files:
      with open(f, "rb") as fh:
        while fh.read(1 << 24):
          pass
  return time.perf_counter() - start


def drop_page_cache() -> None:
  """Empties the OS page cache (root only), so the next reads come from disk: `sync`, then
  /proc/sys/vm/drop_caches. Raises PermissionError without root."""
  os.sync()
  Path("/proc/sys/vm/drop_caches").write_text("1\n")


def mergekit_yaml(
  path: Path,
  method: str,
  base: Path | None,
  models: Sequence[Path],
  model_params: Sequence[dict] | dict,
  shared: dict,
  dtype: str,
) -> Path:
  """Writes a mergekit config: `models` (one parameter dict each, or one for all) onto `base`."""
  if isinstance(model_params, dict):
    model_params = [model_params] * len(models)
  lines = [f"merge_method: {method}"]
  if base is not None:
    lines.append(f"base_model: {base}")
  lines.append("models:")
  for m, p in zip(models, model_params, strict=True):
    lines.append(f"  - model: {m}")
    if p:
      lines.append(f"    parameters: {json.dumps(p)}")
  lines += [f"parameters: {json.dumps(shared)}", f"dtype: {dtype}", ""]
  path.write_text("\n".join(lines))
  return path


def mergekit_version(mergekit_bin: str) -> str:
  """The mergekit version installed next to `mergekit_bin`."""
  return subprocess.run(
    [
      str(Path(mergekit_bin).parent / "python"),
      "-c",
      "import importlib.metadata as m; print(m.version('mergekit'))",
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
