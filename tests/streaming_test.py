"""The streaming engine: the same bits as rules.merge for every rule, budgets, compiles, kills."""

import json
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import merge as merge_config
from mergejax import leafwise, rules, streaming
from mergejax import tree as tree_lib
from mergejax.io import atomic, hf
from mergejax.streaming import flat, statistics
from mergejax.testing.random_models import random_flat_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"a/w": (8, 6), "a/b": (6,), "c/w": (8, 6), "d": (5, 7), "e/scale": (7,)}


def _models(n=3, shapes=SHAPES, seed=0):
  return random_flat_models(shapes, n, seed)


def _in_memory(name, base, experts, **kwargs):
  nested = tree_lib.unflatten(base)
  result = rules.merge(name, nested, [tree_lib.unflatten(e) for e in experts], **kwargs)
  models = rules.task_models(result, nested, len(experts))
  if not isinstance(result, rules.TaskSpecificMerge):
    models = models[:1]
  return [tree_lib.flatten(m) for m in models]


# Rules whose whole-model sums are all signs (TIES's election fallback on their own vectors).
SPECULATE = {"breadcrumbs_ties", "della"}


@pytest.mark.parametrize(
  "name", sorted(n for n, r in rules.REGISTRY.items() if not r.data_dependent)
)
def test_streaming_equals_in_memory_bit_for_bit(name):
  base, experts = _models()
  experts = experts[:2] if name == "slerp" else experts
  hparams = rules.add_key(name, {}, 0)
  expected = _in_memory(name, base, experts, **hparams)
  # The tightest budget: that of the largest leaf, so that groups hold one leaf or a few.
  probe = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  budget = probe.timings.peak_working_set_bytes or 2**30
  engine = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=budget)
  assert engine.num_outputs == len(expected)
  # Every built-in rule streams: task-specific ones (EMR, TALL masks, TSV-C) as their task models,
  # whole-model trims through stream_stats hooks (TIES, sparsify_combine's ties_trim, DARE-TIES:
  # rules.dare_trim, tests/dare_trim_test.py).
  assert engine.reason is None, engine.reason
  assert engine.timings.groups > 1, engine.timings
  # The roomy probe merges in one group, and in the statistics pass where the rule's sums are signs.
  for t, model in enumerate(expected):
    for path in base:
      np.testing.assert_array_equal(engine.leaf(path, t), np.asarray(model[path]), err_msg=path)
      np.testing.assert_array_equal(probe.leaf(path, t), np.asarray(model[path]), err_msg=path)
  assert (probe.timings.speculated > 0) == (name in SPECULATE), probe.timings


@pytest.mark.parametrize(
  "name,hparams",
  [
    ("ties", {"trim_scope": "leaf"}),
    ("ties", {"election": "count", "density": 0.5}),
    ("dare", {"combine": "ties", "rescale": "l1"}),
    ("della", {"combine": "sum", "scope": "leaf"}),
    ("consensus", {"combine": "ties_untrimmed"}),
    ("dare_ties", {"trim_density": None}),  # mergekit-style: no trim after the drop.
    # No trim: no statistics (a random sparsifier: key given, optional for this rule).
    ("sparsify_combine", {"sparsifier": "dare", "combine": "ties", "key": jax.random.key(1)}),
    ("sparsify_combine", {"combine": "ties", "density": 0.4}),
  ],
)
def test_streaming_equals_in_memory_for_options(name, hparams):
  base, experts = _models()
  hparams = rules.add_key(name, hparams, 3)
  expected = _in_memory(name, base, experts, exclude="d", others="average", **hparams)
  engine = streaming.StreamingMerge(
    name, base, experts, hparams, exclude="d", others="average", memory_budget=8000
  )
  assert engine.reason is None
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[0][path]), err_msg=path)


