"""Data-dependent rules (Fisher merging, RegMean, RegMean++) and their statistics: hand-worked
cases (least squares, Fisher weights, a linear softmax model's Fisher), properties, determinism,
validation messages, the CLI and the README example."""

import functools
import pathlib
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import merge as merge_config
from mergejax import rules, run, statistics, streaming
from mergejax import tree as tree_lib
from mergejax.io import checkpoint
from mergejax.models import vit

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class OneLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="dense")(x)


class TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(5, name="dense_0")(x))
    return nn.Dense(3, name="dense_1")(h)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  # Compilation dominates these tests on CPU; XLA's optimizations buy nothing at these sizes.
  saved = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


@functools.cache
def _zoo(name, num_experts=3, d_in=4, seed=0):
  """θ0, experts θ0 + noise, one apply_fn, and per-task batches of unequal sizes.

  Cached, so that every test shares one apply_fn and with it the compiled statistics functions.
  """
  model = {"one": OneLayer, "two": TwoLayer}[name]()
  base = model.init(jax.random.key(seed), jnp.zeros((1, d_in)))["params"]
  experts = [
    jax.tree.map(lambda p, k=t: p + 0.3 * jax.random.normal(jax.random.key(100 + k), p.shape), base)
    for t in range(num_experts)
  ]
  rng = np.random.default_rng(seed)
  batches = [
    [jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32) for n in (3, 2 + t)]
    for t in range(num_experts)
  ]
  return base, experts, (lambda p, x: model.apply({"params": p}, x)), batches


def _regmean_stats(apply_fn, experts, batches):
  return [
    statistics.regmean_statistics(apply_fn, e, b) for e, b in zip(experts, batches, strict=True)
  ]


# ------------------------------------------------------------------------------ RegMean
def test_regmean_on_one_layer_is_least_squares():
  base, experts, apply_fn, batches = _zoo("one")
  stats = _regmean_stats(apply_fn, experts, batches)
  merged = rules.merge("regmean", base, experts, statistics=stats, alpha=1.0)
  # min_W Σt (1/nt) ‖Xt W − Xt Wt‖²: the Gram matrices are means over each task's rows.
  xs = [np.concatenate([np.asarray(b, np.float64) for b in bs]) for bs in batches]
  a = np.concatenate([x / np.sqrt(len(x)) for x in xs])
  rhs = np.concatenate(
    [
      x @ np.asarray(e["dense"]["kernel"], np.float64) / np.sqrt(len(x))
      for x, e in zip(xs, experts, strict=True)
    ]
  )
  expected = np.linalg.lstsq(a, rhs, rcond=None)[0]
  np.testing.assert_allclose(merged["dense"]["kernel"], expected, rtol=2e-5, atol=2e-6)
  # The bias is not a linear layer's kernel: the experts' mean.
  mean_bias = np.mean([np.asarray(e["dense"]["bias"]) for e in experts], axis=0)
  np.testing.assert_allclose(merged["dense"]["bias"], mean_bias, rtol=1e-6)
  # The statistics are the mean Gram matrices Xtᵀ Xt / nt.
  np.testing.assert_allclose(
    stats[1]["grams"]["dense"]["kernel"], xs[1].T @ xs[1] / len(xs[1]), rtol=1e-5
  )


def test_regmean_alpha_zero_weighs_inputs_feature_by_feature():
  base, experts, apply_fn, batches = _zoo("one")
  stats = _regmean_stats(apply_fn, experts, batches)
  merged = rules.regmean(base, experts, stats, alpha=0.0)
  d = np.stack([np.diag(s["grams"]["dense"]["kernel"]) for s in stats])  # [T, d_in]
  w = np.stack([e["dense"]["kernel"] for e in experts])  # [T, d_in, d_out]
  expected = (d[:, :, None] * w).sum(0) / d.sum(0)[:, None]
  np.testing.assert_allclose(merged["dense"]["kernel"], expected, rtol=1e-5)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):  # [n, tokens, 8]
    return nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)


