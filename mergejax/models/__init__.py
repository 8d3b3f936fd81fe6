"""Small flax.linen classifiers for the built-in benchmark; params are {"backbone", "head"}."""

from typing import Any

import flax.linen as nn

from mergejax.models.mlp import MLP
from mergejax.models.vit import ViT

MODELS = {"mlp": MLP, "vit": ViT}


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """Returns the model `name` ("mlp" or "vit") built with `kwargs`.

  Args:
    name: key of `MODELS`.
    **kwargs: attributes of the model class (e.g. width=256).

  Returns:
    A flax.linen module whose `init` gives {"params": {"backbone": ..., "head": ...}}.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known: {sorted(MODELS)}.")
  return MODELS[name](**kwargs)


__all__ = ["MLP", "MODELS", "ViT", "build_model"]