def _tied_models(negative):
  # Task vectors of one sign (so the election's whole-model score has it), but for a tie at
  # c/w[0, 0]: a score of 0 from vectors that are not.
  base, experts = _models(n=2)
  sign = -1.0 if negative else 1.0
  experts = [{p: base[p] + sign * np.abs(e[p] - base[p]) for p in base} for e in experts]
  base["c/w"][0, 0], experts[0]["c/w"][0, 0], experts[1]["c/w"][0, 0] = 0.0, 0.5, -0.5
  return base, experts


@pytest.mark.parametrize("negative", [False, True])
def test_sign_only_sums_merge_in_the_statistics_pass(negative):
  # The election's fallback (the sign of the whole-model score) is guessed "not negative" and every
  # leaf is merged while the score is summed. A leaf is merged again only where the guess was wrong
  # and the leaf has a tie.
  base, experts = _tied_models(negative)
  hparams = {"sparsifier": "none", "combine": "ties"}
  expected = _in_memory("sparsify_combine", base, experts, **hparams)[0]
  assert expected["c/w"][0, 0] == (-0.5 if negative else 0.5)  # The tie takes the score's sign.
  engine = streaming.StreamingMerge("sparsify_combine", base, experts, hparams, memory_budget=2**30)
  assert engine.speculate and engine.timings.stats_passes == 1
  assert engine.timings.speculated == len(base) - (1 if negative else 0)
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]), err_msg=path)
  # A budget with no room beside the largest leaf keeps nothing: every leaf merges again.
  tight = streaming.StreamingMerge(
    "sparsify_combine", base, experts, hparams, memory_budget=engine.timings.peak_working_set_bytes
  )
  assert tight.timings.speculated == 0
  for path in base:
    np.testing.assert_array_equal(tight.leaf(path), np.asarray(expected[path]), err_msg=path)


@pytest.mark.parametrize("negative", [False, True])
def test_sums_that_need_a_sign_take_the_same_pass(negative, monkeypatch):
  # EMR: the election's sign sum; the |τ| sums need no other; the masked sums need the sign. One
  # pass guesses the sign and, where it was wrong, sums the tied leaf's masked partials again.
  base, experts = _tied_models(negative)
  expected = _in_memory("emr", base, experts)
  engine = streaming.StreamingMerge("emr", base, experts, {}, memory_budget=8000)
  num_tasks = len(experts)
  assert engine.num_totals == 1 + 2 * num_tasks and engine.needs[0] == set()
  assert sorted(map(sorted, engine.needs[1:])) == [[]] * num_tasks + [[0]] * num_tasks
  assert engine.speculate and engine.timings.stats_passes == 1
  assert (engine.totals[0] < 0) == negative
  # Off the speculative pass (as on a mesh): rounds in dependency order, the same bits.
  monkeypatch.setattr(statistics, "can_speculate", lambda *a: False)
  rounds = streaming.StreamingMerge("emr", base, experts, {}, memory_budget=8000)
  assert not rounds.speculate and rounds.timings.stats_passes == 2
  # The same sums and bits either way. (Against rules.merge these models' task 0 differs by an
  # ulp: XLA sums a leaf inside the whole-tree program in another order, see the README.)
  assert engine.totals == rounds.totals
  for t, model in enumerate(expected):
    for path in base:
      np.testing.assert_array_equal(engine.leaf(path, t), rounds.leaf(path, t), err_msg=path)
      np.testing.assert_allclose(engine.leaf(path, t), model[path], 1e-6, 1e-6, err_msg=path)


def test_statistics_passes_of_the_model_wide_trim():
  base, experts = _models()
  # Passes over the leaves: the candidates fit, rules.merge's host selection (on the leaves' views,
  # one pass); the band a sample locates fits (the views, then the band); nothing fits (a sample,
  # then the histogram and the threshold bin's entries).
  for budget, passes in ((2**30, 1), (5000, 2), (1100, 3)):
    ties = streaming.StreamingMerge("ties", base, experts, {}, memory_budget=budget)
    assert ties.timings.stats_passes == passes, budget


