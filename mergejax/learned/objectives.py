"""Objectives for learned merging: one scalar loss per task and batch, built from config.

`make(config.objective)` resolves `{"name": ..., **options}`: each objective owns its options (an
unknown one is an error), so the training loop never reads objective-specific fields. The loop
calls `objective.loss(forward, batch)` per task, where `forward(view=None)` runs the merged model
on `batch["x"]`, or on a "weak" / "strong" augmentation of it (the problem's `augment`), and sums
the per-task values (or combines their gradients with MGDA).

* "entropy": Shannon entropy of the predictions (AdaMerging; unlabeled inputs).
* "cross_entropy": supervised, on labeled batches (aTLAS, DV-BASI supervised).
* "ufm": aTLAS's unsupervised FixMatch (`learn_ufm.py` in fredzzhang/atlas): targets from the
  weak view, cross-entropy on the strong view, trusted samples, normalized by the number of
  confident samples. See `ufm`.
* "pseudo_label": cross-entropy against the model's own argmax on the *same* view where its
  confidence reaches `threshold`. Without a second view it only sharpens the model, like entropy
  minimization; kept to reproduce results from before `ufm` existed.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax import losses

Batch = dict[str, jax.Array]
Forward = Callable[..., jax.Array]  # forward(view=None) -> logits of the batch's inputs.
Predict = Callable[[int, np.ndarray], np.ndarray]  # predict(task, x) -> logits (host).
VIEWS = ("weak", "strong")
TRUSTED = ("top_k", "all")


class Objective(NamedTuple):
  """A per-task loss and what it needs from the data.

  Attributes:
    loss: `loss(forward, batch) -> scalar`, the mean over the batch (see the module docstring).
    needs_labels: batches must carry labels "y" (otherwise the loop drops them).
    needs_augment: the loss calls `forward("weak")` / `forward("strong")`, so the problem must
      supply `augment`.
    prepare: optional `prepare(predict, data) -> data`, run once before training with the
      initial merged model's logits (`predict(task, x)`); adds per-example fields the loss reads
      (e.g. UFM's pseudo-labels). Deterministic, so a resumed run prepares the same data.
  """

  loss: Callable[[Forward, Batch], jax.Array]
  needs_labels: bool = False
  needs_augment: bool = False
  prepare: Callable[[Predict, Sequence[Batch]], tuple[Batch, ...]] | None = None


def entropy() -> Objective:
  """Mean prediction entropy on unlabeled inputs (AdaMerging)."""
  return Objective(loss=lambda forward, batch: losses.entropy(forward()))


def cross_entropy() -> Objective:
  """Mean cross-entropy against the batch's labels (aTLAS and DV-BASI supervised)."""
  return Objective(
    loss=lambda forward, batch: losses.cross_entropy(forward(), batch["y"]), needs_labels=True
  )


def pseudo_label_cross_entropy(logits: jax.Array, *, threshold: float = 0.99) -> jax.Array:
  """Same-view pseudo-label loss: CE against the argmax where max-probability >= `threshold`.

  The pseudo-labels and the mask are targets (under `stop_gradient`). The masked sum is divided by
  the batch size, so a batch with no confident example gives zero loss and zero gradient.

  Args:
    logits: `[batch, classes]`.
    threshold: confidence an example needs to count.

  Returns:
    Scalar float32.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
  labels = jnp.argmax(probs, axis=-1)
  mask = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(mask * per_example) / logits.shape[0]


def pseudo_label(*, threshold: float = 0.99) -> Objective:
  """`pseudo_label_cross_entropy` on the plain inputs (no second view)."""
  threshold = float(threshold)
  return Objective(
    loss=lambda forward, batch: pseudo_label_cross_entropy(forward(), threshold=threshold)
  )


def trusted_samples(
  probs: np.ndarray, *, trusted: str = "top_k", trusted_fraction: float = 0.1, max_per_class=100
) -> np.ndarray:
  """UFM's trusted set: for each class c, the k examples with the highest probability of c.

  k = min(⌊n / C · trusted_fraction⌋, max_per_class), as in the reference (10% of an even share,
  at most 100). The union over classes is trusted; an example may be among class c's top k while
  its argmax is another class (its pseudo-label is still its argmax).

  Args:
    probs: `[n, C]` probabilities of the initial model.
    trusted: "top_k" (above), or "all": every example, which is what the reference script runs
      (it marks `trusted_bool[ids_c]`, the full sort order of the last class, not its top k).
    trusted_fraction: share of an even class size trusted per class.
    max_per_class: cap on k.

  Returns:
    Boolean `[n]`.
  """
  n, num_classes = probs.shape
  if trusted == "all":
    return np.ones(n, bool)
  if trusted != "top_k":
    raise ValueError(f"trusted must be one of {TRUSTED}, got {trusted!r}.")
  # The small epsilon keeps 0.1's binary rounding from flooring e.g. 30 * 0.1 to 2.
  k = min(int(n / num_classes * trusted_fraction + 1e-9), int(max_per_class))
  mask = np.zeros(n, bool)
  if k > 0:
    for c in range(num_classes):
      mask[np.argsort(probs[:, c], kind="stable")[n - k :]] = True
  return mask


def ufm_loss(
  weak_logits: jax.Array,
  strong_logits: jax.Array,
  pseudo_labels: jax.Array,
  trusted: jax.Array,
  *,
  threshold: float = 0.99,
) -> jax.Array:
  """aTLAS's unsupervised FixMatch loss on one batch.

  targets = one-hot(pseudo-label) for trusted examples, softmax(weak view) otherwise (no gradient);
  w = 1[max(targets) > threshold]; loss = Σ w · CE(strong view, targets) / Σ w (0 when Σ w = 0,
  where the reference would divide by zero). The reference's "temperature sharpening" multiplies
  the probabilities by 0.5 and renormalizes, which changes nothing, so it is left out.

  Args:
    weak_logits: `[batch, C]` on the weak view (targets; no gradient flows through them).
    strong_logits: `[batch, C]` on the strong view (the loss).
    pseudo_labels: int `[batch]`, the initial model's argmax.
    trusted: bool `[batch]`.
    threshold: confidence a target needs to count.

  Returns:
    Scalar float32.
  """
  num_classes = weak_logits.shape[-1]
  weak = jax.lax.stop_gradient(jax.nn.softmax(weak_logits.astype(jnp.float32), axis=-1))
  one_hot = jax.nn.one_hot(pseudo_labels, num_classes, dtype=jnp.float32)
  targets = jnp.where(trusted[:, None], one_hot, weak)
  weights = (jnp.max(targets, axis=-1) > threshold).astype(jnp.float32)
  log_p = jax.nn.log_softmax(strong_logits.astype(jnp.float32), axis=-1)
  per_example = -jnp.sum(targets * log_p, axis=-1)
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)


def ufm(
  *,
  threshold: float = 0.99,
  trusted: str = "top_k",
  trusted_fraction: float = 0.1,
  max_trusted_per_class: int = 100,
) -> Objective:
  """aTLAS unsupervised (UFM): pseudo-labels from a weak view, loss on a strong view.

  Before training, the initial merged model labels every adaptation input (plain view) and picks
  each class's trusted examples (`trusted_samples`). Each step then runs `ufm_loss` on the batch's
  weak and strong views. The reference also draws 3/4 of each batch from untrusted and 1/4 from
  trusted examples; here batches are uniform over the task's inputs.

  Args:
    threshold: confidence a target needs to count (strict >, as in the reference).
    trusted: "top_k" (default) or "all" (the reference script as it runs; see `trusted_samples`).
    trusted_fraction: see `trusted_samples`.
    max_trusted_per_class: see `trusted_samples`.

  Returns:
    The `Objective`.
  """
  threshold = float(threshold)
  if trusted not in TRUSTED:
    raise ValueError(f"trusted must be one of {TRUSTED}, got {trusted!r}.")

  def prepare(predict, data):
    out = []
    for task, task_data in enumerate(data):
      logits = np.asarray(predict(task, task_data["x"]), np.float32)
      probs = np.asarray(jax.nn.softmax(logits, axis=-1))
      mask = trusted_samples(
        probs,
        trusted=trusted,
        trusted_fraction=trusted_fraction,
        max_per_class=max_trusted_per_class,
      )
      labels = np.argmax(probs, axis=-1).astype(np.int32)
      out.append(dict(task_data, pseudo_label=jnp.asarray(labels), trusted=jnp.asarray(mask)))
    return tuple(out)

  def loss(forward, batch):
    weak, strong = forward("weak"), forward("strong")
    return ufm_loss(weak, strong, batch["pseudo_label"], batch["trusted"], threshold=threshold)

  return Objective(loss=loss, needs_augment=True, prepare=prepare)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
  "entropy": entropy,
  "cross_entropy": cross_entropy,
  "ufm": ufm,
  "pseudo_label": pseudo_label,
}


def make(spec: Mapping[str, Any]) -> Objective:
  """Builds the objective a config names: `{"name": ..., **its options}`.

  Args:
    spec: e.g. `config.objective`; `name` is a key of `OBJECTIVES`, the other fields are that
      objective's keyword options.

  Returns:
    The `Objective`.

  Raises:
    ValueError: for an unknown name or an option the objective does not take.
  """
  options = dict(spec)
  name = options.pop("name")
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective {name!r}: use one of {sorted(OBJECTIVES)}.")
  try:
    return OBJECTIVES[name](**options)
  except TypeError as e:
    raise ValueError(f"Objective {name!r} does not take options {sorted(options)}: {e}") from e
