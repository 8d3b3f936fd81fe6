"""Ready-to-apply flax models from Hugging Face checkpoint directories (CLIP, BERT)."""

import os
from typing import Any

import jax.numpy as jnp

from mergejax.io import hf
from mergejax.models import bert, clip
from mergejax.tree import Params


def load_flax_model(directory: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, Params]:
  """Loads a CLIP or BERT checkpoint directory as a ready-to-apply flax module and its params.

  Args:
    directory: checkpoint directory; config.json's `model_type` picks the module
      ("clip", "clip_vision_model", "clip_text_model", "bert").
    dtype: computation dtype of the module (None: fp32); parameters are loaded in fp32.

  Returns:
    `(module, params)`, to be used as `module.apply({"params": params}, ...)`. For files holding
    more than the encoder (e.g. BertForSequenceClassification) `params` is the encoder subtree.
  """
  dtype = dtype or jnp.float32
  params, config = hf.load_pretrained(directory)
  kind = config.get("model_type")
  if kind == "clip":
    return clip.CLIPModel(clip.CLIPConfig.from_dict(config), dtype), params
  if kind == "clip_vision_model":
    cfg = clip.CLIPVisionConfig.from_dict(config)
    return clip.CLIPVisionTransformer(cfg, dtype), clip.vision_tower(params)
  if kind == "clip_text_model":
    cfg = clip.CLIPTextConfig.from_dict(config)
    return clip.CLIPTextTransformer(cfg, dtype), params.get("text_model", params)
  if kind == "bert":
    tree = params.get("bert", params)
    module = bert.BertModel(bert.BertConfig.from_dict(config), "pooler" in tree, dtype)
    return module, tree
  raise ValueError(f"Unsupported model_type {kind!r} in {directory}.")