@pytest.mark.parametrize("budget", [1100, 2**30])  # Two histogram passes; the host selection.
# density 0.38 of 144 entries: 54.72, which "round" and "mergekit" counting take differently.
@pytest.mark.parametrize("hparams", [{}, {"counting": "mergekit", "density": 0.38}])
def test_ties_model_trim_is_exact_either_way(budget, hparams):
  base, experts = _models()
  expected = _in_memory("ties", base, experts, **hparams)[0]
  engine = streaming.StreamingMerge("ties", base, experts, hparams, memory_budget=budget)
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]), err_msg=path)


def test_a_budget_below_one_leaf_fails_naming_it():
  base, experts = _models(shapes={"small": (4,), "big": (128, 128)})
  with pytest.raises(
    ValueError, match=r"Leaf 'big' \(\(128, 128\), 3 experts\) needs .* KiB .* budget of 48.8 KiB"
  ):  # Below its output alone (64 KiB), whether or not XLA reads the inputs in place.
    streaming.StreamingMerge("task_arithmetic", base, experts, {}, memory_budget=50_000)


def _whole_from(monkeypatch, entries):
  """Elementwise rules merge leaves of `entries` or more whole (`streaming.flat`), the others
  in flat chunks of entries / 4 (the last padded)."""
  monkeypatch.setattr(leafwise, "LARGE_CHUNK", entries // 4)
  monkeypatch.setattr(leafwise, "SMALL_CHUNK", entries // 4)


@pytest.mark.parametrize(
  "name,hparams",
  [
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"trim_scope": "leaf"}),
    ("dare", {"density": 0.3}),
    ("dare_ties", {"density": 0.5}),
    ("breadcrumbs", {"layout": "torch"}),
    ("della", {"layout": "torch", "combine": "sum"}),
  ],
)
def test_a_leaf_above_the_budget_is_merged_in_blocks_of_rows(monkeypatch, name, hparams):
  _whole_from(monkeypatch, 64)  # Elementwise rules' large leaves: whole, or in blocks of rows.
  base, experts = _models(shapes={"big": (64, 24), "a/w": (8, 6), "c": (3, 4, 5), "e": (7,)})
  hparams = rules.add_key(name, hparams, 4)
  expected = _in_memory(name, base, experts, **hparams)[0]
  whole = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  budget = whole.working_set["big"] - 1  # Below the leaf; above every other leaf.
  assert budget > max(ws for p, ws in whole.working_set.items() if p != "big")
  engine = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=budget)
  assert 1 <= engine.row_blocks["big"] < 64 and engine.working_set["big"] <= budget
  assert list(engine.row_blocks) == ["big"]
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]), err_msg=path)


@pytest.mark.parametrize(
  "name,hparams,split",
  [
    ("della", {"layout": "torch", "combine": "sum"}, True),
    ("task_arithmetic", {}, False),  # No temporaries: whole.
    ("breadcrumbs", {"layout": "torch"}, False),  # Its row sorts read the inputs: whole.
    ("dare", {"rescale": "l1"}, False),  # Per-leaf norms: whole, as it fits the budget.
  ],
)
def test_large_temporaries_within_the_budget_run_in_even_blocks(monkeypatch, name, hparams, split):
  # XLA:CPU programs with GB-sized temporaries ran slower per entry: leaves whose program holds
  # more than SPLIT_ABOVE are split where the rule allows, in blocks that divide the rows evenly.
  from mergejax.streaming import blocks

  _whole_from(monkeypatch, 64)

  base, experts = _models(shapes={"big": (60, 24), "e": (7,)})
  hparams = rules.add_key(name, hparams, 4)
  expected = _in_memory(name, base, experts, **hparams)[0]
  whole = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  # Above the temporaries of a program that holds one leaf's worth (5.6 KiB here), below those
  # of DELLA's |τ| rows and ranks and DARE's L1 norms (28-34 KiB). Not a fraction of the working
  # set, which counts the inputs XLA copies: those that happen not to be 64-byte aligned.
  monkeypatch.setattr(blocks, "SPLIT_ABOVE", 3 * base["big"].nbytes)
  assert blocks.large_temporaries(whole, "big") == (name in ("della", "dare"))
  engine = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  if split:
    rows = engine.row_blocks["big"]
    assert 60 % rows == 0 and rows < 60
    assert engine.leaf_working_set("big", (0, rows)) <= blocks.SPLIT_ABOVE
  else:
    assert engine.row_blocks == {} and engine.working_set == whole.working_set
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]), err_msg=path)


