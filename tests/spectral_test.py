"""Spectral rules (TSV-M, TSV-C, ISO-C, ISO-CTS) and MagMax: hand-worked cases, NumPy references,
layout (transpose) behaviour, properties and validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mergejax import rules
from mergejax.rules import spec, spectral

SPECTRAL = ("tsv_m", "iso_c", "iso_cts")
ALL = (*SPECTRAL, "tsv_c", "magmax")


def _tree(seed, shapes, dtype=np.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


# ISO-CTS needs r ≥ ~T / (1 − 0.8) for a non-empty task subspace: 12 and 10 here.
SHAPES = {"tall": (20, 12), "wide": (10, 16), "bias": (5,), "conv": (2, 3, 6), "scalar": ()}


def _models(num_experts, dtype=np.float32, shapes=SHAPES):
  base = _tree(0, shapes, dtype)
  experts = [
    jax.tree.map(lambda b, d: (b + d).astype(dtype), base, _tree(t + 1, shapes, scale=0.1))
    for t in range(num_experts)
  ]
  return base, experts


def _np(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


# ------------------------------------------------------------------ NumPy references (torch layout)
def _np_polar(x):
  p, _, qt = np.linalg.svd(x, full_matrices=False)
  return p @ qt


def np_tsv(deltas):
  t, m, n = deltas.shape
  k = int(min(m, n) * (1.0 / t))
  out = [np.linalg.svd(d, full_matrices=False) for d in deltas]
  u = np.concatenate([o[0][:, :k] for o in out], axis=1)
  s = np.concatenate([o[1][:k] for o in out])
  vt = np.concatenate([o[2][:k] for o in out], axis=0)
  if k == 0:
    return np.zeros((m, n))
  return _np_polar(u) @ np.diag(s) @ _np_polar(vt)


def np_iso_c(deltas):
  u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
  return s.mean() * u @ vt


def np_iso_cts(deltas, fraction=0.8):
  """Torch layout: the common subspace is removed from the rows (outputs)."""
  t, m, n = deltas.shape
  r = min(m, n)
  c = int(r * fraction)
  c = r - round((r - c) / t) * t
  per = (r - c) // t
  u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
  us, ss, vts = [u[:, :c]], [s[:c]], [vt[:c]]
  for d in deltas:
    pu, ps, pvt = np.linalg.svd(d - u[:, :c] @ u[:, :c].T @ d, full_matrices=False)
    us.append(pu[:, :per])
    ss.append(ps[:per])
    vts.append(pvt[:per])
  s_all = np.concatenate(ss)
  return s_all.mean() * _np_polar(np.concatenate(us, 1)) @ _np_polar(np.concatenate(vts, 0))


def np_rule(rule, base, experts, scale, transpose=False, non_matrix="mean"):
  """θ0 + α Δ per leaf; 2-D leaves are matrices (`transpose`: given as flax [in, out])."""
  base, experts = _np(base), [_np(e) for e in experts]
  out = {}
  for k, b in base.items():
    taus = np.stack([e[k] - b for e in experts])
    if rule == "magmax":
      best = taus[0]
      for tau in taus[1:]:
        best = np.where(np.abs(tau) >= np.abs(best), tau, best)
      out[k] = b + scale * best
    elif b.ndim == 2:
      d = np.swapaxes(taus, 1, 2) if transpose else taus
      delta = {"tsv_m": np_tsv, "iso_c": np_iso_c, "iso_cts": np_iso_cts}[rule](d)
      out[k] = b + scale * (delta.T if transpose else delta)
    else:
      out[k] = b + scale * (taus.mean(0) if non_matrix == "mean" else taus.sum(0))
  return out


def _close(got, expected, atol=2e-5):
  for k in expected:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), expected[k], atol=atol, err_msg=k)


# ------------------------------------------------------------------------------ hand-worked cases
class HandWorkedTest(chex.TestCase):
  def test_tsv_m_two_rank_one_tasks(self):
    # Δ1 = 2 e1 e1ᵀ, Δ2 = u2 e2ᵀ with u2 at 60°: k = ⌊2/2⌋ = 1. U = [e1, u2] = [[1, c], [0, s]],
    # Σ = (2, 1), V = I. The nearest rotation to M = [[a, b], [c', d]] is
    # [[a+d, b−c'], [c'−b, a+d]] / ‖(a+d, c'−b)‖, so Δ = R diag(2, 1).
    c, s = 0.5, np.sqrt(3) / 2
    d1 = np.array([[2.0, 0.0], [0.0, 0.0]])
    d2 = np.array([[0.0, c], [0.0, s]])
    r = np.array([[1 + s, c], [-c, 1 + s]]) / np.hypot(1 + s, c)
    expected = r @ np.diag([2.0, 1.0])
    base = {"w": jnp.zeros((2, 2))}
    experts = [{"w": jnp.asarray(d, jnp.float32)} for d in (d1, d2)]
    out = rules.tsv_merging(base, experts, scale=1.0)
    np.testing.assert_allclose(out["w"], expected, atol=1e-6)
    # α scales the update; Δt themselves are rank-1 so each is its own truncation.
    out = rules.tsv_merging(base, experts, scale=0.5)
    np.testing.assert_allclose(out["w"], 0.5 * expected, atol=1e-6)

  def test_tsv_m_one_rank_one_task_is_the_task(self):
    a, b = np.array([1.0, -2.0, 2.0]), np.array([3.0, 0.0, 4.0, 0.0])
    base = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    expert = {"w": jnp.asarray(1.0 + np.outer(a, b), jnp.float32), "b": jnp.arange(4.0)}
    out = rules.tsv_merging(base, [expert], scale=1.0)
    chex.assert_trees_all_close(out, expert, atol=1e-5)

  def test_tsv_m_orthogonal_tasks_is_task_arithmetic(self):
    # Tasks on disjoint row and column blocks, rank ≤ k = ⌊6/2⌋ = 3 each: U and V are already
    # orthonormal, so TSV-M is the plain sum (task arithmetic with λ = α).
    rng = np.random.default_rng(0)
    w1, w2 = np.zeros((8, 6)), np.zeros((8, 6))
    w1[:4, :3] = rng.standard_normal((4, 3))
    w2[4:, 3:] = rng.standard_normal((4, 3))
    base = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), "b": jnp.zeros(3)}
    experts = [
      {"w": base["w"] + jnp.asarray(w, jnp.float32), "b": jnp.asarray(rng.standard_normal(3))}
      for w in (w1, w2)
    ]
    out = rules.tsv_merging(base, experts, scale=0.7, non_matrix="sum")
    chex.assert_trees_all_close(out, rules.task_arithmetic(base, experts, scale=0.7), atol=1e-5)
    # Default: the non-matrix leaf gets the mean, as the reference does.
    out = rules.tsv_merging(base, experts, scale=0.7)
    np.testing.assert_allclose(out["b"], 0.7 * (experts[0]["b"] + experts[1]["b"]) / 2, atol=1e-6)

  def test_tsv_m_rank_below_tasks_leaves_base(self):
    # r = 2 < T = 3: k = 0 singular triplets per task, as in the reference.
    base, experts = _models(3, shapes={"head": (2, 8)})
    out = rules.tsv_merging(base, experts)
    np.testing.assert_array_equal(out["head"], base["head"])

  def test_iso_c_2x2(self):
    # Σ Δt = [[0, 3], [1, 0]]: σ = (3, 1), σ̄ = 2, U Vᵀ = [[0, 1], [1, 0]] -> Δ = 2 U Vᵀ.
    base = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    experts = [
      {"w": jnp.array([[1.0, 2.0], [1.0, 1.0]]), "b": jnp.array([1.0, 0.0])},
      {"w": jnp.array([[1.0, 3.0], [2.0, 1.0]]), "b": jnp.array([3.0, 2.0])},
    ]
    out = rules.iso_c(base, experts, scale=0.5)
    np.testing.assert_allclose(out["w"], [[1.0, 2.0], [2.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(out["b"], [1.0, 0.5], atol=1e-6)  # 0.5 · mean τ.

  def test_magmax_ties_in_magnitude_and_sign(self):
    taus = [[1.0, -2.0, 3.0, -1.0, 2.0], [-1.0, 2.0, -4.0, 1.0, 0.5], [1.0, 1.0, 4.0, -1.0, -2.0]]
    base = {"w": jnp.full(5, 10.0)}
    experts = [{"w": 10.0 + jnp.asarray(t)} for t in taus]
    # Per entry: all tie -> last (1); -2 vs 2 -> later 2, then 1 loses; 3, -4, 4 -> last 4;
    # all tie -> last (-1); 2 vs -2 tie -> later -2.
    out = rules.magmax(base, experts, scale=0.5)
    np.testing.assert_array_equal(out["w"], 10.0 + 0.5 * np.array([1.0, 2.0, 4.0, -1.0, -2.0]))
    self.assertEqual(rules.hparams_of("magmax"), {"scale": 0.5})

  def test_iso_cts_sizes(self):
    self.assertEqual(spectral.iso_cts_sizes(384, 8, 0.8), (304, 10))  # 307 -> 77 -> 80 -> 304.
    self.assertEqual(spectral.iso_cts_sizes(10, 8, 0.8), (10, 0))
    self.assertEqual(spectral.iso_cts_sizes(12, 2, 0.5), (6, 3))


# ------------------------------------------------------------------------------ NumPy references
class ReferenceTest(chex.TestCase):
  @parameterized.product(rule=(*SPECTRAL, "magmax"), num_experts=(1, 3, 4))
  def test_matches_numpy(self, rule, num_experts):
    base, experts = _models(num_experts)
    out = rules.merge(rule, base, experts, scale=0.8)
    _close(out, np_rule(rule, base, experts, 0.8, transpose=rule == "iso_cts"))

  def test_iso_cts_layouts(self):
    base, experts = _models(3)
    flip = lambda t: {k: (v.T if v.ndim == 2 else v) for k, v in t.items()}  # noqa: E731
    in_out = rules.iso_cts(flip(base), [flip(e) for e in experts])
    out_in = rules.iso_cts(base, experts, layout="torch")
    chex.assert_trees_all_close(flip(in_out), out_in, atol=2e-5)
    _close(out_in, np_rule("iso_cts", base, experts, 1.0))
    # On the same matrices the two layouts differ: ISO-CTS is not transpose-invariant.
    other = rules.iso_cts(base, experts, layout="flax")
    self.assertGreater(float(jnp.max(jnp.abs(other["tall"] - out_in["tall"]))), 1e-3)

  @parameterized.parameters("tsv_m", "iso_c")
  def test_transpose_invariant(self, rule):
    base, experts = _models(3)
    flip = lambda t: {k: (v.T if v.ndim == 2 else v) for k, v in t.items()}  # noqa: E731
    direct = rules.merge(rule, base, experts)
    flipped = rules.merge(rule, flip(base), [flip(e) for e in experts])
    chex.assert_trees_all_close(flip(flipped), direct, atol=2e-5)

  @parameterized.parameters("merge_leading", "merge_trailing")
  def test_higher_rank_leaves_as_matrices(self, matrices):
    base, experts = _models(3)
    out = rules.merge("tsv_m", base, experts, matrices=matrices)
    shape2 = (6, 6) if matrices == "merge_leading" else (2, 18)
    taus = np.stack([np.asarray(e["conv"] - base["conv"]).reshape(shape2) for e in experts])
    expected = np.asarray(base["conv"]) + np_tsv(taus).reshape(2, 3, 6)
    np.testing.assert_allclose(out["conv"], expected, atol=2e-5)
    # "2d" (default): the 3-D leaf is a non-matrix and gets the mean.
    out = rules.merge("tsv_m", base, experts)
    np.testing.assert_allclose(out["conv"], np_rule("tsv_m", base, experts, 1.0)["conv"], atol=1e-6)

  def test_tsv_c_is_rank_k_truncation(self):
    base, experts = _models(3)
    out = rules.merge("tsv_c", base, experts)
    self.assertEqual(out.num_tasks, 3)
    u, s, vt = out.parts["tall"]
    self.assertEqual((u.shape, s.shape, vt.shape), ((3, 20, 4), (3, 4), (3, 4, 12)))  # ⌊12/3⌋.
    for t, model in enumerate(rules.task_models(out, base, 3)):
      d = np.asarray(experts[t]["tall"] - base["tall"], np.float64)
      pu, ps, pvt = np.linalg.svd(d, full_matrices=False)
      expected = np.asarray(base["tall"]) + (pu[:, :4] * ps[:4]) @ pvt[:4]
      np.testing.assert_allclose(model["tall"], expected, atol=2e-5)
      np.testing.assert_allclose(model["bias"], experts[t]["bias"], atol=1e-6)
    # Full rank kept: each task model is its expert.
    out = rules.merge("tsv_c", base, experts, fraction=1.0)
    chex.assert_trees_all_close(rules.task_models(out, base, 3)[2], experts[2], atol=2e-5)

  def test_tsv_c_keeps_nothing_of_a_single_row_and_checks_the_rest(self):
    # A [1, n] matrix (a ViT's class token) keeps ⌊1/3⌋ = 0 triplets: empty parts, which the
    # finite checks (on by default) skip.
    base, experts = _models(3, shapes={"cls": (1, 16), "tall": (20, 12)})
    out = rules.merge("tsv_c", base, experts)
    self.assertEqual(out.parts["cls"][1].shape, (3, 0))
    model = rules.task_models(out, base, 3)[1]
    np.testing.assert_array_equal(model["cls"], base["cls"])


# ------------------------------------------------------------------------------ properties
class PropertyTest(chex.TestCase):
  @parameterized.parameters(*ALL)
  def test_bf16_in_bf16_out_float32_arithmetic(self, rule):
    base, experts = _models(3, dtype=jnp.bfloat16)
    out = rules.task_models(rules.merge(rule, base, experts), base, 3)[0]
    chex.assert_trees_all_equal_shapes_and_dtypes(out, base)
    # The same merge on the float32 values of the bf16 inputs, rounded once at the end.
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    ref = rules.task_models(rules.merge(rule, up(base), [up(e) for e in experts]), up(base), 3)[0]
    chex.assert_trees_all_close(
      up(out), jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), ref), atol=2e-2
    )

  @parameterized.parameters(*ALL)
  def test_deterministic_and_jit_agrees(self, rule):
    base, experts = _models(4)
    first = rules.task_models(rules.merge(rule, base, experts), base, 4)[1]
    again = rules.task_models(rules.merge(rule, base, experts), base, 4)[1]
    eager = rules.task_models(rules.merge(rule, base, experts, jit=False), base, 4)[1]
    chex.assert_trees_all_equal(first, again)
    chex.assert_trees_all_close(first, eager, atol=2e-5)

  @parameterized.parameters(*SPECTRAL, "magmax")
  def test_scale_sweep_does_not_retrace(self, rule):
    base, experts = _models(2)
    fn = jax.jit(chex.assert_max_traces(spec.get(rule).fn, n=1))
    outs = [fn(base, experts, scale=jnp.float32(a)) for a in (0.0, 0.5, 1.0)]
    chex.assert_trees_all_close(outs[0], base, atol=1e-6)
    # θ is affine in α.
    half = jax.tree.map(lambda a, b: (a + b) / 2, outs[0], outs[2])
    chex.assert_trees_all_close(outs[1], half, atol=2e-5)
    # The front door's executable is reused across α (traced), not across static options.
    traces = []

    def counting(base, experts, *, scale=1.0):
      traces.append(scale)
      return spec.get(rule).fn(base, experts, scale=scale)

    rules.register("counting_spectral", counting, scale=spec.SCALE)
    try:
      for a in (0.3, 0.6, 1.2):
        rules.merge("counting_spectral", base, experts, scale=a)
    finally:
      del rules.REGISTRY["counting_spectral"]
    self.assertLen(traces, 1)

  @parameterized.parameters(*ALL)
  def test_zero_task_vectors_give_base(self, rule):
    base, _ = _models(1)
    out = rules.merge(rule, base, [base, base])
    for model in rules.task_models(out, base, 2):
      chex.assert_trees_all_close(model, base, atol=1e-6)

  @parameterized.parameters(*ALL)
  def test_front_door_include_exclude(self, rule):
    base, experts = _models(3)
    out = rules.task_models(rules.merge(rule, base, experts, exclude="wide"), base, 3)[0]
    np.testing.assert_array_equal(out["wide"], base["wide"])
    sub = {k: v for k, v in base.items() if k != "wide"}
    subs = [{k: v for k, v in e.items() if k != "wide"} for e in experts]
    direct = rules.task_models(rules.merge(rule, sub, subs), sub, 3)[0]
    chex.assert_trees_all_close({k: out[k] for k in sub}, direct, atol=1e-6)
    only = rules.task_models(rules.merge(rule, base, experts, include="tall"), base, 3)[0]
    chex.assert_trees_all_close(only["tall"], direct["tall"], atol=1e-6)
    np.testing.assert_array_equal(only["bias"], base["bias"])

  def test_defaults(self):
    self.assertEqual(
      rules.hparams_of("tsv_m"), {"scale": 1.0, "matrices": "2d", "non_matrix": "mean"}
    )
    self.assertEqual(rules.hparams_of("iso_c")["scale"], 1.0)
    iso_cts = rules.hparams_of("iso_cts")
    self.assertEqual((iso_cts["common_fraction"], iso_cts["layout"]), (0.8, "flax"))
    self.assertIsNone(rules.hparams_of("tsv_c")["fraction"])


# ------------------------------------------------------------------------------ bad input
class ValidationTest(chex.TestCase):
  def test_bad_hparams(self):
    base, experts = _models(2)
    with self.assertRaisesRegex(TypeError, "scale='1' is a str"):
      rules.merge("tsv_m", base, experts, scale="1")
    with self.assertRaisesRegex(ValueError, r"common_fraction=0.0 is outside \(0, 1\]"):
      rules.merge("iso_cts", base, experts, common_fraction=0.0)
    with self.assertRaisesRegex(ValueError, "not one of"):
      rules.merge("iso_c", base, experts, matrices="3d")
    with self.assertRaisesRegex(ValueError, "not one of"):
      rules.merge("iso_cts", base, experts, layout="out_in")
    with self.assertRaisesRegex(ValueError, r"fraction=1.5 is outside"):
      rules.merge("tsv_c", base, experts, fraction=1.5)
    with self.assertRaisesRegex(ValueError, "not finite"):
      rules.merge("magmax", base, experts, scale=float("nan"))

  def test_iso_cts_too_small_common_space_names_the_leaf(self):
    # r = 7, c = ⌊0.7⌋ = 0, round(7/8)·8 = 8 > 7: no valid split.
    base, experts = _models(8, shapes={"enc/w": (7, 9)})
    with self.assertRaisesRegex(ValueError, "leaf 'enc/w'.*common_fraction=0.1"):
      rules.merge("iso_cts", base, experts, common_fraction=0.1, layout="torch")


def test_a_failed_divide_and_conquer_svd_falls_back_to_qr(monkeypatch):
  # gesdd returns NaNs when it does not converge (seen under jit on a near-singular ISO-CTS
  # basis); the fallback recomputes that matrix with QR iteration, and only that matrix.
  x = jax.random.normal(jax.random.key(0), (6, 4))
  real_svd = jnp.linalg.svd
  expected = real_svd(x, full_matrices=False)

  def failing(a, full_matrices=True):
    u, s, vt = real_svd(a, full_matrices=full_matrices)
    return u * jnp.nan, s, vt

  monkeypatch.setattr(jnp.linalg, "svd", failing)
  u, s, vt = jax.jit(spectral._svd)(x)
  assert np.isfinite(np.asarray(u)).all()
  np.testing.assert_allclose(s, expected[1], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(u * s) @ np.asarray(vt), np.asarray(x), atol=1e-5)
  monkeypatch.setattr(jnp.linalg, "svd", real_svd)
  # Without a failure: the plain SVD's bits (a new function: jit caches traces per function).
  chex.assert_trees_all_equal(
    tuple(jax.jit(lambda a: spectral._svd(a))(x)),
    tuple(jax.jit(lambda a: real_svd(a, full_matrices=False))(x)),
  )


if __name__ == "__main__":
  absltest.main()
