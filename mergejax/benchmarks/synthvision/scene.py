"""Procedural RGB scenes: coloured masks (see `render`) over procedural backgrounds.

Everything is vectorized over a batch and drawn from an explicit `np.random.Generator`, so a scene
is a pure function of the generator's state. Scenes are rendered at `supersample` times the output
size and box-filtered down, which anti-aliases edges without a rendering library. Coordinates: the
canvas spans [-1, 1] on both axes (x to the right, y downwards).
"""

import numpy as np

from mergejax.benchmarks.synthvision import render

# Background textures: each maps (rng, n, grid) -> pattern in [0, 1], shape [n, size, size].
TEXTURES = (
  "solid",
  "gradient",
  "grating",
  "stripes",
  "checker",
  "dots",
  "noise",
  "plaid",
  "rings",
  "zigzag",
)


def texture(
  kind: str, rng: np.random.Generator, n: int, size: int, freq: tuple[float, float] = (1.5, 3.0)
) -> np.ndarray:
  """Draws `n` random instances of a background pattern (random orientation, phase, frequency).

  Args:
    kind: one of `TEXTURES`.
    rng: the generator (its state advances).
    n: number of patterns.
    size: side in pixels.
    freq: range of the spatial frequency, in cycles per canvas width.

  Returns:
    float32 [n, size, size] in [0, 1].
  """
  x, y = render.grid(size)
  x, y = x[None], y[None]
  col = lambda v: np.asarray(v, np.float32)[:, None, None]
  phi = col(rng.uniform(0, np.pi, n))
  phase = col(rng.uniform(0, 2 * np.pi, n))
  along = np.cos(phi) * x + np.sin(phi) * y
  across = -np.sin(phi) * x + np.cos(phi) * y
  freq = col(rng.uniform(*freq, n))
  if kind == "solid":
    out = np.zeros((n, size, size))
  elif kind == "gradient":
    out = (along + 1.5) / 3
  elif kind == "grating":
    out = 0.5 + 0.5 * np.sin(np.pi * freq * along + phase)
  elif kind == "stripes":
    out = (np.sin(np.pi * freq * along + phase) > 0).astype(np.float32)
  elif kind == "checker":
    out = (np.sin(np.pi * freq * along + phase) * np.sin(np.pi * freq * across) > 0).astype(
      np.float32
    )
  elif kind == "dots":
    period = 2 / (freq + 1)
    du = (along - phase / 10) % period - period / 2
    dv = (across + phase / 10) % period - period / 2
    out = (du**2 + dv**2 < (0.3 * period) ** 2).astype(np.float32)
  elif kind == "noise":
    coarse = rng.uniform(0, 1, (n, 5, 5))
    out = render.upsample(coarse, size)
    out = (out - out.min((1, 2), keepdims=True)) / (np.ptp(out, (1, 2), keepdims=True) + 1e-6)
  elif kind == "plaid":
    out = 0.25 * (2 + np.sin(np.pi * freq * along + phase) + np.sin(np.pi * freq * across - phase))
  elif kind == "rings":
    ox, oy = col(rng.uniform(-0.6, 0.6, n)), col(rng.uniform(-0.6, 0.6, n))
    r = np.sqrt((x - ox) ** 2 + (y - oy) ** 2)
    out = 0.5 + 0.5 * np.sin(np.pi * 1.5 * freq * r + phase)
  elif kind == "zigzag":
    tri = np.abs(((across * freq * 1.5 + phase) % 2) - 1)
    out = (np.sin(np.pi * freq * (along + 0.35 * tri)) > 0).astype(np.float32)
  else:
    raise ValueError(f"Unknown texture {kind!r}; known: {TEXTURES}.")
  return np.broadcast_to(out, (n, size, size)).astype(np.float32)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorized HSV -> RGB (all in [0, 1]); returns [..., 3] float32."""
  from matplotlib.colors import hsv_to_rgb as _hsv_to_rgb

  return _hsv_to_rgb(np.stack([h % 1.0, s, v], -1)).astype(np.float32)


def random_colours(rng: np.random.Generator, n: int, *, value=(0.55, 1.0), sat=(0.5, 1.0)):
  """Returns (rgb [n, 3], hue [n]) of random saturated colours."""
  hue = rng.uniform(0, 1, n)
  rgb = hsv_to_rgb(hue, rng.uniform(*sat, n), rng.uniform(*value, n))
  return rgb, hue


def backgrounds(
  rng: np.random.Generator,
  kinds: np.ndarray,
  size: int,
  names=TEXTURES,
  contrast: tuple[float, float] = (0.6, 1.0),
  freq: tuple[float, float] = (1.5, 3.0),
) -> np.ndarray:
  """Coloured backgrounds: pattern p mixes two dim colours as c1 (1 - p) + c2 p.

  c2 = c1 + m (c - c1) for a random colour c and m drawn from `contrast`: a low contrast keeps
  the texture a mild nuisance behind objects, a high one makes it the content.

  Args:
    rng: the generator.
    kinds: [n] indices into `names`.
    size: side in pixels.
    names: texture names.
    contrast: range of the mixing weight m.
    freq: range of the patterns' spatial frequency (cycles per canvas width).

  Returns:
    float32 [n, size, size, 3].
  """
  n = len(kinds)
  pattern = np.zeros((n, size, size), np.float32)
  for k, name in enumerate(names):
    sel = np.flatnonzero(kinds == k)
    if len(sel):
      pattern[sel] = texture(name, rng, len(sel), size, freq)
  c1, _ = random_colours(rng, n, value=(0.05, 0.45), sat=(0.0, 0.8))
  c, _ = random_colours(rng, n, value=(0.3, 0.7), sat=(0.0, 0.8))
  m = rng.uniform(*contrast, (n, 1))
  c2 = c1 + m * (c - c1)
  p = pattern[..., None]
  return c1[:, None, None] * (1 - p) + c2[:, None, None] * p


def finish(rng: np.random.Generator, canvas: np.ndarray, supersample: int) -> np.ndarray:
  """Box-filters the supersampled canvas down, jitters contrast/brightness, adds noise.

  Args:
    rng: the generator.
    canvas: float [n, H, W, 3] with H = W = size * supersample.
    supersample: the box filter's side.

  Returns:
    uint8 [n, H / supersample, W / supersample, 3].
  """
  img = render.box_down(canvas, supersample)
  n = len(img)
  contrast = rng.uniform(0.75, 1.15, (n, 1, 1, 1))
  bright = rng.uniform(-0.08, 0.08, (n, 1, 1, 1))
  mean = img.mean(axis=(1, 2, 3), keepdims=True)
  img = (img - mean) * contrast + mean + bright + rng.normal(0, 0.02, img.shape)
  return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


class Scene:
  """A batch of supersampled canvases being painted."""

  def __init__(self, rng: np.random.Generator, n: int, size: int, supersample: int):
    self.rng, self.n, self.supersample = rng, n, supersample
    self.side = size * supersample
    self.canvas = np.zeros((n, self.side, self.side, 3), np.float32)

  def background(
    self, kinds: np.ndarray, names=TEXTURES, contrast=(0.1, 0.35), freq=(1.5, 3.0)
  ) -> None:
    """Paints backgrounds; the default low contrast keeps textures behind objects mild."""
    self.canvas = backgrounds(self.rng, kinds, self.side, names, contrast, freq)

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
    return finish(self.rng, self.canvas, self.supersample)


def jitter(rng, n, amount):
  """Centres within `amount` of the canvas centre (small: the models are not translation
  invariant, so large position variation would need far more data than the tasks have)."""
  return rng.uniform(-amount, amount, n), rng.uniform(-amount, amount, n)


def hue_colours(rng, hue_centres, spread=0.03):
  """Bright colours around the given hues (for colour-labelled objects)."""
  n = len(hue_centres)
  hue = hue_centres + rng.uniform(-spread, spread, n)
  return hsv_to_rgb(hue, rng.uniform(0.75, 1.0, n), rng.uniform(0.8, 1.0, n))
