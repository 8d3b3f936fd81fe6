"""The streaming merge engine: any registered rule, one leaf at a time, within a memory budget.

`StreamingMerge` merges models whose leaves are memory-mapped (or any arrays) without ever
holding more than a budget of working memory, and gives the same bits as `rules.merge`:

* **One executable per distinct leaf signature.** The rule runs on `{"x": leaf}` trees under
  `jax.jit`, compiled ahead of time once per (rule, static options, leaf shape and dtypes) and
  kept in a process-wide cache, so compile time depends on the number of distinct shapes, not of
  leaves. Random rules get their per-leaf keys as data (`leafwise.FoldedKeys`), the same keys as a
  whole-tree call. The finite checks ride along as in `rules.merge`. Elementwise rules
  (`RuleSpec.elementwise`) merge leaves below 4M entries as chunks of their flattened entries, of
  a few padded sizes (`flat`): a few executables for any set of leaf shapes. Breadcrumbs and DELLA
  too, given their per-row statistics computed on the host first (`RuleSpec.leaf_stats`).
* **Memory.** XLA's own accounting of each executable (arguments, output, temporaries) is the
  leaf's working set; leaves are dispatched in groups whose working sets fit the budget (the
  group's results wait for the writer, the next group is dispatched when they are taken). A leaf
  whose working set exceeds the budget is merged in blocks of rows when the rule allows it
  (`blocks`, `RuleSpec.row_split`), else fails in the constructor, before anything is written.
* **Whole-model statistics** take passes of their own before the apply pass: the sums a rule
  writes as `leafwise.total` (TIES's election fallback, EMR's rescalers), in as many rounds as
  they depend on each other (found from the rule's jaxpr), summed in the order a whole-tree call
  sums them; and a rule's `stream_stats` hook for statistics that are not sums (TIES's model-wide
  top-k threshold, `streaming_topk.StreamingTopK`; DARE-TIES's, on its dropped vectors,
  `rules.dare_trim`). Sums asked only for their sign (`leafwise.total_is_negative`), and sums
  that need only those, take one speculative pass (`statistics.speculative_pass`), which also
  merges the leaves when every sum is a sign.
* **Leaf locality is checked, not assumed.** A rule without `stream_stats` is traced on two
  leaves; if an output leaf depends on another leaf's inputs other than through `leafwise.total`,
  the rule cannot stream and the engine says so (`StreamingMerge.reason`) and merges in memory.

Outputs are pulled leaf by leaf (`lazy_outputs`: array-likes that compute on `np.asarray`; a leaf
merged in flat chunks also comes as its chunks, `LazyLeaf.pieces`, which the safetensors writer
writes one after the other), so any writer streams them; `mergejax.run` writes them into shards as
they complete, under the run's one commit point.

With `mesh=`, each group's leaves are split over the devices (and hosts) of a mesh and every
per-leaf program runs SPMD with the single-device bits (`mergejax.distributed.spmd`): partitioned,
or on one leaf gathered onto one device when its result depends on sums over the leaf.
"""

from mergejax.streaming.engine import StreamingMerge
from mergejax.streaming.programs import (
  BUDGET_FRACTION,
  LazyLeaf,
  Timings,
  default_budget_bytes,
  enable_compile_cache,
)

__all__ = [
  "BUDGET_FRACTION",
  "LazyLeaf",
  "StreamingMerge",
  "Timings",
  "default_budget_bytes",
  "enable_compile_cache",
]
