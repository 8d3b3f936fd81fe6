"""Parity of mergejax.models.clip with transformers' CLIP, and checkpoint round trips.

Tiny random models are built with transformers + CPU torch (test-only dependencies) and saved
locally; nothing is downloaded.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mergejax.io import hf, safetensors  # noqa: E402
from mergejax.models import clip, pretrained  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_VISION = dict(_TOWER, image_size=32, patch_size=8)
_TEXT = dict(
  _TOWER,
  vocab_size=100,
  max_position_embeddings=16,
  bos_token_id=98,
  eos_token_id=99,
  pad_token_id=0,
)
_ATOL = 1e-5


def _clip_config(**text_overrides):
  text = dict(_TEXT, **text_overrides)
  return transformers.CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPModel(_clip_config()).eval()
  with torch.no_grad():  # Non-trivial temperature so logit_scale is really checked.
    model.logit_scale.fill_(1.7)
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(path)
  return path, model


def _inputs():
  rng = np.random.RandomState(0)
  pixels = rng.randn(3, 3, 32, 32).astype(np.float32)  # NCHW for torch.
  ids = rng.randint(1, 98, size=(2, 10))
  ids[0, 6], ids[1, 9] = 99, 99  # EOS; row 0 is padded after it.
  ids[0, 7:] = 0
  mask = (np.arange(10)[None] <= np.array([6, 9])[:, None]).astype(np.int64)
  return pixels, ids, mask


def test_clip_model_matches_transformers(clip_dir):
  path, model = clip_dir
  module, params = pretrained.load_flax_model(path)
  pixels, ids, mask = _inputs()
  with torch.no_grad():
    ref = model(
      input_ids=torch.tensor(ids),
      pixel_values=torch.tensor(pixels),
      attention_mask=torch.tensor(mask),
    )
  nhwc = pixels.transpose(0, 2, 3, 1)
  logits = module.apply({"params": params}, ids, nhwc, mask)
  np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), atol=_ATOL * 10, rtol=1e-5)
  img = module.apply({"params": params}, nhwc, method=clip.CLIPModel.get_image_features)
  txt = module.apply({"params": params}, ids, mask, method=clip.CLIPModel.get_text_features)
  normed = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  np.testing.assert_allclose(normed(img), ref.image_embeds.numpy(), atol=_ATOL)
  np.testing.assert_allclose(normed(txt), ref.text_embeds.numpy(), atol=_ATOL)
  assert float(params["logit_scale"]) == pytest.approx(1.7)


def test_loaded_tree_matches_flax_init(clip_dir):
  path, _ = clip_dir
  module, params = pretrained.load_flax_model(path)
  pixels, ids, _ = _inputs()
  # eval_shape: flax's init traced abstractly, so nothing is compiled.
  init = jax.eval_shape(module.init, jax.random.key(0), ids, pixels.transpose(0, 2, 3, 1))
  init = init["params"]
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), t)
  assert shapes(init) == shapes(params)


def test_legacy_eos_token_id_two_pools_at_largest_id(tmp_path):
  # Configs written before transformers PR #24773 say eos_token_id=2 and pool at argmax(ids).
  torch.manual_seed(1)
  cfg = transformers.CLIPTextConfig(**dict(_TEXT, eos_token_id=2, bos_token_id=1))
  model = transformers.CLIPTextModel(cfg).eval()
  model.save_pretrained(tmp_path)
  module, params = pretrained.load_flax_model(tmp_path)
  _, ids, _ = _inputs()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids)).pooler_output.numpy()
  _, pooled = module.apply({"params": params}, ids)
  np.testing.assert_allclose(pooled, ref, atol=_ATOL)


@pytest.mark.parametrize("legacy_prefix", [False, True])
def test_vision_model_round_trip(tmp_path, legacy_prefix):
  torch.manual_seed(2)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_VISION)).eval()
  src = tmp_path / "src"
  model.save_pretrained(src)
  if legacy_prefix:  # FusionBench-era files (transformers 4) prefix names with "vision_model.".
    sd = safetensors.read_safetensors(src / "model.safetensors")
    safetensors.write_safetensors(
      src / "model.safetensors", {"vision_model." + k: v for k, v in sd.items()}
    )
  original_names = set(hf.read_state_dict(src))
  params, config = hf.load_pretrained(src)
  assert ("vision_model" in params) == legacy_prefix

  # Perturb, export, reload with transformers: names identical, outputs follow the new weights.
  params = jax.tree.map(lambda a: a * 1.01, params)
  out = hf.save_pretrained(tmp_path / "out", params, config)
  assert set(hf.read_state_dict(out)) == original_names
  reloaded, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  pixels, _, _ = _inputs()
  module = clip.CLIPVisionTransformer(clip.CLIPVisionConfig.from_dict(config))
  _, pooled = module.apply({"params": clip.vision_tower(params)}, pixels.transpose(0, 2, 3, 1))
  with torch.no_grad():
    ref = reloaded.eval()(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
    before = model(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
  np.testing.assert_allclose(pooled, ref, atol=_ATOL)
  assert np.abs(ref - before).max() > 1e-3  # The export really carries the perturbed weights.


def test_export_is_lossless_and_bf16_export_loads(clip_dir, tmp_path):
  path, model = clip_dir
  params, config = hf.load_pretrained(path)
  # fp32 export reproduces every tensor bit for bit under its original name.
  hf.save_pretrained(tmp_path / "fp32", params, config)
  written = hf.read_state_dict(tmp_path / "fp32")
  original = {k: v for k, v in hf.read_state_dict(path).items() if "position_ids" not in k}
  assert set(written) == set(original)
  for k, v in original.items():
    np.testing.assert_array_equal(written[k], v, err_msg=k)
  _, info = transformers.CLIPModel.from_pretrained(tmp_path / "fp32", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))

  hf.save_pretrained(tmp_path / "bf16", params, config, dtype=ml_dtypes.bfloat16)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "bf16")
  assert reloaded.text_projection.weight.dtype == torch.bfloat16
  bf16_params, _ = hf.load_pretrained(tmp_path / "bf16", dtype=None)
  assert bf16_params["text_projection"]["kernel"].dtype == ml_dtypes.bfloat16
  np.testing.assert_allclose(
    bf16_params["text_projection"]["kernel"].astype(np.float32),
    params["text_projection"]["kernel"],
    rtol=1e-2,
  )
  # Legacy pickle checkpoints load through torch.load(weights_only=True) to the same tree.
  (tmp_path / "bin").mkdir()
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
  from_bin, _ = hf.load_pretrained(tmp_path / "bin")
  jax.tree.map(np.testing.assert_array_equal, from_bin, params)


def test_missing_weights_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.read_state_dict(tmp_path)
