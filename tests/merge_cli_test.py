"""The merge entry: configs, checkpoints from disk, provenance, clear errors."""

import importlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import merge as merge_config
from mergejax import rules, run
from mergejax.io import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Anchor variants of configs/merge.py: (module, the rule it configures).
VARIANTS = {"ties_fusionbench": "ties"}


def _load_config(name):
  if name in VARIANTS:
    return importlib.import_module(f"configs.{name}").get_config()
  return merge_config.get_config(name)


def _write_models(tmp_path, n=3):
  base = {"backbone": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, "head": jnp.ones(2)}
  checkpoint.save_params(tmp_path / "base.safetensors", base)
  paths = []
  for i in range(n):
    key = jax.random.key(i)
    expert = jax.tree.map(lambda x, k=key: x + jax.random.normal(k, x.shape), base)
    paths.append(str(tmp_path / f"expert{i}"))  # orbax directories
    checkpoint.save_params(paths[-1], expert)
  return str(tmp_path / "base.safetensors"), paths


@pytest.mark.parametrize("name", sorted(rules.REGISTRY))
def test_every_rule_config_holds_its_defaults(name):
  config = _load_config(name)
  defaults = rules.hparams_of(name)
  assert config.rule_name == name
  assert set(config.rule) == {k for k in defaults if k != "key"}
  for key, value in config.rule.items():
    assert value == defaults[key], f"{name}: {key}={value} differs from the rule's default"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_configs_name_known_hparams(name):
  config = _load_config(name)
  assert config.rule_name == VARIANTS[name]
  assert set(config.rule) <= set(rules.hparams_of(config.rule_name))


def test_a_registered_rule_gets_a_config():
  def halve(base, experts, *, scale=0.5):
    return rules.task_arithmetic(base, experts, scale=scale)

  rules.register("halve_test", halve, scale=rules.spec.SCALE)
  try:
    assert merge_config.get_config("halve_test").rule.to_dict() == {"scale": 0.5}
  finally:
    del rules.REGISTRY["halve_test"]


@pytest.mark.parametrize("name", ["ties", "emr", "dare", "tall_masks"])
def test_merge_from_disk(tmp_path, name):
  base, experts = _write_models(tmp_path)
  config = _load_config(name)
  config.base, config.experts, config.exclude = base, tuple(experts), ("head",)
  record = run.merge_from_disk(config, tmp_path / "out")
  written = json.loads((tmp_path / "out" / "run.json").read_text())
  assert written["config"]["rule_name"] == config.rule_name
  assert written["versions"]["jax"] == jax.__version__
  assert len(record["outputs"]) == (3 if name in ("emr", "tall_masks") else 1)
  merged = checkpoint.load_params(record["outputs"][0])
  np.testing.assert_array_equal(merged["head"], np.ones(2))  # Excluded: kept from base.
  assert merged["backbone"]["w"].shape == (4, 3)


def test_missing_paths(tmp_path):
  config = _load_config("ties")
  with pytest.raises(ValueError, match="--config.base"):
    run.merge_from_disk(config, tmp_path)
  config.base, config.experts = str(tmp_path / "nope.safetensors"), ("x",)
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    run.merge_from_disk(config, tmp_path)


def test_cli_end_to_end_and_unknown_key(tmp_path):
  base, experts = _write_models(tmp_path, n=2)
  cmd = [
    sys.executable,
    str(ROOT / "launch/merge.py"),
    "--config",
    str(ROOT / "configs/merge.py") + ":ties",
    f"--config.base={base}",
    *[f"--config.experts={e}" for e in experts],
    f"--workdir={tmp_path / 'cli'}",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "cli" / "merged.safetensors").exists()
  done = subprocess.run(
    cmd + ["--config.rule.dnsity=0.3"], capture_output=True, text=True, check=False
  )
  assert done.returncode != 0 and "dnsity" in done.stderr