@pytest.mark.parametrize(
  "name,hparams,why",
  [
    ("dare", {"rescale": "l1"}, "cannot merge a leaf in blocks of rows"),  # Per-leaf norms.
    ("breadcrumbs", {}, "cannot merge a leaf in blocks of rows"),  # Flax rows run along axis 0.
    ("della", {"layout": "torch"}, "takes whole-model sums"),  # The election's fallback.
  ],
)
def test_a_leaf_that_cannot_be_split_fails_saying_why(name, hparams, why):
  base, experts = _models(shapes={"big": (64, 24), "e": (7,)})
  hparams = rules.add_key(name, hparams, 4)
  whole = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  # Below the leaf's flat chunks' working set (DELLA's) and its whole program's.
  budget = min(whole.working_set["big"], whole.leaf_working_set("big")) - 1
  with pytest.raises(ValueError, match=f"Leaf 'big' .* memory budget .*{why}"):
    streaming.StreamingMerge(name, base, experts, hparams, memory_budget=budget)


def test_compile_count_depends_on_shapes_not_leaves():
  shapes = {f"layer_{i}/{k}": s for i in range(12) for k, s in {"w": (9, 5), "b": (5,)}.items()}
  base, experts = _models(shapes=shapes)
  hparams = rules.add_key("breadcrumbs", {"density": 0.3}, 0)
  streaming.programs._EXECUTABLES.clear()
  first = streaming.StreamingMerge("breadcrumbs", base, experts, hparams, memory_budget=10_000)
  # Two shapes, and the flat chunks' program, compiled for its working set, which this budget
  # cannot hold.
  assert first.timings.executables == 3 and not first.flat_paths
  again = streaming.StreamingMerge("breadcrumbs", base, experts, {**hparams, "density": 0.5})
  assert again.timings.executables == 0  # Traced density: the same executables.
  expected = _in_memory("breadcrumbs", base, experts, **{**hparams, "density": 0.5})[0]
  for path in base:
    np.testing.assert_array_equal(again.leaf(path), np.asarray(expected[path]))


# Elementwise rules; DARE-TIES also trims, at the dropped vectors' whole-model thresholds.
FLAT = [
  ("task_arithmetic", {}),
  ("weight_average", {"weights": [1.0, 2.0, 0.5]}),
  ("task_negation", {}),
  ("magmax", {}),
  ("consensus", {"combine": "mean", "tall_lambda": [0.3, 0.5, 0.4]}),
  ("ties", {}),
  ("ties", {"trim_scope": "leaf", "election": "count"}),
  ("dare", {"density": 0.3}),
  ("dare_ties", {"density": 0.5}),
  ("sparsify_combine", {}),  # TIES's trim (whole-model thresholds), then a sum.
  ("sparsify_combine", {"sparsifier": "dare", "combine": "mean", "key": jax.random.key(2)}),
]


