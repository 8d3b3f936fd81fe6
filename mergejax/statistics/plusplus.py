"""RegMean++'s statistics: each layer's Gram matrices with the layers below already merged.

RegMean computes every expert's Gram matrices from the expert's own forward pass. RegMean++
(Nguyen et al., 2025; the authors' code is FusionBench's `RegMeanAlgorithmPlusPlus`) merges the
model block by block in forward order, and computes block l's Gram matrices for task t by running
task t's examples through the *merged* blocks below l and through expert t's own block l:
1. every leaf outside the blocks (embeddings, the stem's norms; everything not yet merged) is the
   experts' mean, as RegMean leaves it (FusionBench: `merge_embedding_layer`);
2. for each block in forward order and each task t, the model with the blocks below merged,
   block l taken from expert t, gives block l's linear layers' inputs on task t's examples; the
   block's kernels are then merged by RegMean's closed form (α as given), its other leaves by
   the mean, and the next block reads the merged block's outputs.
The merged model is then `rules.merge("regmean_plusplus", base, experts, statistics=...)`: the
same closed form on these Gram matrices.

Blocks. Leaves are grouped by `blocks`: by default the path prefix up to the first component
named `layers_<i>`, `layer_<i>`, `blocks_<i>` or `block_<i>` (CLIP's `encoder/layers_3`, BERT's
`encoder/layer_3`, the ViT's and ResMLP's `block_3`); a linear layer outside any block is a block
of its own (its module: a plain MLP is merged layer by layer). Blocks run in the order their
first linear layer is called. Each step runs the whole forward pass, but only the Gram matrices
of the block at hand are outputs, so XLA drops everything above it: the cost is that of L(L+1)/2
block passes per example for L blocks (FusionBench caches each block's inputs instead: L passes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree as tree_lib
from mergejax.rules.regmean import regmean_solve
from mergejax.statistics import batches as batches_lib
from mergejax.statistics import grams as grams_lib
from mergejax.tree import Params, to_compute

_BLOCK = re.compile(r"^((?:.*?/)?(?:layers?|blocks?)_\d+)(?:/|$)")


def _block_of(path: str, blocks: Any) -> str | None:
  if callable(blocks):
    return blocks(path)
  pattern = _BLOCK if blocks is None else re.compile(blocks)
  match = pattern.match(path)
  return match.group(1) if match else None


def _module(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def block_plan(
  kernels: Sequence[str], paths: Sequence[str], blocks: Any = None
) -> tuple[list[str], dict[str, str | None], dict[str, str]]:
  """Groups leaves into blocks.

  Args:
    kernels: the linear layers' kernel paths, in forward order.
    paths: every leaf path.
    blocks: None (the default pattern), a regex whose first group, matched at the start of a
      leaf path, names the block, or a callable `path -> block name | None`.

  Returns:
    (the blocks in forward order, {leaf path: its block or None}, {kernel path: its block}).

  >>> order, leaves, _ = block_plan(["block_0/fc/kernel", "head/kernel"],
  ...                               ["block_0/fc/kernel", "block_0/ln/scale", "head/kernel"])
  >>> order, leaves["block_0/ln/scale"]
  (['block_0', 'head'], 'block_0')
  """
  kernel_block = {k: _block_of(k, blocks) or _module(k) for k in kernels}
  singletons = {kernel_block[k] for k in kernels if _block_of(k, blocks) is None}
  leaf_block: dict[str, str | None] = {}
  for p in paths:
    block = _block_of(p, blocks)
    if block is None and _module(p) in singletons:
      block = _module(p)
    leaf_block[p] = block
  return list(dict.fromkeys(kernel_block[k] for k in kernels)), leaf_block, kernel_block


def _mean(leaves: Sequence[Any]) -> Any:
  if not tree_lib.is_float(leaves[0]):
    return leaves[0]
  # The expression `rules.regmean` uses for the leaves it averages.
  return (sum(to_compute(x) for x in leaves) / len(leaves)).astype(leaves[0].dtype)


def regmean_plusplus_statistics(
  apply_fn: Callable[[Params, jax.Array], Any] | Sequence[Callable[[Params, jax.Array], Any]],
  experts: Sequence[Params],
  batches: Sequence[Any],
  *,
  alpha: float = 0.95,
  blocks: Any = None,
  max_examples: int | None = None,
) -> list[dict[str, Any]]:
  """Computes RegMean++'s Gram matrices, merging block by block (see the module docstring).

  Args:
    apply_fn: `apply_fn(params, x)` running a flax linen model, or one per task (e.g. with the
      task's frozen head); its output is not used.
    experts: the experts' parameters (the trees to be merged), one per task.
    batches: one iterable of batches per task (see `mergejax.statistics.batches`); each is read
      once and kept, then reused for every block.
    alpha: RegMean's off-diagonal scale, used for the merges of the lower blocks (0.95:
      FusionBench's RegMean++ config); merge with the same α.
    blocks: how leaves group into blocks (see `block_plan`).
    max_examples: per task, stop before a batch once this many examples were taken (FusionBench
      uses 256); None takes every batch.

  Returns:
    One dict per expert: {"grams": tree of [d_in, d_in] float32 matrices at the kernel paths,
    "alpha": float32 scalar}.

  Raises:
    ValueError: mismatched inputs, no batches, or no linear layer found.
  """
  num = len(experts)
  apply_fns = list(apply_fn) if isinstance(apply_fn, Sequence) else [apply_fn] * num
  if len(apply_fns) != num or len(batches) != num:
    raise ValueError(
      f"regmean_plusplus_statistics: {num} experts need as many batch iterables and apply_fns; "
      f"got {len(batches)} and {len(apply_fns)}."
    )
  tree_lib.check_compatible(
    experts[0],
    list(experts[1:]),
    reference_name="experts[0]",
    other_names=[f"experts[{t}]" for t in range(1, num)],
  )
  task_batches = [list(batches_lib.take(b, max_examples)) for b in batches]
  for t, b in enumerate(task_batches):
    if not b:
      raise ValueError(f"regmean_plusplus_statistics: task {t} has no batch of examples.")

  # 1. The plan: linear layers in forward order, grouped into blocks; everything starts averaged.
  treedef = jax.tree.structure(experts[0])
  flats = [tree_lib.flatten(e) for e in experts]
  paths = list(flats[0])
  first_x = jnp.asarray(batches_lib.unpack(task_batches[0][0])[0])
  kernels = grams_lib.linear_layers(apply_fns[0], experts[0], first_x)
  if not kernels:
    raise grams_lib.no_layer_error("regmean_plusplus_statistics")
  order, leaf_block, kernel_block = block_plan(kernels, paths, blocks)
  merged = {p: _mean([f[p] for f in flats]) for p in paths}
  solve = jax.jit(regmean_solve)
  alpha32 = jnp.float32(alpha)
  stats: list[dict[str, Any]] = [{} for _ in range(num)]

  # 2. Block by block: capture with the blocks below merged and expert t's own block, then merge.
  for block in order:
    block_kernels = [k for k in kernels if kernel_block[k] == block]
    task_grams = []
    for t in range(num):
      hybrid = [flats[t][p] if leaf_block[p] == block else merged[p] for p in paths]
      # One executable per (apply_fn, block): the same for every task that shares apply_fn.
      fn = grams_lib.gram_fn(apply_fns[t], block_kernels)
      grams = grams_lib.accumulate_grams(fn, jax.tree.unflatten(treedef, hybrid), task_batches[t])
      missing = [k for k in block_kernels if k not in grams]
      if missing:
        raise ValueError(
          f"regmean_plusplus_statistics: layer(s) {missing} did not run on task {t}'s inputs."
        )
      task_grams.append(grams)
    for k in block_kernels:
      gram_list = [g[k] for g in task_grams]
      solved = solve(gram_list, [f[k] for f in flats], alpha32)
      merged[k] = solved.astype(flats[0][k].dtype)
      for t in range(num):
        stats[t][k] = gram_list[t]

  return [
    {"grams": tree_lib.unflatten({p: s[p] for p in paths if p in s}), "alpha": alpha32}
    for s in stats
  ]
