r"""Benchmark (not a test): mergejax vs transformers/torch on ViT-B/32-shaped CLIP image encoders.

  python launch/bench_hf.py --workdir=/tmp/bench_hf            # full: ViT-B/32, 9 checkpoints
  python launch/bench_hf.py --workdir=/tmp/bench_hf --small    # seconds-long smoke run

Random weights, built locally (nothing is downloaded). Two measurements, each against
transformers + torch in the same process on the same inputs, repeats interleaved; medians:
  1. evaluation throughput (images/s): uint8 224x224 images -> normalize -> image encoder ->
     projection -> zero-shot logits (mergejax: jitted flax; torch: eval mode, no_grad);
  2. load time of 9 CLIPVisionModel checkpoints from safetensors (mergejax:
     `hf.load_pretrained` into flax-layout numpy; transformers: `from_pretrained`).
Prints a Markdown table and writes workdir/bench_hf.json.
"""

import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mergejax import provenance
from mergejax.benchmarks.clip8 import classifier
from mergejax.io import hf
from mergejax.models import clip

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_hf", "Checkpoints and results go here.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny model and few repeats (smoke run).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per evaluation step.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per framework (after one warm-up).")
_CHECKPOINTS = flags.DEFINE_integer("checkpoints", 9, "Checkpoints to load (pre-trained + 8).")
_CLASSES = 100


def _vision_config(small: bool) -> dict:
  if small:
    return dict(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=64,
      patch_size=16,
    )
  return dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
  )  # ViT-B/32.


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv):
  del argv
  import torch  # noqa: PLC0415 (benchmark-only dependency)
  import transformers  # noqa: PLC0415

  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  small, repeats = _SMALL.value, (2 if _SMALL.value else _REPEATS.value)
  vcfg = dict(_vision_config(small), model_type="clip_vision_model", projection_dim=512)
  rng = np.random.default_rng(0)

  # Checkpoints: a random image encoder saved by transformers, and perturbed copies (distinct
  # files). Both frameworks read them from a warm page cache, so load times measure parsing and
  # conversion, not the disk.
  torch.manual_seed(0)
  tmodel = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vcfg)).eval()
  dirs = []
  for i in range(_CHECKPOINTS.value):
    d = workdir / f"ckpt_{i}"
    if not (d / "model.safetensors").exists():
      with torch.no_grad():
        for p in tmodel.parameters():
          p.add_(1e-3 * torch.randn_like(p))
      tmodel.save_pretrained(d)
    dirs.append(d)
  tmodel = transformers.CLIPVisionModel.from_pretrained(dirs[0]).eval()
  nparams = sum(p.numel() for p in tmodel.parameters())

  # 1. Evaluation throughput on identical weights, inputs and head.
  module_cfg = clip.CLIPVisionConfig.from_dict(vcfg)
  params, _ = hf.load_pretrained(dirs[0])
  head = rng.standard_normal((_CLASSES, 512)).astype(np.float32)
  head /= np.linalg.norm(head, axis=-1, keepdims=True)
  proj = (rng.standard_normal((vcfg["hidden_size"], 512)) / 30).astype(np.float32)
  cparams = {
    "backbone": clip.vision_tower(params),
    "head": {
      "visual_projection": {"kernel": proj},
      "class_embeddings": head,
      "logit_scale": np.float32(np.log(100.0)),
    },
  }
  cparams = jax.device_put(cparams)
  zero_shot = classifier.ZeroShotClassifier(module_cfg, _CLASSES, 512)
  jax_step = jax.jit(zero_shot.apply)
  size = vcfg["image_size"]
  images = rng.integers(0, 256, (_BATCH.value, size, size, 3), dtype=np.uint8)

  mean = torch.tensor(clip.IMAGE_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(clip.IMAGE_STD).view(1, 3, 1, 1)
  t_proj, t_head = torch.from_numpy(proj), torch.from_numpy(head)

  def torch_step(batch):
    with torch.inference_mode():
      x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
      f = tmodel(pixel_values=x).pooler_output @ t_proj
      return 100.0 * torch.nn.functional.normalize(f, dim=-1) @ t_head.T

  jax_logits = np.asarray(jax_step({"params": cparams}, images))  # Warm-up (compiles).
  torch_logits = torch_step(images).numpy()
  max_diff = float(np.abs(jax_logits - torch_logits).max())
  eval_s = {"mergejax": [], "torch": []}
  for _ in range(repeats):
    eval_s["mergejax"].append(
      _time(lambda: jax_step({"params": cparams}, images).block_until_ready())
    )
    eval_s["torch"].append(_time(lambda: torch_step(images)))

  # 2. Loading all checkpoints (warm page cache for both).
  def load_mergejax():  # Device arrays in flax layout, ready to merge.
    return jax.block_until_ready([hf.load_pretrained(d)[0] for d in dirs])

  def load_mergejax_lazy():  # Memory-mapped numpy views (read on first use).
    return [hf.load_pretrained(d, lazy=True)[0] for d in dirs]

  def load_torch():
    return [transformers.CLIPVisionModel.from_pretrained(d) for d in dirs]

  load_mergejax(), load_mergejax_lazy(), load_torch()  # Warm-up: page cache, imports.
  load_s = {"mergejax": [], "mergejax_lazy": [], "torch": []}
  for _ in range(repeats):
    load_s["mergejax"].append(_time(load_mergejax))
    load_s["mergejax_lazy"].append(_time(load_mergejax_lazy))
    load_s["torch"].append(_time(load_torch))

  # Report.
  med = {k: statistics.median(v) for k, v in eval_s.items()}
  lmed = {k: statistics.median(v) for k, v in load_s.items()}
  result = {
    "model": "ViT-B/32 image encoder" if not small else "small",
    "parameters": nparams,
    "batch_size": _BATCH.value,
    "repeats": repeats,
    "logits_max_abs_diff": max_diff,
    "eval_seconds": eval_s,
    "load_seconds": load_s,
    "checkpoints": len(dirs),
    "images_per_s_median": {k: _BATCH.value / v for k, v in med.items()},
    "load_all_seconds_median": lmed,
    "torch_threads": torch.get_num_threads(),
    "cpu_count": os.cpu_count(),
    "devices": [str(d) for d in jax.devices()],
    "versions": provenance.package_versions(
      ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "safetensors")
    ),
  }
  (workdir / "bench_hf.json").write_text(json.dumps(result, indent=2))
  print(
    f"{result['model']}, {nparams / 1e6:.1f}M params, batch {_BATCH.value}, {repeats} repeats, "
    f"devices {result['devices']}, logits max|diff| {max_diff:.2e}"
  )
  print("| measurement (median) | mergejax | transformers/torch | mergejax speed-up |")
  print("|---|---|---|---|")
  ips = result["images_per_s_median"]
  print(
    f"| eval images/s | {ips['mergejax']:.1f} | {ips['torch']:.1f} | "
    f"{ips['mergejax'] / ips['torch']:.2f}x |"
  )
  print(
    f"| load {len(dirs)} checkpoints (s) | {lmed['mergejax']:.2f} | {lmed['torch']:.2f} | "
    f"{lmed['torch'] / lmed['mergejax']:.2f}x |"
  )
  print(
    f"| load {len(dirs)} checkpoints, lazy (s) | {lmed['mergejax_lazy']:.3f} | "
    f"{lmed['torch']:.2f} | {lmed['torch'] / lmed['mergejax_lazy']:.1f}x |"
  )


if __name__ == "__main__":
  jnp.zeros(())  # Initialise the backend before torch spins up its thread pool.
  app.run(main)