def test_gram_matrices_of_attention_are_those_of_its_inputs():
  model = Attention()
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  params = model.init(jax.random.key(0), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  stats = statistics.regmean_statistics(apply_fn, params, [x])
  grams = tree_lib.flatten(stats["grams"])
  names = [f"attn/{n}/kernel" for n in ("query", "key", "value", "out")]
  assert list(grams) == sorted(names)
  # q/k/v (DenseGeneral kernels [8, heads, head_dim]) read the tokens as rows; the output
  # projection [heads, head_dim, 8] reads the heads concatenated: d_in = heads · head_dim.
  rows = np.asarray(x, np.float64).reshape(-1, 8)
  np.testing.assert_allclose(grams["attn/query/kernel"], rows.T @ rows / len(rows), rtol=1e-5)
  np.testing.assert_array_equal(grams["attn/query/kernel"], grams["attn/value/kernel"])
  assert grams["attn/out/kernel"].shape == (8, 8)
  # The merge takes DenseGeneral kernels as matrices: [2, 4, 8] as [8, 8].
  experts = [jax.tree.map(lambda p, k=k: p * (1.0 + 0.1 * k), params) for k in (1, 2)]
  other = jax.tree.map(lambda g: 2.0 * g + jnp.eye(len(g)), stats)
  merged = rules.merge("regmean", params, experts, statistics=[stats, other], alpha=0.5)
  grams = [np.asarray(s["grams"]["attn"]["out"]["kernel"], np.float64) for s in (stats, other)]
  grams = [0.5 * g + 0.5 * np.diag(np.diag(g)) for g in grams]
  kernels = [np.asarray(e["attn"]["out"]["kernel"], np.float64).reshape(8, 8) for e in experts]
  expected = np.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, kernels, strict=True)))
  out = np.asarray(merged["attn"]["out"]["kernel"])
  np.testing.assert_allclose(out.reshape(8, 8), expected, rtol=1e-4, atol=1e-5)
  assert out.shape == (2, 4, 8)


