"""Hugging Face directories: shards and indexes checked, legacy and wrapped .bin, clear errors."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from mergejax.io import checkpoint, hf, safetensors

torch = pytest.importorskip("torch")


def _state_dict():
  rng = np.random.default_rng(0)
  return {
    "emb.weight": rng.standard_normal((16, 8)).astype(np.float32),
    "h.0.ln_1.weight": np.ones(8, np.float32),
    "h.0.fc.weight": rng.standard_normal((8, 8)).astype(np.float32),
    "h.1.fc.weight": rng.standard_normal((8, 8)).astype(np.float32),
    "pos_ids": np.arange(4, dtype=np.int64) + 2**33,
  }


def _sharded(tmp_path):
  d = tmp_path / "sharded"
  hf.write_dir(d, _state_dict(), {"model_type": "toy"}, max_shard_size=400)
  return d


def test_sharded_write_round_trips(tmp_path):
  d = _sharded(tmp_path)
  shards = sorted(p.name for p in d.glob("model-*.safetensors"))
  assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
  index = json.loads((d / hf.SAFETENSORS_INDEX).read_text())
  assert set(index["weight_map"]) == set(_state_dict())
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in _state_dict().values())
  loaded = hf.read_state_dict(d)
  for k, v in _state_dict().items():
    np.testing.assert_array_equal(loaded[k], v)
    assert loaded[k].dtype == v.dtype
  assert json.loads((d / "config.json").read_text())["dtype"] == "float32"


def _edit_index(d, edit):
  index = json.loads((d / hf.SAFETENSORS_INDEX).read_text())
  edit(index["weight_map"])
  (d / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
  d = _sharded(tmp_path)
  _edit_index(d, lambda m: m.update({"ghost.weight": "model-00001-of-00003.safetensors"}))
  with pytest.raises(
    ValueError, match=r"index.json: shard 'model-00001.*listed but absent \['ghost"
  ):
    hf.read_state_dict(d)


def test_shard_holding_unlisted_tensors(tmp_path):
  d = _sharded(tmp_path)
  _edit_index(d, lambda m: m.pop("h.0.ln_1.weight"))
  with pytest.raises(ValueError, match=r"present but not listed \['h.0.ln_1.weight'\]"):
    hf.read_state_dict(d)


@pytest.mark.parametrize(
  "name", ["../outside.safetensors", "/etc/outside.safetensors", "a/../../x"]
)
def test_index_paths_must_stay_inside(tmp_path, name):
  d = _sharded(tmp_path)
  safetensors.write_safetensors(tmp_path / "outside.safetensors", {"x": np.ones(1, np.float32)})
  _edit_index(d, lambda m: m.update({"x": name}))
  with pytest.raises(ValueError, match="lies outside .*refusing to read it"):
    hf.read_state_dict(d)


def test_missing_and_corrupt_shards_are_named(tmp_path):
  d = _sharded(tmp_path)
  shard = d / "model-00002-of-00003.safetensors"
  shard.write_bytes(shard.read_bytes()[:-3])
  with pytest.raises(
    safetensors.SafetensorsError, match=r"model-00002-of-00003.*truncated.*shard of"
  ):
    hf.read_state_dict(d)
  shard.unlink()
  with pytest.raises(
    FileNotFoundError, match="shard 'model-00002-of-00003.safetensors' is missing"
  ):
    hf.read_state_dict(d)


def _torch_sd():
  sd = {k: torch.from_numpy(v.copy()) for k, v in _state_dict().items()}
  sd["half.weight"] = torch.ones(3, dtype=torch.bfloat16)
  return sd


def _check_bin(loaded):
  for k, v in _state_dict().items():
    np.testing.assert_array_equal(loaded[k], v)
  assert loaded["pos_ids"].dtype == np.int64 and int(loaded["pos_ids"][0]) == 2**33
  assert loaded["half.weight"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_zip_and_legacy_formats(tmp_path, legacy):
  torch.save(_torch_sd(), tmp_path / hf.BIN, _use_new_zipfile_serialization=not legacy)
  _check_bin(hf.read_state_dict(tmp_path))


def test_bin_wrapped_in_state_dict_is_unwrapped(tmp_path):
  torch.save({"state_dict": _torch_sd(), "epoch": 3}, tmp_path / "model.bin")
  _check_bin(hf.read_torch_file(tmp_path / "model.bin"))
  nested = checkpoint.load_params(tmp_path / "model.bin")  # A torch file as a checkpoint path.
  np.testing.assert_array_equal(nested["h"]["0"]["ln_1"]["weight"], np.ones(8))


def test_bin_with_other_objects_is_refused(tmp_path):
  torch.save({"w": torch.ones(2), "step": 3}, tmp_path / hf.BIN)
  with pytest.raises(ValueError, match=r"pytorch_model.bin: entry 'step' is a int, not a tensor"):
    hf.read_state_dict(tmp_path)


class _Payload:
  def __reduce__(self):
    return (os.system, ("echo pwned > pwned.txt",))


def test_pickled_code_never_runs(tmp_path):
  torch.save({"w": _Payload()}, tmp_path / hf.BIN)
  with pytest.raises(
    ValueError, match=r"pytorch_model.bin: torch.load\(weights_only=True\) cannot"
  ):
    hf.read_state_dict(tmp_path)
  assert not (tmp_path / "pwned.txt").exists()


def test_sharded_bin(tmp_path):
  sd = _torch_sd()
  names = sorted(sd)
  torch.save({k: sd[k] for k in names[:3]}, tmp_path / "pytorch_model-00001-of-00002.bin")
  torch.save({k: sd[k] for k in names[3:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
  weight_map = {k: f"pytorch_model-0000{1 + (i >= 3)}-of-00002.bin" for i, k in enumerate(names)}
  (tmp_path / hf.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
  _check_bin(hf.read_state_dict(tmp_path))


def test_a_broken_orbax_directory_is_named(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "_METADATA").write_text("not json")
  with pytest.raises(ValueError, match=r"ckpt: orbax cannot restore it"):
    checkpoint.load_params(tmp_path / "ckpt")


def test_a_directory_that_is_no_checkpoint(tmp_path):
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match=r"is a directory but no checkpoint.*\['notes.txt'\]"):
    checkpoint.load_params(tmp_path)
  with pytest.raises(ValueError, match="unknown checkpoint file type '.txt'"):
    checkpoint.load_params(tmp_path / "notes.txt")


def test_hf_directory_as_checkpoint_keeps_torch_names(tmp_path):
  d = _sharded(tmp_path)
  params = checkpoint.load_params(d)
  assert checkpoint.checkpoint_format(d) == "hf"
  assert set(checkpoint.to_flat_names(params)) == set(_state_dict())
  assert params["pos_ids"].dtype == np.int64


def test_save_pretrained_replaces_weights_and_keeps_other_files(tmp_path):
  out = tmp_path / "out"
  big = {"fc": {"kernel": np.ones((40, 30), np.float32), "bias": np.ones(40, np.float32)}}
  hf.save_pretrained(out, big, {"model_type": "toy"}, max_shard_size=2000)
  assert (out / hf.SAFETENSORS_INDEX).exists()
  (out / "tokenizer.json").write_text("{}")
  small = {"fc": {"kernel": np.zeros((2, 3), np.float32)}}
  hf.save_pretrained(out, small, {"model_type": "toy"})
  assert sorted(p.name for p in out.iterdir()) == [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
  ]  # The stale shards and index are gone, the tokenizer stays.
  np.testing.assert_array_equal(hf.read_state_dict(out)["fc.weight"], np.zeros((3, 2)))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_side_files_are_copied_but_not_weights_or_cards(tmp_path):
  src = tmp_path / "src"
  hf.write_dir(src, _state_dict(), {"model_type": "toy"})
  for name in ("tokenizer.json", "vocab.txt", "README.md", "generation_config.json"):
    (src / name).write_text("{}")
  out = tmp_path / "out"
  hf.write_dir(out, _state_dict(), {"model_type": "toy"}, source=src)
  assert sorted(p.name for p in out.iterdir()) == [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.txt",
  ]


def test_parse_size():
  assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2MiB") == 2 * 2**20
  with pytest.raises(ValueError, match="Shard size 'lots'"):
    hf.parse_size("lots")
