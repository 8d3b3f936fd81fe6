r"""Benchmark (not a test): out-of-core merges of Llama-shaped bf16 HF checkpoints, vs mergekit.

  python launch/bench_out_of_core.py --hidden=512 --layers=8 --vocab=32000   # ~58M params each
  python launch/bench_out_of_core.py --hidden=2048 --layers=16 --vocab=128256 \
      --intermediate=8192 --kv_heads=8 --tie_embeddings --dir=/tmp/ooc \
      --rules=task_arithmetic,ties,dare_ties,breadcrumbs   # Llama-3.2-1B's shapes: 1.24B, 22 GB

Writes a base and --experts experts (base + N(0, 0.002²) noise, bf16, sharded safetensors with a
Llama config.json) under --dir, then, per rule, runs in fresh processes the mergejax CLI
(launch/merge.py, streaming engine) and mergekit-yaml (--lazy-unpickle --low-cpu-memory, torch's
default threads) on the same files, measured by `bench_util.sample`: wall and CPU time, peak
RssAnon (anonymous memory; the page cache of memory-mapped inputs is not counted) and peak RSS.
"read once" is the time to read every input file once, before the runs and after them (page
cache as it stands: a model larger than the free memory is read from disk; with --cold, root
only, the cache is emptied before it and before every run, so every figure reads from disk).
The checkpoints are deleted at the end unless --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import bench_util  # launch/ is the script's directory, so on sys.path.
import ml_dtypes
import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

_DIR = flags.DEFINE_string("dir", "/work/tmp_ooc", "Where the synthetic checkpoints go.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_INTER = flags.DEFINE_integer("intermediate", None, "MLP width (default 2.7 x hidden).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads of 64 (default: all heads).")
_TIED = flags.DEFINE_bool("tie_embeddings", False, "No lm_head: tied to the embedding.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Number of experts.")
_RULES = flags.DEFINE_list("rules", ["task_arithmetic", "ties"], "Rules to run.")
_BUDGET = flags.DEFINE_float("budget_gb", 2.0, "mergejax's memory_budget_gb.")
_PEERS = flags.DEFINE_bool("mergekit", True, "Also run mergekit.")
_MERGEKIT_BIN = flags.DEFINE_string(
  "mergekit_bin", bench_util.MERGEKIT_BIN, "mergekit-yaml of mergekit's own virtual environment."
)
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints.")
_ONLY_WRITE = flags.DEFINE_bool("only_write", False, "Write the checkpoints (kept) and stop.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "A run taking longer is killed.")
_COLD = flags.DEFINE_bool(
  "cold",
  False,
  "Empty the page cache (root only) before the read-once and before every run, so each figure "
  "reads its inputs from disk, as a one-shot merge of files on disk does. Without it, what the "
  "cache holds depends on the runs before (22 GB of inputs, 23 GiB of RAM).",
)

# DARE-TIES: each library's own at p = 0.9. mergejax's default is the DARE paper's code (1/(1-p),
# then a TIES trim of the whole model, mass election, disjoint mean; the trim's thresholds from a
# host pass); mergekit's dare_ties (normalize: false) has no trim,
# restores each tensor's L1 norm and sums. mergejax's port of mergekit's variant
# (configs/dare_ties_mergekit.py) rescales per whole leaf, so its embedding cannot be split into
# blocks and needs ~9.3 GiB: run it with --rules=dare_ties_mergekit and a larger --budget_gb.
_MERGEKIT_DARE_TIES = ("dare_ties", {"weight": 1.0, "density": 0.1}, {"normalize": False})
VARIANTS = {
  "dare_ties": ("configs/merge.py:dare_ties", [], _MERGEKIT_DARE_TIES),
  "dare_ties_mergekit": (
    "configs/dare_ties_mergekit.py",
    ["--config.rule.density=0.1"],
    _MERGEKIT_DARE_TIES,
  ),
}


def llama_shapes(hidden, layers, vocab, inter, kv_width, tied):
  shapes = {
    "model.embed_tokens.weight": (vocab, hidden),
    "model.norm.weight": (hidden,),
  }
  if not tied:
    shapes["lm_head.weight"] = (vocab, hidden)
  for i in range(layers):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      width = kv_width if name in ("k_proj", "v_proj") else hidden
      shapes[f"{p}self_attn.{name}.weight"] = (width, hidden)
    shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
    shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
    shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
    shapes[f"{p}input_layernorm.weight"] = (hidden,)
    shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
  return shapes


def make_checkpoints(root: Path, shapes, config):
  from mergejax.io import hf  # noqa: PLC0415

  rng = np.random.default_rng(0)
  paths = []
  for m in range(_EXPERTS.value + 1):
    d = root / ("base" if m == 0 else f"expert{m}")
    paths.append(d)
    if (d / "config.json").exists():
      continue
    sd = {}
    for name, shape in shapes.items():
      # crc32, not hash(): the same θ0 in every process (a resumed write included).
      base_rng = np.random.default_rng(zlib.crc32(name.encode()))
      x = base_rng.standard_normal(shape, np.float32) * 0.02
      if m:
        x += rng.standard_normal(shape, np.float32) * 0.002
      sd[name] = x.astype(ml_dtypes.bfloat16)
    hf.write_dir(d, sd, config, max_shard_size="1GB")
  return paths


def main(argv):
  del argv
  root = Path(_DIR.value)
  inter = _INTER.value or int(2.7 * _HIDDEN.value)
  heads = max(1, _HIDDEN.value // 64)
  kv_heads = _KV_HEADS.value or heads
  shapes = llama_shapes(
    _HIDDEN.value, _LAYERS.value, _VOCAB.value, inter, 64 * kv_heads, _TIED.value
  )
  params = sum(int(np.prod(s)) for s in shapes.values())
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": _HIDDEN.value,
    "intermediate_size": inter,
    "num_hidden_layers": _LAYERS.value,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "vocab_size": _VOCAB.value,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": _TIED.value,
    "torch_dtype": "bfloat16",
  }
  t0 = time.perf_counter()
  paths = make_checkpoints(root, shapes, config)
  inputs_gb = sum(f.stat().st_size for d in paths for f in d.glob("*.safetensors")) / 1e9
  print(
    f"{params / 1e6:.1f}M params per model, {inputs_gb:.2f} GB of inputs "
    f"(made in {time.perf_counter() - t0:.0f} s)"
  )
  if _ONLY_WRITE.value:
    return
  cold = bench_util.drop_page_cache if _COLD.value else lambda: None
  cold()
  read_s = bench_util.read_once(paths)
  print(f"read every input once: {read_s:.2f} s", flush=True)
  rows = []
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  for rule in _RULES.value:
    out = root / f"out_{rule}"
    config, overrides, mergekit_method = VARIANTS.get(
      rule, (f"configs/merge.py:{rule}", [], bench_util.MERGEKIT_METHODS.get(rule))
    )
    cmd = [
      sys.executable,
      str(ROOT / "launch/merge.py"),
      f"--config={ROOT}/{config}",
      *overrides,
      f"--config.base={paths[0]}",
      *[f"--config.experts={p}" for p in paths[1:]],
      f"--config.memory_budget_gb={_BUDGET.value}",
      f"--workdir={out}",
    ]
    cold()
    s = bench_util.sample(cmd, _TIMEOUT.value, env=env, cwd=ROOT)
    record = json.loads((out / "run.json").read_text()) if s.returncode == 0 else {}
    rows.append(("mergejax", rule, s))
    print(rule, s, record.get("phases_s"), record.get("streaming"), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if _PEERS.value and mergekit_method is not None:
      method, p, extra = mergekit_method
      yml = bench_util.mergekit_yaml(
        root / f"{rule}.yml", method, paths[0], paths[1:], p, extra, "bfloat16"
      )
      cmd = [
        _MERGEKIT_BIN.value,
        str(yml),
        str(root / f"mk_{rule}"),
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--no-cuda",
      ]
      cold()
      s = bench_util.sample(cmd, _TIMEOUT.value)
      rows.append(("mergekit", rule, s))
      print(rule, s, flush=True)
      shutil.rmtree(root / f"mk_{rule}", ignore_errors=True)
  cold()
  read_after = bench_util.read_once(paths)
  print(
    f"\n{params / 1e6:.0f}M params x (1 + {_EXPERTS.value}) bf16, {inputs_gb:.2f} GB; "
    f"read once {read_s:.2f} s (before the runs), {read_after:.2f} s (after)\n"
  )
  print("| tool | rule | wall s | wall / read once | CPU s | peak RssAnon MiB | peak RSS MiB |")
  print("|---|---|---|---|---|---|---|")
  for tool, rule, s in rows:
    status = "" if s.returncode == 0 else f" (exit {s.returncode})"
    print(
      f"| {tool} | {rule}{status} | {s.wall_s:.1f} | {s.wall_s / read_s:.1f} | {s.cpu_s:.1f} "
      f"| {s.peak_anon_mib:.0f} | {s.peak_rss_mib:.0f} |"
    )
  if not _KEEP.value:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