def test_the_repository_vit_has_its_linear_layers_found():
  model = vit.ViT(num_classes=3, dim=8, depth=2, num_heads=2, mlp_dim=16, patch_size=2)
  x = jnp.zeros((2, 4, 4, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # Shapes only.

  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params["head"])

  def apply_fn(backbone, x):  # The head is closed over: not merged, so no Gram matrix.
    return model.apply({"params": {"backbone": backbone, "head": head}}, x)

  found = statistics.linear_layers(apply_fn, params["backbone"], x)  # Traced, not run.
  per_block = [f"attn/{n}/kernel" for n in ("query", "key", "value", "out")]
  per_block += ["mlp_in/kernel", "mlp_out/kernel"]
  assert found == [f"block_{i}/{n}" for i in range(2) for n in per_block]
  order, _, _ = statistics.block_plan(found, tree_lib.leaf_paths(params["backbone"]))
  assert order == ["block_0", "block_1"]


# ------------------------------------------------------------------------------ RegMean++
def test_regmean_plusplus_on_one_layer_is_regmean():
  base, experts, apply_fn, batches = _zoo("one")
  plain = _regmean_stats(apply_fn, experts, batches)
  plus = statistics.regmean_plusplus_statistics(apply_fn, experts, batches, alpha=0.7)
  for p, q in zip(plain, plus, strict=True):
    chex.assert_trees_all_equal(p["grams"], q["grams"])
  a = rules.merge("regmean", base, experts, statistics=plain, alpha=0.7)
  b = rules.merge("regmean_plusplus", base, experts, statistics=plus, alpha=0.7)
  chex.assert_trees_all_equal(a, b)


def test_regmean_plusplus_reads_inputs_through_the_merged_layers_below():
  base, experts, apply_fn, batches = _zoo("two")
  alpha = 0.9
  plus = statistics.regmean_plusplus_statistics(apply_fn, experts, batches, alpha=alpha)
  # Layer 0 reads the data: RegMean's statistics. Layer 1 reads gelu(X W0 + b0) of the *merged*
  # layer 0 (RegMean kernel, mean bias), not of expert t's own.
  plain = _regmean_stats(apply_fn, experts, batches)
  for p, q in zip(plain, plus, strict=True):
    np.testing.assert_array_equal(p["grams"]["dense_0"]["kernel"], q["grams"]["dense_0"]["kernel"])
  layer0 = rules.regmean(base, experts, plain, alpha=alpha)["dense_0"]
  for t, bs in enumerate(batches):
    x = np.concatenate([np.asarray(b) for b in bs])
    h = np.asarray(nn.gelu(x @ layer0["kernel"] + layer0["bias"]), np.float64)
    np.testing.assert_allclose(
      plus[t]["grams"]["dense_1"]["kernel"], h.T @ h / len(h), rtol=1e-4, atol=1e-6
    )
    own = plain[t]["grams"]["dense_1"]["kernel"]
    assert not np.allclose(own, plus[t]["grams"]["dense_1"]["kernel"], rtol=1e-3)
  merged = rules.merge("regmean_plusplus", base, experts, statistics=plus, alpha=alpha)
  assert merged["dense_1"]["kernel"].shape == (5, 3)


def test_block_plan_groups_a_block_and_keeps_lone_layers_apart():
  kernels = [
    "embed/kernel",
    "block_0/mlp/dense_in/kernel",
    "block_0/mlp/dense_out/kernel",
    "head/kernel",
  ]
  paths = kernels + ["embed/bias", "block_0/ln/scale", "ln_final/scale"]
  order, leaves, _ = statistics.block_plan(kernels, paths)
  assert order == ["embed", "block_0", "head"]
  assert leaves["embed/bias"] == "embed" and leaves["block_0/ln/scale"] == "block_0"
  assert leaves["ln_final/scale"] is None  # Outside every block: averaged from the start.


# ------------------------------------------------------------------------------ Fisher
def _softmax_model(seed=0, d_in=3, classes=4, n=5):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((d_in, classes)), jnp.float32)}
  x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
  return params, x, y, lambda p, x: x @ p["w"]


def test_fisher_of_a_linear_softmax_model():
  params, x, y, apply_fn = _softmax_model()
  xn, p = np.asarray(x, np.float64), np.asarray(jax.nn.softmax(x @ params["w"]), np.float64)
  # Expected over the predictive distribution: Σc p_c (δ_cj − p_j)² x_i² = p_j (1 − p_j) x_i².
  got = statistics.fisher_statistics(apply_fn, params, [x[:2], x[2:]])["fisher"]["w"]
  np.testing.assert_allclose(
    got, np.mean(xn[:, :, None] ** 2 * (p * (1 - p))[:, None], 0), rtol=1e-5
  )
  # Empirical: (δ_{y j} − p_j)² x_i²; per example or per batch of one, the same.
  onehot = np.eye(4)[np.asarray(y)]
  expected = np.mean(xn[:, :, None] ** 2 * ((onehot - p) ** 2)[:, None], 0)
  batches = [(x[i : i + 1], y[i : i + 1]) for i in range(5)]
  for per_example in (True, False):
    got = statistics.fisher_statistics(
      apply_fn, params, batches, labels="empirical", per_example=per_example
    )
    np.testing.assert_allclose(got["fisher"]["w"], expected, rtol=1e-5)
  # FusionBench's batch form squares the gradient of Σn Σc sqrt(p_nc) log p_nc (p constant).
  w = np.sqrt(p)
  g = xn[:, :, None] * (w - p * w.sum(-1, keepdims=True))[:, None]  # [n, d_in, classes]
  got = statistics.fisher_statistics(apply_fn, params, [x], per_example=False)["fisher"]["w"]
  np.testing.assert_allclose(got, g.sum(0) ** 2 / 5, rtol=1e-5)


