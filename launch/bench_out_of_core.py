r"""Benchmark (not a test): out-of-core merges of Llama-shaped bf16 HF checkpoints, vs mergekit.

  python launch/bench_out_of_core.py --hidden=512 --layers=8 --vocab=32000   # ~58M params each
  python launch/bench_out_of_core.py --hidden=2048 --layers=16 --vocab=128256 \
      --intermediate=8192 --rules=task_arithmetic,ties,dare_ties,breadcrumbs   # ~1.2B (22 GB)

Writes a base and --experts experts (base + N(0, 0.002²) noise, bf16, sharded safetensors with a
Llama config.json) under --dir, then, per rule, runs in fresh processes the mergejax CLI
(launch/merge.py, streaming engine) and mergekit-yaml (--lazy-unpickle --low-cpu-memory) on the
same files, sampling /proc/<pid>/status every 20 ms: peak RssAnon (anonymous memory; the page
cache of memory-mapped inputs is not counted) and peak RSS (VmHWM). "read once" is the time to
read every input file once (page cache as it stands: warm after the first run, as for every
figure here). The checkpoints are deleted at the end unless --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

_DIR = flags.DEFINE_string("dir", "/work/tmp_ooc", "Where the synthetic checkpoints go.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_INTER = flags.DEFINE_integer("intermediate", None, "MLP width (default 2.7 x hidden).")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Number of experts.")
_RULES = flags.DEFINE_list("rules", ["task_arithmetic", "ties"], "Rules to run.")
_BUDGET = flags.DEFINE_float("budget_gb", 2.0, "mergejax's memory_budget_gb.")
_PEERS = flags.DEFINE_bool("mergekit", True, "Also run mergekit.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints.")

# mergekit method names and parameters of the same merges (paper defaults of mergejax's configs).
MERGEKIT_METHODS = {
  "task_arithmetic": ("task_arithmetic", {"weight": 0.3}, {}),
  "ties": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
  "dare_ties": ("dare_ties", {"weight": 1.0, "density": 0.1}, {"normalize": True}),
  "breadcrumbs": ("breadcrumbs", {"weight": 0.2, "density": 0.15, "gamma": 0.006}, {}),
}


def llama_shapes(hidden, layers, vocab, inter):
  shapes = {
    "model.embed_tokens.weight": (vocab, hidden),
    "lm_head.weight": (vocab, hidden),
    "model.norm.weight": (hidden,),
  }
  for i in range(layers):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
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
      base_rng = np.random.default_rng(abs(hash(name)) % 2**32)
      x = base_rng.standard_normal(shape, np.float32) * 0.02
      if m:
        x += rng.standard_normal(shape, np.float32) * 0.002
      sd[name] = x.astype(ml_dtypes.bfloat16)
    hf.write_dir(d, sd, config, max_shard_size="1GB")
  return paths


def sample(cmd, **kwargs):
  """Runs `cmd`; returns (wall s, peak RssAnon MiB, peak RSS MiB, returncode, output tail)."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
  peak = {"anon": 0, "rss": 0}

  def watch():
    while proc.poll() is None:
      try:
        for line in open(f"/proc/{proc.pid}/status"):
          if line.startswith("RssAnon:"):
            peak["anon"] = max(peak["anon"], int(line.split()[1]))
          elif line.startswith("VmHWM:"):
            peak["rss"] = max(peak["rss"], int(line.split()[1]))
      except OSError:
        pass
      time.sleep(0.02)

  t = threading.Thread(target=watch)
  t.start()
  out = proc.communicate()[0].decode(errors="replace")
  t.join()
  return (
    time.perf_counter() - start,
    peak["anon"] / 1024,
    peak["rss"] / 1024,
    proc.returncode,
    out[-1500:],
  )


def read_once(paths) -> float:
  start = time.perf_counter()
  for d in paths:
    for f in sorted(d.glob("*.safetensors")):
      with open(f, "rb") as fh:
        while fh.read(1 << 24):
          pass
  return time.perf_counter() - start