@pytest.mark.parametrize("name,hparams", FLAT)
def test_elementwise_rules_merge_leaves_of_any_shape_with_a_few_programs(
  monkeypatch, name, hparams
):
  # Leaves of 7 shapes, 1 to 2000 entries; chunks of 16 (the last padded) below 64 entries, so
  # "big" and "wide" stay whole (their own programs, one of them in blocks of rows).
  _whole_from(monkeypatch, 64)
  shapes = {"a": (3, 5), "b": (7,), "c": (2, 3, 3), "d": (), "e": (1, 9), "big": (8, 8)}
  base, experts = _models(shapes={**shapes, "wide": (200, 10)})
  hparams = rules.add_key(name, hparams, 7)
  expected = _in_memory(name, base, experts, **hparams)[0]
  roomy = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  assert roomy.flat_paths == set(shapes) - {"big"}
  budget = roomy.working_set["wide"] - 1  # "wide" in blocks of rows.
  engine = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=budget)
  assert engine.row_blocks.keys() == {"wide"} and engine.working_set["wide"] <= budget
  for path in base:
    for merge in (roomy, engine):
      got = merge.leaf(path)
      assert got.shape == np.shape(base[path]) and got.dtype == base[path].dtype
      np.testing.assert_array_equal(got, np.asarray(expected[path]), err_msg=path)


@pytest.mark.parametrize(
  "name,hparams",
  [
    ("della", {}),  # Its election's fallback: merged in the statistics pass, in chunks.
    ("della", {"combine": "sum", "layout": "torch"}),
    ("della", {"scope": "leaf", "combine": "mean"}),
    ("breadcrumbs", {"density": 0.5}),
    ("breadcrumbs_ties", {"counting": "mergekit", "layout": "torch"}),
    ("sparsify_combine", {"sparsifier": "none", "combine": "ties"}),
  ],
)
def test_rules_with_leaf_stats_or_sign_sums_merge_in_flat_chunks(monkeypatch, name, hparams):
  # DELLA's and Breadcrumbs' statistics within rows come from the host (`RuleSpec.leaf_stats`),
  # so their programs are
  # elementwise: one program (chunks of 16, the last padded) for six leaf shapes; the same bits
  # at any budget.
  _whole_from(monkeypatch, 64)
  shapes = {"a": (3, 5), "b": (7,), "c": (2, 3, 3), "d": (), "e": (1, 9), "f": (4, 10)}
  base, experts = _models(shapes=shapes)
  hparams = rules.add_key(name, hparams, 7)
  expected = _in_memory(name, base, experts, **hparams)[0]
  streaming.programs._EXECUTABLES.clear()
  roomy = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  assert roomy.flat_paths == set(shapes)
  assert roomy.timings.executables == 1, roomy.timings
  assert roomy.timings.speculated == (len(shapes) if roomy.apply_mode == "speculate" else 0)
  tight = streaming.StreamingMerge(
    name, base, experts, hparams, memory_budget=roomy.timings.peak_working_set_bytes
  )
  assert tight.timings.groups > 1 and tight.timings.executables == 0
  for path in base:
    for merge in (roomy, tight):
      np.testing.assert_array_equal(merge.leaf(path), np.asarray(expected[path]), err_msg=path)


def test_host_statistics_chunk_only_shapes_whose_programs_cost_more(monkeypatch):
  # Host statistics cost more per entry than a leaf's own program: shapes with more entries in
  # all (over their leaves and experts) than the limit keep their programs.
  _whole_from(monkeypatch, 64)
  shapes = {"a/w": (4, 10), "b/w": (4, 10), "c": (7,), "d": (3, 5)}
  base, experts = _models(shapes=shapes)
  monkeypatch.setattr(flat, "HOST_STATS_SHAPE_ENTRIES", 2 * 40 * len(experts) - 1)
  expected = _in_memory("breadcrumbs", base, experts)[0]
  engine = streaming.StreamingMerge("breadcrumbs", base, experts, {}, memory_budget=2**30)
  assert engine.flat_paths == {"c", "d"}  # Two 4 x 10 leaves: above the limit.
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]), err_msg=path)


