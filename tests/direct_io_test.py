"""`io.direct.Writer`: the bytes written are the bytes given, across buffer boundaries and an
unaligned tail, with O_DIRECT or through the page cache where a file system refuses it; large
safetensors files are written through it, with the same bytes as the buffered writer."""

import errno
import os

import numpy as np
import pytest

from mergejax.io import direct, safetensors


def _payload(n: int) -> bytes:
  return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("sizes", [[1], [4096], [5000, 3, 8192, 12289], [8192 * 3 + 17]])
def test_round_trip_across_buffers_and_an_unaligned_tail(tmp_path, sizes):
  path = tmp_path / "f"
  w = direct.Writer(path, buffer_bytes=8192)
  parts = [_payload(n) for n in sizes]
  for p in parts:
    w.write(p)
  w.close()
  assert path.read_bytes() == b"".join(parts)


def test_open_refusing_o_direct_writes_through_the_page_cache(tmp_path, monkeypatch):
  real_open = os.open

  def no_direct(path, flags, *args):
    if flags & getattr(os, "O_DIRECT", 0):
      raise OSError(errno.EINVAL, "O_DIRECT refused")
    return real_open(path, flags, *args)

  monkeypatch.setattr(os, "open", no_direct)
  w = direct.Writer(tmp_path / "f", buffer_bytes=8192)
  assert not w.direct
  w.write(_payload(20000))
  w.close()
  assert (tmp_path / "f").read_bytes() == _payload(20000)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_a_refused_write_falls_back_and_rewrites_that_buffer(tmp_path, monkeypatch):
  real_write, calls = os.write, []

  def refuse_second(fd, data):
    calls.append(len(data))
    if len(calls) == 2:
      raise OSError(errno.EINVAL, "refused")
    return real_write(fd, data)

  w = direct.Writer(tmp_path / "f", buffer_bytes=8192)
  if not w.direct:
    pytest.skip("this file system refuses O_DIRECT at open")
  monkeypatch.setattr(os, "write", refuse_second)
  data = _payload(3 * 8192 + 100)
  w.write(data)
  w.close()
  assert not w.direct
  assert (tmp_path / "f").read_bytes() == data


def test_large_safetensors_go_through_the_writer_with_the_same_bytes(tmp_path, monkeypatch):
  tensors = {"w": np.arange(5 << 20, dtype=np.float32), "b": np.ones(3, np.float32)}
  used = []
  real = direct.Writer

  def spy(path, *args, **kwargs):
    used.append(path)
    return real(path, *args, **kwargs)

  monkeypatch.setattr(direct, "Writer", spy)
  size = safetensors.write_safetensors(tmp_path / "big.safetensors", tensors)
  assert len(used) == 1 and size > safetensors._DIRECT_ABOVE
  monkeypatch.setattr(safetensors, "_DIRECT_ABOVE", size + 1)  # The buffered writer's bytes.
  safetensors.write_safetensors(tmp_path / "plain.safetensors", tensors)
  assert len(used) == 1
  big, plain = ((tmp_path / n).read_bytes() for n in ("big.safetensors", "plain.safetensors"))
  assert big == plain and len(big) == size