def main(argv):
  del argv
  root = Path(_DIR.value)
  inter = _INTER.value or int(2.7 * _HIDDEN.value)
  shapes = llama_shapes(_HIDDEN.value, _LAYERS.value, _VOCAB.value, inter)
  params = sum(int(np.prod(s)) for s in shapes.values())
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": _HIDDEN.value,
    "intermediate_size": inter,
    "num_hidden_layers": _LAYERS.value,
    "num_attention_heads": max(1, _HIDDEN.value // 64),
    "num_key_value_heads": max(1, _HIDDEN.value // 64),
    "vocab_size": _VOCAB.value,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
  }
  t0 = time.perf_counter()
  paths = make_checkpoints(root, shapes, config)
  inputs_gb = sum(f.stat().st_size for d in paths for f in d.glob("*.safetensors")) / 1e9
  print(
    f"{params / 1e6:.1f}M params per model, {inputs_gb:.2f} GB of inputs "
    f"(made in {time.perf_counter() - t0:.0f} s)"
  )
  read_s = read_once(paths)
  print(f"read every input once: {read_s:.2f} s")
  rows = []
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  for rule in _RULES.value:
    out = root / f"out_{rule}"
    cmd = [
      sys.executable,
      str(ROOT / "launch/merge.py"),
      f"--config={ROOT}/configs/merge.py:{rule}",
      f"--config.base={paths[0]}",
      *[f"--config.experts={p}" for p in paths[1:]],
      f"--config.memory_budget_gb={_BUDGET.value}",
      f"--workdir={out}",
    ]
    wall, anon, rss, rc, tail = sample(cmd, env=env, cwd=ROOT)
    record = json.loads((out / "run.json").read_text()) if rc == 0 else {}
    rows.append(("mergejax", rule, wall, anon, rss, rc, record.get("phases_s")))
    print(rows[-1] if rc == 0 else tail)
    shutil.rmtree(out, ignore_errors=True)
    if _PEERS.value and rule in MERGEKIT_METHODS:
      method, p, extra = MERGEKIT_METHODS[rule]
      yml = root / f"{rule}.yml"
      models = "\n".join(f"  - model: {d}\n    parameters: {json.dumps(p)}" for d in paths[1:])
      yml.write_text(
        f"merge_method: {method}\nbase_model: {paths[0]}\nmodels:\n{models}\n"
        f"parameters: {json.dumps(extra)}\ndtype: bfloat16\n"
      )
      cmd = [
        MERGEKIT_BIN,
        str(yml),
        str(root / f"mk_{rule}"),
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--no-cuda",
        "-j",
        "1",
      ]
      wall, anon, rss, rc, tail = sample(cmd)
      rows.append(("mergekit", rule, wall, anon, rss, rc, None))
      print(rows[-1] if rc == 0 else tail)
      shutil.rmtree(root / f"mk_{rule}", ignore_errors=True)
  print(
    f"\n{params / 1e6:.0f}M params x (1 + {_EXPERTS.value}) bf16, {inputs_gb:.2f} GB; "
    f"read once {read_s:.2f} s\n"
  )
  print("| tool | rule | wall s | wall / read once | peak RssAnon MiB | peak RSS MiB |")
  print("|---|---|---|---|---|---|")
  for tool, rule, wall, anon, rss, rc, _ in rows:
    status = "" if rc == 0 else f" (exit {rc})"
    print(
      f"| {tool} | {rule}{status} | {wall:.1f} | {wall / read_s:.1f} | {anon:.0f} | {rss:.0f} |"
    )
  if not _KEEP.value:
    shutil.rmtree(root, ignore_errors=True)


MERGEKIT_BIN = "/work/peers/mergekit/bin/mergekit-yaml"

if __name__ == "__main__":
  app.run(main)