@pytest.mark.parametrize("name", ["task_arithmetic", "dare", "ties"])
@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16])
def test_flat_chunks_of_bf16_leaves_in_any_output_dtype(monkeypatch, name, dtype):
  _whole_from(monkeypatch, 64)
  base, experts = _models(shapes={"a": (3, 7), "b": (40,), "c": (3, 4, 5)})  # 2, 3, 4 chunks.
  base, experts = _bf16(base), [_bf16(e) for e in experts]
  hparams = rules.add_key(name, {}, 5)
  expected = _in_memory(name, base, experts, **hparams)[0]
  engine = streaming.StreamingMerge(name, base, experts, hparams, dtype=dtype, memory_budget=2**30)
  assert engine.flat_paths == set(base)
  for path in base:
    want = np.asarray(expected[path])
    want = want if dtype is None else want.astype(dtype)
    got = engine.leaf(path)
    assert got.dtype == want.dtype == (dtype or jnp.bfloat16)
    np.testing.assert_array_equal(got, want, err_msg=path)


@pytest.mark.parametrize("name", ["tall_masks", "emr"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_task_specific_rules_merge_flat_chunks_into_every_task_model(monkeypatch, name, dtype):
  # TALL masks and EMR (given its rescalers' whole-model sums) are elementwise: their programs
  # build all T task models chunk by chunk (2, 3 and 4 chunks of 16 below), as rules.merge's
  # callers build them from its result.
  _whole_from(monkeypatch, 64)
  base, experts = _models(shapes={"a": (3, 7), "b": (40,), "c": (3, 4, 5)})
  if dtype is not None:
    base, experts = _bf16(base), [_bf16(e) for e in experts]
  expected = _in_memory(name, base, experts)
  engine = streaming.StreamingMerge(name, base, experts, {}, memory_budget=2**30)
  assert engine.flat_paths == set(base) and engine.num_outputs == len(expected) == 3
  assert (engine.num_totals > 0) == (name == "emr")  # The rescalers' sums, from whole leaves.
  for t, model in enumerate(expected):
    for path in base:
      got = engine.leaf(path, t)
      assert got.dtype == base[path].dtype
      np.testing.assert_array_equal(got, np.asarray(model[path]), err_msg=f"{path}, task {t}")


def _bf16(model):
  return {p: x.astype(jnp.bfloat16) for p, x in model.items()}


def test_flat_chunks_compile_one_program_per_chunk_size():
  # 24 leaves of 24 shapes (up to 72 entries): every one a single chunk of 4096 entries.
  shapes = {f"layer_{i}/w": (i + 1, 8) for i in range(9)}
  shapes.update({f"layer_{i}/b": (i + 1,) for i in range(15)})
  base, experts = _models(shapes=shapes)
  hparams = rules.add_key("dare", {"density": 0.4}, 1)
  engine = streaming.StreamingMerge("dare", base, experts, hparams, memory_budget=2**30)
  assert engine.flat_paths == set(shapes)
  whole = {(np.shape(x), x.dtype) for x in base.values()}
  assert engine.timings.executables in (0, 1) and len(whole) == 24
  expected = _in_memory("dare", base, experts, **hparams)[0]
  for path in base:
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]))


def test_a_rule_coupling_leaves_is_merged_in_memory():
  def global_norm(base, experts, *, scale=1.0):
    tv = [jax.tree.map(lambda x, b: x - b, e, base) for e in experts]
    norm = sum(jnp.sum(x**2) for x in jax.tree.leaves(tv[0]))  # Not a leafwise.total.
    return jax.tree.map(lambda b, x: b + scale * x / norm, base, tv[0])

  rules.register("global_norm_demo", global_norm, scale=rules.spec.SCALE)
  try:
    base, experts = _models()
    engine = streaming.StreamingMerge("global_norm_demo", base, experts, {}, memory_budget=8000)
    assert "depends on leaf" in engine.reason
    expected = _in_memory("global_norm_demo", base, experts)[0]
    for path in base:
      np.testing.assert_array_equal(engine.leaf(path), np.asarray(expected[path]))
  finally:
    del rules.REGISTRY["global_norm_demo"]


