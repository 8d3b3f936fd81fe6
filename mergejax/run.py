"""Library functions behind the launch entries: merge checkpoints from disk and write the result.

`merge_from_disk` is one linear story: load the checkpoints (validated, memory-mapped: nothing is
read until the merge needs it), merge with a registered rule (inputs and output checked for
NaN/Inf inside the merge's own pass), write the merged model(s) and run.json.

One commit point per run: everything the run writes goes into a temporary sibling of the workdir
(`.mergejax-tmp-<workdir>-<hex>`), which replaces the workdir with two renames once complete. A run
that fails or is killed at any point leaves the previous workdir as it was; its temporary
directory is removed by the next run into that workdir. The workdir is replaced as a whole, so it
must be new, empty, or the output of an earlier merge run (nothing else in it): a run never
deletes a file it did not write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np
import tqdm
from absl import logging

from mergejax import provenance, rules, streaming
from mergejax import tree as tree_lib
from mergejax.distributed import hosts, layout
from mergejax.io import atomic, checkpoint, hf, safetensors

RUN_KIND = "mergejax.merge"  # run.json's "kind": marks a workdir this module may replace.
OUTPUT_FORMATS = ("auto", "hf", "safetensors", "orbax")
ENGINES = ("streaming", "memory")
OUTPUT_DTYPES = {
  "base": None,
  "bfloat16": ml_dtypes.bfloat16,
  "float16": np.float16,
  "float32": np.float32,
}
# Temporaries of this and of earlier versions (tempfile's ".tmpXXXX", ".name.tmp-XXXX").
_DEBRIS = re.compile(rf"{re.escape(atomic.TMP_PREFIX)}.*|\.tmp.*|\..*\.tmp-.*")


# ------------------------------------------------------------------------------ config fields
def _strings(config: ml_collections.ConfigDict, field: str) -> list[str]:
  """A list-valued field (a tuple; a single string is one element, never split on commas)."""
  value = config.get(field)
  if value is None:
    return []
  values = [value] if isinstance(value, str) else list(value)
  for v in values:
    if not isinstance(v, str):
      raise TypeError(
        f"config.{field}: {v!r} is a {type(v).__name__}, not a string. On the command line, "
        f"quote it: --config.{field}=\"'{v}'\" (the value is parsed as a Python literal)."
      )
  return values


def _checkpoint_paths(config: ml_collections.ConfigDict) -> tuple[str, list[str]]:
  experts = _strings(config, "experts")
  if not config.get("base") or not experts:
    raise ValueError(
      "Set --config.base=PATH and the experts, one flag each (--config.experts=PATH1 "
      "--config.experts=PATH2) or as a tuple (--config.experts=\"('PATH1', 'PATH2')\")."
    )
  for p in [config.base, *experts]:
    if "," in p and not Path(p).exists():
      raise FileNotFoundError(
        f"No checkpoint at {p!r}. Paths are never split on commas: give each expert as its "
        "own --config.experts=PATH flag or as a tuple."
      )
  return config.base, experts


def _output(config: ml_collections.ConfigDict, base_format: str) -> tuple[str, str]:
  """(format, name under the workdir) of the merged model."""
  fmt, name = config.get("output_format", "auto"), config.get("output", "merged")
  if fmt not in OUTPUT_FORMATS:
    raise ValueError(f"config.output_format={fmt!r}: expected one of {OUTPUT_FORMATS}.")
  if config.get("dtype", "base") not in OUTPUT_DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}.")
  if fmt == "auto":
    if name.endswith(".safetensors"):
      fmt = "safetensors"
    else:
      fmt = "hf" if base_format == "hf" else "safetensors"
  if fmt == "hf" and base_format != "hf":
    raise ValueError(
      "config.output_format='hf' needs a Hugging Face directory as the base (its config.json and "
      f"tokenizer go with the weights); the base is a {base_format} checkpoint."
    )
  if not name or "/" in name or name in (".", "..", "run.json"):
    raise ValueError(f"config.output={name!r}: expected a plain file or directory name.")
  if fmt == "safetensors":
    name = name if name.endswith(".safetensors") else f"{name}.safetensors"
  else:
    name = name.removesuffix(".safetensors")
  return fmt, name


# ------------------------------------------------------------------------------ the workdir
def _check_replaceable(workdir: Path) -> None:
  """The run replaces `workdir` as a whole: it must hold nothing but an earlier run's output."""
  if not workdir.exists():
    return
  if not workdir.is_dir():
    raise FileExistsError(f"--workdir {workdir} is a file.")
  ours = {"run.json"}
  try:
    record = json.loads((workdir / "run.json").read_text())
  except (OSError, ValueError):
    record = None
  if isinstance(record, dict) and (
    record.get("kind") == RUN_KIND or "rule_name" in (record.get("config") or {})
  ):
    ours |= {Path(o).name for o in record.get("outputs", [])}
  foreign = sorted(
    p.name for p in workdir.iterdir() if p.name not in ours and not _DEBRIS.fullmatch(p.name)
  )
  if foreign:
    raise FileExistsError(
      f"--workdir {workdir} holds {foreign[:5]}, which no earlier merge run wrote there. A run "
      "replaces its workdir as a whole (its one commit point), so pass a new or empty directory."
    )


