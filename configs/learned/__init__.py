"""Learned-merging recipes: one config file per method (AdaMerging, aTLAS, DV-BASI, ...).

Every module here is a recipe: `get_config(arg)` returns a config whose `method` names an
algorithm in `mergejax.learned.METHODS`, with `label` (its row name in tables) and `table_rank`
(rows sort by it, then by module name). `adamerging.py` holds the defaults of every field; the
other recipes import a recipe and override only what differs. `recipes()` finds them, so a new
recipe file is a new row of the digits benchmark (configs/benchmark.py), with nothing else to edit.
"""

import importlib
import pkgutil
import types


def recipes(package: str = __name__) -> dict[str, types.ModuleType]:
  """Returns {module name: recipe module} for every module of a package, in table order.

  Args:
    package: the package to search (this one by default); modules named "_*" are skipped.

  Returns:
    The recipes, ordered by (`table_rank`, module name).
  """
  path = importlib.import_module(package).__path__
  modules = {
    info.name: importlib.import_module(f"{package}.{info.name}")
    for info in pkgutil.iter_modules(path)
    if not info.name.startswith("_")
  }
  rank = {name: module.get_config("runlocal").table_rank for name, module in modules.items()}
  return {name: modules[name] for name in sorted(modules, key=lambda n: (rank[n], n))}
