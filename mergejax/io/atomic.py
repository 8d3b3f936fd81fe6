"""Atomic writes: the one idiom every writer in mergejax uses.

Data goes to a temporary sibling named `.mergejax-tmp-<name>-<random>` and is renamed over the
destination only once it is complete (and fsync'ed), so a crash never leaves half a file where a
good one stood. The prefix is recognizable and hidden: no pattern that finds checkpoints
(`*.safetensors`, `model-*-of-*.safetensors`, an orbax directory) matches it, and
`remove_debris` deletes what a killed process left.

A directory is replaced by two renames (the old one aside, the new one in). A process killed
between them leaves the old directory as `.mergejax-tmp-<name>-old-<random>` and no `<name>`;
`recover` (called by `remove_debris` and `atomic_dir`) renames it back.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Iterator

TMP_PREFIX = ".mergejax-tmp-"


def tmp_sibling(path: str | os.PathLike, tag: str = "") -> pathlib.Path:
  """Returns a fresh temporary path next to `path` (same directory, so a rename is atomic).

  Args:
    path: the final destination.
    tag: optional marker in the name ("old" for a replaced directory kept until the swap).

  Returns:
    `<dir>/.mergejax-tmp-<name>[-tag]-<8 hex>`.
  """
  path = pathlib.Path(path)
  suffix = f"-{tag}" if tag else ""
  return path.with_name(f"{TMP_PREFIX}{path.name}{suffix}-{uuid.uuid4().hex[:8]}")


def fsync(path: str | os.PathLike) -> None:
  """Flushes a file, or a directory's entries (after renames), to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


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
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary directory path to create and fill; on success it replaces `path`.

  An existing directory at `path` is moved aside, the new one renamed in, then the old one
  deleted (see the module docstring for a kill between the renames).

  Args:
    path: destination directory.

  Yields:
    The temporary directory's path (not created: writers such as orbax create it themselves).
  """
  path = pathlib.Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  recover(path)
  tmp, old = tmp_sibling(path), tmp_sibling(path, "old")
  try:
    yield tmp
    if path.exists():
      os.replace(path, old)
    os.replace(tmp, path)
    fsync(path.parent)
  finally:
    for leftover in (tmp, old):
      _remove(leftover)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a text file atomically (e.g. config.json)."""
  with atomic_file(path) as tmp:
    tmp.write_text(text)


def _debris_pattern(name: str | None) -> re.Pattern:
  target = ".+?" if name is None else re.escape(name)
  return re.compile(rf"{re.escape(TMP_PREFIX)}(?P<target>{target})(?P<old>-old)?-[0-9a-f]{{8}}")


def recover(path: str | os.PathLike) -> pathlib.Path | None:
  """Puts back a directory that a swap killed between its two renames left aside.

  Args:
    path: the destination of an `atomic_dir` swap.

  Returns:
    The restored path, or None if there was nothing to restore.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() or not path.parent.is_dir():
    return None
  pattern = _debris_pattern(path.name)
  for p in sorted(path.parent.iterdir()):
    match = pattern.fullmatch(p.name)
    if match and match["old"]:
      os.replace(p, path)  # At most one: each swap removes its own on the way out.
      return path
  return None


def remove_debris(directory: str | os.PathLike, name: str | None = None) -> list[pathlib.Path]:
  """Deletes temporary files and directories that killed writers left in `directory`.

  Only `.mergejax-tmp-<name>-<8 hex>` entries are touched (with `name`, only those of writes to
  `directory/name`, so writers of other destinations in the same directory are left alone). A
  directory an interrupted swap left aside is renamed back (`recover`) instead of deleted.

  Args:
    directory: the directory to clean (missing: nothing to do).
    name: restrict to debris of this destination.

  Returns:
    The removed paths.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  pattern, removed = _debris_pattern(name), []
  for p in sorted(directory.iterdir()):
    match = pattern.fullmatch(p.name)
    if not match:
      continue
    if match["old"] and recover(directory / match["target"]):
      continue
    _remove(p)
    removed.append(p)
  return removed


def _remove(p: pathlib.Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  else:
    p.unlink(missing_ok=True)