class _Phases:
  """Wall time per phase, for run.json."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = round(time.perf_counter() - start, 3)


# ------------------------------------------------------------------------------ writing
def _cast(params: Any, dtype: Any) -> Any:
  if dtype is None:
    return params
  return jax.tree.map(lambda x: x.astype(dtype) if tree_lib.is_float(x) else x, params)


def _write(
  fmt: str, path: Path, params: Any, base_path: str, config: ml_collections.ConfigDict, bar
) -> int:
  """Writes one model; returns the bytes written."""
  if fmt == "hf":
    return hf.write_dir(
      path,
      checkpoint.to_flat_names(params),
      hf.read_config(base_path),
      source=base_path,
      max_shard_size=config.get("shard_size", hf.DEFAULT_SHARD_SIZE),
      progress=bar.update,
    )
  if fmt == "safetensors":
    flat = checkpoint.to_flat_names(params)
    if any(isinstance(x, streaming.LazyLeaf) for x in flat.values()):  # Computed as written.
      return safetensors.write_safetensors(path, flat, progress=bar.update)
    return checkpoint.save_safetensors(path, params, progress=bar.update)
  checkpoint.save_pytree(path, params)
  bar.update(tree_lib.num_bytes(params))
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_order(fmt: str, flat_base: dict[str, Any], config) -> list[str]:
  """The leaf paths in the order the writer will ask for them (the engine groups along it)."""
  if fmt not in ("hf", "safetensors"):
    return list(flat_base)
  names = {path.replace("/", checkpoint.SAFETENSORS_SEP): path for path in flat_base}
  tensors = {n: flat_base[p] for n, p in names.items()}
  size = config.get("shard_size", hf.DEFAULT_SHARD_SIZE) if fmt == "hf" else 2**62
  return [names[n] for n in hf.write_order(tensors, size)]


def merge_from_disk(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Loads θ0 and the experts, merges them with `config.rule_name`, writes the merged model.

  Args:
    config: see configs/merge.py (base, experts, rule_name, rule, include, exclude, others,
      non_float, cast_experts, output, output_format, dtype, shard_size, seed, engine,
      memory_budget_gb, compile_cache_dir, mesh, statistics).
    workdir: output directory; replaced as a whole (see the module docstring). In a multi-host
      run (`hosts.initialize` called first) every process merges its slices and only process 0
      writes.

  Returns:
    The provenance record written to run.json (with "outputs", bytes, phases).
  """
  started, phases = time.time(), _Phases()
  workdir = Path(workdir).absolute()
  base_path, expert_paths = _checkpoint_paths(config)
  include, exclude = _strings(config, "include") or None, _strings(config, "exclude") or None
  fmt, name = _output(config, checkpoint.checkpoint_format(base_path))
  atomic.remove_debris(workdir.parent, workdir.name)  # A killed run's temporaries; undo a swap.
  _check_replaceable(workdir)

  # 1. Load checkpoints: validated, memory-mapped where the format allows (read during the merge).
  with phases("load"):
    base = checkpoint.load_params(base_path)
    experts = [checkpoint.load_params(p) for p in tqdm.tqdm(expert_paths, "load", disable=None)]
    if config.get("cast_experts", False):
      tree_lib.check_compatible(base, experts, check_dtypes=False)
      experts = [jax.tree.map(_cast_like, e, base) for e in experts]
  bytes_read = sum(tree_lib.num_bytes(t) for t in (base, *experts))
  logging.info("Loaded %s and %d experts (%.1f MB).", base_path, len(experts), bytes_read / 1e6)

  # 2. Hyper-parameters: the config's rule dict, plus a key for random rules.
  rule_hparams = config.rule.to_dict() if config.rule else {}
  hparams = rules.add_key(config.rule_name, rule_hparams, config.seed)
  if hparams.get("layout") == "auto":
    hparams["layout"] = weight_layout(base, checkpoint.checkpoint_format(base_path))
  dtype = OUTPUT_DTYPES[config.get("dtype", "base")]
  engine = config.get("engine", "streaming")
  if engine not in ENGINES:
    raise ValueError(f"config.engine={engine!r}: expected one of {ENGINES}.")
  statistics = _statistics(config, len(experts))
  if statistics is not None:
    engine = "memory"  # Data-dependent rules weigh whole layers: they merge in memory.
  if config.get("compile_cache_dir"):
    streaming.enable_compile_cache(config.compile_cache_dir)
  options = dict(
    include=include,
    exclude=exclude,
    others=config.others,
    non_float=config.get("non_float", "check"),
  )
  # Data-dependent rules weigh whole layers on one device (rules.merge refuses them on a mesh).
  mesh = (
    None if statistics is not None else layout.merge_mesh((config.get("mesh") or {}).get("devices"))
  )

  # 3. Merge. In memory: here, whole (NaN/Inf in the inputs or the result raise before anything
  # is written). Streaming: planned here (hyper-parameters, compiles, the memory budget and the
  # whole-model statistics checked), computed leaf by leaf as step 4 writes; an error there
  # (NaN/Inf included) discards the staged workdir, so nothing reaches the destination either.
  with phases("merge" if engine == "memory" else "plan"):
    if engine == "memory":
      merged = jax.block_until_ready(
        rules.merge(
          config.rule_name,
          base,
          experts,
          mesh=mesh,
          **options,
          **hparams,
          **_as_kwargs(statistics),
        )
      )
      if mesh is not None:  # Whole leaves on every process (collectively), as one device has.
        merged = jax.tree.map(hosts.to_host, merged)
      models = rules.task_models(merged, base, len(experts))
      if not isinstance(merged, rules.TaskSpecificMerge):
        models = models[:1]
      models = [_cast(m, dtype) for m in models]
    else:
      flat_base = tree_lib.flatten(base)
      budget = config.get("memory_budget_gb")
      stream = streaming.StreamingMerge(
        config.rule_name,
        flat_base,
        [tree_lib.flatten(e) for e in experts],
        hparams,
        memory_budget=None if budget is None else int(float(budget) * 2**30),
        dtype=dtype,
        order=_write_order(fmt, flat_base, config),
        mesh=mesh,
        **options,
      )
      models = [tree_lib.unflatten(stream.lazy_outputs(t)) for t in range(stream.num_outputs)]
      if fmt == "orbax":  # Orbax takes arrays: the merged model is materialized first.
        models = [jax.tree.map(np.asarray, m) for m in models]

  # 4. Write everything into a temporary workdir, run.json last, then swap it in: one commit.
  # Only process 0 writes; the others compute the same leaves with it, in the writer's order.
  if not hosts.is_primary():
    if engine == "streaming" and fmt != "orbax":
      for model in models:
        flat = tree_lib.flatten(model)
        for path in _write_order(fmt, tree_lib.flatten(base), config):
          np.asarray(flat[path])
    return {"outputs": [], "process_index": jax.process_index()}
  stem, suffix = name.removesuffix(".safetensors"), name[len(name.removesuffix(".safetensors")) :]
  names = [name] if len(models) == 1 else [f"{stem}_task{t}{suffix}" for t in range(len(models))]
  with atomic.atomic_dir(workdir) as stage:
    stage.mkdir()
    bytes_written = 0
    phase = "write" if engine == "memory" else "merge_write"
    desc = "write" if engine == "memory" else f"{config.rule_name}: merge+write"
    with phases(phase), tqdm.tqdm(desc=desc, unit="B", unit_scale=True, disable=None) as bar:
      for out_name, model in zip(names, models, strict=True):
        bytes_written += _write(fmt, stage / out_name, model, base_path, config, bar)
    record = provenance.record(config, seed=config.seed, started=started)
    record.update(
      kind=RUN_KIND,
      inputs={"base": str(base_path), "experts": [str(p) for p in expert_paths]},
      outputs=[str(workdir / n) for n in names],
      output_format=fmt,
      bytes_read=bytes_read,
      bytes_written=bytes_written,
      phases_s=phases.seconds,
      engine=engine,
      distributed=layout.describe(mesh),
    )
    if statistics is not None:
      record["statistics"] = str(config.statistics)
    if engine == "streaming":
      record["streaming"] = dict(
        dataclasses.asdict(stream.timings),
        memory_budget_bytes=stream.budget,
        in_memory_because=stream.reason,
        compile_cache_dir=config.get("compile_cache_dir"),
        spmd_modes={k: sorted(v) for k, v in stream.timings.spmd_modes.items()},
      )
    atomic.write_text(stage / "run.json", json.dumps(record, indent=2, default=str))
  logging.info("Wrote %s", record["outputs"])
  return record


