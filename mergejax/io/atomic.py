"""Atomic writes: the one idiom every writer in mergejax uses.

Data goes to a temporary sibling named `.mergejax-tmp-<name>-<random>` and is renamed over the
destination only once it is complete (and fsync'ed), so a crash never leaves half a file where a
good one stood. The prefix is recognizable: `remove_debris` deletes what a killed process left.
"""

import contextlib
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator

TMP_PREFIX = ".mergejax-tmp-"


def tmp_sibling(path: str | os.PathLike, tag: str = "") -> pathlib.Path:
  """Returns a fresh temporary path next to `path` (same directory, so a rename is atomic).

  Args:
    path: the final destination.
    tag: optional marker in the name (e.g. "old" for a replaced directory kept until the swap).

  Returns:
    `<dir>/.mergejax-tmp-<name>[-tag]-<8 hex>`.
  """
  path = pathlib.Path(path)
  suffix = f"-{tag}" if tag else ""
  return path.with_name(f"{TMP_PREFIX}{path.name}{suffix}-{uuid.uuid4().hex[:8]}")


def _fsync(path: pathlib.Path) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write; on success it replaces `path`, on error it is removed.

  Args:
    path: destination file; its directory is created.

  Yields:
    The temporary path to write the complete file to.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = tmp_sibling(path)
  try:
    yield tmp
    _fsync(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary directory path to create and fill; on success it replaces `path`.

  An existing directory at `path` is moved aside, the new one renamed in, then the old one
  deleted: a crash between the renames leaves the old directory as `.mergejax-tmp-<name>-old-*`.

  Args:
    path: destination directory.

  Yields:
    The temporary directory's path (not created: writers such as orbax create it themselves).
  """
  path = pathlib.Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp, old = tmp_sibling(path), tmp_sibling(path, "old")
  try:
    yield tmp
    if path.exists():
      os.replace(path, old)
    os.replace(tmp, path)
  finally:
    for leftover in (tmp, old):
      shutil.rmtree(leftover, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a text file atomically (e.g. config.json, run.json)."""
  with atomic_file(path) as tmp:
    tmp.write_text(text)


def remove_debris(directory: str | os.PathLike) -> list[pathlib.Path]:
  """Deletes temporary files and directories that killed writers left in `directory`.

  Only names starting with `TMP_PREFIX` are touched. Call it before writing into a directory
  no other process is writing to.

  Args:
    directory: the directory to clean (missing: nothing to do).

  Returns:
    The removed paths.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  removed = []
  for p in directory.iterdir():
    if p.name.startswith(TMP_PREFIX):
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)
      removed.append(p)
  return removed
