"""What every learned method takes (`LearnProblem`) and returns (`LearnedMerge`), and the
caller-owned `CompileCache` that lets runs share compilations explicitly.

Conventions:

* `apply_fn(backbone_params, x, task_index) -> logits`: heads are closed over and frozen; only the
  backbone is merged. `task_index` is a Python int, so the training step holds one program per
  task (a `lax.switch`) and the evaluator compiles once per task. An apply_fn that also takes a
  traced int32 index (e.g. it picks its head from stacked heads with it) says so by being wrapped
  in `TracedTaskApply`: the step then runs one program for every task, which compiles in a
  fraction of the time.
* `base` (θ0) and `experts` are backbone parameter trees (plain nested dicts of arrays).
* `splits` maps "train", "validation", "test" to per-task dicts {"x": [n, ...], "y": [n]}. A
  method adapts on `splits[config.adapt_split]` and selects on "validation"; it reads "test"
  only when `config.adapt_split == "test"` (transductive, inputs only: unsupervised objectives
  never see "y"), and then its result says `transductive=True`.
"""

import dataclasses
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from mergejax.tree import Params

Batch = dict[str, jax.Array]
ApplyFn = Callable[[Params, jax.Array, int], jax.Array]
# x' = augment(key, x, view): view is "weak" or "strong" (a static string); jit-compatible.
Augment = Callable[[jax.Array, jax.Array, str], jax.Array]


@dataclasses.dataclass(frozen=True)
class TracedTaskApply:
  """An apply_fn whose task index may be a traced int32 scalar (not only a Python int).

  >>> import jax.numpy as jnp
  >>> heads = jnp.array([[1.0], [-1.0]])  # Two tasks' heads, stacked.
  >>> apply = TracedTaskApply(lambda params, x, task: x @ params + heads[task])
  >>> apply(jnp.ones((1, 1)), jnp.ones((2, 1)), 1).tolist()
  [[0.0], [0.0]]

  Attributes:
    fn: `logits = fn(params, x, task_index)`, valid for a traced `task_index`.
  """

  fn: Callable[[Params, jax.Array, Any], jax.Array]

  def __call__(self, params: Params, x: jax.Array, task: Any) -> jax.Array:
    return self.fn(params, x, task)


def traced_task(apply_fn: Callable[..., jax.Array]) -> bool:
  """Whether `apply_fn` takes a traced task index (it is a `TracedTaskApply`)."""
  return isinstance(apply_fn, TracedTaskApply)


class LearnProblem(NamedTuple):
  """A merging problem with data, as every learned method takes it.

  Attributes:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones, one per task (in the order of the data).
    splits: {"train"?, "validation", "test"?} -> per-task data dicts.
    reference_accuracy: per-task validation accuracy of the experts (normalized-accuracy
      selection); None selects on plain accuracy.
    augment: `augment(key, x, view)`, the weak and strong views of a batch of inputs, for
      objectives that need them (aTLAS's UFM); None if the problem has none.
  """

  apply_fn: ApplyFn
  base: Params
  experts: Sequence[Params]
  splits: Mapping[str, Sequence[Batch]]
  reference_accuracy: Sequence[float] | None = None
  augment: Augment | None = None


class LearnedMerge(NamedTuple):
  """What every learned method returns.

  Attributes:
    params: the merged backbone, selected on validation (never on test).
    coeffs: the selected coefficients (the parametrization's pytree; for DV-BASI, the list of
      each kept outer iteration's Λ).
    transductive: True when something was adapted on unlabeled *test* inputs; reports must say so.
    history: {"loss": [[step, loss], ...], "eval": [[step, metric, [task metrics]], ...]} (for
      DV-BASI, its last outer iteration's).
    selected: what a table prints as "selected on validation", e.g. {"best step": 120},
      {"steps": 500} (no validation in the recipe: the last step) or {"m*": 2}.
    extras: method-specific, JSON-friendly after `np.asarray(...).tolist()`: block names,
      effective and final coefficients, DV-BASI's trajectory and per-iteration histories, ...
  """

  params: Params
  coeffs: Any
  transductive: bool
  history: dict[str, list]
  selected: dict[str, Any]
  extras: dict[str, Any]


class CompileCache:
  """Jitted training steps and evaluators shared by the runs of one problem, keyed explicitly.

  jax.jit compiles once per function object and input shapes. Runs whose configs agree on
  everything a jitted function closes over can share it: the methods key each entry on those
  config values (never on object identities) and build it on a miss. Valid for one `apply_fn`
  and `augment`: make one cache per `LearnProblem`; drop it to free the compilations.

  >>> cache = CompileCache()
  >>> cache.get(("step", {"lr": 0.1}), lambda: "built")
  'built'
  >>> cache.get(("step", {"lr": 0.1}), lambda: "rebuilt"), len(cache)
  ('built', 1)
  """

  def __init__(self):
    self._entries: dict[Hashable, Any] = {}

  def get(self, key: Any, build: Callable[[], Any]) -> Any:
    """Returns the entry for `key` (any JSON-serializable value), building it on a miss."""
    canonical = json.dumps(key, sort_keys=True, default=_to_json)
    if canonical not in self._entries:
      self._entries[canonical] = build()
    return self._entries[canonical]

  def __len__(self) -> int:
    return len(self._entries)


def _to_json(value: Any) -> Any:
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    return value.to_dict()
  raise TypeError(f"Cache keys must be plain config values, got {type(value).__name__}.")
