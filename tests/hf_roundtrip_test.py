"""Hugging Face round trips: load_pretrained + save_pretrained give back every tensor exactly.

Tiny random models of six transformers families, built locally: names, values and the reloaded
model's outputs must be those of the original. Plus the name mapping on adversarial names.
"""

import itertools

import numpy as np
import pytest

from mergejax.io import hf, names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=64, max_position_embeddings=32)


def _gpt2():
  cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=64)
  return transformers.GPT2LMHeadModel(cfg), {"input_ids": _ids()}


def _llama():
  cfg = transformers.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, **_TEXT,
  )  # fmt: skip
  return transformers.LlamaForCausalLM(cfg), {"input_ids": _ids()}


def _qwen2():
  cfg = transformers.Qwen2Config(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, **_TEXT,
  )  # fmt: skip
  return transformers.Qwen2ForCausalLM(cfg), {"input_ids": _ids()}


def _bert():
  cfg = transformers.BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_TEXT
  )
  return transformers.BertForMaskedLM(cfg), {"input_ids": _ids()}


def _clip():
  cfg = transformers.CLIPConfig(
    text_config=dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **_TEXT
    ),
    vision_config=dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8,
    ),
    projection_dim=16,
  )  # fmt: skip
  pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 32, 32))).float()
  return transformers.CLIPModel(cfg), {"input_ids": _ids(), "pixel_values": pixels}


def _t5():
  # Gated feed-forward: T5 v1.1's `wi_0` / `wi_1`, names ending in "_<digits>".
  cfg = transformers.T5Config(
    vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", decoder_start_token_id=0,
  )  # fmt: skip
  return transformers.T5ForConditionalGeneration(cfg), {
    "input_ids": _ids(),
    "decoder_input_ids": _ids()[:, :5],
  }


def _ids():
  return torch.from_numpy(np.random.default_rng(0).integers(1, 64, (2, 9)))


FAMILIES = {
  "gpt2": _gpt2,
  "llama": _llama,
  "qwen2": _qwen2,
  "bert": _bert,
  "clip": _clip,
  "t5": _t5,
}


def _outputs(model, inputs):
  with torch.no_grad():
    out = model.eval()(**inputs)
  keys = ("logits", "logits_per_image", "text_embeds", "image_embeds")
  return {k: out[k].numpy() for k in keys if k in out}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_keeps_names_values_and_outputs(tmp_path, family):
  torch.manual_seed(0)
  model, inputs = FAMILIES[family]()
  model.save_pretrained(tmp_path / "src")
  params, config = hf.load_pretrained(tmp_path / "src", dtype=None, buffers=True)
  hf.save_pretrained(tmp_path / "out", params, config)

  original, written = hf.read_state_dict(tmp_path / "src"), hf.read_state_dict(tmp_path / "out")
  assert set(written) == set(original)
  for k, v in original.items():
    assert written[k].dtype == v.dtype, k
    np.testing.assert_array_equal(written[k], v, err_msg=k)

  reloaded, info = type(model).from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  expected, got = _outputs(model, inputs), _outputs(reloaded, inputs)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_gpt2_layer_norm_names_survive(tmp_path):
  torch.manual_seed(0)
  model, _ = _gpt2()
  model.save_pretrained(tmp_path / "src")
  params, config = hf.load_pretrained(tmp_path / "src")
  assert {"ln_1_", "ln_2_", "attn", "mlp"} <= set(params["transformer"]["h_0"])
  hf.save_pretrained(tmp_path / "out", params, config)
  assert "transformer.h.0.ln_1.weight" in hf.read_state_dict(tmp_path / "out")


_PARTS = ["h", "0", "7", "ln_1", "ln_1_", "wi_0", "_2", "x_", "kernel", "scale_", "embedding"]
_LEAVES = ["weight", "bias", "kernel", "scale", "scale_", "embedding", "ln_3", "1", "position_ids"]


def test_name_mapping_is_invertible_on_adversarial_names():
  rng = np.random.default_rng(0)
  candidates = [
    ".".join([*mods, leaf])
    for n in range(0, 3)
    for mods in itertools.product(_PARTS, repeat=n)
    for leaf in _LEAVES
  ]
  for _ in range(200):
    picked = sorted(set(rng.choice(candidates, size=8)))
    # Torch names cannot have a tensor's name as a module prefix of another tensor's.
    picked = [a for a in picked if not any(b.startswith(a + ".") for b in picked)]
    shapes = [(3,), (2, 3), (2, 3, 4), (1, 2, 3, 4), ()]
    sd = {}
    for i, name in enumerate(picked):
      dtype = np.int64 if name.endswith("position_ids") else np.float32
      sd[name] = rng.standard_normal(shapes[i % len(shapes)]).astype(dtype)
    params = names.state_dict_to_params(sd)
    back = names.params_to_state_dict(params)
    assert set(back) == set(sd), (sorted(back), sorted(sd))
    for k, v in sd.items():
      np.testing.assert_array_equal(back[k], v)


def expert_state(directory):
  return {k: torch.from_numpy(np.array(v)) for k, v in hf.read_state_dict(directory).items()}


def test_merge_cli_on_transformers_directories(tmp_path):
  """Issue 14: base as safetensors, one expert as pytorch_model.bin, one sharded; the default
  output is a sharded bf16 Hugging Face directory that transformers loads as it is."""
  import json
  import subprocess
  import sys

  from mergejax.io import checkpoint

  torch.manual_seed(0)
  model, inputs = _bert()
  model.save_pretrained(tmp_path / "base")
  for i, kwargs in enumerate([{}, dict(max_shard_size="40KB")]):
    expert = type(model)(model.config)
    expert.load_state_dict(model.state_dict())
    with torch.no_grad():
      for p in expert.parameters():
        p.add_(0.01 * (i + 1))
    expert.save_pretrained(tmp_path / f"e{i}", **kwargs)
  # A legacy pickle checkpoint: the same tensors in pytorch_model.bin.
  names = set(hf.read_state_dict(tmp_path / "e0"))
  sd = {k: v for k, v in expert_state(tmp_path / "e0").items() if k in names}
  (tmp_path / "e0" / "model.safetensors").unlink()
  torch.save(sd, tmp_path / "e0" / "pytorch_model.bin")
  assert (tmp_path / "e0" / "pytorch_model.bin").exists()
  assert (tmp_path / "e1" / "model.safetensors.index.json").exists()
  root = __import__("pathlib").Path(__file__).resolve().parents[1]
  done = subprocess.run(
    [
      sys.executable, str(root / "launch/merge.py"),
      f"--config={root / 'configs/merge.py'}:task_arithmetic",
      f"--config.base={tmp_path / 'base'}",
      f"--config.experts={tmp_path / 'e0'}", f"--config.experts={tmp_path / 'e1'}",
      "--config.rule.scale=0.5", "--config.dtype=bfloat16", "--config.shard_size=20KB",
      f"--workdir={tmp_path / 'w'}",
    ],
    capture_output=True, text=True, check=False,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  out = tmp_path / "w" / "merged"
  assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert reloaded.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
  # θ0 + 0.5 (τ1 + τ2) = θ0 + 0.015 on every float tensor, rounded to bf16 (half an ulp).
  base = hf.read_state_dict(tmp_path / "base")
  merged = checkpoint.to_flat_names(checkpoint.load_params(out))
  for k, v in base.items():
    got = merged[k].astype(np.float32)
    np.testing.assert_allclose(got, v + np.float32(0.015), rtol=2**-8, atol=1e-6, err_msg=k)
  assert np.isfinite(_outputs(reloaded.float(), inputs)["logits"]).all()
