"""Parity of mergejax.models.bert with transformers' BERT, checkpoint round trips (tiny, local)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mergejax.io import hf  # noqa: E402
from mergejax.models import bert, pretrained  # noqa: E402

_CONFIG = dict(
  vocab_size=50,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=16,
)


def _inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(1, 50, size=(3, 10))
  mask = (np.arange(10)[None] < np.array([[10], [6], [3]])).astype(np.int64)
  ids = ids * mask  # Pad with token 0 after each row's length.
  token_types = np.zeros_like(ids)
  token_types[:, 5:] = 1
  return ids, mask, token_types


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_bert_model_matches_transformers(tmp_path, hidden_act):
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**_CONFIG, hidden_act=hidden_act)
  model = transformers.BertModel(cfg).eval()
  model.save_pretrained(tmp_path)
  module, params = pretrained.load_flax_model(tmp_path)
  assert module.add_pooling_layer
  ids, mask, token_types = _inputs()
  with torch.no_grad():
    ref = model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(token_types),
    )
  hidden, pooled = module.apply({"params": params}, ids, mask, token_types)
  valid = mask.astype(bool)  # Padding positions are undefined in both implementations.
  np.testing.assert_allclose(
    np.asarray(hidden)[valid], ref.last_hidden_state.numpy()[valid], atol=1e-5
  )
  np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5)
  # The loaded tree has exactly the structure flax's own init builds.
  init = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


def test_mean_pool_ignores_padding():
  hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  mask = np.array([[1, 1, 0], [0, 0, 0]])
  out = np.asarray(bert.mean_pool(hidden, mask))
  np.testing.assert_allclose(out[0], hidden[0, :2].mean(0))
  np.testing.assert_array_equal(out[1], 0.0)


def test_sequence_classifier_round_trip(tmp_path):
  torch.manual_seed(1)
  cfg = transformers.BertConfig(**_CONFIG, num_labels=3)
  model = transformers.BertForSequenceClassification(cfg).eval()
  model.save_pretrained(tmp_path / "src")
  params, config = hf.load_pretrained(tmp_path / "src")
  assert set(params) == {"bert", "classifier"}
  assert params["classifier"]["kernel"].shape == (32, 3)

  # A merged-looking edit of the encoder only; the export must load into transformers unchanged.
  params["bert"] = jax.tree.map(lambda a: a + 0.01, params["bert"])
  hf.save_pretrained(tmp_path / "out", params, config)
  reloaded, info = transformers.BertForSequenceClassification.from_pretrained(
    tmp_path / "out", output_loading_info=True
  )
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  ids, mask, token_types = _inputs()
  module = bert.BertModel(bert.BertConfig.from_dict(config))
  _, pooled = module.apply({"params": params["bert"]}, ids, mask, token_types)
  logits = np.asarray(pooled) @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  with torch.no_grad():
    ref = reloaded.eval()(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(token_types),
    ).logits.numpy()
  np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
  torch.manual_seed(2)
  model = transformers.BertModel(transformers.BertConfig(**_CONFIG)).eval()
  model.save_pretrained(tmp_path / "single")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
  single, _ = hf.load_pretrained(tmp_path / "single")
  sharded, _ = hf.load_pretrained(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
