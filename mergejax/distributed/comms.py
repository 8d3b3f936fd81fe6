"""Bytes a compiled program's collectives move, read from its optimized HLO text.

XLA inserts the collectives of a partitioned program (all-reduce, all-gather, reduce-scatter,
all-to-all, collective-permute) itself; `collective_bytes(compiled.as_text())` lists them, with
how many times each runs (a collective inside a `while` body runs once per trip, e.g. the 31
rounds of TIES's bisection) and the bytes each device sends under the usual ring algorithms:
an all-reduce of B bytes over n devices sends 2 (n - 1) / n * B per device, an all-gather or
all-to-all (n - 1) / n * B of its result, a reduce-scatter (n - 1) * B of its result, a
collective-permute B. These are volumes, not times: CPU "devices" of one host share its cores
and memory, and the backends implement collectives their own way.
"""

from __future__ import annotations

import math
import re
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_DTYPE_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8})
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+([a-z\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


def _bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str, num_devices: int) -> int:
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if iota:
    return int(iota.group(1).split(",")[-1])
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit:
    return len(explicit.group(1).split(","))
  return num_devices


def _sent_per_device(kind: str, nbytes: int, n: int) -> float:
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * (n - 1) / n * nbytes
  if kind in ("all-gather", "all-to-all"):
    return (n - 1) / n * nbytes
  if kind == "reduce-scatter":
    return float((n - 1) * nbytes)
  return float(nbytes)  # collective-permute


def collective_bytes(hlo_text: str, num_devices: int = 1) -> dict[str, Any]:
  """The collectives of an optimized HLO module and the bytes they move per execution.

  Args:
    hlo_text: `compiled.as_text()` of a `jax.stages.Compiled`.
    num_devices: the group size where the HLO does not state one.

  Returns:
    {"ops": [{"kind", "count", "bytes", "group", "sent_per_device"}, ...] (count: executions
    per run of the program, on average where a conditional picks a branch), "payload_bytes":
    Σ count · bytes (the data the collectives carry), "sent_bytes_per_device":
    Σ count · sent_per_device}.
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        computations["__entry__"] = computations[current]
    elif current is not None:
      computations[current].append(line)
  # How many times each computation runs per execution: a while body once per (known) trip, a
  # conditional's branches 1 / (number of branches) each (lax.switch over tasks: alike branches).
  runs: dict[str, float] = {}

  def visit(name: str, times: float) -> None:
    runs[name] = runs.get(name, 0) + times
    for line in computations.get(name, ()):
      body = re.search(r"\bbody=%([\w.\-]+)", line)
      if body:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        visit(body.group(1), times * (int(trips.group(1)) if trips else 1))
      branches = re.search(r"\bbranch_computations=\{([^}]*)\}", line)
      if branches:
        names = re.findall(r"%([\w.\-]+)", branches.group(1))
        for called in names:
          visit(called, times / len(names))
      called = re.search(r"\b(?:kind=kCall|call\().*\bto_apply=%([\w.\-]+)", line)
      if called:
        visit(called.group(1), times)

  entry = next((k for k, v in computations.items() if v is computations.get("__entry__")), None)
  if entry is not None:
    visit(entry, 1)
  ops = []
  for name, times in runs.items():
    for line in computations.get(name, ()):
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      kind = match.group(2).removesuffix("-start")
      if kind not in KINDS:
        continue
      nbytes = _bytes(match.group(1))
      group = _group_size(line, num_devices)
      ops.append(
        {
          "kind": kind,
          "count": times,
          "bytes": nbytes,
          "group": group,
          "sent_per_device": _sent_per_device(kind, nbytes, group),
        }
      )
  return {
    "ops": ops,
    "payload_bytes": sum(o["count"] * o["bytes"] for o in ops),
    "sent_bytes_per_device": sum(o["count"] * o["sent_per_device"] for o in ops),
  }
