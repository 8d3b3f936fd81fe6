"""The CLIP 8-task model pool: the pre-trained CLIPModel and the experts' image encoders."""

import dataclasses
import pathlib

from mergejax.io import hf
from mergejax.models import clip
from mergejax.tree import Params


@dataclasses.dataclass
class ModelPool:
  """The pre-trained CLIP (both towers) and the task experts' image encoders."""

  clip_config: clip.CLIPConfig
  clip_params: Params  # Full CLIPModel tree: text_model, vision_model, projections, logit_scale.
  experts: dict[str, Params]  # task -> vision tower.
  expert_layout: tuple[dict, bool]  # (config.json of the first expert, names prefixed?)
  pretrained_dir: pathlib.Path


def load_pool(pretrained: str, experts: dict[str, str]) -> ModelPool:
  """Loads the pre-trained CLIPModel and each task's fine-tuned image encoder.

  Args:
    pretrained: a CLIPModel checkpoint directory (with tokenizer.json for the heads).
    experts: `{task: directory}`, each a CLIPVisionModel or CLIPModel checkpoint.

  Returns:
    The pool, vision towers in the layout of `clip.CLIPVisionTransformer`.
  """
  params, config = hf.load_pretrained(pretrained)
  if config.get("model_type") != "clip":
    raise ValueError(f"{pretrained} must hold a full CLIPModel (text tower needed for heads).")
  towers, layout = {}, None
  for task, directory in experts.items():
    p, c = hf.load_pretrained(directory)
    towers[task] = clip.vision_tower(p)
    if layout is None:  # Export in the experts' own format: their config, their name prefix.
      vision = c.get("vision_config", c) if c.get("model_type") == "clip" else c
      layout = (dict(vision, model_type="clip_vision_model"), "vision_model" in p)
  return ModelPool(
    clip.CLIPConfig.from_dict(config), params, towers, layout, pathlib.Path(pretrained)
  )
