"""Rule specs: each registered rule's hyper-parameters, defaults, valid values and static ones.

A rule is a pure function `fn(base, experts, *, **hparams)`. Registering it declares, for every
keyword-only hyper-parameter, an `HParam` (its kind, range or choices); defaults are read from the
function's signature, so each default lives in one place. Validation (`RuleSpec.validate`), the
split into static and traced values (`RuleSpec.split`), the merge configs (configs/merge.py) and
`hparams_of` all derive from the spec.

>>> from mergejax import task_vectors as tv
>>> def shrink(base, experts, *, scale=0.5):
...   return tv.apply(base, tv.add(*tv.task_vectors(base, experts)), scale)
>>> _ = register("shrink_demo", shrink, scale=SCALE)
>>> REGISTRY["shrink_demo"].defaults
{'scale': 0.5}
>>> REGISTRY["shrink_demo"].validate({"scale": "0.3"}, num_experts=1)
Traceback (most recent call last):
...
TypeError: shrink_demo: scale='0.3' is a str; expected a real number.
>>> del REGISTRY["shrink_demo"]
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("float", "int", "bool", "choice", "key", "per_expert")
_BOUNDS = ("[]", "(]", "[)", "()")


@dataclasses.dataclass(frozen=True)
class HParam:
  """What one hyper-parameter of a rule may be.

  Attributes:
    kind: "float" (a real number), "int" (an integer), "bool", "choice" (one of `choices`),
      "key" (a jax PRNG key; the rule is random), or "per_expert" (a real number, or one per
      expert).
    low: lower bound (None: unbounded); for "per_expert", of every value.
    high: upper bound (None: unbounded).
    bounds: which ends are closed: "[]", "(]", "[)" or "()".
    choices: the allowed values of a "choice".
    static: whether the value is a compile-time constant (`jax.jit` static). Default: choices
      and bools are static (they change the program); numbers are traced, so a sweep over them
      compiles once.
    optional: None is allowed (e.g. `weights=None` for equal weights).
  """

  kind: str
  low: float | None = None
  high: float | None = None
  bounds: str = "[]"
  choices: tuple[Any, ...] = ()
  static: bool | None = None
  optional: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"HParam kind must be one of {KINDS}, got {self.kind!r}.")
    if self.bounds not in _BOUNDS:
      raise ValueError(f"HParam bounds must be one of {_BOUNDS}, got {self.bounds!r}.")
    if self.kind == "choice" and not self.choices:
      raise ValueError("A 'choice' HParam needs choices.")

  @property
  def is_static(self) -> bool:
    return self.static if self.static is not None else self.kind in ("bool", "choice")

  def interval(self) -> str:
    lo = "-inf" if self.low is None else f"{self.low:g}"
    hi = "inf" if self.high is None else f"{self.high:g}"
    return f"{self.bounds[0]}{lo}, {hi}{self.bounds[1]}"

  def check(self, rule: str, name: str, value: Any, num_experts: int) -> None:
    """Raises TypeError / ValueError naming the rule, the value and what is allowed."""
    where = f"{rule}: {name}={value!r}"
    if value is None:
      if self.optional:
        return
      raise TypeError(f"{where} is None; pass a value (default: see rules.hparams_of({rule!r})).")
    if self.kind == "key":
      if not _is_key(value):
        raise TypeError(f"{where} is not a PRNG key; pass key=jax.random.key(seed).")
      return
    if self.kind == "bool":
      if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{where} is a {type(value).__name__}; expected True or False.")
      return
    if self.kind == "choice":
      if value not in self.choices:
        raise ValueError(f"{where} is not one of {list(self.choices)}.")
      return
    if _is_tracer(value):
      return  # Checked by whoever made it concrete.
    values = _numbers(where, value, self.kind, num_experts)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{where} is not finite.")
    if self.kind != "int" and np.any(np.abs(values) > np.finfo(np.float32).max):
      raise ValueError(f"{where} overflows float32, the dtype the rules compute in.")
    lo_ok = self.low is None or np.all(
      values > self.low if self.bounds[0] == "(" else values >= self.low
    )
    hi_ok = self.high is None or np.all(
      values < self.high if self.bounds[1] == ")" else values <= self.high
    )
    if not (lo_ok and hi_ok):
      raise ValueError(f"{where} is outside {self.interval()}.")


def _is_tracer(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _is_key(value: Any) -> bool:
  if _is_tracer(value):
    return True
  if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
    return value.shape == ()
  # Raw uint32 key data (the legacy jax.random.PRNGKey form).
  return isinstance(value, jax.Array | np.ndarray) and value.dtype == np.uint32 and value.ndim == 1


def _numbers(where: str, value: Any, kind: str, num_experts: int) -> np.ndarray:
  """The value as a float64 array, after type checks (a str or a bool is not a number)."""
  scalar_types = numbers.Integral if kind == "int" else numbers.Real
  expected = "an integer" if kind == "int" else "a real number"
  if kind == "per_expert" and isinstance(value, list | tuple):
    if len(value) != num_experts:
      raise ValueError(f"{where} has {len(value)} values; expected 1 or {num_experts} (experts).")
    for v in value:
      _numbers(where, v, "float", num_experts)
    return np.asarray(value, np.float64)
  if isinstance(value, bool | np.bool_ | str | bytes):
    raise TypeError(f"{where} is a {type(value).__name__}; expected {expected}.")
  if isinstance(value, jax.Array | np.ndarray):
    if value.dtype == bool or not np.issubdtype(value.dtype, np.number):
      raise TypeError(f"{where} has dtype {value.dtype}; expected {expected}.")
    if kind == "int" and not np.issubdtype(value.dtype, np.integer):
      raise TypeError(f"{where} has dtype {value.dtype}; expected {expected}.")
    allowed = ((), (num_experts,)) if kind == "per_expert" else ((),)
    if value.shape not in allowed:
      raise ValueError(f"{where} has shape {value.shape}; expected a scalar.")
    return np.asarray(value, np.float64)
  if not isinstance(value, scalar_types):
    raise TypeError(f"{where} is a {type(value).__name__}; expected {expected}.")
  return np.asarray(float(value), np.float64)


# Common hyper-parameters.
SCALE = HParam("float")  # λ: any finite real (negative λ subtracts).
FRACTION = HParam("float", 0.0, 1.0, "(]")  # A kept fraction, e.g. density.
RATE = HParam("float", 0.0, 1.0, "[)")  # A dropped fraction, e.g. Breadcrumbs' γ.
UNIT = HParam("float", 0.0, 1.0, "[]")  # An interpolation weight.
KEY = HParam("key")


def choice(*options: Any) -> HParam:
  """A static hyper-parameter taking one of `options`."""
  return HParam("choice", choices=tuple(options))


@dataclasses.dataclass(frozen=True)
class RuleSpec:
  """A registered rule.

  Attributes:
    name: key in `REGISTRY`.
    fn: the pure rule `fn(base, experts, **hparams)`.
    hparams: `{name: HParam}` for every keyword hyper-parameter of `fn`.
    defaults: `{name: default}` from `fn`'s signature (updated by the registration's
      `defaults`); "key" has none.
    prepare: optional host-side pre-pass `prepare(base, experts, **hparams) -> stats`, run
      outside jit on concrete CPU inputs (see `mergejax.selection.prefer_host`); its result goes
      to `with_stats`.
    with_stats: `with_stats(base, experts, stats, **hparams)`: `fn` given precomputed stats.
    stream_stats: optional out-of-core `prepare` for the streaming engine:
      `stream_stats(leaves, sizes, memory_budget=..., paths=..., **hparams) -> leaf_stats`, where
      `leaves()` starts a pass over the merged leaves in tree order (yielding `(base_leaf,
      [expert leaves])` as NumPy arrays), `sizes` are their entry counts, `paths` their "a/b/c"
      paths and `memory_budget` the bytes it may hold (the engine's); `leaf_stats(i)` is what
      `with_stats` takes for a tree holding leaf i alone. Rules without a `prepare` need none
      (`mergejax.streaming`).
    check: optional cross-parameter check `check(hparams, num_experts)` raising ValueError.
    min_experts / max_experts: how many experts the rule takes.
    statistics: set for data-dependent rules (Fisher merging, RegMean), whose `fn` takes the
      experts' statistics as a third positional argument, `fn(base, experts, statistics,
      **hparams)`: `statistics(base, selected, stats, hparams, num_experts)` validates the
      caller's statistics (one per expert) against the full `base` and the merged leaves
      `selected` ({"a/b/c": leaf}) on the host, and returns them restricted to those leaves.
    lapack: the rule runs LAPACK kernels (SVD, eigh); merges run it with one BLAS thread
      (`mergejax.lapack_threads`: XLA runs LAPACK calls concurrently on its own threads).
    row_split: optional `row_split(hparams, ndim) -> bool`: True when each output row (a slice
      along axis 0) reads only the same rows of the inputs (and the whole-model statistics), so
      the streaming engine may merge a leaf above its budget in blocks of rows (same bits).
    elementwise: optional `elementwise(hparams) -> bool`: True when each output entry reads only
      the same entry of the inputs (and whole-model statistics or sums, and `leaf_stats`), so the
      streaming engine may merge leaves as chunks of their flattened entries (`streaming.flat`:
      a few programs for any set of leaf shapes; same bits).
    leaf_stats: optional `leaf_stats(base_leaf, expert_leaves, **hparams) -> [{"x": array}]`:
      per expert, a NumPy array shaped like the leaf (one dtype for every leaf) as a one-leaf
      tree, what `with_stats` takes for a tree of that leaf alone, computed on the host where
      the engine merges a leaf in flat chunks: what the rule's program would compute across the
      leaf (Breadcrumbs' masks, DELLA's rank spreads within rows).
  """

  name: str
  fn: Callable[..., Any]
  hparams: Mapping[str, HParam]
  defaults: Mapping[str, Any]
  prepare: Callable[..., Any] | None = None
  with_stats: Callable[..., Any] | None = None
  check: Callable[[dict[str, Any], int], None] | None = None
  min_experts: int = 1
  max_experts: int | None = None
  stream_stats: Callable[..., Any] | None = None
  statistics: Callable[..., Any] | None = None
  lapack: bool = False
  row_split: Callable[[Mapping[str, Any], int], bool] | None = None
  elementwise: Callable[[Mapping[str, Any]], bool] | None = None
  leaf_stats: Callable[..., Any] | None = None

  def __call__(self, base: Any, experts: Any, *statistics: Any, **hparams: Any) -> Any:
    """Runs the rule with the registered defaults (no validation, no jit: see `rules.merge`).

    Data-dependent rules take their statistics as a third positional argument.
    """
    defaults = {k: v for k, v in self.defaults.items() if k not in hparams}
    return self.fn(base, experts, *statistics, **defaults, **hparams)

  @property
  def data_dependent(self) -> bool:
    """Whether the rule needs statistics computed from data (`rules.merge(statistics=...)`)."""
    return self.statistics is not None

  @property
  def is_random(self) -> bool:
    return any(h.kind == "key" and not h.optional for h in self.hparams.values())

  def validate(self, hparams: Mapping[str, Any], *, num_experts: int) -> dict[str, Any]:
    """Checks names, types and ranges; returns the complete hyper-parameters (defaults filled).

    Args:
      hparams: the caller's hyper-parameters.
      num_experts: T (for per-expert values and the rule's arity).

    Returns:
      {name: value} for every hyper-parameter of the rule.

    Raises:
      TypeError: unknown names, wrong types.
      ValueError: out-of-range values, a random rule without a key, wrong number of experts.
    """
    unknown = sorted(set(hparams) - set(self.hparams))
    if unknown:
      raise TypeError(
        f"Rule {self.name!r} has no hyper-parameter(s) {unknown}; it takes {sorted(self.hparams)}."
      )
    if self.min_experts == self.max_experts and num_experts != self.min_experts:
      raise ValueError(f"{self.name} takes exactly {self.min_experts} experts, got {num_experts}.")
    if num_experts < self.min_experts:
      raise ValueError(f"{self.name} needs at least {self.min_experts} experts, got {num_experts}.")
    if self.max_experts is not None and num_experts > self.max_experts:
      raise ValueError(f"{self.name} takes at most {self.max_experts} experts, got {num_experts}.")
    if self.is_random and hparams.get("key") is None:
      raise ValueError(f"Rule {self.name!r} is random: pass key=jax.random.key(seed).")
    full = {**self.defaults, **hparams}
    for name, spec in self.hparams.items():
      spec.check(self.name, name, full[name], num_experts)
    if self.check is not None:
      self.check(full, num_experts)
    return full

  def split(self, hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits validated hyper-parameters into (static, traced); traced numbers become arrays."""
    static, traced = {}, {}
    for name, value in hparams.items():
      h = self.hparams[name]
      if h.is_static or value is None:
        static[name] = value
      elif h.kind == "key":
        traced[name] = value
      else:
        traced[name] = jnp.asarray(value, jnp.int32 if h.kind == "int" else jnp.float32)
    return static, traced


REGISTRY: dict[str, RuleSpec] = {}


def register(
  name: str,
  fn: Callable[..., Any],
  *,
  defaults: Mapping[str, Any] | None = None,
  prepare: Callable[..., Any] | None = None,
  with_stats: Callable[..., Any] | None = None,
  check: Callable[[dict[str, Any], int], None] | None = None,
  min_experts: int = 1,
  max_experts: int | None = None,
  stream_stats: Callable[..., Any] | None = None,
  statistics: Callable[..., Any] | None = None,
  lapack: bool = False,
  row_split: Callable[[Mapping[str, Any], int], bool] | None = None,
  elementwise: Callable[[Mapping[str, Any]], bool] | None = None,
  leaf_stats: Callable[..., Any] | None = None,
  **hparams: HParam,
) -> RuleSpec:
  """Registers a rule: `fn` and one `HParam` per keyword-only hyper-parameter of `fn`.

  Args:
    name: key in `REGISTRY`.
    fn: pure `fn(base, experts, *, **hparams)`; defaults come from its signature.
    defaults: overrides of `fn`'s defaults (e.g. a variant rule).
    min_experts / max_experts: how many experts the rule accepts (max None: any number).
    prepare, with_stats (required with `prepare`), check, stream_stats and leaf_stats (need
      `with_stats`), statistics, lapack, row_split, elementwise: see `RuleSpec`.
    **hparams: `{name: HParam}`; must name exactly `fn`'s keyword-only parameters.

  Returns:
    The `RuleSpec` (also stored in `REGISTRY[name]`).
  """
  params = {
    p.name: p.default
    for p in inspect.signature(fn).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
  }
  if set(params) != set(hparams):
    raise TypeError(
      f"register({name!r}): declare exactly the keyword hyper-parameters of "
      f"{getattr(fn, '__name__', fn)}: missing {sorted(set(params) - set(hparams))}, "
      f"unexpected {sorted(set(hparams) - set(params))}."
    )
  merged_defaults = {k: v for k, v in params.items() if v is not inspect.Parameter.empty}
  merged_defaults.update(defaults or {})
  missing = [k for k in params if k not in merged_defaults and hparams[k].kind != "key"]
  if missing:
    raise TypeError(f"register({name!r}): hyper-parameters {missing} have no default.")
  if (prepare is None and leaf_stats is None) != (with_stats is None):
    raise TypeError(f"register({name!r}): with_stats= takes prepare='s or leaf_stats=' stats.")
  if (stream_stats is not None or leaf_stats is not None) and with_stats is None:
    raise TypeError(f"register({name!r}): stream_stats= / leaf_stats= feed with_stats=.")
  if statistics is not None and prepare is not None:
    raise TypeError(f"register({name!r}): a data-dependent rule takes no prepare= pre-pass.")
  spec = RuleSpec(
    name=name, fn=fn, hparams=dict(hparams), defaults=merged_defaults, prepare=prepare,
    with_stats=with_stats, check=check, min_experts=min_experts, max_experts=max_experts,
    stream_stats=stream_stats, statistics=statistics, lapack=lapack, row_split=row_split,
    elementwise=elementwise, leaf_stats=leaf_stats,
  )  # fmt: skip
  REGISTRY[name] = spec
  return spec


def get(rule_name: str) -> RuleSpec:
  """Returns the spec of a registered rule (KeyError listing the known ones otherwise)."""
  if rule_name not in REGISTRY:
    raise KeyError(f"Unknown rule {rule_name!r}; known rules: {sorted(REGISTRY)}.")
  return REGISTRY[rule_name]


def hparams_of(rule_name: str) -> dict[str, Any]:
  """Returns the hyper-parameters of a registered rule with their defaults.

  Args:
    rule_name: key of `REGISTRY`.

  Returns:
    {name: default}; a random rule's "key" maps to `inspect.Parameter.empty` (no default).
  """
  spec = get(rule_name)
  return {name: spec.defaults.get(name, inspect.Parameter.empty) for name in spec.hparams}


def add_key(rule_name: str, hparams: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """Returns `hparams` plus `key=jax.random.key(seed)` if the rule is random and has none.

  The one place that turns a run's seed into a rule's key (CLI, benchmarks, pipelines).

  Args:
    rule_name: key of `REGISTRY`.
    hparams: the rule's hyper-parameters.
    seed: the run's seed.

  Returns:
    A new dict.
  """
  out = dict(hparams)
  if get(rule_name).is_random and out.get("key") is None:
    out["key"] = jax.random.key(seed)
  return out
