"""The synthvision downstream tasks: different problems, each with its own label set and
sub-domain (the pre-training mixture is in `pretraining`).

`TASKS`: each draws its own sub-domain: handwritten digits (never in
pre-training), lowercase letters in held-out fonts, shapes (half unseen) on full textures,
full-contrast textures without objects, counts of unseen shapes, the relation of a circle to a
plus, colour x shape conjunctions with a distractor, and the orientation of a bar over 180°.

Every generator is a pure function of a `np.random.Generator` and a balanced label array; which
seed feeds it is decided in `mergejax.benchmarks.synthvision.data` (one seed per task and split).
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from mergejax.benchmarks.synthvision import render
from mergejax.benchmarks.synthvision import scene as scene_lib

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
PLAIN_TEXTURES = ("solid", "gradient", "noise")


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
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  scale = rng.uniform(0.7, 0.85, n)
  cx, cy = scene_lib.jitter(rng, n, 0.1)
  rgb, _ = scene_lib.random_colours(rng, n, value=(0.7, 1.0))
  scene.draw(masks, idx, rgb, scale=scale, angle=rng.uniform(-0.15, 0.15, n), cx=cx, cy=cy)
  return scene.finish()


LETTERS = "abdefghmrt"


def _letters(rng, labels, size, supersample, part):
  del part
  atlas = render.glyph_atlas(HELDOUT_FONTS, LETTERS)
  n = len(labels)
  font = rng.integers(0, len(HELDOUT_FONTS), n)
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  scale = rng.uniform(0.55, 0.75, n)
  cx, cy = scene_lib.jitter(rng, n, 0.15)
  rgb, _ = scene_lib.random_colours(rng, n, value=(0.7, 1.0))
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
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, len(_TEXTURED), n), _TEXTURED)
  scale = rng.uniform(0.55, 0.8, n)
  cx, cy = scene_lib.jitter(rng, n, 0.15)
  rgb, _ = scene_lib.random_colours(rng, n, value=(0.8, 1.0))
  scene.draw(atlas, labels, rgb, scale=scale, angle=rng.uniform(-0.5, 0.5, n), cx=cx, cy=cy)
  return scene.finish()


# All are pre-training backgrounds too, but dimmed behind objects there.
TEXTURE_CLASSES = ("solid", "gradient", "stripes", "checker", "dots", "noise", "rings", "zigzag")


def _textures(rng, labels, size, supersample, part):
  del part
  n = len(labels)
  scene = scene_lib.Scene(rng, n, size, supersample)
  # Full-contrast patterns without objects (pre-training shows them dimmed, behind objects).
  scene.background(labels, TEXTURE_CLASSES, contrast=(0.7, 1.0))
  return scene.finish()


MAX_COUNT = 6
COUNT_SHAPES = ("heart", "crescent", "semicircle", "tee")  # Not in pre-training.


def _count(rng, labels, size, supersample, part):
  del part
  atlas = render.shape_atlas(COUNT_SHAPES)
  n = len(labels)
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  # One held-out shape and one colour per image, on distinct cells of a 3x3 grid.
  shape = rng.integers(0, len(COUNT_SHAPES), n)
  rgb, _ = scene_lib.random_colours(rng, n, value=(0.8, 1.0))
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
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  # Offset of the circle from the plus: mostly along the labelled axis.
  direction = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)], np.float32)[labels]
  dist = rng.uniform(0.9, 1.2, n)
  side = rng.uniform(-0.3, 0.3, n)
  off = direction * dist[:, None] + direction[:, ::-1] * side[:, None]
  mid = np.stack(scene_lib.jitter(rng, n, 0.12), 1)
  plus, circle = mid - off / 2, mid + off / 2
  for shape, centre in ((1, plus), (0, circle)):
    rgb, _ = scene_lib.random_colours(rng, n, value=(0.75, 1.0))
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
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  hues = np.array(list(CONJ_COLOURS.values()))
  # A smaller distractor of a random colour and shape in a random corner, drawn first.
  scale = rng.uniform(0.15, 0.2, n)
  cx, cy = (0.72 * rng.choice([-1.0, 1.0], n) for _ in range(2))
  scene.draw(
    atlas,
    rng.integers(0, 3, n),
    scene_lib.hue_colours(rng, hues[rng.integers(0, 3, n)]),
    scale=scale,
    angle=rng.uniform(-0.5, 0.5, n),
    cx=cx,
    cy=cy,
  )
  scale = rng.uniform(0.45, 0.65, n)
  cx, cy = scene_lib.jitter(rng, n, 0.12)
  scene.draw(
    atlas,
    labels % 3,
    scene_lib.hue_colours(rng, hues[labels // 3]),
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
  scene = scene_lib.Scene(rng, n, size, supersample)
  scene.background(rng.integers(0, 3, n), PLAIN_TEXTURES)
  angle = (labels + rng.uniform(0.15, 0.85, n)) * (np.pi / ORIENTATION_BINS)
  scale = rng.uniform(0.55, 0.8, n)
  cx, cy = scene_lib.jitter(rng, n, 0.15)
  rgb, _ = scene_lib.random_colours(rng, n, value=(0.75, 1.0))
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
