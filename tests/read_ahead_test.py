"""`io.read_ahead`: memory-mapped inputs touched ahead of their use, within a window."""

import time

import numpy as np
import pytest

from mergejax.io import read_ahead, safetensors


def _mapped(tmp_path, n=4, size=100):
  path = tmp_path / "x.bin"
  np.arange(n * size, dtype=np.uint8).tofile(path)
  whole = np.memmap(path, dtype=np.uint8, mode="r")
  return [whole[i * size : (i + 1) * size] for i in range(n)]


def test_only_memory_mapped_files_are_read_ahead(tmp_path):
  path = tmp_path / "a.safetensors"
  safetensors.write_safetensors(path, {"w": np.ones((3, 4), np.float32)})
  view = safetensors.SafetensorsFile(path)["w"]
  assert read_ahead.file_backed(view) and read_ahead.file_backed(view.reshape(-1)[2:])
  assert not read_ahead.file_backed(np.ones(3)) and not read_ahead.file_backed(np.array(view))
  with read_ahead.ReadAhead([[np.ones(3)], [np.zeros(2)]]) as ahead:
    assert ahead._thread is None  # Nothing to read ahead: no thread.


def _wait_for(condition, seconds=5.0):
  deadline = time.monotonic() + seconds
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


@pytest.mark.parametrize(
  "window,reached,before,after",
  [
    (50, 2, [0, 1], [0, 1, 2, 3]),  # The next step always, whatever its size.
    (350, 2, [0, 1, 2], [0, 1, 2, 3, 4]),  # Step 3 ends 400 bytes from step 0's start.
    (50, 4, [0, 1], [0, 1, 4]),  # Steps the consumer has passed are skipped.
  ],
)
def test_steps_are_touched_in_order_within_the_window(
  tmp_path, monkeypatch, window, reached, before, after
):
  # Steps of 100 bytes: the thread touches ahead of the step in progress, waits for the consumer
  # beyond the window, and stops when closed.
  touched, steps = [], [[x] for x in _mapped(tmp_path, n=5)]
  index = {s[0].ctypes.data: i for i, s in enumerate(steps)}
  monkeypatch.setattr(read_ahead, "touch", lambda x: touched.append(index[x.ctypes.data]))
  ahead = read_ahead.ReadAhead(steps, window=window)
  assert _wait_for(lambda: touched == before)
  time.sleep(0.1)
  assert touched == before
  ahead.reached(reached)
  assert _wait_for(lambda: touched == after)
  ahead.close()
  ahead._thread.join(5)
  assert not ahead._thread.is_alive() and touched == after


def test_touch_reads_every_page(tmp_path):
  x = _mapped(tmp_path, n=1, size=3 * 4096 + 5)[0]
  read_ahead.touch(x)  # Runs over a memory-mapped view without copying it.
  read_ahead.touch(x[:0])