def test_fisher_statistics_equal_vmap_of_grad():
  base, experts, apply_fn, batches = _zoo("two")
  x = jnp.concatenate(batches[0])
  y = jnp.arange(len(x)) % 3

  def log_p(params, xi, yi):
    return jax.nn.log_softmax(apply_fn(params, xi[None])[0])[yi]

  grads = jax.vmap(jax.grad(log_p), in_axes=(None, 0, 0))(experts[0], x, y)
  expected = jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads)
  got = statistics.fisher_statistics(apply_fn, experts[0], [(x, y)], labels="empirical")
  chex.assert_trees_all_close(got["fisher"], expected, rtol=1e-5, atol=1e-8)
  # Sampled labels: drawn from the model, reproducible from the key.
  a = statistics.fisher_statistics(
    apply_fn, experts[0], [x], labels="sampled", key=jax.random.key(3)
  )
  b = statistics.fisher_statistics(
    apply_fn, experts[0], [x], labels="sampled", key=jax.random.key(3)
  )
  chex.assert_trees_all_equal(a, b)


def _vec_models(values):
  base = {"w": jnp.zeros(2)}
  return base, [{"w": jnp.asarray(v, jnp.float32)} for v in values]


@pytest.mark.parametrize("floor", ["add", "max"])
@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_with_equal_fishers_is_weight_averaging(floor, normalize):
  base, experts = _vec_models([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]])
  stats = [{"fisher": {"w": jnp.array([0.5, 2.0])}}] * 3
  out = rules.merge("fisher", base, experts, statistics=stats, floor=floor, normalize=normalize)
  np.testing.assert_allclose(out["w"], rules.weight_average(base, experts)["w"], rtol=1e-6)


def test_fisher_weights_are_proportional_to_the_fisher():
  base, experts = _vec_models([[1.0, 1.0], [3.0, 3.0]])
  stats = [{"fisher": {"w": jnp.array([1.0, 3.0])}}, {"fisher": {"w": jnp.array([3.0, 1.0])}}]
  out = rules.merge("fisher", base, experts, statistics=stats, normalize=False, min_weight=0.0)
  np.testing.assert_allclose(out["w"], [(1 + 9) / 4, (3 + 3) / 4], rtol=1e-6)
  # Normalized (the default): scaling one expert's Fisher changes nothing up to ε.
  scaled = [stats[0], {"fisher": {"w": 100.0 * stats[1]["fisher"]["w"]}}]
  a = rules.merge("fisher", base, experts, statistics=stats)
  b = rules.merge("fisher", base, experts, statistics=scaled)
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5)
  # FusionBench's arithmetic: F + ε, coefficients (1/(‖Ft‖ + ε)) normalized to sum 1.
  eps, f = 1e-6, [np.array([1.0, 3.0]), np.array([3.0, 1.0])]
  c = np.array([1 / (np.linalg.norm(fi) + eps) for fi in f])
  c = c / c.sum()
  num = sum(ci * (fi + eps) * np.asarray(e["w"]) for ci, fi, e in zip(c, f, experts, strict=True))
  den = sum(ci * (fi + eps) for ci, fi in zip(c, f, strict=True))
  np.testing.assert_allclose(a["w"], num / den, rtol=1e-6)
  # Zero Fisher everywhere: the floor decides, the coefficient-weighted mean.
  zero = [{"fisher": {"w": jnp.zeros(2)}}] * 2
  out = rules.merge("fisher", base, experts, statistics=zero, weights=[3.0, 1.0], normalize=False)
  np.testing.assert_allclose(out["w"], [1.5, 1.5], rtol=1e-5)


