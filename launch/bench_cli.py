r"""Benchmark (not a test): the one-shot CLI end to end for every rule, vs mergekit; and
`rules.merge` as a user calls it against its best case.

  python launch/bench_cli.py                              # 22M x 8 fp32, every rule but spectral
  python launch/bench_cli.py --rules=ties,dare --layers=2  # a quick look

Writes bench_rules' ViT-S/16-shaped θ0 and 8 experts (21.7M fp32 entries, 150 leaves each) once,
as Hugging Face directories (model.safetensors + a config.json; flax-style tensor names, so
`layout=auto` resolves to "flax"), then per rule:
  * **CLI**: `python launch/merge.py --config=configs/merge.py:<rule>` with the rule's defaults,
    as a fresh process, --cli_runs times (the median run reported), timed from outside
    (`bench_util.sample`: wall, CPU, peak RSS), with run.json's phases (load, plan = compile +
    statistics, merge+write) and the rest of the process (Python start, imports, exit); then
    again with a warm persistent compilation cache (`--config.compile_cache_dir`, filled by an
    untimed run first) unless --warm_cache=false;
  * **mergekit** (`mergekit-yaml --lazy-unpickle --low-cpu-memory --no-cuda`, in its own virtual
    environment) on the same files, for the rules it has (`bench_util.MERGEKIT_METHODS`, slerp);
  * **API** (--api): one fresh process loads the inputs both ways and times `rules.merge`
    interleaved: as a user calls it (`checkpoint.load_params`: memory-mapped numpy views, default
    arguments, finite checks on) and the best case (device arrays, `check_finite=False`); first
    call and the median of --repeats more.
The machine's load average is printed with every row: on a shared machine, read the ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_from_disk  # launch/ is the script's directory, so on sys.path.
import bench_rules
import bench_util
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
# --layers, --experts, --repeats, --rules, --out and --worker are bench_rules' flags.
_LAYERS, _EXPERTS, _REPEATS = bench_rules._LAYERS, bench_rules._EXPERTS, bench_rules._REPEATS
_RULES, _WORKER = bench_rules._RULES, bench_rules._WORKER
_DIR = flags.DEFINE_string("dir", "/tmp/mergejax_bench_cli", "Where the inputs are written.")
_MERGEKIT_BIN = flags.DEFINE_string(
  "mergekit_bin", bench_util.MERGEKIT_BIN, "mergekit-yaml of its own venv ('' to skip mergekit)."
)
_WARM = flags.DEFINE_bool("warm_cache", True, "Also time each rule with a warm compile cache.")
_RUNS = flags.DEFINE_integer(
  "cli_runs",
  3,
  "Cold CLI runs per rule (each followed by the baseline's, if any): the row shows the run of "
  "median wall time and lists every run's (this machine's runs vary by up to ~1 s).",
)
_API = flags.DEFINE_bool("api", True, "Also time rules.merge from disk vs on device arrays.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 600, "A process running longer is killed.")
_BASELINE = flags.DEFINE_string(
  "baseline_root",
  "",
  "A checkout of the code to compare with (e.g. `git archive main | tar -x -C DIR`), run on the "
  "same inputs right after each CLI run; '' to skip.",
)

TARGET_S = 3.0  # The target for one CLI run, Python start to the last byte written.
# SVD-bound rules: minutes at 22M x 8 on 2 cores (see the README); run them with --rules.
SLOW_RULES = ("tsv_m", "tsv_c", "iso_c", "iso_cts")
# A config transformers parses (mergekit reads it) naming no class it can build, so mergekit infers
# the architecture from the tensor names.
CONFIG_JSON = {
  "architectures": ["BenchViT"],
  "model_type": "vit",
  "hidden_size": 384,
  "intermediate_size": 1536,
  "num_attention_heads": 6,
  "image_size": 224,
  "patch_size": 16,
  "torch_dtype": "float32",
}


def write_inputs(root: Path, layers: int, n: int) -> list[Path]:
  """θ0 and the experts as Hugging Face directories under `root` (written once)."""
  from mergejax.io import hf

  paths = [root / "base", *[root / f"expert{i}" for i in range(n)]]
  stamp = root / f"layers{layers}_experts{n}.done"
  if not stamp.exists():
    shutil.rmtree(root, ignore_errors=True)
    base, experts = bench_rules.make_inputs(layers, n)
    for path, tree in zip(paths, [base, *experts], strict=True):
      config = CONFIG_JSON | {"num_hidden_layers": layers}
      hf.write_dir(path, {k.replace("/", "."): v for k, v in tree.items()}, config)
    stamp.write_text("")
  return paths


def default_rules() -> list[str]:
  from mergejax import rules

  # Data-dependent rules need statistics from a model and data, which this workload has not:
  # launch/bench_statistics.py and bench_rules measure them.
  return [
    r for r, spec in rules.REGISTRY.items() if r not in SLOW_RULES and not spec.data_dependent
  ]


def models_for(rule: str, paths: list[Path]) -> tuple[Path, list[Path]]:
  """(base, experts) of a rule: slerp interpolates the first two experts."""
  return paths[0], paths[1:3] if rule == "slerp" else paths[1:]


# ---------------------------------------------------------------------------- the CLI
def run_cli(
  rule: str, paths: list[Path], work: Path, cache: Path | None = None, root: Path = ROOT
) -> dict:
  """One fresh `launch/merge.py` process of the code at `root`, measured from outside."""
  base, experts = models_for(rule, paths)
  out = work / f"out_{rule}"
  cmd = [
    sys.executable,
    str(root / "launch/merge.py"),
    f"--config={root}/configs/merge.py:{rule}",
    f"--config.base={base}",
    *[f"--config.experts={p}" for p in experts],
    f"--workdir={out}",
  ]
  if cache is not None:
    cmd.append(f"--config.compile_cache_dir={cache}")
  env = {**os.environ, "PYTHONPATH": str(root)}
  load = os.getloadavg()[0]
  s = bench_util.sample(cmd, _TIMEOUT.value, env=env, cwd=root)
  row = {"wall_s": s.wall_s, "cpu_s": s.cpu_s, "rss_mib": s.peak_rss_mib, "load": load}
  row["returncode"] = s.returncode
  if s.returncode:
    row["error"] = s.tail[-600:]
    return row
  record = json.loads((out / "run.json").read_text())
  shutil.rmtree(out)
  phases, streaming = record["phases_s"], record.get("streaming") or {}
  row |= {
    "run_json_wall_s": record["wall_time_s"],
    "phases_s": phases,
    "executables": streaming.get("executables"),
    "compile_s": streaming.get("compile_s"),
    "stats_s": streaming.get("stats_s"),
    "in_memory_because": streaming.get("in_memory_because"),
  }
  return row


def run_mergekit(rule: str, paths: list[Path], work: Path) -> dict | None:
  if not _MERGEKIT_BIN.value:
    return None
  base, experts = models_for(rule, paths)
  if rule == "slerp":  # mergekit's slerp: base_model is model a, t the weight of model b.
    yml = bench_util.mergekit_yaml(
      work / "slerp.yml", "slerp", experts[0], experts, {}, {"t": 0.5}, "float32"
    )
  elif rule in bench_util.MERGEKIT_METHODS:
    method, model_params, shared = bench_util.MERGEKIT_METHODS[rule]
    yml = bench_util.mergekit_yaml(
      work / f"{rule}.yml",
      method,
      None if method == "linear" else base,
      experts,
      model_params,
      shared,
      "float32",
    )
  else:
    return None
  out = work / f"mk_{rule}"
  cmd = [_MERGEKIT_BIN.value, str(yml), str(out), "--lazy-unpickle", "--low-cpu-memory"]
  cmd += ["--no-cuda", "--random-seed", "0"]
  load = os.getloadavg()[0]
  s = bench_util.sample(cmd, _TIMEOUT.value)
  shutil.rmtree(out, ignore_errors=True)
  row = {"wall_s": s.wall_s, "cpu_s": s.cpu_s, "rss_mib": s.peak_rss_mib, "load": load}
  row["returncode"] = s.returncode
  if s.returncode:
    row["error"] = s.tail[-600:]
  return row


# ---------------------------------------------------------------------------- the API
def api_worker(rule: str, paths: list[Path], repeats: int) -> dict:
  """`rules.merge` from disk with defaults vs on device arrays without checks, interleaved."""
  import jax

  from mergejax import rules

  base_path, expert_paths = models_for(rule, paths)
  calls = {}
  for mode in ("disk", "device"):
    base, experts, kw = bench_from_disk.load_inputs(mode, base_path, expert_paths)
    kw |= rules.add_key(rule, {}, 0)

    def call(base=base, experts=experts, kw=kw):
      return jax.block_until_ready(rules.merge(rule, base, experts, **kw))

    calls[mode] = call
  results = {mode: {"times_s": []} for mode in calls}
  for i in range(repeats + 1):  # Interleaved: the machine's load hits both alike.
    for mode, call in calls.items():
      start = time.perf_counter()
      out = call()
      seconds = time.perf_counter() - start
      del out  # Freed before the next call, as in a sweep.
      if i == 0:
        results[mode]["first_s"] = seconds
      else:
        results[mode]["times_s"].append(seconds)
  for r in results.values():
    r["median_s"] = statistics.median(r["times_s"])
  return results


def run_api(rule: str) -> dict:
  cmd = [
    sys.executable,
    __file__,
    f"--worker=api:{rule}",
    f"--dir={_DIR.value}",
    f"--layers={_LAYERS.value}",
    f"--experts={_EXPERTS.value}",
    f"--repeats={_REPEATS.value}",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=_TIMEOUT.value)
  if done.returncode:
    return {"error": done.stderr[-600:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the report
def _f(x, fmt=".2f") -> str:
  return "" if x is None else format(x, fmt)


def _median_run(runs: list[dict]) -> dict:
  """The run of median wall time (the first failed one, if any failed), with every wall time."""
  failed = [r for r in runs if r.get("returncode")]
  chosen = failed[0] if failed else sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
  return {**chosen, "walls_s": [r.get("wall_s") for r in runs]}


def cli_row(rule: str, cli: dict, warm: dict | None, mk: dict | None, before: dict | None) -> str:
  if cli.get("returncode"):
    return f"| {rule} | failed (exit {cli['returncode']}) |" + " |" * 15
  p = cli["phases_s"]
  plan = p.get("plan", p.get("merge", 0.0))
  compile_s = cli["compile_s"] or 0.0
  stats = cli["stats_s"] or 0.0
  rest_of_plan = max(plan - compile_s - stats, 0.0)
  startup = cli["wall_s"] - cli["run_json_wall_s"]
  ok = "yes" if cli["wall_s"] <= TARGET_S else "no"
  warm_s = "" if warm is None else _f(warm["wall_s"])
  mk_s = ""
  if mk is not None:
    mk_s = f"failed (exit {mk['returncode']})" if mk["returncode"] else _f(mk["wall_s"])
  mk_cpu = "" if mk is None or mk["returncode"] else _f(mk["cpu_s"])
  before_s = ""
  if before is not None:
    before_s = (
      f"failed (exit {before['returncode']})"
      if before["returncode"]
      else f"{before['wall_s']:.2f} / {before['cpu_s']:.2f}"
    )
  walls = ", ".join(f"{w:.2f}" for w in cli["walls_s"])
  return (
    f"| {rule} | {cli['wall_s']:.2f} | {walls} | {ok} | {cli['cpu_s']:.2f} | {startup:.2f} | "
    f"{p.get('load', 0):.2f} | {compile_s:.2f} ({cli['executables'] or 0}) | {stats:.2f} | "
    f"{rest_of_plan:.2f} | {p.get('merge_write', p.get('write', 0)):.2f} | {warm_s} | "
    f"{cli['rss_mib']:.0f} | {before_s} | {mk_s} | {mk_cpu} | {cli['load']:.1f} |"
  )


def main(argv):
  del argv
  root = Path(_DIR.value)
  paths = [root / "base", *[root / f"expert{i}" for i in range(_EXPERTS.value)]]
  if _WORKER.value:
    kind, rule = _WORKER.value.split(":")
    assert kind == "api", kind
    print(json.dumps(api_worker(rule, paths, _REPEATS.value)))
    return
  from mergejax import provenance

  paths = write_inputs(root, _LAYERS.value, _EXPERTS.value)
  work = root / "runs"
  work.mkdir(exist_ok=True)
  n_params = sum(v for v in map(_numel, bench_rules.vit_shapes(_LAYERS.value).values()))
  version = bench_util.mergekit_version(_MERGEKIT_BIN.value) if _MERGEKIT_BIN.value else None
  print(
    f"{n_params / 1e6:.1f}M fp32 parameters x {_EXPERTS.value} experts, HF directories; "
    f"read once (page cache warm): {bench_util.read_once(paths):.2f} s; mergekit {version}; "
    f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n",
    flush=True,
  )
  header = (
    "| rule | CLI wall s (median) | runs s | ≤ 3 s | CPU s | start+imports+exit s | load s "
    "| compile s (executables) "
    "| statistics s | rest of plan s | merge+write s | wall, warm compile cache s "
    "| peak RSS MiB | before: wall / CPU s | mergekit wall s | mergekit CPU s | load avg |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  )
  print(header, flush=True)
  rows, results = [], {}
  for rule in _RULES.value or default_rules():
    clis, befores = [], []
    for _ in range(_RUNS.value):
      clis.append(run_cli(rule, paths, work))
      if _BASELINE.value:
        befores.append(run_cli(rule, paths, work, root=Path(_BASELINE.value)))
    cli, before = _median_run(clis), _median_run(befores) if befores else None
    warm = None
    if _WARM.value and not cli.get("returncode"):
      cache = work / f"xla_cache_{rule}"
      shutil.rmtree(cache, ignore_errors=True)
      run_cli(rule, paths, work, cache)  # Fills the cache.
      warm = run_cli(rule, paths, work, cache)
      shutil.rmtree(cache, ignore_errors=True)
    mk = run_mergekit(rule, paths, work)
    results[rule] = {"cli_runs": clis, "cli_before_runs": befores, "cli_warm_cache": warm}
    results[rule] |= {"cli": cli, "cli_before": before, "mergekit": mk}
    rows.append(cli_row(rule, cli, warm, mk, before))
    print(rows[-1], flush=True)
    if cli.get("error"):
      print(cli["error"], flush=True)
  if _API.value:
    print(
      "\n| rule | rules.merge from disk, defaults: median s | first s "
      "| device arrays, no checks: median s | first s | ratio of medians |\n"
      "|---|---|---|---|---|---|",
      flush=True,
    )
    for rule in _RULES.value or default_rules():
      api = run_api(rule)
      results[rule]["api"] = api
      if "error" in api:
        print(f"| {rule} | failed | | | | |\n{api['error']}", flush=True)
        continue
      d, v = api["disk"], api["device"]
      print(
        f"| {rule} | {d['median_s']:.3f} | {d['first_s']:.2f} | {v['median_s']:.3f} | "
        f"{v['first_s']:.2f} | {d['median_s'] / v['median_s']:.2f}x |",
        flush=True,
      )
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  record = provenance.record(
    {"layers": _LAYERS.value, "experts": _EXPERTS.value, "repeats": _REPEATS.value}, seed=0
  )
  out.write_text(json.dumps({"results": results, "provenance": record}, indent=2, default=str))
  print(f"\nWrote {out}")


def _numel(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


_OUT = bench_rules._OUT

if __name__ == "__main__":
  flags.FLAGS.set_default("out", "results/bench_cli.json")
  app.run(main)
