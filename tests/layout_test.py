"""The layout the README's table describes: the merging library stands apart from the benchmarks,
and no library module outgrows one reading."""

import ast
import pathlib
import subprocess
import sys

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mergejax"
_BENCHMARK_WORLD = ("sklearn", "matplotlib", "mergejax.benchmarks")


def test_the_merging_library_imports_no_benchmark_world():
  code = (
    "import sys; import mergejax.rules, mergejax.learned, mergejax.run, mergejax.io.hf; "
    f"print(sorted(m for m in sys.modules if m.startswith({_BENCHMARK_WORLD!r})))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_imports_point_down_from_the_library_to_nothing_in_benchmarks():
  offenders = []
  for path in _PACKAGE.rglob("*.py"):
    if "benchmarks" in path.relative_to(_PACKAGE).parts:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      offenders += [f"{path.name}: {n}" for n in names if n.startswith(_BENCHMARK_WORLD)]
  assert not offenders


def test_no_library_module_is_over_400_lines():
  long = {
    str(p.relative_to(_PACKAGE)): n
    for p in _PACKAGE.rglob("*.py")
    if (n := len(p.read_text().splitlines())) > 400
  }
  assert not long, f"split these modules: {long}"