def _statistics(config: ml_collections.ConfigDict, num_experts: int) -> list | None:
  """A data-dependent rule's statistics, loaded from `config.statistics` (None for the others)."""
  path = config.get("statistics")
  if not rules.spec.get(config.rule_name).data_dependent:
    if path:
      raise ValueError(
        f"config.statistics is set, but rule {config.rule_name!r} is data-free (statistics are "
        "for the data-dependent rules: fisher, regmean, regmean_plusplus)."
      )
    return None
  if not path:
    raise ValueError(
      f"Rule {config.rule_name!r} is data-dependent: it needs the experts' statistics, which "
      "take a model and data to compute (mergejax.statistics in Python). Save them with "
      "mergejax.statistics.save(DIR, stats), one entry per expert in the order of "
      "--config.experts, and pass --config.statistics=DIR."
    )
  # Here, not at the top: mergejax.statistics imports flax (0.1 s of every CLI merge's start).
  from mergejax import statistics as statistics_lib  # noqa: PLC0415

  loaded = statistics_lib.load(path)
  if len(loaded) != num_experts:
    raise ValueError(
      f"config.statistics={path}: {len(loaded)} entries for {num_experts} experts (one per "
      "expert, in the order of --config.experts)."
    )
  return loaded


def _as_kwargs(statistics: list | None) -> dict[str, Any]:
  return {} if statistics is None else {"statistics": statistics}


def weight_layout(params: Any, fmt: str) -> str:
  """The layout of a checkpoint's 2-D weights, for the rules whose rows are per output neuron.

  Args:
    params: the loaded tree.
    fmt: its `checkpoint.checkpoint_format`.

  Returns:
    "flax" ([in, out]) for orbax checkpoints and trees with flax-named leaves (".../kernel"),
    "torch" ([out, in]) for safetensors / Hugging Face / torch tensors kept with their torch names.
  """
  paths = [tree_lib.path_str(p) for p, _ in jax.tree.flatten_with_path(params)[0]]
  if fmt == "orbax" or any(p.rsplit("/", 1)[-1] == "kernel" for p in paths):
    return "flax"
  return "torch"


def _cast_like(x: Any, ref: Any) -> Any:
  """`x` in `ref`'s dtype if both are floating and differ (the experts' explicit cast)."""
  if tree_lib.is_float(x) and tree_lib.is_float(ref) and x.dtype != ref.dtype:
    return x.astype(ref.dtype)
  return x
