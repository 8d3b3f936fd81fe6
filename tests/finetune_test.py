"""Training: one step of each mode, a frozen head, SAM/ASAM perturbations, linearization."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax import finetune, layer_decay, losses, models
from mergejax.benchmarks.common.data import Split


def _setup(seed=0, n=64):
  rng = np.random.default_rng(seed)
  data = Split(
    x=rng.random((n, 8, 8)).astype(np.float32), y=rng.integers(0, 10, n).astype(np.int32)
  )
  model = models.build_model("mlp", width=16, depth=1)
  params = model.init(jax.random.key(seed), jnp.asarray(data.x[:1]))["params"]
  return model, params, data


def _cfg(**kw):
  base = dict(steps=4, batch_size=16, learning_rate=1e-2, warmup_steps=1, weight_decay=0.0, chunk=2)
  return finetune.TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", finetune.MODES)
def test_fine_tuning_moves_backbone_only(mode):
  model, params, data = _setup()
  out, losses = finetune.train(model, params, data, _cfg(rho=0.05), mode=mode)
  assert losses.shape == (4,) and np.all(np.isfinite(losses))
  chex.assert_trees_all_equal(out["head"], params["head"])
  diffs = jax.tree.map(
    lambda a, b: float(jnp.abs(a - b).max()), out["backbone"], params["backbone"]
  )
  assert max(jax.tree.leaves(diffs)) > 0


def test_one_step_lowers_the_loss_on_its_batch():
  model, params, data = _setup()
  cfg = _cfg(learning_rate=1e-2, warmup_steps=0)
  opt = finetune.make_optimizer(cfg)
  step = jax.jit(finetune.make_train_step(model, opt, train_head=True))
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)
  loss_fn = lambda p: losses.cross_entropy(model.apply({"params": p}, x), y)
  new, _, loss = step(params, opt.init(params), None, x, y)
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-6)
  # With no warm-up the first step runs at the peak learning rate and descends on its batch.
  assert loss_fn(new) < loss_fn(params)


def test_pretraining_trains_the_head_and_is_deterministic():
  model, params, data = _setup()
  a, la = finetune.train(model, params, data, _cfg(), train_head=True, seed=3)
  b, lb = finetune.train(model, params, data, _cfg(), train_head=True, seed=3)
  chex.assert_trees_all_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.allclose(a["head"]["kernel"], params["head"]["kernel"])


def test_sam_and_asam_steps_differ_from_adamw():
  model, params, data = _setup()
  cfg = _cfg(steps=2, rho=0.5, chunk=2)
  outs = {
    m: finetune.train(model, params, data, cfg, mode=m)[0] for m in ("standard", "sam", "asam")
  }
  flat = {m: np.concatenate([np.ravel(x) for x in jax.tree.leaves(o)]) for m, o in outs.items()}
  assert not np.allclose(flat["standard"], flat["sam"])
  assert not np.allclose(flat["sam"], flat["asam"])


def test_adaptive_sharpness_direction():
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.0])}
  grads = {"a": jnp.array([0.5, 0.5]), "b": jnp.array([1.0])}
  tx = finetune.scale_by_adaptive_sharpness(eta=0.1)
  out, _ = tx.update(grads, tx.init(params), params)
  t = {"a": np.array([1.1, 2.1]), "b": np.array([0.1])}
  tg = {k: t[k] * np.asarray(grads[k]) for k in t}
  norm = np.sqrt(sum((v**2).sum() for v in tg.values()))
  for k in t:
    np.testing.assert_allclose(out[k], t[k] * tg[k] / norm, rtol=1e-5)
  # optax.contrib.sam negates the adversarial optimizer's update: sgd(rho) then ascends.
  adv = optax.chain(tx, optax.sgd(0.5))
  step, _ = adv.update(grads, adv.init(params), params)
  np.testing.assert_allclose(-step["b"], 0.5 * np.asarray(out["b"]), rtol=1e-6)


def test_linearized_forward_is_the_first_order_taylor_model():
  model, params, data = _setup()
  base, head = params["backbone"], params["head"]
  x = jnp.asarray(data.x[:8])
  lin = finetune.make_apply(model, mode="linearized", base_backbone=base)
  std = finetune.make_apply(model)
  np.testing.assert_allclose(lin(base, head, x), std(base, head, x), atol=1e-6)
  delta = jax.tree.map(
    lambda a: 1e-3 * jnp.sign(jnp.sin(jnp.arange(a.size))).reshape(a.shape), base
  )
  moved = jax.tree.map(jnp.add, base, delta)
  # Linear in the displacement: doubling it doubles the change.
  moved2 = jax.tree.map(lambda a, d: a + 2 * d, base, delta)
  d1 = lin(moved, head, x) - lin(base, head, x)
  d2 = lin(moved2, head, x) - lin(base, head, x)
  np.testing.assert_allclose(d2, 2 * d1, rtol=1e-3, atol=1e-6)
  # And it agrees with the true model to first order: the error is second order in the step.
  change = np.abs(std(moved, head, x) - std(base, head, x)).max()
  error = np.abs(lin(moved, head, x) - std(moved, head, x)).max()
  assert change > 1e-3 and error < 0.05 * change
  with pytest.raises(ValueError, match="base_backbone"):
    finetune.make_apply(model, mode="linearized")


def test_decay_towards_init_pulls_back_to_the_start():
  # Zero gradients: only the decay acts, so each step moves p by -lr * wd * (p - p0).
  tx = finetune.add_decayed_weights_towards_init(0.5)
  p0 = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(p0)
  p = {"w": jnp.array([3.0, -2.0])}
  updates, _ = tx.update({"w": jnp.zeros(2)}, state, p)
  np.testing.assert_allclose(updates["w"], [1.0, 0.0])  # 0.5 * (p - p0)


@pytest.mark.parametrize("mode", ["standard", "sam"])
def test_decay_to_init_from_zero_weights_is_adamw(mode):
  # With initial weights 0 the anchor is 0, so the chain is AdamW's exactly.
  model, params, data = _setup()
  params = {"backbone": jax.tree.map(jnp.zeros_like, params["backbone"]), "head": params["head"]}
  cfg = _cfg(weight_decay=0.1, rho=0.05)
  a, _ = finetune.train(model, params, data, cfg, mode=mode)
  b, _ = finetune.train(model, params, data, cfg._replace(decay_to_init=True), mode=mode)
  chex.assert_trees_all_close(a, b, atol=1e-7)


def test_decay_to_init_adds_no_shrink_component():
  # Decay towards 0 moves the backbone along -θ0 (a component shared by every expert); decay
  # towards θ0 does not, so its task vector has the smaller component along -θ0.
  model, params, data = _setup()
  cfg = _cfg(weight_decay=1.0, learning_rate=1e-2, steps=8)
  to_zero, _ = finetune.train(model, params, data, cfg)
  to_init, _ = finetune.train(model, params, data, cfg._replace(decay_to_init=True))
  base = params["backbone"]
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  shrink = lambda out: float(
    jnp.dot(flat(out["backbone"]) - flat(base), -flat(base)) / jnp.linalg.norm(flat(base))
  )
  assert shrink(to_zero) > shrink(to_init)


def test_sgd_steps_are_heavy_ball_plus_decoupled_decay():
  cfg = finetune.TrainConfig(
    optimizer="sgd", learning_rate=0.1, momentum=0.5, weight_decay=0.2, warmup_steps=0, steps=10
  )
  tx = finetune.make_optimizer(cfg._replace(decay_to_init=True))
  p0 = np.array([1.0, -1.0])
  grads = [np.array([2.0, 0.0]), np.array([-1.0, 3.0]), np.array([0.5, 0.5])]
  lr = [float(optax.cosine_decay_schedule(0.1, 10)(k)) for k in range(3)]

  def reference(decay_in_momentum):
    p, m, out = p0.copy(), np.zeros(2), []
    for k, g in enumerate(grads):
      d = 0.2 * (p - p0)
      m = 0.5 * m + g + (d if decay_in_momentum else 0.0)
      p = p - lr[k] * (m + (0.0 if decay_in_momentum else d))
      out.append(p)
    return out

  state, p = tx.init({"w": jnp.asarray(p0)}), {"w": jnp.asarray(p0)}
  for k, g in enumerate(grads):
    u, state = tx.update({"w": jnp.asarray(g)}, state, p)
    p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["w"], reference(decay_in_momentum=False)[k], rtol=1e-6)
  # The order matters from the third step on: decay inside the momentum (torch's SGD) differs.
  assert not np.allclose(reference(True)[-1], reference(False)[-1], rtol=1e-4)
  with pytest.raises(ValueError, match="Unknown optimizer"):
    finetune.make_optimizer(cfg._replace(optimizer="lion"))


@pytest.mark.parametrize("mode", ["standard", "sam"])
def test_sgd_fine_tuning_moves_the_backbone_only(mode):
  model, params, data = _setup()
  cfg = _cfg(optimizer="sgd", learning_rate=0.05, decay_to_init=True, rho=0.05)
  out, losses = finetune.train(model, params, data, cfg, mode=mode)
  chex.assert_trees_all_equal(out["head"], params["head"])
  assert not np.allclose(
    np.asarray(jax.tree.leaves(out["backbone"])[0]),
    np.asarray(jax.tree.leaves(params["backbone"])[0]),
  )
  assert np.isfinite(losses).all()


def test_layer_indices_of_a_residual_mlp_and_a_vit():
  resmlp = {
    "embed": {"kernel": 0},
    "block_0": {"dense_in": {"kernel": 0}},
    "block_2": {"ln": {"scale": 0}},
    "ln_final": {"scale": 0},
  }
  layers, num = layer_decay.layer_indices(resmlp)
  assert num == 3
  assert layers == {
    "embed": {"kernel": 0},
    "block_0": {"dense_in": {"kernel": 1}},
    "block_2": {"ln": {"scale": 3}},
    "ln_final": {"scale": 4},
  }
  vit = {"embedding": {"kernel": 0}, "cls": 0, "pos_embedding": 0, "block_0": {"w": 0}, "head": 0}
  layers, num = layer_decay.layer_indices(vit)
  assert num == 1
  assert layers == {
    "embedding": {"kernel": 0},
    "cls": 0,
    "pos_embedding": 0,
    "block_0": {"w": 1},
    "head": 2,
  }
  with pytest.raises(ValueError, match="name their block"):
    layer_decay.layer_indices({"dense": {"kernel": 0}})


def test_layer_decay_scales_each_layers_step():
  # SGD without momentum or decay, constant rate: the step is -lr * decay**(L + 1 - layer) * g.
  cfg = finetune.TrainConfig(
    optimizer="sgd",
    momentum=0.0,
    learning_rate=0.1,
    warmup_steps=0,
    steps=10**6,
    weight_decay=0.0,
    layer_decay=0.5,
  )
  params = {
    "embed": jnp.ones(2),
    "block_0": jnp.ones(2),
    "block_1": jnp.ones(2),
    "ln_final": jnp.ones(2),
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx = finetune.make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = {"embed": 0.125, "block_0": 0.25, "block_1": 0.5, "ln_final": 1.0}
  for name, factor in expected.items():
    np.testing.assert_allclose(updates[name], -0.1 * factor * np.ones(2), rtol=1e-6)
  # 1.0 is the plain optimizer, bit for bit.
  plain = finetune.make_optimizer(cfg._replace(layer_decay=1.0))
  ref, _ = plain.update(grads, plain.init(params), params)
  chex.assert_trees_all_equal(ref["embed"], -0.1 * jnp.ones(2))
  with pytest.raises(ValueError, match="layer_decay must be in"):
    finetune.make_optimizer(cfg._replace(layer_decay=1.5))
