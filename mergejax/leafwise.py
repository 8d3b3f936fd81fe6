"""What lets a rule run one leaf at a time: whole-model sums and leaf keys folded in advance.

**Whole-model sums.**
A rule that needs a statistic of the whole model (TIES's election fallback sums the score over all
leaves, EMR's rescalers are ratios of sums of |τ| over all leaves) writes it as
`leafwise.total(partial)`, `partial` being the sum over the leaves of the tree it was given. In an
ordinary call that tree is the whole model and `total` is the identity. The streaming engine
(`mergejax.streaming`) runs a rule on one leaf at a time: it first traces the rule under
`recording`, which collects each call's per-leaf partial and hands back a placeholder; it sums
the partials over all leaves in a statistics pass; then it runs the rule again under
`substituting`, which hands each call its whole-model value. Calls are told apart by their order,
which is the same on every leaf (a rule calls `total` on trees, never per leaf).

**Signs of sums.** A rule that needs only the sign of a whole-model sum (TIES's election fallback)
writes `leafwise.total_is_negative(partial, relevant)`, `relevant` saying whether this tree's
result depends on the answer. The engine then guesses "not negative" and merges each leaf in the
statistics pass itself, keeping the result unless the sum turns out negative and the leaf's
`relevant` flag is set: one pass over the inputs instead of two.

**Folded keys.** Random rules draw one key per (expert, leaf path) (`sparsify.leaf_key`). The
engine runs a rule on `{"x": leaf}`, so that one executable serves every leaf of a shape, and
passes that leaf's keys in as data: a `FoldedKeys` given as the rule's `key`.

**Flat chunks.** Where each output entry reads only the same entry of the inputs, a leaf may be
merged as chunks of its flattened entries (`flat_chunk`'s few padded sizes): the same bits, and a
few compiled programs for any set of leaf shapes. A chunk's `FoldedKeys.offset` is its first
entry's flat index, so a random rule draws the leaf's own uniforms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax

_STATE = threading.local()

LARGE_CHUNK = 1 << 20  # Entries per chunk of leaves of 4 chunks or more (4 MiB per float32 input).
SMALL_CHUNK = 1 << 16  # The most for the others.


def flat_chunk(n: int) -> int:
  """Entries per chunk of a flattened leaf of n entries, its last chunk padded to it: 4^6, 4^7 or
  4^8 (a few programs cover every leaf, with little padding for ViT-sized leaves), LARGE_CHUNK for
  leaves of 4 of those or more (fewer calls)."""
  if n >= 4 * LARGE_CHUNK:
    return LARGE_CHUNK
  return min(SMALL_CHUNK, 4 ** max(6, -(-(n - 1).bit_length() // 2)))


def flat_pieces(n: int) -> list[tuple[int, int, int]]:
  """`(start, entries, padded entries)` of each chunk of a flattened leaf of n entries."""
  chunk = flat_chunk(n)
  return [(start, min(chunk, n - start), chunk) for start in range(0, n, chunk)]


class _Context:
  def __init__(self, values: Sequence[Any] | None):
    self.values = values  # None: recording.
    self.partials: list[jax.Array] = []
    # Per call: None for `total`; for `total_is_negative`, whether the tree's result depends on it.
    self.relevant: list[jax.Array | None] = []

  def visit(self, partial: jax.Array, relevant: jax.Array | None = None) -> jax.Array:
    i = len(self.partials)
    self.partials.append(partial)
    self.relevant.append(relevant)
    if self.values is None:
      return partial
    if i >= len(self.values):
      raise RuntimeError(
        f"whole_model.total called {i + 1} times, but the statistics pass saw {len(self.values)} "
        "calls: a rule must make the same calls on every leaf."
      )
    return self.values[i]


def total(partial: jax.Array) -> jax.Array:
  """The whole model's value of a sum over leaves, given the sum over this tree's leaves.

  Args:
    partial: a float32 scalar, the sum over the leaves of the tree at hand.

  Returns:
    `partial` itself outside the streaming engine; inside it, the sum over every leaf.
  """
  ctx = getattr(_STATE, "ctx", None)
  return partial if ctx is None else ctx.visit(partial)


def total_is_negative(partial: jax.Array, relevant: jax.Array) -> jax.Array:
  """Whether the whole model's value of a sum over leaves is negative (see `total`).

  Args:
    partial: a float32 scalar, the sum over the leaves of the tree at hand.
    relevant: a boolean scalar, False if this tree's result is the same whatever the answer
      (the streaming engine then keeps a result computed before the whole-model sum is known).

  Returns:
    A boolean scalar.
  """
  ctx = getattr(_STATE, "ctx", None)
  return (partial if ctx is None else ctx.visit(partial, relevant)) < 0


@contextlib.contextmanager
def _use(ctx: _Context) -> Iterator[_Context]:
  previous = getattr(_STATE, "ctx", None)
  _STATE.ctx = ctx
  try:
    yield ctx
  finally:
    _STATE.ctx = previous


def recording() -> contextlib.AbstractContextManager[_Context]:
  """Within: `total` records each partial (in `ctx.partials`) and returns it unchanged."""
  return _use(_Context(None))


def substituting(values: Sequence[Any]) -> contextlib.AbstractContextManager[_Context]:
  """Within: the i-th call of `total` returns `values[i]` (partials still recorded)."""
  return _use(_Context(values))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FoldedKeys:
  """Leaf keys folded in advance: `data[t, i]` holds `sparsify.leaf_key_data`'s words for expert
  t and leaf i of the tree the rule is given. Not a jax key: a rule that uses its key any other
  way than through `sparsify` fails loudly instead of drawing other masks."""

  data: jax.Array  # uint32 [T, L, W].
  # Flat index of the leaf's first entry: a chunk of a flattened leaf draws the leaf's uniforms.
  offset: jax.Array | None = None