def test_a_nan_names_the_leaf_and_the_expert():
  base, experts = _models()
  experts[1]["c/w"] = experts[1]["c/w"].copy()
  experts[1]["c/w"][2, 3] = np.nan
  engine = streaming.StreamingMerge("ties", base, experts, {}, memory_budget=8000)
  with pytest.raises(ValueError, match=r"Leaf 'c/w' of experts\[1\] holds 1 NaN"):
    [engine.leaf(p) for p in base]


@pytest.mark.parametrize(
  "name", sorted(n for n, r in rules.REGISTRY.items() if not r.data_dependent)
)
def test_a_nan_in_a_large_leaf_is_caught_in_chunks_and_whole_leaves(name):
  # 8192 entries: flat chunks for the elementwise rules, whole leaves for the others (XLA on the
  # CPU drops NaNs from max reductions that large; the fused check reduces isfinite instead).
  base, experts = _models(shapes={"w": (64, 128), "b": (300,)})
  experts = experts[:2] if name == "slerp" else experts
  experts[1]["w"] = experts[1]["w"].copy()
  experts[1]["w"][40, 100] = np.nan
  hparams = rules.add_key(name, {}, 3)
  engine = streaming.StreamingMerge(name, base, experts, hparams, memory_budget=2**30)
  elementwise = rules.REGISTRY[name].elementwise
  assert ("w" in engine.flat_paths) == bool(elementwise and elementwise(engine.full))
  with pytest.raises(ValueError, match=r"Leaf 'w' of experts\[1\] holds 1 NaN"):
    [engine.leaf(p, t) for t in range(engine.num_outputs) for p in base]


# ------------------------------------------------------------------------------ from disk
def _hf_models(tmp_path, n=3):
  base, experts = _models(
    n,
    shapes={
      "model.embed.weight": (32, 8),
      "model.h.0.fc.weight": (8, 8),
      "model.h.1.fc.weight": (8, 8),
      "lm_head.weight": (32, 8),
    },
  )
  paths = []
  for i, sd in enumerate([base, *experts]):
    d = tmp_path / ("base" if i == 0 else f"expert{i}")
    hf.write_dir(d, {k.replace("/", "."): v for k, v in sd.items()}, {"model_type": "toy"})
    paths.append(str(d))
  return paths[0], paths[1:]


def _config(rule, base, experts, **fields):
  config = merge_config.get_config(rule)
  config.base, config.experts = base, tuple(experts)
  for k, v in fields.items():
    setattr(config, k, v)
  return config


def _snapshot(directory):
  return {
    str(p.relative_to(directory)): p.read_bytes()
    for p in sorted(pathlib.Path(directory).rglob("*"))
    if p.is_file()
  }


def test_from_disk_streaming_equals_memory_engine(tmp_path):
  base, experts = _hf_models(tmp_path)
  for engine in ("memory", "streaming"):
    config = _config("ties", base, experts, engine=engine, shard_size="1KB", dtype="bfloat16")
    config.memory_budget_gb = 2e-6  # ~2 KiB: a group per leaf or two.
    run_record = __import__("mergejax.run", fromlist=["run"]).merge_from_disk(
      config, tmp_path / engine
    )
  assert _snapshot(tmp_path / "memory" / "merged") == _snapshot(tmp_path / "streaming" / "merged")
  record = json.loads((tmp_path / "streaming" / "run.json").read_text())
  assert record["engine"] == "streaming" and record["streaming"]["groups"] > 1
  # The leaves' views, then (at ~2 KiB neither the candidates nor a sampled band fit) the
  # histogram and the threshold bin's entries.
  assert record["streaming"]["stats_passes"] == 3 and run_record["phases_s"]["plan"] >= 0


def test_a_budget_below_one_leaf_writes_nothing(tmp_path):
  from mergejax import run

  base, experts = _hf_models(tmp_path)
  workdir = tmp_path / "w"
  run.merge_from_disk(_config("task_arithmetic", base, experts), workdir)
  before = _snapshot(workdir)
  config = _config("task_arithmetic", base, experts, memory_budget_gb=1e-7)
  with pytest.raises(ValueError, match="memory budget"):
    run.merge_from_disk(config, workdir)
  assert _snapshot(workdir) == before and not list(tmp_path.glob(".mergejax-tmp-*"))


