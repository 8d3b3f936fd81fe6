"""Parameter pytrees on disk: orbax checkpoints and safetensors files (the one module using orbax).

`load_params` reads any checkpoint a user can point at: a safetensors file, a Hugging Face
directory (single or sharded safetensors, pytorch_model.bin), a torch `.bin`/`.pt` file (read
with `weights_only=True`) or an orbax directory. Flat tensor names ("a.b.c") become nested dicts
({"a": {"b": {"c": ...}}}, leaf path "a/b/c") and go back unchanged on writing, so a Hugging Face
checkpoint round-trips name for name. Tensors keep their stored dtype (int64 included: they stay
numpy arrays, which jax would narrow).

Every write is atomic (`mergejax.io.atomic`): the data goes to a temporary sibling first and is
renamed into place once complete, so a crash never leaves a half-written checkpoint where a good
one stood.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging

from mergejax import tree as tree_lib
from mergejax.io import atomic, hf, safetensors
from mergejax.tree import Params

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

SAFETENSORS_SEP = "."  # Flat names "a.b.c" <-> nested {"a": {"b": {"c": ...}}}.
FORMATS = ("safetensors", "hf", "torch", "orbax")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")


# ------------------------------------------------------------------------------ safetensors
def to_flat_names(params: Params, sep: str = SAFETENSORS_SEP) -> dict[str, Any]:
  """Returns `{"a.b.c": array}` for a nested dict of arrays (leaves as they are, no copy).

  Args:
    params: nested dict of arrays.
    sep: separator of the flat names.

  Returns:
    The leaves keyed by flat name.

  Raises:
    ValueError: if a key already contains `sep` (the names would not round-trip).
  """
  flat = tree_lib.flatten(params)
  out = {}
  for path, leaf in flat.items():
    parts = path.split("/")
    if any(sep in p for p in parts):
      raise ValueError(
        f"Leaf {path!r}: a key contains {sep!r}, so flat names would not round-trip."
      )
    out[sep.join(parts)] = leaf
  return out


def from_flat_names(flat: dict[str, Any], sep: str = SAFETENSORS_SEP) -> dict:
  """Inverse of `to_flat_names`: nests `{"a.b.c": x}` into `{"a": {"b": {"c": x}}}`."""
  return tree_lib.unflatten(flat, sep=sep)


def _nest(flat: dict[str, Any], source: Path) -> dict:
  try:
    return from_flat_names(flat)
  except ValueError as e:
    raise ValueError(f"{source}: its tensor names do not form a tree ({e}).") from None


def save_safetensors(
  path: str | os.PathLike, params: Params, metadata: dict | None = None, *, progress=None
) -> int:
  """Writes a nested dict of arrays as one safetensors file, atomically.

  Args:
    path: destination file (conventionally "*.safetensors").
    params: nested dict of arrays (any dtype safetensors supports, bfloat16 included).
    metadata: optional str -> str metadata stored in the header.
    progress: called with each tensor's byte count once written.

  Returns:
    Bytes written.
  """
  _check_array_leaves(params)
  return safetensors.write_safetensors(path, to_flat_names(params), metadata, progress=progress)


def load_safetensors(path: str | os.PathLike) -> dict:
  """Reads a safetensors file into a nested dict of read-only numpy views of a memory map."""
  path = Path(path)
  _require_exists(path)
  return _nest(safetensors.read_safetensors(path), path)


# ------------------------------------------------------------------------------ orbax
def _ocp():
  """`orbax.checkpoint`, imported on first use: a merge of safetensors files never pays its
  0.3 s of import."""
  import orbax.checkpoint  # noqa: PLC0415

  return orbax.checkpoint


def __getattr__(name: str) -> Any:  # `checkpoint.ocp` (tests patch it), imported when asked for.
  if name == "ocp":
    return _ocp()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_pytree(path: str | os.PathLike, tree: Any) -> None:
  """Saves any pytree of arrays as an orbax checkpoint directory, atomically.

  The checkpoint is written to a temporary sibling directory and swapped in with renames; an
  existing checkpoint at `path` is only removed once the new one is complete.

  Args:
    path: destination directory.
    tree: pytree of arrays (nested dicts, NamedTuples, ...).
  """
  ocp = _ocp()
  _check_array_leaves(tree)
  with atomic.atomic_dir(path) as tmp:
    try:
      # The synchronous checkpointer: once save() returns or raises, no thread writes any more,
      # so the clean-up cannot race a background write.
      with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp, args=ocp.args.StandardSave(tree))
    finally:
      # Orbax stages its own writes in "<tmp>.orbax-checkpoint-tmp*": clear those too on failure.
      for leftover in tmp.parent.glob(f"{tmp.name}.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _check_array_leaves(tree: Any) -> None:
  """Fails before anything is written if a leaf is not a numeric array (names the leaf)."""
  for path, leaf in tree_lib.flatten(tree).items():
    if not isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float):
      raise TypeError(f"Leaf {path!r} is a {type(leaf).__name__}, not an array; cannot save it.")
    if np.dtype(getattr(leaf, "dtype", np.float32)).kind in "OSUM":  # bf16 & co. are kind "V".
      raise TypeError(f"Leaf {path!r} has dtype {leaf.dtype}, which checkpoints cannot hold.")


def load_pytree(path: str | os.PathLike, abstract_target: Any = None) -> Any:
  """Restores an orbax checkpoint directory written by `save_pytree`.

  Args:
    path: checkpoint directory.
    abstract_target: optional pytree of `jax.ShapeDtypeStruct` (or arrays) giving the structure
      to restore into; needed to get NamedTuples (e.g. optax states) back rather than dicts.

  Returns:
    The restored pytree (jax arrays).
  """
  ocp = _ocp()
  path = Path(path).absolute()
  _require_exists(path)
  if abstract_target is not None:
    abstract_target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_target)


# ------------------------------------------------------------------------------ training runs
def training_manager(
  workdir: str | os.PathLike, *, every_steps: int, keep: int
) -> ocp.CheckpointManager:
  """Returns a CheckpointManager for a resumable run under `workdir/checkpoints`.

  Args:
    workdir: the run's directory.
    every_steps: save every this many steps (`save_training_state(force=True)` saves anyway).
    keep: how many of the latest checkpoints to keep.

  Returns:
    An orbax CheckpointManager (use it as a context manager, or close it).
  """
  ocp = _ocp()
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=policies.FixedIntervalPolicy(every_steps),
    preservation_policy=policies.LatestN(keep),
    # Learned coefficients are tiny; a synchronous save keeps "saved" meaning "on disk" when the
    # next step starts.
    enable_async_checkpointing=False,
    # A save killed midway leaves a "*.orbax-checkpoint-tmp*" directory that is never read as a
    # checkpoint; remove such leftovers when the run restarts.
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save_training_state(
  manager: ocp.CheckpointManager, step: int, state: Any, history: dict, *, force: bool = False
) -> bool:
  """Saves a training state pytree and a JSON history at `step` (if the policy says so).

  Orbax writes into a temporary directory and renames it when complete, so a kill mid-save
  leaves the previous good checkpoint as the latest one.

  Returns:
    Whether a checkpoint was written.
  """
  ocp = _ocp()
  return manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)),
    force=force,
  )


def restore_training_state(
  manager: ocp.CheckpointManager, template: Any
) -> tuple[Any, dict, int] | None:
  """Restores the newest (state, history) that restores; `template` gives the structure.

  A checkpoint that fails to restore (a file deleted or truncated inside it) is reported,
  deleted so that the run can write that step again, and the next older one is tried.

  Args:
    manager: from `training_manager`.
    template: a pytree of arrays or ShapeDtypeStructs shaped like the saved state (NamedTuples
      survive the round trip).

  Returns:
    (state, history, step), or None when there is no checkpoint.

  Raises:
    ValueError: checkpoints exist but none restores (naming the directory and each error).
  """
  ocp = _ocp()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
  )
  errors = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types)
      message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      errors.append(f"step {step}: {message}")
      logging.warning(
        "Checkpoint of step %d in %s does not restore (%s); deleting it and trying the one before.",
        step,
        manager.directory,
        message,
      )
      manager.delete(step)
      continue
    if errors:
      logging.warning("Resuming from step %d in %s instead.", step, manager.directory)
    return restored["state"], restored["history"], step
  if errors:
    raise ValueError(
      f"No checkpoint in {manager.directory} restores: {errors}. Start afresh in a new workdir."
    )
  return None


# ------------------------------------------------------------------------------ dispatch
def checkpoint_format(path: str | os.PathLike) -> str:
  """Tells what kind of checkpoint `path` is (one of `FORMATS`), from what is on disk.

  Args:
    path: a file or directory.

  Returns:
    "safetensors" (a *.safetensors file), "hf" (a directory with Hugging Face weights), "torch"
    (a .bin/.pt/.pth file) or "orbax" (an orbax checkpoint directory).

  Raises:
    FileNotFoundError: nothing at `path` (the message points at leftovers of an interrupted
      write, if any).
    ValueError: something that is none of these, with what it holds.
  """
  path = Path(path)
  _require_exists(path)
  if path.is_dir():
    if hf.is_checkpoint_dir(path):
      return "hf"
    if any((path / m).exists() for m in _ORBAX_MARKERS):
      return "orbax"
    raise ValueError(
      f"{path} is a directory but no checkpoint: neither Hugging Face weights "
      f"({', '.join(hf.WEIGHT_FILES)}) nor an orbax checkpoint ({' or '.join(_ORBAX_MARKERS)}). "
      f"It holds {sorted(p.name for p in path.iterdir())[:10]}."
    )
  if path.suffix == ".safetensors":
    return "safetensors"
  if path.suffix in _TORCH_SUFFIXES:
    return "torch"
  raise ValueError(
    f"{path}: unknown checkpoint file type {path.suffix!r}; expected a .safetensors file, a "
    f"torch {'/'.join(_TORCH_SUFFIXES)} file, or a checkpoint directory."
  )


def save_params(path: str | os.PathLike, params: Params) -> None:
  """Saves parameters: "*.safetensors" → one safetensors file; anything else → orbax directory.

  Args:
    path: destination.
    params: nested dict of arrays.
  """
  if str(path).endswith(".safetensors"):
    save_safetensors(path, params)
  else:
    save_pytree(path, params)


def load_params(path: str | os.PathLike) -> Params:
  """Loads parameters from any checkpoint (format found by `checkpoint_format`).

  Args:
    path: a "*.safetensors" file, a Hugging Face checkpoint directory, a torch .bin/.pt file,
      or an orbax checkpoint directory.

  Returns:
    Nested dict of arrays: read-only memory-mapped numpy views for safetensors (nothing read
    until used), numpy for torch files, jax or numpy arrays (as saved) for orbax.

  Raises:
    FileNotFoundError / ValueError: naming the path (and the shard) and what is wrong.
  """
  path = Path(path)
  kind = checkpoint_format(path)
  if kind == "safetensors":
    return load_safetensors(path)
  if kind == "hf":
    return _nest(hf.read_state_dict(path), path)
  if kind == "torch":
    return _nest(hf.read_torch_file(path), path)
  try:
    return load_pytree(path)
  except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types)
    raise ValueError(
      f"{path}: orbax cannot restore it ({type(e).__name__}: {str(e).splitlines()[0][:300]})."
    ) from e


def _require_exists(path: Path) -> None:
  if path.exists():
    return
  leftovers = (
    sorted(p.name for p in path.parent.glob(f"{atomic.TMP_PREFIX}{path.name}-old-*"))
    if path.parent.exists()
    else []
  )
  hint = (
    f" An interrupted write left {leftovers}: rename it to {path.name!r} to recover."
    if leftovers
    else ""
  )
  raise FileNotFoundError(f"No checkpoint at {str(path)!r}.{hint}")
