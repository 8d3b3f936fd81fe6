"""NumPy restatements of the rules, for tests and benchmarks (not for merging).

Each function takes flat `{path: np.ndarray}` trees and follows the rule's definition at its paper
defaults, written independently of mergejax's JAX code (loops over leaves, `np.partition` for the
k-th largest magnitude), so a test or a benchmark can compare the two. `NUMPY` maps a registered
rule's name to its reference; tests/numpy_reference_test.py checks each against `rules.merge`, and
launch/bench_rules.py times them against mergejax.

The random rules (DARE, DARE-TIES) draw their own masks from NumPy's generator: compare them by
statistics (kept fraction, norms), not element by element. The data-dependent rules' references
(`NUMPY_DATA`) also take the statistics, one dict per expert with flat `{path: array}` trees.
"""

import numpy as np


def np_task_vectors(base, experts):
  return [{p: e[p] - base[p] for p in base} for e in experts]


def np_kth_largest_abs(vector, density):
  flat = np.concatenate([np.abs(x).ravel() for x in vector.values()])
  k = min(max(int(np.round(np.float32(density) * np.float32(flat.size))), 1), flat.size)
  return np.partition(flat, flat.size - k)[flat.size - k]


def np_ties(base, experts, density, scale, trim=True):
  taus = np_task_vectors(base, experts)
  if trim:
    ths = [np_kth_largest_abs(t, density) for t in taus]
    taus = [
      {p: np.where(np.abs(x) >= th, x, 0) for p, x in t.items()}
      for t, th in zip(taus, ths, strict=True)
    ]
  total = sum(float(sum(t[p] for t in taus).sum()) for p in base)
  out = {}
  for p in base:
    s = sum(t[p] for t in taus)
    sign = np.where(s > 0, 1.0, np.where(s < 0, -1.0, 1.0 if total >= 0 else -1.0))
    agree = [np.where(sign > 0, t[p] > 0, t[p] < 0) for t in taus]
    num = sum(np.where(a, t[p], 0) for a, t in zip(agree, taus, strict=True))
    cnt = sum(a.astype(np.float32) for a in agree)
    out[p] = (base[p] + scale * num / np.maximum(cnt, 1)).astype(np.float32)
  return out


def np_dare(base, experts, density, scale, combine):
  rng = np.random.default_rng(1)
  dropped = []
  for e in experts:
    dropped.append(
      {
        p: np.where(rng.random(x.shape, np.float32) < density, e[p] - x, 0) / density
        for p, x in base.items()
      }
    )
  if combine == "ties":
    fake = [{p: base[p] + t[p] for p in base} for t in dropped]
    return np_ties(base, fake, 1.0, scale, trim=False)
  return {p: base[p] + scale * sum(t[p] for t in dropped) for p in base}


def np_kth_row_leaf(x, k):
  flat = np.abs(x).ravel()
  return np.partition(flat, flat.size - k)[flat.size - k]


def np_breadcrumbs(base, experts, density, gamma, scale):
  out = {p: np.zeros_like(x) for p, x in base.items()}
  for e in experts:
    for p, x in base.items():
      tau = e[p] - x
      n = tau.size
      n_top = int(np.floor(np.float32(gamma) * np.float32(n)))
      n_keep = min(max(int(np.round(np.float32(density) * np.float32(n))), 1), n)
      upper = np_kth_row_leaf(tau, max(n_top, 1))
      lower = np_kth_row_leaf(tau, min(n_top + n_keep, n))
      mag = np.abs(tau)
      keep = (mag >= lower) & ((n_top == 0) | (mag < upper))
      out[p] += np.where(keep, tau, 0)
  return {p: base[p] + scale * out[p] for p in base}


def np_consensus(base, experts, tall_lambda, min_tasks, scale):
  taus = np_task_vectors(base, experts)
  out = {}
  for p in base:
    multi = sum(t[p] for t in taus)
    votes = sum((np.abs(t[p]) >= tall_lambda * np.abs(multi - t[p])).astype(np.int32) for t in taus)
    out[p] = base[p] + scale * np.where(votes >= min_tasks, multi, 0)
  return out


def np_emr_task0(base, experts):
  taus = np_task_vectors(base, experts)
  total = sum(float(sum(t[p] for t in taus).sum()) for p in base)
  unified = {}
  for p in base:
    s = sum(t[p] for t in taus)
    sign = np.where(s > 0, 1.0, np.where(s < 0, -1.0, 1.0 if total >= 0 else -1.0))
    mag = np.zeros_like(s)
    for t in taus:
      mag = np.maximum(mag, np.where(np.sign(t[p]) == sign, np.abs(t[p]), 0))
    unified[p] = sign * mag
  mask = {p: taus[0][p] * unified[p] > 0 for p in base}
  rescale = sum(np.abs(taus[0][p]).sum() for p in base) / sum(
    np.abs(np.where(mask[p], unified[p], 0)).sum() for p in base
  )
  return {p: base[p] + rescale * np.where(mask[p], unified[p], 0) for p in base}