# ------------------------------------------------------------------------------ properties
def test_statistics_are_deterministic_and_round_trip(tmp_path):
  base, experts, apply_fn, batches = _zoo("two")
  fisher = [
    statistics.fisher_statistics(apply_fn, e, b) for e, b in zip(experts, batches, strict=True)
  ]
  again = [
    statistics.fisher_statistics(apply_fn, e, b) for e, b in zip(experts, batches, strict=True)
  ]
  chex.assert_trees_all_equal(fisher, again)
  plus = statistics.regmean_plusplus_statistics(apply_fn, experts, batches)
  chex.assert_trees_all_equal(
    plus, statistics.regmean_plusplus_statistics(apply_fn, experts, batches)
  )
  statistics.save(tmp_path / "plus", plus)
  loaded = statistics.load(tmp_path / "plus")
  chex.assert_trees_all_equal(loaded, plus)
  a = rules.merge("regmean_plusplus", base, experts, statistics=plus)
  chex.assert_trees_all_equal(a, rules.merge("regmean_plusplus", base, experts, statistics=loaded))


def test_a_scalar_sweep_compiles_once_and_bf16_stays_bf16():
  base, experts, apply_fn, batches = _zoo("two")
  stats = _regmean_stats(apply_fn, experts, batches)
  fn = jax.jit(chex.assert_max_traces(rules.regmean, n=1))
  for alpha in (0.2, 0.5, 0.9):
    fn(base, experts, stats, alpha=jnp.float32(alpha))
  fisher = [{"fisher": jax.tree.map(jnp.ones_like, base)}] * 3
  fn = jax.jit(chex.assert_max_traces(rules.fisher_merging, n=1))
  for eps in (1e-6, 1e-3):
    fn(base, experts, fisher, min_weight=jnp.float32(eps))
  # bf16 storage, float32 arithmetic, bf16 output: the float32 merge of the same values, rounded.
  low = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
  high = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  bf16_experts = [low(e) for e in experts]
  out = rules.merge("regmean", low(base), bf16_experts, statistics=stats)
  chex.assert_trees_all_equal_dtypes(out, low(base))
  expected = rules.regmean(base, [high(e) for e in bf16_experts], stats)
  chex.assert_trees_all_close(high(out), high(low(expected)), rtol=1e-2, atol=1e-3)
  out = rules.merge("fisher", low(base), bf16_experts, statistics=fisher)
  chex.assert_trees_all_equal_dtypes(out, low(base))
  expected = rules.weight_average(base, [high(e) for e in bf16_experts])  # Equal Fishers.
  chex.assert_trees_all_close(high(out), high(low(expected)), rtol=1e-2, atol=1e-3)


def test_include_exclude_select_the_statistics_too():
  base, experts, apply_fn, batches = _zoo("two")
  stats = _regmean_stats(apply_fn, experts, batches)
  out = rules.merge("regmean", base, experts, statistics=stats, exclude="dense_1/.*")
  chex.assert_trees_all_equal(out["dense_1"], base["dense_1"])
  whole = rules.merge("regmean", base, experts, statistics=stats)
  chex.assert_trees_all_close(out["dense_0"], whole["dense_0"], rtol=1e-6)