_KILLER = textwrap.dedent(
  """
  import os, signal, sys
  from configs import merge as merge_config
  from mergejax import run, streaming

  base, workdir, *experts = sys.argv[1:]
  run_group, seen = streaming.StreamingMerge._run_group, []
  def counting(self, group):  # Killed once a few shards are complete in the staged workdir.
    seen.append(group)
    if len(seen) == 2:
      os.kill(os.getpid(), signal.SIGKILL)
    return run_group(self, group)
  streaming.StreamingMerge._run_group = counting
  config = merge_config.get_config("dare")
  config.base, config.experts, config.shard_size = base, tuple(experts), "1KB"
  config.memory_budget_gb = 2e-6
  run.merge_from_disk(config, workdir)
  """
)


def test_a_run_killed_mid_stream_leaves_nothing_partial(tmp_path):
  from mergejax import run

  base, experts = _hf_models(tmp_path)
  workdir = tmp_path / "w"
  run.merge_from_disk(_config("task_arithmetic", base, experts, shard_size="1KB"), workdir)
  before = _snapshot(workdir)
  proc = subprocess.run(
    [sys.executable, "-c", _KILLER, base, str(workdir), *experts], cwd=ROOT, capture_output=True
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  staged = list(tmp_path.glob(".mergejax-tmp-w-*/merged/model-*.safetensors"))
  assert staged, "the kill came before any shard was complete"  # Shards complete as they go...
  assert _snapshot(workdir) == before  # ...but only in the staged workdir.
  atomic.remove_debris(tmp_path, "w")
  assert not list(tmp_path.glob(".mergejax-tmp-*"))


@pytest.mark.parametrize("k", [1, 37, 500, 700])
@pytest.mark.parametrize("how", ["two passes", "band", "band that misses"])
def test_streaming_top_k_equals_the_host_selection(k, how, monkeypatch):
  # Two experts of bf16 leaves with many ties (values on a coarse grid), against θ0.
  from mergejax import selection, streaming_topk

  if how == "band that misses":  # A band of one sampled bin from one block: usually wrong.
    monkeypatch.setattr(streaming_topk, "_SIGMAS", 0.0)
    monkeypatch.setattr(streaming_topk, "_SLACK", 0)
    monkeypatch.setattr(streaming_topk, "_BLOCK", 7)
    monkeypatch.setattr(streaming_topk, "_SAMPLE_BLOCKS", 1)
  rng = np.random.default_rng(k)
  grid = lambda shape: (rng.integers(-40, 40, shape) / 64).astype(jnp.bfloat16)  # noqa: E731
  base = [grid((30, 20)), grid((100,))]
  experts = [[grid(b.shape) for b in base] for _ in range(2)]
  leaves = lambda: iter([(b, [e[i] for e in experts]) for i, b in enumerate(base)])  # noqa: E731
  monkeypatch.setattr(streaming_topk, "_CANDIDATE_BYTES", 10**9)  # Never the host selection.
  budget = None if how == "two passes" else 10**6
  got = streaming_topk.model_top_k_stats(leaves, [600, 100], k, memory_budget=budget)
  want = selection.top_k_stats_eager(experts, [k, k], origins=[base, base])
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_readme_notebook_example_gives_rules_merge_task_models():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
  (block,) = [textwrap.dedent(b) for b in blocks if 'StreamingMerge("emr"' in b]
  base, experts = _models()
  base, experts = tree_lib.unflatten(base), [tree_lib.unflatten(e) for e in experts]
  namespace = {"base": base, "experts": experts}
  exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README's example)
  expected = rules.task_models(rules.merge("emr", base, experts), base, len(experts))
  assert len(namespace["models"]) == len(expected) == 3
  for got, want in zip(namespace["models"], expected, strict=True):
    chex.assert_trees_all_equal(got, jax.tree.map(np.asarray, want))
