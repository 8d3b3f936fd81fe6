"""NumPy restatements of the data-free rules, for tests and benchmarks (not for merging).

Each function takes flat `{path: np.ndarray}` trees and follows the rule's definition at its paper
defaults, written independently of mergejax's JAX code (loops over leaves, `np.partition` for the
k-th largest magnitude), so a test or a benchmark can compare the two. `NUMPY` maps a registered
rule's name to its reference; tests/numpy_reference_test.py checks each against `rules.merge`, and
launch/bench_rules.py times them against mergejax.

The random rules (DARE, DARE-TIES) draw their own masks from NumPy's generator: compare them by
statistics (kept fraction, norms), not element by element.
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
}
