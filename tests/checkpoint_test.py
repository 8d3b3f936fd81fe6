"""Checkpoint I/O: round trips, atomic writes, clear errors."""

import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.io import checkpoint, safetensors


def _params():
  return {
    "encoder": {"layer_0": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}},
    "head": jnp.array([1.5, -2.0], jnp.bfloat16),
  }


@pytest.mark.parametrize("name", ["p.safetensors", "p_orbax"])
def test_round_trip_keeps_values_and_dtypes(tmp_path, name):
  params = _params()
  checkpoint.save_params(tmp_path / name, params)
  loaded = checkpoint.load_params(tmp_path / name)
  assert loaded["head"].dtype == jnp.bfloat16
  for a, b in zip(
    checkpoint.to_flat_names(params).values(),
    checkpoint.to_flat_names(loaded).values(),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_flat_names():
  flat = checkpoint.to_flat_names(_params())
  assert sorted(flat) == ["encoder.layer_0.bias", "encoder.layer_0.kernel", "head"]
  assert checkpoint.from_flat_names(flat)["encoder"]["layer_0"]["kernel"].shape == (2, 3)
  with pytest.raises(ValueError, match="contains '.'"):
    checkpoint.to_flat_names({"a.b": jnp.ones(1)})


@pytest.mark.parametrize("name", ["p.safetensors", "p_orbax"])
def test_bad_leaf_fails_before_writing(tmp_path, name):
  path = tmp_path / name
  checkpoint.save_params(path, _params())
  with pytest.raises(TypeError, match="Leaf 'bad' is a object"):
    checkpoint.save_params(path, {"good": jnp.ones(2), "bad": object()})
  with pytest.raises(TypeError, match="Leaf 'bad' has dtype <U4"):
    checkpoint.save_params(path, {"good": jnp.ones(2), "bad": np.array(["text"])})
  np.testing.assert_array_equal(checkpoint.load_params(path)["encoder"]["layer_0"]["bias"], 1.0)
  assert sorted(os.listdir(tmp_path)) == [name]


class _Crash(RuntimeError):
  pass


def _crash_orbax(monkeypatch):
  class HalfWritingCheckpointer:
    def __init__(self, *args, **kwargs):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def save(self, directory, *args, **kwargs):
      os.makedirs(directory)
      (pathlib.Path(directory) / "half").write_bytes(b"x")
      raise _Crash

  monkeypatch.setattr(checkpoint.ocp, "Checkpointer", HalfWritingCheckpointer)


def _crash_safetensors(monkeypatch):
  # The header is on disk; the crash comes while the first tensor's bytes are written.
  def crash(_):
    raise _Crash

  monkeypatch.setattr(safetensors, "memoryview", crash, raising=False)


@pytest.mark.parametrize("name", ["p.safetensors", "p_orbax"])
def test_crash_mid_write_keeps_the_good_checkpoint(tmp_path, monkeypatch, name):
  path = tmp_path / name
  checkpoint.save_params(path, _params())
  (_crash_safetensors if name.endswith(".safetensors") else _crash_orbax)(monkeypatch)
  with pytest.raises(_Crash):
    checkpoint.save_params(path, {"x": jnp.zeros(2)})
  monkeypatch.undo()
  np.testing.assert_array_equal(checkpoint.load_params(path)["encoder"]["layer_0"]["bias"], 1.0)
  assert sorted(os.listdir(tmp_path)) == [name]  # The half-written temporary is gone.


@pytest.mark.parametrize("name", ["p.safetensors", "p_orbax"])
def test_overwrite_replaces(tmp_path, name):
  checkpoint.save_params(tmp_path / name, _params())
  checkpoint.save_params(tmp_path / name, {"x": jnp.zeros(2)})
  assert list(checkpoint.load_params(tmp_path / name)) == ["x"]


@pytest.mark.parametrize("name", ["missing.safetensors", "missing_dir"])
def test_missing_checkpoint(tmp_path, name):
  with pytest.raises(FileNotFoundError, match="No checkpoint at .*missing"):
    checkpoint.load_params(tmp_path / name)


def test_generic_pytree_restores_namedtuples(tmp_path):
  import optax

  params = {"w": jnp.ones(3)}
  state = optax.adam(1e-3).init(params)
  checkpoint.save_pytree(tmp_path / "state", state)
  restored = checkpoint.load_pytree(tmp_path / "state", abstract_target=state)
  assert type(restored[0]).__name__ == "ScaleByAdamState"