# ------------------------------------------------------------------------------ validation
def test_statistics_errors_name_the_leaf_and_the_fix():
  base, experts, apply_fn, batches = _zoo("two")
  grams = _regmean_stats(apply_fn, experts, batches)
  fisher = [
    statistics.fisher_statistics(apply_fn, e, b) for e, b in zip(experts, batches, strict=True)
  ]
  with pytest.raises(ValueError, match="data-dependent: pass statistics="):
    rules.merge("regmean", base, experts)
  with pytest.raises(TypeError, match="data-free"):
    rules.merge("task_arithmetic", base, experts, statistics=grams)
  with pytest.raises(ValueError, match="2 entries; expected one per expert \\(3\\)"):
    rules.merge("regmean", base, experts, statistics=grams[:2])
  with pytest.raises(ValueError, match="needs 'grams'.*regmean_statistics"):
    rules.merge("regmean", base, experts, statistics=fisher)
  missing = [{"fisher": {"dense_0": f["fisher"]["dense_0"]}} for f in fisher]
  with pytest.raises(ValueError, match="leaf 'dense_1/bias' has no Fisher in statistics\\[0\\]"):
    rules.merge("fisher", base, experts, statistics=missing)
  wrong = [{"grams": {"dense_1": {"kernel": jnp.eye(4)}}}] * 3
  with pytest.raises(ValueError, match="leaf 'dense_1/kernel' has shape \\(5, 3\\).*\\(4, 4\\)"):
    rules.merge("regmean", base, experts, statistics=wrong)
  other = [{"grams": {"backbone": g["grams"]}} for g in grams]
  with pytest.raises(ValueError, match="'backbone/dense_0/kernel'.*the same root"):
    rules.merge("regmean", base, experts, statistics=other)
  nan = [grams[0], grams[1], jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grams[2])]
  with pytest.raises(ValueError, match=re.escape("'grams/dense_0/kernel' of statistics[2]")):
    rules.merge("regmean", base, experts, statistics=nan)
  with pytest.raises(ValueError, match="no 'alpha'.*regmean_plusplus_statistics"):
    rules.merge("regmean_plusplus", base, experts, statistics=grams)
  plus = [dict(g, alpha=jnp.float32(0.95)) for g in grams]
  with pytest.raises(ValueError, match="computed with alpha=\\[0.95, 0.95, 0.95\\]"):
    rules.merge("regmean_plusplus", base, experts, statistics=plus, alpha=0.5)
  with pytest.raises(ValueError, match="labels='empirical' needs labels"):
    statistics.fisher_statistics(apply_fn, base, batches[0], labels="empirical")
  with pytest.raises(ValueError, match="no nn.Dense"):  # apply_fn ignores the tree it is given.
    statistics.regmean_statistics(lambda p, x: apply_fn(base, x), experts[0], batches[0])
  with pytest.raises(ValueError, match="merges in memory"):
    streaming.StreamingMerge(
      "regmean", tree_lib.flatten(base), [tree_lib.flatten(e) for e in experts], {}
    )


def test_merge_from_disk_with_saved_statistics(tmp_path):
  base, experts, apply_fn, batches = _zoo("two")
  checkpoint.save_params(tmp_path / "base", base)
  for t, e in enumerate(experts):
    checkpoint.save_params(tmp_path / f"e{t}", e)
  statistics.save(tmp_path / "stats", _regmean_stats(apply_fn, experts, batches))
  config = merge_config.get_config("regmean")
  config.base, config.experts = (
    str(tmp_path / "base"),
    tuple(str(tmp_path / f"e{t}") for t in range(3)),
  )
  with pytest.raises(ValueError, match="--config.statistics=DIR"):
    run.merge_from_disk(config, tmp_path / "out")
  config.statistics = str(tmp_path / "stats")
  record = run.merge_from_disk(config, tmp_path / "out")
  assert record["engine"] == "memory" and record["statistics"] == config.statistics
  merged = checkpoint.load_params(record["outputs"][0])
  expected = rules.merge("regmean", base, experts, statistics=statistics.load(tmp_path / "stats"))
  np.testing.assert_allclose(merged["dense_1"]["kernel"], expected["dense_1"]["kernel"], rtol=1e-6)


def _readme_block() -> str:
  text = _README.read_text()
  start = text.index("## Data-dependent rules")
  end = text.index("\n## ", start + 1)
  (block,) = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)
  return block


def test_the_readme_example_runs(tmp_path):
  namespace = {"workdir": str(tmp_path)}
  exec(compile(_readme_block(), "README.md", "exec"), namespace)  # noqa: S102 (the README's example)
  for name in ("fisher", "regmean", "regmean_plusplus"):
    merged = namespace["merged"][name]
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, namespace["base"])