def np_model_stock(base, experts):
  out = {}
  n = len(experts)
  for p, x in base.items():
    taus = [(e[p] - x).ravel() for e in experts]
    cos = []
    for i in range(n):
      for j in range(i + 1, n):
        d = np.linalg.norm(taus[i]) * np.linalg.norm(taus[j])
        cos.append(float(taus[i] @ taus[j] / d) if d > 0 else 0.0)
    c = min(max(sum(cos) / len(cos), 0.0), 1.0)
    t = n * c / (1 + (n - 1) * c)
    out[p] = x + t * sum(taus).reshape(x.shape) / n
  return out


def _np_polar(x):
  p, _, qt = np.linalg.svd(x, full_matrices=False)
  return p @ qt


def _np_spectral(base, experts, scale, on_matrix):
  """θ0 + α Δ: Δ = on_matrix(stacked [T, in, out] task matrices) on 2-D leaves, mean τ elsewhere."""
  out = {}
  for p, x in base.items():
    taus = np.stack([e[p] - x for e in experts])
    out[p] = x + scale * (on_matrix(taus) if x.ndim == 2 else taus.mean(0))
  return out


def np_tsv_m(deltas):
  t, m, n = deltas.shape
  k = int(min(m, n) * (1.0 / t))
  if k == 0:
    return np.zeros((m, n), deltas.dtype)
  u, s, vt = np.linalg.svd(deltas, full_matrices=False)
  u_cat = np.concatenate(list(u[:, :, :k]), axis=1)
  vt_cat = np.concatenate(list(vt[:, :k]), axis=0)
  return (_np_polar(u_cat) * s[:, :k].ravel()) @ _np_polar(vt_cat)


def np_iso_c(deltas):
  u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
  return s.mean() * (u @ vt)


def np_iso_cts(deltas, fraction=0.8):
  d = np.swapaxes(deltas, 1, 2)  # [in, out] -> [out, in]: the common space is the output side.
  t, m, n = d.shape
  r = min(m, n)
  c = r - round((r - int(r * fraction)) / t) * t
  per = (r - c) // t
  u, s, vt = np.linalg.svd(d.sum(0), full_matrices=False)
  uc = u[:, :c]
  pu, ps, pvt = np.linalg.svd(d - uc @ (uc.T @ d), full_matrices=False)
  u_all = np.concatenate([*pu[:, :, :per], uc], axis=1)
  vt_all = np.concatenate([*pvt[:, :per], vt[:c]], axis=0)
  s_mean = (ps[:, :per].sum() + s[:c].sum()) / r
  return (s_mean * (_np_polar(u_all) @ _np_polar(vt_all))).T


def np_magmax(base, experts, scale):
  out = {}
  for p, x in base.items():
    best = experts[0][p] - x
    for e in experts[1:]:
      tau = e[p] - x
      best = np.where(np.abs(tau) >= np.abs(best), tau, best)
    out[p] = x + scale * best
  return out


NUMPY = {
  "task_arithmetic": lambda b, e, scale: {p: b[p] + scale * sum(x[p] - b[p] for x in e) for p in b},
  "weight_average": lambda b, e: {p: sum(x[p] for x in e) / len(e) for p in b},
  "ties": lambda b, e, density, scale: np_ties(b, e, density, scale),
  "dare": lambda b, e, density, scale: np_dare(b, e, density, scale, "sum"),
  "dare_ties": lambda b, e, density, scale: np_dare(b, e, density, scale, "ties"),
  "breadcrumbs": np_breadcrumbs,
  "consensus": np_consensus,
  "emr": np_emr_task0,
  "model_stock": np_model_stock,
  "magmax": np_magmax,
  "tsv_m": lambda b, e, scale: _np_spectral(b, e, scale, np_tsv_m),
  "iso_c": lambda b, e, scale: _np_spectral(b, e, scale, np_iso_c),
  "iso_cts": lambda b, e, scale: _np_spectral(b, e, scale, np_iso_cts),
}


def np_fisher(base, experts, statistics, min_weight=1e-6):
  """Fisher merging with FusionBench's weights: F + ε, coefficients 1/(‖Ft‖ + ε), normalized."""
  fishers = [s["fisher"] for s in statistics]
  norms = [
    np.sqrt(sum(float(np.sum(np.square(f[p], dtype=np.float64))) for p in base)) for f in fishers
  ]
  coeffs = np.array([1.0 / (n + min_weight) for n in norms])
  coeffs = coeffs / coeffs.sum() / len(experts)
  out = {}
  for p in base:
    weights = [c * (f[p] + min_weight) for c, f in zip(coeffs, fishers, strict=True)]
    out[p] = sum(w * e[p] for w, e in zip(weights, experts, strict=True)) / sum(weights)
  return out


def np_regmean(base, experts, statistics, alpha):
  """RegMean: per kernel with a Gram matrix (Σ G̃t)⁻¹ Σ G̃t Wt, the experts' mean elsewhere."""
  out = {}
  for p, b in base.items():
    if p not in statistics[0]["grams"]:
      out[p] = sum(e[p] for e in experts) / len(experts)
      continue
    grams = [s["grams"][p] for s in statistics]
    grams = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    d_in = grams[0].shape[0]
    rhs = sum(g @ e[p].reshape(d_in, -1) for g, e in zip(grams, experts, strict=True))
    out[p] = np.linalg.solve(sum(grams), rhs).reshape(b.shape)
  return out


NUMPY_DATA = {
  "fisher": np_fisher,
  "regmean": np_regmean,
}
