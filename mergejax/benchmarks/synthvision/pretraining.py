"""The pre-training mixture, broad like CLIP's (here supervised on several attributes at once).

Object scenes (a glyph of the pre-training fonts or a shape, with up to two distractors) and grid
scenes (one to six copies of a shape) on procedural backgrounds, labelled with category (62
glyphs + 10 shapes), colour, background texture, count, and for object scenes position, size,
rotation and the relation of a distractor to the primary object. The heads trained on these
labels are discarded after pre-training.
"""

import numpy as np

from mergejax.benchmarks.synthvision import render, scene

# Fonts of the pre-training glyphs; the letters task uses other, held-out fonts.
PRETRAIN_FONTS = (
  "DejaVuSans",
  "DejaVuSans-Bold",
  "DejaVuSans-Oblique",
  "DejaVuSansMono",
  "DejaVuSerif",
  "DejaVuSerif-Bold",
)
PRETRAIN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
PRETRAIN_SHAPES = (
  "circle",
  "square",
  "triangle",
  "diamond",
  "plus",
  "star",
  "hexagon",
  "ring",
  "bar",
  "ell",
)
# Pre-training attributes and their number of classes (the pre-training heads' sizes). A label
# of -1 means "not defined for this scene" and is left out of the loss.
ATTRIBUTES = {
  "category": len(PRETRAIN_CHARS) + len(PRETRAIN_SHAPES),
  "colour": 8,
  "background": len(scene.TEXTURES),
  "count": 6,
  "position": 9,
  "size": 3,
  "rotation": 6,
  "relation": 4,
}
IGNORE = -1


def glyphs_and_shapes():
  glyphs = render.glyph_atlas(PRETRAIN_FONTS, PRETRAIN_CHARS)  # [F, C, A, A]
  shapes = render.shape_atlas(PRETRAIN_SHAPES)
  return np.concatenate([glyphs.reshape(-1, *glyphs.shape[2:]), shapes]), glyphs.shape[:2]


def pretraining_mixture(
  rng: np.random.Generator, n: int, size: int, supersample: int = 2, grid_fraction: float = 0.3
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Draws the pre-training mixture: two kinds of scenes with up to eight attribute labels.

  Object scenes: a primary glyph (pre-training fonts) or shape, rotated and scaled, with zero to
  two small distractors; labels: category, colour, position, size and rotation of the primary,
  background texture, number of objects, where the first distractor lies relative to the primary.
  Grid scenes (`grid_fraction` of them): one to six copies of one small shape on a 3x3 grid;
  labels: category (the shape), colour, background, count; the rest are `IGNORE`.

  Args:
    rng: the generator.
    n: number of images.
    size: image side in pixels.
    supersample: rendering oversampling per side.
    grid_fraction: fraction of grid scenes.

  Returns:
    (uint8 images [n, size, size, 3], {attribute: int32 labels [n]}) with the keys of
    `ATTRIBUTES`; -1 marks an attribute a scene does not define.
  """
  atlas, (num_fonts, num_chars) = glyphs_and_shapes()
  shapes = render.shape_atlas(PRETRAIN_SHAPES)
  canvas = scene.Scene(rng, n, size, supersample)
  bg = rng.integers(0, len(scene.TEXTURES), n)
  canvas.background(bg, scene.TEXTURES, contrast=(0.15, 0.9))
  grid = rng.uniform(size=n) < grid_fraction
  obj = ~grid
  labels = {k: np.full(n, IGNORE, np.int64) for k in ATTRIBUTES}
  labels["background"] = bg
  colour = rng.integers(0, ATTRIBUTES["colour"], n)
  labels["colour"] = colour
  rgb = scene.hue_colours(rng, colour / ATTRIBUTES["colour"], spread=0.5 / ATTRIBUTES["colour"])

  # Object scenes. Distractors first (small, off the centre), the primary on top.
  distractors = rng.integers(0, 3, n)
  first = np.zeros((n, 2))
  for k in range(2):
    where = obj & (distractors > k)
    angle = rng.uniform(-np.pi, np.pi, n)
    radius = rng.uniform(0.55, 0.75, n)
    cx, cy = radius * np.cos(angle), radius * np.sin(angle)
    if k == 0:
      first = np.stack([cx, cy], 1)
    d_rgb, _ = scene.random_colours(rng, n)
    canvas.draw(
      atlas,
      rng.integers(0, len(atlas), n),
      d_rgb,
      scale=rng.uniform(0.15, 0.22, n),
      angle=rng.uniform(-np.pi, np.pi, n),
      cx=cx,
      cy=cy,
      where=where,
    )
  category = rng.integers(0, ATTRIBUTES["category"], n)
  is_glyph = category < num_chars
  font = rng.integers(0, num_fonts, n)
  idx = np.where(
    is_glyph, font * num_chars + category, num_fonts * num_chars + category - num_chars
  )
  size_bin = rng.integers(0, 3, n)
  scale = 0.45 + 0.12 * size_bin + rng.uniform(0, 0.1, n)
  cx, cy = scene.jitter(rng, n, 0.3)
  # Rotation bins of 10 degrees over [-30, 30]: upright enough for glyphs to keep their identity.
  rot_bin = rng.integers(0, ATTRIBUTES["rotation"], n)
  angle = (rot_bin + rng.uniform(0, 1, n) - ATTRIBUTES["rotation"] / 2) * np.deg2rad(10)
  canvas.draw(atlas, idx, rgb, scale=scale, angle=angle, cx=cx, cy=cy, where=obj)
  off = first - np.stack([cx, cy], 1)
  relation = np.where(
    np.abs(off[:, 0]) >= np.abs(off[:, 1]), (off[:, 0] > 0).astype(int), 2 + (off[:, 1] > 0)
  )
  labels["category"] = np.where(obj, category, labels["category"])
  labels["count"] = np.where(obj, distractors, labels["count"])
  labels["position"] = np.where(
    obj, np.digitize(cy, [-0.1, 0.1]) * 3 + np.digitize(cx, [-0.1, 0.1]), IGNORE
  )
  labels["size"] = np.where(obj, size_bin, IGNORE)
  labels["rotation"] = np.where(obj, rot_bin, IGNORE)
  labels["relation"] = np.where(obj & (distractors > 0), relation, IGNORE)

  # Grid scenes: k copies of one shape in one colour on distinct cells of a 3x3 grid.
  count = rng.integers(1, ATTRIBUTES["count"] + 1, n)
  shape = rng.integers(0, len(PRETRAIN_SHAPES), n)
  cells = np.argsort(rng.uniform(size=(n, 9)), axis=1)
  for k in range(ATTRIBUTES["count"]):
    cell = cells[:, k]
    canvas.draw(
      shapes,
      shape,
      rgb,
      scale=rng.uniform(0.26, 0.32, n),
      angle=rng.uniform(-0.5, 0.5, n),
      cx=(cell % 3 - 1) * 0.64,
      cy=(cell // 3 - 1) * 0.64,
      where=grid & (count > k),
    )
  labels["category"] = np.where(grid, num_chars + shape, labels["category"])
  labels["count"] = np.where(grid, count - 1, labels["count"])
  return canvas.finish(), {k: np.asarray(v, np.int32) for k, v in labels.items()}
