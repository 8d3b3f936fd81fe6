"""End to end on CPU: tiny random CLIP, generated image folders, perturbed experts.

Load -> heads -> merge -> evaluate -> export, in seconds. The pool is built with flax and written
by mergejax itself, so only Pillow and `tokenizers` are needed; the checks against transformers
run where it is installed.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
pytest.importorskip("tokenizers")

from PIL import Image  # noqa: E402

from configs import clip_8task  # noqa: E402
from mergejax.benchmarks.clip8 import classifier as clip8_classifier  # noqa: E402
from mergejax.benchmarks.clip8 import data as clip8_data  # noqa: E402
from mergejax.benchmarks.clip8 import pool as clip8_pool  # noqa: E402
from mergejax.benchmarks.clip8 import run as clip8_run  # noqa: E402
from mergejax.io import hf  # noqa: E402
from mergejax.io import tokenizer as tokenizer_lib  # noqa: E402
from mergejax.models import clip, pretrained  # noqa: E402

_TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
_TASKS = {  # task -> (class folder names, image size (w, h), mode)
  "mnist": (["0", "1", "2"], (28, 28), "L"),
  "eurosat": (["Forest", "River"], (40, 40), "RGB"),
  "dtd": (["banded", "dotted", "striped"], (48, 36), "RGB"),
}


def _write_tokenizer(directory: pathlib.Path) -> tuple[int, int]:
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  words = set()
  for task, (classes, _, _) in _TASKS.items():
    for template in clip8_classifier.TEMPLATES[task]:
      words.update(template.format(" ".join(classes)).lower().replace('"', ' " ').split())
  words.update(["annual", "crop", "land", "lake", "or", "sea", ".", ":", "!"])
  vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3}
  for w in sorted(words):
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
  )
  tok.save(str(directory / "tokenizer.json"))
  return len(vocab), 3


def _clip_config_dict(vocab_size: int, eos: int) -> dict:
  return {
    "model_type": "clip",
    "architectures": ["CLIPModel"],
    "projection_dim": 8,
    "logit_scale_init_value": 2.6592,
    "text_config": dict(
      _TOWER, vocab_size=vocab_size, max_position_embeddings=24, eos_token_id=eos, bos_token_id=2
    ),
    "vision_config": dict(_TOWER, image_size=32, patch_size=8),
  }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip8")
  rng = np.random.RandomState(0)

  # Pre-trained CLIPModel directory: flax init, written with mergejax's exporter.
  pretrained = root / "pretrained"
  pretrained.mkdir()
  vocab_size, eos = _write_tokenizer(pretrained)
  config = _clip_config_dict(vocab_size, eos)
  module = clip.CLIPModel(clip.CLIPConfig.from_dict(config))
  # Jitted: un-jitted init compiles each of ~135 ops separately (13 s on 2 cores).
  params = jax.jit(module.init)(
    jax.random.key(0), jnp.zeros([1, 24], jnp.int32), jnp.zeros([1, 32, 32, 3])
  )["params"]
  hf.save_pretrained(pretrained, params, config)

  # Experts: the pre-trained image encoder perturbed per task, saved as CLIPVisionModel files
  # with the "vision_model." prefix of FusionBench's (transformers 4) checkpoints.
  vision_config = dict(config["vision_config"], model_type="clip_vision_model")
  for task in _TASKS:
    expert = jax.tree.map(
      lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), params["vision_model"]
    )
    hf.save_pretrained(root / f"expert_{task}", {"vision_model": expert}, vision_config)

  # Image folders root/<task>/test/<class>/<i>.png, class-dependent brightness, varied sizes.
  for task, (classes, size, mode) in _TASKS.items():
    for c, name in enumerate(classes):
      folder = root / "data" / task / "test" / name
      folder.mkdir(parents=True)
      for j in range(5):
        level = 60 + 80 * c
        shape = (size[1], size[0]) + (() if mode == "L" else (3,))
        pixels = np.clip(rng.normal(level, 30, shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode).save(folder / f"{j}.png")
  (root / "data" / "eurosat" / "classnames.txt").write_text("annual crop land\nlake or sea\n")
  return root


def _config(root, rule="task_arithmetic"):
  config = clip_8task.get_config(f"rule={rule}")
  config.tasks = ",".join(_TASKS)
  config.pool.pretrained = str(root / "pretrained")
  config.pool.experts_dir = str(root / "expert_{task}")
  config.data.root_dir = str(root / "data" / "{task}")
  config.data.batch_size = 4  # 10-15 images per task: full batches and a padded one.
  return config


def test_pipeline_end_to_end(setup, tmp_path):
  config = _config(setup)
  config.rule.scale = 0.5
  record = clip8_run.merge_and_evaluate(config, tmp_path)

  # Results table: every row, every task, valid accuracies; files written.
  rows = record["results"]
  assert list(rows) == ["pretrained", "finetuned", "task_arithmetic scale=0.5"]
  for accs in rows.values():
    assert set(accs) == set(_TASKS) and all(0.0 <= a <= 1.0 for a in accs.values())
  assert record["examples"] == {t: 5 * len(c) for t, (c, _, _) in _TASKS.items()}
  table = (tmp_path / "results.md").read_text()
  assert "| model | mnist | eurosat | dtd | avg | normalized avg |" in table
  assert json.loads((tmp_path / "results.json").read_text())["results"] == rows

  # The export is θ0 + 0.5 Σ τt of the expert files, under the experts' own (prefixed) names.
  base = hf.read_state_dict(setup / "pretrained")
  experts = [hf.read_state_dict(setup / f"expert_{t}") for t in _TASKS]
  merged = hf.read_state_dict(tmp_path / "merged")
  assert set(merged) == set(experts[0])
  for name, value in merged.items():
    b = base[name]
    expected = b + 0.5 * sum(e[name] - b for e in experts)
    np.testing.assert_allclose(value, expected, atol=1e-5, err_msg=name)
  assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == (
    "clip_vision_model"
  )

  # Caches: preprocessed data and one head per task, reused by a second run.
  cache = tmp_path / "cache"
  assert len(list(cache.glob("head_*.npy"))) == len(_TASKS)
  assert len(list(cache.glob("data_*/images.npy"))) == len(_TASKS)
  config.eval_baselines = False
  again = clip8_run.merge_and_evaluate(config, tmp_path)
  assert again["results"]["task_arithmetic scale=0.5"] == rows["task_arithmetic scale=0.5"]


def test_evaluation_matches_direct_clip_forward(setup, tmp_path):
  # Accuracy from the jitted, padded, batched classifier == CLIPModel's own image-text logits.
  pool = clip8_pool.load_pool(
    str(setup / "pretrained"), {t: str(setup / f"expert_{t}") for t in _TASKS}
  )
  data = clip8_data.load_task_data(setup / "data" / "eurosat", "test", image_size=32)
  assert data.classnames == ["annual crop land", "lake or sea"]  # classnames.txt wins.
  templates = clip8_classifier.TEMPLATES["eurosat"]
  head = clip8_classifier.zero_shot_head(pool, data.classnames, templates, cache_dir=tmp_path)
  assert np.array_equal(head, np.load(next(tmp_path.glob("head_*.npy"))))

  model = clip.CLIPModel(pool.clip_config)
  tokenizer = tokenizer_lib.load_tokenizer(setup / "pretrained")
  ids, mask = tokenizer_lib.encode(
    tokenizer, [t.format(c) for c in data.classnames for t in templates]
  )
  apply = lambda method: jax.jit(functools.partial(model.apply, method=method))
  txt = np.asarray(
    apply(clip.CLIPModel.get_text_features)({"params": pool.clip_params}, ids, mask)
  ).reshape(2, len(templates), -1)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  np.testing.assert_allclose(
    head, txt.mean(1) / np.linalg.norm(txt.mean(1), axis=-1)[:, None], atol=1e-5
  )

  pixels = clip.normalize_pixels(data.images)
  img = np.asarray(apply(clip.CLIPModel.get_image_features)({"params": pool.clip_params}, pixels))
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  direct_logits = np.exp(float(pool.clip_params["logit_scale"])) * img @ head.T
  direct = np.mean(np.argmax(direct_logits, -1) == data.labels)
  classifier = clip8_classifier.ZeroShotClassifier(pool.clip_config.vision_config, 2, 8)
  params = clip8_classifier.classifier_params(pool, clip.vision_tower(pool.clip_params), head)
  logits = jax.jit(classifier.apply)({"params": params}, data.images)
  np.testing.assert_allclose(logits, direct_logits, rtol=1e-5, atol=1e-5)
  assert clip8_classifier.evaluate(classifier, params, data, batch_size=4) == pytest.approx(direct)
  # bf16 evaluation runs and agrees on these easy inputs up to a few flips.
  bf16 = clip8_classifier.ZeroShotClassifier(pool.clip_config.vision_config, 2, 8, jnp.bfloat16)
  assert abs(clip8_classifier.evaluate(bf16, params, data, batch_size=4) - direct) <= 0.2


def test_preprocessing_and_export_match_transformers(setup, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  processor = transformers.CLIPImageProcessor(
    size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
  )
  rng = np.random.RandomState(1)
  for shape in [(40, 30, 3), (30, 47, 3), (28, 28)]:
    image = Image.fromarray(rng.randint(0, 255, shape).astype(np.uint8))
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    mine = clip.normalize_pixels(clip8_data.resize_and_crop(image, 32)[None])[0]
    np.testing.assert_allclose(mine, ref, atol=1e-5)

  config = _config(setup, rule="ties")
  config.eval_baselines = False
  config.data.max_examples = 4
  clip8_run.merge_and_evaluate(config, tmp_path)
  model, info = transformers.CLIPVisionModel.from_pretrained(
    tmp_path / "merged", output_loading_info=True
  )
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  _, flax_params = pretrained.load_flax_model(tmp_path / "merged")
  expected = np.asarray(flax_params["post_layernorm"]["scale"])
  np.testing.assert_array_equal(model.post_layernorm.weight.detach().numpy(), expected)


def test_saved_hf_dataset_loads_like_the_image_folder(setup, tmp_path):
  datasets = pytest.importorskip("datasets")
  classes, _, _ = _TASKS["dtd"]
  folder = setup / "data" / "dtd" / "test"
  files = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).iterdir())]
  features = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}
  )
  table = features.encode_batch(
    {"image": [str(f) for f, _ in files], "label": [c for _, c in files]}
  )
  # An explicit fingerprint: hashing the dataset state trips a dill/pyarrow pickling bug in some
  # version combinations, and the test is about the saved layout, not about caching.
  ds = datasets.Dataset(
    datasets.table.InMemoryTable.from_pydict(table, schema=features.arrow_schema),
    info=datasets.DatasetInfo(features=features),
    fingerprint="clip_pipeline_test",
  )
  datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dtd"))

  from_hf = clip8_data.load_task_data(tmp_path / "dtd", "test", image_size=32)
  from_folder = clip8_data.load_task_data(setup / "data" / "dtd", "test", image_size=32)
  assert from_hf.classnames == classes
  np.testing.assert_array_equal(from_hf.labels, from_folder.labels)
  np.testing.assert_array_equal(from_hf.images, from_folder.images)
