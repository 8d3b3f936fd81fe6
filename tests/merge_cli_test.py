"""The merge entry: configs, checkpoints from disk, provenance, clear errors."""

import importlib
import json
import pathlib
import re
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
VARIANTS = {
  "ties_fusionbench": "ties",
  "ties_mergekit": "ties",
  "breadcrumbs_mergekit": "breadcrumbs",
  "dare_ties_mergekit": "dare_ties",
}


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
    if key == "layout":  # From disk, run.merge_from_disk resolves it from the checkpoint.
      assert value == "auto"
      continue
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


def _cli(tmp_path, *flags, rule="task_arithmetic"):
  cmd = [
    sys.executable,
    str(ROOT / "launch/merge.py"),
    "--config",
    str(ROOT / "configs/merge.py") + f":{rule}",
    f"--workdir={tmp_path / 'cli'}",
    *flags,
  ]
  return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_cli_lists_hold_commas_in_paths_and_regexes(tmp_path):
  # Issue 11 item 1: `--config.exclude=h.{1,3}/w` was split on its comma and excluded nothing.
  root = tmp_path / "with,comma"
  root.mkdir()
  base, experts = _write_models(root, n=2)
  done = _cli(
    tmp_path,
    f"--config.base={base}",
    f"--config.experts='{experts[0]}'",  # One flag per element; quoted, it may hold commas.
    f"--config.experts='{experts[1]}'",
    "--config.exclude='hea.{1,3}'",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads((tmp_path / "cli" / "run.json").read_text())
  assert record["config"]["exclude"] == ["hea.{1,3}"]
  assert record["inputs"]["experts"] == experts
  merged = checkpoint.load_params(tmp_path / "cli" / "merged.safetensors")
  np.testing.assert_array_equal(merged["head"], np.ones(2))  # Excluded: θ0's.


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--config.exclude=haed"], "exclude pattern 'haed' matches no leaf"),
    (["--config.rule.scale=1e39"], "overflows float32"),
    (["--config.experts=/a,/b"], "insert quotes around each element"),
    (["--config.rule.weights=(1.0, -1.0)"], r"outside \[0, inf\]"),
  ],
)
def test_cli_refuses_bad_values_and_writes_nothing(tmp_path, flags, message):
  base, experts = _write_models(tmp_path, n=2)
  rule = "weight_average" if "weights" in flags[0] else "task_arithmetic"
  given = [f"--config.experts={e}" for e in experts] if "experts" not in flags[0] else []
  done = _cli(tmp_path, f"--config.base={base}", *given, *flags, rule=rule)
  assert done.returncode != 0 and re.search(message, done.stderr), done.stderr[-2000:]
  assert not (tmp_path / "cli").exists()
