"""Large files written with O_DIRECT: past the page cache, straight to the device.

On this project's VM, writes through the page cache reached the disk at 138 MB/s (`dd`, 2 GiB,
fsync'ed) while O_DIRECT writes of the same file took 1.66 s (1.3 GB/s). A merge waits for its
outputs to reach the disk (every file is fsync'ed before it is renamed into place), so the
page cache's write-back was most of a one-shot merge that writes much: on the CLI's 22M x 8 fp32
workload EMR (8 task models, 700 MB) took 21.2-23.4 s and TALL masks 9.1-9.4 s through it,
8.8-8.9 s and 2.4 s with O_DIRECT (alternating runs, the same bytes). When write-back is fast
it makes no difference (full-size task arithmetic, 2.5 GB written: 31.0 and 31.8 s).

Reading with O_DIRECT was measured too and is not used: reading the full-size benchmark's 22 GB
that way took 19-21 s and 1 s of CPU against 31-33 s and 21.5 s buffered, and it took TIES's
statistics pass from 55 to 30-34 s, but the merge pass after it then found nothing in the page
cache and took 62-64 s instead of 14-18 s (TIES 97.9 s in all against 74.8 s, README).
"""

from __future__ import annotations

import fcntl
import mmap
import os

_ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and buffers (a multiple of any block).


class Writer:
  """A file written front to back with O_DIRECT, through a reused page-aligned buffer.

  Full buffers go out as they fill; `close` writes the last one padded to a block and truncates
  the file to its size. Where the file system refuses O_DIRECT (at `open`, or at the first
  write), the file is written through the page cache instead.

  Args:
    path: the file to create (truncated if it exists).
    buffer_bytes: the buffer's size (a multiple of 4096).
  """

  def __init__(self, path: str | os.PathLike, buffer_bytes: int = 16 << 20):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
      self.fd, self.direct = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644), True
    except OSError:
      self.fd, self.direct = os.open(path, flags, 0o644), False
    self.buffer = memoryview(mmap.mmap(-1, buffer_bytes))
    self.used = 0  # Bytes in the buffer.
    self.size = 0  # Bytes written to the file.

  def write(self, data) -> None:
    """Appends `data` (bytes, or an object exposing a C-contiguous buffer)."""
    data = memoryview(data).cast("B")
    while len(data):
      n = min(len(data), len(self.buffer) - self.used)
      self.buffer[self.used : self.used + n] = data[:n]
      self.used, data = self.used + n, data[n:]
      if self.used == len(self.buffer):
        self._flush(self.used)

  def _flush(self, nbytes: int) -> None:
    chunk = self.buffer[:nbytes]
    try:
      done = 0
      while done < nbytes:
        done += os.write(self.fd, chunk[done:])
    except OSError:
      if not self.direct:
        raise
      # A file system that opened O_DIRECT but refuses its writes: the page cache from here.
      fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
      self.direct = False
      os.lseek(self.fd, self.size, os.SEEK_SET)
      os.ftruncate(self.fd, self.size)
      self._flush(nbytes)
      return
    self.size += nbytes
    self.used = 0

  def close(self) -> None:
    """Writes what the buffer holds and closes the file (not fsync'ed)."""
    try:
      if self.used:
        tail = self.used
        padded = -(-tail // _ALIGN) * _ALIGN if self.direct else tail
        self.buffer[tail:padded] = bytes(padded - tail)
        self._flush(padded)
        self.size -= padded - tail
        os.ftruncate(self.fd, self.size)
    finally:
      os.close(self.fd)
