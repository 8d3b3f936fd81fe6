"""The synthvision tasks: a broad pre-training mixture and downstream tasks that are different
problems, each with its own label set and sub-domain.

Pre-training (like CLIP's broad pre-training, here supervised on several attributes at once):
scenes of one to four objects (shapes and glyphs of the pre-training fonts) on procedural
backgrounds, labelled with the primary object's category (36 glyphs + 10 shapes), colour, position,
size and rotation, the background's texture and the number of objects.

Downstream tasks (`TASKS`): each draws its own sub-domain, some of it unseen in pre-training
(handwritten digits, lowercase letters in held-out fonts, held-out shapes and textures, larger
counts, two-object relations, colour x shape conjunctions, orientation).

GENERATOR_VERSION names the generators' behaviour in the pool's cache key: bump it whenever a
change alters the images or labels drawn from a seed.

Every generator is a pure function of a `np.random.Generator` and a balanced label array; which
seed feeds it is decided in `mergejax.benchmarks.synthvision.data` (one seed per task and split).
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from mergejax.benchmarks.synthvision import render

GENERATOR_VERSION = 6

# Fonts: pre-training sees glyphs in these; the letters task uses only the held-out ones.
PRETRAIN_FONTS = (
  "DejaVuSans",
  "DejaVuSans-Bold",
  "DejaVuSans-Oblique",
  "DejaVuSansMono",
  "DejaVuSerif",
  "DejaVuSerif-Bold",
)
HELDOUT_FONTS = (
  "STIXGeneral",
  "STIXGeneralBol",
  "STIXGeneralItalic",
  "cmr10",
  "cmss10",
  "cmtt10",
  "cmb10",
  "cmti10",
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
PLAIN_TEXTURES = ("solid", "gradient", "noise")

# Pre-training attributes and their number of classes (the pre-training heads' sizes). A label
# of -1 means "not defined for this scene" and is left out of the loss.
ATTRIBUTES = {
  "category": len(PRETRAIN_CHARS) + len(PRETRAIN_SHAPES),
  "colour": 8,
  "background": len(render.TEXTURES),
  "count": 6,
  "position": 9,
  "size": 3,
  "rotation": 6,
  "relation": 4,
}
IGNORE = -1


@dataclasses.dataclass(frozen=True)
class Task:
  """A downstream task: its class names and its generator.

  Attributes:
    name: task name.
    classes: class names; labels are indices into this tuple.
    generate: `generate(rng, labels, size, supersample, part) -> uint8 [n, size, size, 3]`;
      `part` ("train" / "val" / "test") lets a task draw from a disjoint source pool per split.
  """

  name: str
  classes: tuple[str, ...]
  generate: Callable[..., np.ndarray]

  @property
  def num_classes(self) -> int:
    return len(self.classes)


class _Scene:
  """A batch of supersampled canvases being painted."""

  def __init__(self, rng: np.random.Generator, n: int, size: int, supersample: int):
    self.rng, self.n, self.supersample = rng, n, supersample
    self.side = size * supersample
    self.canvas = np.zeros((n, self.side, self.side, 3), np.float32)

  def background(
    self, kinds: np.ndarray, names=render.TEXTURES, contrast=(0.1, 0.35), freq=(1.5, 3.0)
  ) -> None:
    """Paints backgrounds; the default low contrast keeps textures behind objects mild."""
    self.canvas = render.backgrounds(self.rng, kinds, self.side, names, contrast, freq)

  def draw(self, atlas, idx, rgb, *, scale, angle, cx, cy, aspect=None, where=None) -> None:
    """Paints one object per example (only where `where` is True, if given).

    The parameters are drawn for every example whether painted or not, so the random stream,
    and hence every other attribute, does not depend on which examples are painted.
    """
    self.canvas = render.paint(
      self.canvas,
      atlas,
      idx,
      rgb,
      scale=scale,
      angle=angle,
      cx=cx,
      cy=cy,
      aspect=aspect,
      visible=where,
    )

  def finish(self) -> np.ndarray:
    return render.finish(self.rng, self.canvas, self.supersample)


def _jitter(rng, n, amount):
  """Centres within `amount` of the canvas centre (small: the models are not translation
  invariant, so large position variation would need far more data than the tasks have)."""
  return rng.uniform(-amount, amount, n), rng.uniform(-amount, amount, n)


def _inside(rng, scale, extent=0.95):
  """Centres that keep an object of half-extent `scale` inside the canvas."""
  lim = np.maximum(extent - scale, 0.0)
  return rng.uniform(-lim, lim), rng.uniform(-lim, lim)


def _hue_colours(rng, hue_centres, jitter=0.03):
  """Bright colours around the given hues (for colour-labelled objects)."""
  n = len(hue_centres)
  hue = hue_centres + rng.uniform(-jitter, jitter, n)
  return render.hsv_to_rgb(hue, rng.uniform(0.75, 1.0, n), rng.uniform(0.8, 1.0, n))


def _glyphs_and_shapes():
  glyphs = render.glyph_atlas(PRETRAIN_FONTS, PRETRAIN_CHARS)  # [F, C, A, A]
  shapes = render.shape_atlas(PRETRAIN_SHAPES)
  return np.concatenate([glyphs.reshape(-1, *glyphs.shape[2:]), shapes]), glyphs.shape[:2]


# ------------------------------------------------------------------------------ pre-training
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
  atlas, (num_fonts, num_chars) = _glyphs_and_shapes()
  shapes = render.shape_atlas(PRETRAIN_SHAPES)
  scene = _Scene(rng, n, size, supersample)
  bg = rng.integers(0, len(render.TEXTURES), n)
  scene.background(bg, render.TEXTURES, contrast=(0.15, 0.9))
  grid = rng.uniform(size=n) < grid_fraction
  obj = ~grid
  labels = {k: np.full(n, IGNORE, np.int64) for k in ATTRIBUTES}
  labels["background"] = bg
  colour = rng.integers(0, ATTRIBUTES["colour"], n)
  labels["colour"] = colour
  rgb = _hue_colours(rng, colour / ATTRIBUTES["colour"], jitter=0.5 / ATTRIBUTES["colour"])

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
    d_rgb, _ = render.random_colours(rng, n)
    scene.draw(
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
  cx, cy = _jitter(rng, n, 0.3)
  # Rotation bins of 10 degrees over [-30, 30]: upright enough for glyphs to keep their identity.
  rot_bin = rng.integers(0, ATTRIBUTES["rotation"], n)
  angle = (rot_bin + rng.uniform(0, 1, n) - ATTRIBUTES["rotation"] / 2) * np.deg2rad(10)
  scene.draw(atlas, idx, rgb, scale=scale, angle=angle, cx=cx, cy=cy, where=obj)
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
    scene.draw(
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
  return scene.finish(), {k: np.asarray(v, np.int32) for k, v in labels.items()}


# ------------------------------------------------------------------------------ tasks
_DIGITS_PARTITION = {"train": (0.0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}


def digits_partition(part: str) -> np.ndarray:
  """Indices of scikit-learn's handwritten digits that split `part` draws from.

  A fixed partition (its own seed, independent of the data seed), so no handwritten sample is
  drawn in two splits.
  """
  num = len(render.handwritten_digits()[1])
  perm = np.random.default_rng(20240601).permutation(num)
  lo, hi = _DIGITS_PARTITION[part]
  return perm[int(lo * num) : int(hi * num)]


def _digits(rng, labels, size, supersample, part):
  masks, digit = render.handwritten_digits()
  pool = digits_partition(part)
  idx = np.empty(len(labels), np.int64)
  for c in range(10):
    sel = np.flatnonzero(labels == c)
    idx[sel] = rng.choice(pool[digit[pool] == c], len(sel))
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  scale = rng.uniform(0.7, 0.85, n)
  cx, cy = _jitter(rng, n, 0.1)
  rgb, _ = render.random_colours(rng, n, value=(0.7, 1.0))
  scene.draw(masks, idx, rgb, scale=scale, angle=rng.uniform(-0.15, 0.15, n), cx=cx, cy=cy)
  return scene.finish()


LETTERS = "abdefghmrt"


def _letters(rng, labels, size, supersample, part):
  del part
  atlas = render.glyph_atlas(HELDOUT_FONTS, LETTERS)
  n = len(labels)
  font = rng.integers(0, len(HELDOUT_FONTS), n)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  scale = rng.uniform(0.55, 0.75, n)
  cx, cy = _jitter(rng, n, 0.15)
  rgb, _ = render.random_colours(rng, n, value=(0.7, 1.0))
  flat = atlas.reshape(-1, *atlas.shape[2:])
  scene.draw(
    flat,
    font * len(LETTERS) + labels,
    rgb,
    scale=scale,
    angle=rng.uniform(-0.25, 0.25, n),
    cx=cx,
    cy=cy,
  )
  return scene.finish()


SHAPE_CLASSES = ("circle", "square", "triangle", "star", "heart", "crescent", "arrow", "tee")
_TEXTURED = ("grating", "stripes", "checker", "dots", "plaid", "rings", "zigzag")


def _shapes(rng, labels, size, supersample, part):
  del part
  atlas = render.shape_atlas(SHAPE_CLASSES)
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, len(_TEXTURED), n), _TEXTURED)
  scale = rng.uniform(0.55, 0.8, n)
  cx, cy = _jitter(rng, n, 0.15)
  rgb, _ = render.random_colours(rng, n, value=(0.8, 1.0))
  scene.draw(atlas, labels, rgb, scale=scale, angle=rng.uniform(-0.5, 0.5, n), cx=cx, cy=cy)
  return scene.finish()


# Seen in pre-training's background attribute: solid, gradient, checker, dots, noise; new:
# stripes (a square-wave grating), rings, zigzag.
TEXTURE_CLASSES = ("solid", "gradient", "stripes", "checker", "dots", "noise", "rings", "zigzag")


def _textures(rng, labels, size, supersample, part):
  del part
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  # Full-contrast patterns without objects (pre-training shows them dimmed, behind objects).
  scene.background(labels, TEXTURE_CLASSES, contrast=(0.7, 1.0))
  return scene.finish()


MAX_COUNT = 6
COUNT_SHAPES = ("heart", "crescent", "semicircle", "tee")  # Not in pre-training.


def _count(rng, labels, size, supersample, part):
  del part
  atlas = render.shape_atlas(COUNT_SHAPES)
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  # One held-out shape and one colour per image, on distinct cells of a 3x3 grid.
  shape = rng.integers(0, len(COUNT_SHAPES), n)
  rgb, _ = render.random_colours(rng, n, value=(0.8, 1.0))
  cells = np.argsort(rng.uniform(size=(n, 9)), axis=1)
  for k in range(MAX_COUNT):
    cell = cells[:, k]
    cx = (cell % 3 - 1) * 0.64 + rng.uniform(-0.04, 0.04, n)
    cy = (cell // 3 - 1) * 0.64 + rng.uniform(-0.04, 0.04, n)
    scene.draw(
      atlas,
      shape,
      rgb,
      scale=rng.uniform(0.3, 0.34, n),
      angle=rng.uniform(-0.3, 0.3, n),
      cx=cx,
      cy=cy,
      where=labels >= k,
    )
  return scene.finish()


RELATIONS = ("left", "right", "above", "below")
RELATION_SHAPES = ("circle", "plus")  # Where the circle is, relative to the plus.


def _relation(rng, labels, size, supersample, part):
  del part
  atlas = render.shape_atlas(RELATION_SHAPES)
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  # Offset of the circle from the plus: mostly along the labelled axis.
  direction = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)], np.float32)[labels]
  dist = rng.uniform(0.9, 1.2, n)
  side = rng.uniform(-0.3, 0.3, n)
  off = direction * dist[:, None] + direction[:, ::-1] * side[:, None]
  mid = np.stack(_jitter(rng, n, 0.12), 1)
  plus, circle = mid - off / 2, mid + off / 2
  for shape, centre in ((1, plus), (0, circle)):
    rgb, _ = render.random_colours(rng, n, value=(0.75, 1.0))
    scene.draw(
      atlas,
      np.full(n, shape),
      rgb,
      scale=rng.uniform(0.3, 0.38, n),
      angle=rng.uniform(-0.3, 0.3, n),
      cx=centre[:, 0],
      cy=centre[:, 1],
    )
  return scene.finish()


CONJ_COLOURS = {"red": 0.0, "green": 1 / 3, "blue": 2 / 3}
CONJ_SHAPES = ("circle", "triangle", "square")


def _conjunction(rng, labels, size, supersample, part):
  del part
  atlas = render.shape_atlas(CONJ_SHAPES)
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  hues = np.array(list(CONJ_COLOURS.values()))
  # A smaller distractor of a random colour and shape in a random corner, drawn first.
  scale = rng.uniform(0.15, 0.2, n)
  cx, cy = (0.72 * rng.choice([-1.0, 1.0], n) for _ in range(2))
  scene.draw(
    atlas,
    rng.integers(0, 3, n),
    _hue_colours(rng, hues[rng.integers(0, 3, n)]),
    scale=scale,
    angle=rng.uniform(-0.5, 0.5, n),
    cx=cx,
    cy=cy,
  )
  scale = rng.uniform(0.45, 0.65, n)
  cx, cy = _jitter(rng, n, 0.12)
  scene.draw(
    atlas,
    labels % 3,
    _hue_colours(rng, hues[labels // 3]),
    scale=scale,
    angle=rng.uniform(-0.5, 0.5, n),
    cx=cx,
    cy=cy,
  )
  return scene.finish()


ORIENTATION_BINS = 8


def _orientation(rng, labels, size, supersample, part):
  del part
  atlas = render.shape_atlas(("bar",))
  n = len(labels)
  scene = _Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  angle = (labels + rng.uniform(0.15, 0.85, n)) * (np.pi / ORIENTATION_BINS)
  scale = rng.uniform(0.55, 0.8, n)
  cx, cy = _jitter(rng, n, 0.15)
  rgb, _ = render.random_colours(rng, n, value=(0.75, 1.0))
  scene.draw(
    atlas,
    np.zeros(n, np.int64),
    rgb,
    scale=scale,
    angle=angle,
    cx=cx,
    cy=cy,
    aspect=rng.uniform(0.8, 1.0, n),
  )
  return scene.finish()


TASKS = {
  t.name: t
  for t in (
    Task("digits", tuple("0123456789"), _digits),
    Task("letters", tuple(LETTERS), _letters),
    Task("shapes", SHAPE_CLASSES, _shapes),
    Task("textures", TEXTURE_CLASSES, _textures),
    Task("count", tuple(str(k) for k in range(1, MAX_COUNT + 1)), _count),
    Task("relation", RELATIONS, _relation),
    Task(
      "conjunction",
      tuple(f"{c} {s}" for c in CONJ_COLOURS for s in CONJ_SHAPES),
      _conjunction,
    ),
    Task(
      "orientation",
      tuple(f"{round(180 * k / ORIENTATION_BINS)}deg" for k in range(ORIENTATION_BINS)),
      _orientation,
    ),
  )
}
DEFAULT_TASKS = tuple(TASKS)
