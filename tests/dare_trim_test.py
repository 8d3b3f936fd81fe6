"""DARE-TIES's whole-model trim outside jit (`rules.dare_trim`): the same bits as the trim inside
jit, in memory and streamed, whatever the chunking of the host pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import leafwise, rules, sparsify, streaming
from mergejax import tree as tree_lib
from mergejax.rules import dare_trim
from mergejax.testing.random_models import random_flat_models

SHAPES = {"a/w": (30, 7), "a/b": (7,), "c/w": (9, 5, 4), "d": (130,)}


def _models(n=3, seed=0):
  return random_flat_models(SHAPES, n, seed)


def test_uniforms_of_a_chunk_are_the_leafs_at_its_offset():
  data = sparsify.leaf_key_data(jax.random.key(0), 1, ["w"])[0, 0]
  whole = sparsify.uniform_from_key_data(data, (6, 11)).reshape(-1)
  parts = [sparsify.uniform_from_key_data(data, (20,), jnp.uint32(s)) for s in (0, 20, 40, 60)]
  np.testing.assert_array_equal(np.concatenate(parts)[:66], whole)


def test_dropped_leaves_equal_the_rules_drop_whatever_the_chunk(monkeypatch):
  base, experts = _models()
  key, paths = jax.random.key(5), sorted(SHAPES)  # A dict flattens in sorted key order.
  vectors = [{p: e[p] - base[p] for p in paths} for e in experts]
  keys = leafwise.FoldedKeys(sparsify.leaf_key_data(key, len(experts), paths))
  for rescale in ("inverse", "l1"):
    # Under jit with the density traced, as the rule runs (eager division may round otherwise).
    drop = jax.jit(lambda v, k, d, r=rescale: sparsify.random_drop(v, k, d, rescale=r))
    want = drop(vectors, keys, np.float32(0.3))
    # Chunks that cut every leaf (padded at its end); one per leaf.
    for chunk in (16, 1 << 20):
      monkeypatch.setattr(leafwise, "LARGE_CHUNK", chunk)
      monkeypatch.setattr(leafwise, "SMALL_CHUNK", min(chunk, 1 << 16))
      leaves = lambda: ((base[p], [e[p] for e in experts]) for p in paths)  # noqa: E731
      got = list(dare_trim.dropped_leaves(leaves, paths, key, 0.3, rescale)())
      sizes = [int(np.prod(SHAPES[p])) for p in paths]
      assert [xs[0].size for _, xs in got] == dare_trim.piece_sizes(sizes, rescale)
      assert all(origin is None for origin, _ in got)
      for t in range(len(experts)):
        flat = np.concatenate([xs[t] for _, xs in got])
        np.testing.assert_array_equal(
          flat, np.concatenate([np.asarray(want[t][p]).reshape(-1) for p in paths])
        )


@pytest.mark.parametrize(
  "hparams",
  [{}, {"weights": [1.0, 0.5, 2.0]}, {"rescale": "l1", "election": "count"}, {"reduce": "sum"}],
)
def test_host_trim_equals_the_trim_inside_jit(hparams):
  base, experts = _models()
  nested, nested_experts = tree_lib.unflatten(base), [tree_lib.unflatten(e) for e in experts]
  key = jax.random.key(2)
  # The rule under jit without the host pre-pass, density traced as rules.merge traces it.
  inside = jax.jit(lambda b, e, d, k: rules.dare_ties(b, e, key=k, density=d, **hparams))(
    nested, nested_experts, np.float32(0.3), key
  )
  stats = dare_trim.prepare(
    nested, nested_experts, key=key, density=0.3, rescale=hparams.get("rescale", "inverse"),
    trim_density=0.2,
  )  # fmt: skip
  assert stats.threshold.shape == (3,) and np.all(np.asarray(stats.threshold) > 0)
  front_door = rules.merge("dare_ties", nested, nested_experts, key=key, density=0.3, **hparams)
  for x, y in zip(jax.tree.leaves(inside), jax.tree.leaves(front_door), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("budget", [None, 4000])
def test_streamed_trim_equals_in_memory(monkeypatch, budget):
  # budget 4000 bytes: the dropped vectors do not fit, so the trim streams (StreamingTopK passes).
  monkeypatch.setattr(leafwise, "LARGE_CHUNK", 64)
  monkeypatch.setattr(leafwise, "SMALL_CHUNK", 16)  # Leaves of 130 and 210 entries in pieces.
  base, experts = _models()
  hparams = rules.add_key("dare_ties", {"density": 0.5, "weights": [1.0, 2.0, 0.5]}, 1)
  want = rules.merge(
    "dare_ties", tree_lib.unflatten(base), [tree_lib.unflatten(e) for e in experts], **hparams
  )
  engine = streaming.StreamingMerge(
    "dare_ties", base, experts, hparams, memory_budget=budget or 2**30
  )
  assert engine.reason is None and engine.timings.stats_passes >= (2 if budget else 1)
  for path, x in tree_lib.flatten(want).items():
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(x), err_msg=path)


def _sorted_reference(xs, k):
  """TopKStats of one group by a full sort: the k-th largest |x|, sums over |x| >= it."""
  x = np.concatenate([a.reshape(-1) for a in xs]).astype(np.float32)
  threshold = np.sort(np.abs(x))[::-1][k - 1]
  kept = x[np.abs(x) >= threshold]
  return threshold, np.float32(kept.sum(dtype=np.float64)), np.float32(np.sign(kept).sum())


@pytest.mark.parametrize("k", [5, 60, 119, 120, 121, 400, 700])
@pytest.mark.parametrize("how", ["in memory", "two passes", "band"])
def test_top_k_of_mostly_zero_vectors(k, how, monkeypatch):
  # DARE-dropped vectors: 120 of 700 entries nonzero, so k >= 121 puts the k-th largest at 0,
  # where the selections keep the zeros out of their candidates (counted, not partitioned).
  from mergejax import selection, streaming_topk

  rng = np.random.default_rng(k)
  experts = []
  for _ in range(2):
    x = np.zeros(700, np.float32)
    x[rng.choice(700, 120, replace=False)] = rng.standard_normal(120).astype(np.float32)
    experts.append([x[:600].reshape(30, 20), x[600:]])
  if how == "in memory":
    got = selection.top_k_stats_eager(experts, [k, k])
  else:
    monkeypatch.setattr(streaming_topk, "_CANDIDATE_BYTES", 10**9)  # Never the host selection.
    monkeypatch.setattr(streaming_topk, "_CHUNK", 128)  # Leaves in several steps, one partial.
    leaves = lambda: iter([(None, [e[i] for e in experts]) for i in range(2)])  # noqa: E731
    budget = None if how == "two passes" else 10**6
    got = streaming_topk.model_top_k_stats(leaves, [600, 100], k, memory_budget=budget)
  for t, xs in enumerate(experts):
    want = _sorted_reference(xs, k)
    np.testing.assert_array_equal([np.asarray(s)[t] for s in got], want)


def _leaves_fn(base, experts, paths):
  return lambda: ((base[p], [e[p] for e in experts]) for p in paths)


def test_sampled_blocks_are_the_passes_entries(monkeypatch):
  # The band's sample, computed at the sampled blocks alone, holds the pass's values there.
  from mergejax import streaming_topk

  monkeypatch.setattr(leafwise, "LARGE_CHUNK", 64)
  monkeypatch.setattr(leafwise, "SMALL_CHUNK", 16)
  base, experts = _models()
  key, paths = jax.random.key(3), sorted(SHAPES)
  leaves = _leaves_fn(base, experts, paths)
  pieces = [xs for _, xs in dare_trim.dropped_leaves(leaves, paths, key, 0.4, "inverse")()]
  sizes = dare_trim.piece_sizes([int(np.prod(SHAPES[p])) for p in paths], "inverse")
  rng = np.random.default_rng(0)
  lengths = [min(5, n) for n in sizes]
  starts = [
    np.unique(rng.integers(0, n - length + 1, 3)) for n, length in zip(sizes, lengths, strict=True)
  ]
  sample = dare_trim.dropped_sample(leaves, paths, key, 0.4, "inverse")
  got = list(sample(starts, lengths))
  want = list(streaming_topk._sliced_blocks([(None, xs) for xs in pieces], starts, lengths))
  assert len(got) == len(pieces) == len(sizes)
  for g, w, s, length in zip(got, want, starts, lengths, strict=True):
    assert all(x.shape == (s.size * length,) for x in w)
    for x, y in zip(g, w, strict=True):
      np.testing.assert_array_equal(x, y)
  assert dare_trim.dropped_sample(leaves, paths, key, 0.4, "l1") is None  # Norms need all.


def test_streamed_drop_is_computed_once(monkeypatch):
  # Dropped vectors above the budget: one collecting pass computes them, after a sample of
  # blocks, not a whole pass to sample them and another to find that they do not fit.
  from mergejax import streaming_topk

  monkeypatch.setattr(streaming_topk, "_SAMPLE_BLOCKS", 64)
  monkeypatch.setattr(streaming_topk, "_BLOCK", 16)
  shapes = {"a": (64, 64), "b": (4096,), "c": (16, 256), "d": (2, 2048)}  # Unpadded chunks.
  base, experts = random_flat_models(shapes, 3, 1)
  paths, sizes = sorted(shapes), [int(np.prod(shapes[p])) for p in sorted(shapes)]
  computed = []
  drop = dare_trim._dropped_chunk
  monkeypatch.setattr(
    dare_trim, "_dropped_chunk", lambda b, *a, **k: computed.append(b.size) or drop(b, *a, **k)
  )
  hparams = {"key": jax.random.key(4), "density": 0.2, "rescale": "inverse"}
  for trim_density in (0.1, 0.5):  # A k-th largest inside the nonzeros, then at a zero.
    computed.clear()
    leaf_stats = dare_trim.stream_stats(
      _leaves_fn(base, experts, paths), sizes, paths=paths, trim_density=trim_density,
      memory_budget=150_000, **hparams,
    )  # fmt: skip
    # The pass, its first leaf again (to learn the experts' count), the sampled blocks.
    assert sum(sizes) < sum(computed) < 1.4 * sum(sizes)
    want = dare_trim.prepare(base, [dict(e) for e in experts], trim_density=trim_density, **hparams)
    for x, y in zip(leaf_stats(0), want, strict=True):
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("k", [50, 119, 121, 500])
def test_a_band_of_zeros_alone(k):
  # A band of zeros (top bin -1) holds no candidates: exact when the k-th largest is a zero
  # (k > 120 nonzeros), and a miss (None, then the two passes) when it is not.
  from mergejax import streaming_topk

  rng = np.random.default_rng(k)
  x = np.zeros(700, np.float32)
  x[rng.choice(700, 120, replace=False)] = rng.standard_normal(120).astype(np.float32)
  topk = streaming_topk.StreamingTopK([k])
  topk.bins = [(0, -1)]
  topk._start_collecting()
  topk.add(0, x[:300], collect=True)
  topk.add(0, x[300:], collect=True)
  got = topk.finalize()
  if k <= 120:
    assert got is None
  else:
    np.testing.assert_array_equal([np.asarray(s)[0] for s in got], _sorted_reference([x], k))


def test_in_memory_selection_budgets_for_the_experts_selected_at_once(monkeypatch):
  from mergejax import selection, streaming_topk

  rng = np.random.default_rng(0)
  base = rng.standard_normal(1000).astype(np.float32)
  experts = [base + rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
  k, copies = 100, 5 * base.nbytes  # The leaves are copies: they count against the budget.
  one = streaming_topk._CANDIDATE_BYTES * k + streaming_topk._SCRATCH_BYTES * base.size
  eager, real = [], selection.top_k_stats_eager
  monkeypatch.setattr(
    selection, "top_k_stats_eager", lambda *a, **kw: eager.append(1) or real(*a, **kw)
  )
  got = {}
  for threads in (1, 2):  # One expert's selection fits the budget's half; two at once do not.
    monkeypatch.setattr(selection, "_THREADS", threads)
    eager.clear()
    got[threads] = streaming_topk.model_top_k_stats(
      lambda: iter([(base, experts)]), [base.size], k, memory_budget=2 * (one + copies)
    )
    assert eager == ([1] if threads == 1 else [])
  for a, b in zip(got[1], got[2], strict=True):
    np.testing.assert_array_equal(a, b)
